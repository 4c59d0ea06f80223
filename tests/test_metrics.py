"""Retrieval metrics against hand-computed cases; the arithmetic is in the comments."""

import math

import pytest

from mmsearch.metrics import (
    average_precision_at_k,
    first_relevant_rank,
    hit_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    reciprocal_rank,
    summarize,
)

# Relevant items sit at ranks 2 and 4; "z" is relevant but never retrieved.
RANKED = ["a", "b", "c", "d", "e"]
RELEVANT = {"b", "d", "z"}


def test_recall_is_share_of_relevant_found():
    assert recall_at_k(RANKED, RELEVANT, 1) == 0.0  # top1 {a}: 0/3
    assert recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 3)  # {a,b}: 1/3
    assert recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)  # b,d found, z not: 2/3


def test_hit_is_any_relevant_in_top_k():
    assert hit_at_k(RANKED, RELEVANT, 1) == 0.0
    assert hit_at_k(RANKED, RELEVANT, 2) == 1.0  # b at rank 2
    # The two recalls differ as soon as there are several relevant items.
    assert hit_at_k(RANKED, RELEVANT, 5) == 1.0 and recall_at_k(RANKED, RELEVANT, 5) < 1.0


def test_precision_divides_by_k():
    assert precision_at_k(RANKED, RELEVANT, 2) == 0.5  # {a,b}: 1/2
    assert precision_at_k(RANKED, RELEVANT, 4) == 0.5  # {a,b,c,d}: 2/4
    assert precision_at_k(RANKED, RELEVANT, 10) == pytest.approx(0.2)  # 2 hits / 10, list of 5


def test_average_precision():
    # P@2 = 1/2 at b, P@4 = 2/4 at d; normaliser min(|rel|=3, k=5) = 3 -> (0.5 + 0.5) / 3
    assert average_precision_at_k(RANKED, RELEVANT, 5) == pytest.approx(1 / 3)
    # k=2: only b counts, P@2 = 1/2; normaliser min(3, 2) = 2 -> 0.5 / 2
    assert average_precision_at_k(RANKED, RELEVANT, 2) == pytest.approx(0.25)
    # everything relevant at the top: (1/1 + 2/2) / 2 = 1
    assert average_precision_at_k(["x", "y", "q"], {"x", "y"}, 3) == 1.0


def test_ndcg_binary():
    # DCG = 1/log2(3) + 1/log2(5) (ranks 2 and 4); ideal: min(3, 5) = 3 hits at ranks 1..3
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(["x", "y"], {"x"}, 5) == 1.0


def test_ndcg_graded_gains():
    # gains b=3, d=1, z defaults to 1: DCG = 3/log2(3) + 1/log2(5); ideal sorted 3,1,1 at ranks 1..3
    gains = {"b": 3.0, "d": 1.0, "c": 9.0}  # c is not relevant: its gain is ignored
    dcg = 3 / math.log2(3) + 1 / math.log2(5)
    ideal = 3 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RANKED, RELEVANT, 5, gains=gains) == pytest.approx(dcg / ideal)


def test_reciprocal_rank():
    assert reciprocal_rank(RANKED, RELEVANT) == 0.5  # first hit b at rank 2
    assert reciprocal_rank(RANKED, {"e"}) == pytest.approx(0.2)
    assert reciprocal_rank(RANKED, {"nope"}) == 0.0


def test_no_relevant_scores_zero_everywhere():
    for metric in (recall_at_k, hit_at_k, precision_at_k, average_precision_at_k, ndcg_at_k):
        assert metric(RANKED, set(), 3) == 0.0
    assert reciprocal_rank(RANKED, []) == 0.0


def test_k_larger_than_list_and_empty_list():
    assert recall_at_k(["a"], {"a"}, 100) == 1.0
    assert average_precision_at_k(["a"], {"a", "b"}, 100) == 0.5  # (1/1) / min(2, 100)
    assert recall_at_k([], {"a"}, 3) == 0.0
    assert ndcg_at_k([], {"a"}, 3) == 0.0


def test_duplicates_in_ranking_count_once():
    ranked = ["b", "b", "b", "d"]  # distinct list is [b, d]
    assert precision_at_k(ranked, {"b", "d"}, 2) == 1.0  # top-2 distinct {b, d}: 2/2, not 2 copies of b
    assert recall_at_k(ranked, {"b"}, 3) == 1.0  # not 3/1
    assert average_precision_at_k(ranked, {"b", "d"}, 2) == 1.0  # (1/1 + 2/2) / 2
    assert first_relevant_rank(["a", "a", "d"], {"d"}) == 2


def test_bad_k_is_rejected():
    with pytest.raises(ValueError):
        recall_at_k(RANKED, RELEVANT, 0)
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_means_and_curve():
    runs = [
        (["a", "b", "c"], {"a"}),  # first hit at rank 1
        (["a", "b", "c"], {"c"}),  # first hit at rank 3
        (["a", "b", "c"], {"x"}),  # no hit
        (["a", "b", "c"], {"b", "c"}),  # first hit at rank 2
    ]
    summary = summarize(runs, ks=(1, 2, 3))
    assert summary["queries"] == 4
    assert summary["R@1"] == 0.25  # only query 1
    assert summary["R@2"] == 0.5  # queries 1 and 4
    assert summary["R@3"] == 0.75  # queries 1, 2, 4
    assert summary["curve"] == {1: 0.25, 2: 0.5, 3: 0.75}
    assert summary["MRR"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    assert summary["P@3"] == pytest.approx((1 / 3 + 1 / 3 + 0 + 2 / 3) / 4)
    # AP@3: q1 1/1 / 1 = 1; q2 (1/3) / 1; q3 0; q4 (1/2 + 2/3) / 2
    assert summary["mAP@3"] == pytest.approx((1 + 1 / 3 + 0 + (1 / 2 + 2 / 3) / 2) / 4)
    q4_ndcg = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert summary["nDCG@3"] == pytest.approx((1 + 1 / math.log2(4) + 0 + q4_ndcg) / 4)


def test_summarize_default_keys():
    summary = summarize([(list(range(20)), {4})])
    assert {"R@1", "R@5", "R@10", "P@10", "mAP@10", "nDCG@10", "MRR", "curve", "queries"} <= set(summary)
    assert list(summary["curve"]) == list(range(1, 11))
    assert summary["R@5"] == 1.0 and summary["R@1"] == 0.0  # item 4 sits at rank 5
