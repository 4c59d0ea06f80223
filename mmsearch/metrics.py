"""Exact retrieval metrics for one ranked list, and their means over a set of queries.

Two different things are called "recall@K" in the literature, and they are both here:

* `recall_at_k` is the standard IR recall: the share of a query's relevant items found in the top K.
* `hit_at_k` is 1 if at least one relevant item is in the top K, else 0. Its mean over queries is
  the "R@K" reported by CLIP and the image-text retrieval papers (Flickr30k / COCO Karpathy test
  protocol): with 5 captions per image, text->image has one relevant image and image->text counts
  a hit when any of the 5 captions is retrieved. `summarize` reports this one as "R@K".

Conventions shared by every function:

* `ranked` is best first. A repeated item counts once, at its first position, and later copies are
  dropped before the list is cut at K, so the top K holds K distinct items (or fewer).
* K larger than the list is fine: the list is simply shorter than K (precision still divides by K).
* A query with no relevant item scores 0 everywhere rather than NaN, so means stay defined.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Run = tuple[Sequence[Hashable], Collection[Hashable]]


def _distinct(ranked: Iterable[Hashable]) -> list[Hashable]:
    """First occurrence of every item, order kept."""
    return list(dict.fromkeys(ranked))


def _top_k(ranked: Sequence[Hashable], k: int) -> list[Hashable]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _distinct(ranked)[:k]


def recall_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Standard IR recall: |relevant ∩ top-K| / |relevant|."""
    relevant = set(relevant)
    top = _top_k(ranked, k)
    if not relevant:
        return 0.0
    return sum(item in relevant for item in top) / len(relevant)


def hit_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """1.0 when any relevant item is in the top K: the per-query "R@K" of CLIP retrieval papers."""
    relevant = set(relevant)
    return float(any(item in relevant for item in _top_k(ranked, k)))


def precision_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """|relevant ∩ top-K| / K (K, not the list length: a short list is not rewarded)."""
    relevant = set(relevant)
    return sum(item in relevant for item in _top_k(ranked, k)) / k


def average_precision_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """AP@K = (1 / min(|relevant|, K)) * sum over i <= K of P@i * rel_i."""
    relevant = set(relevant)
    top = _top_k(ranked, k)
    if not relevant:
        return 0.0
    hits = 0
    total = 0.0
    for position, item in enumerate(top, start=1):
        if item in relevant:
            hits += 1
            total += hits / position
    return total / min(len(relevant), k)


def ndcg_at_k(
    ranked: Sequence[Hashable],
    relevant: Collection[Hashable],
    k: int,
    gains: Mapping[Hashable, float] | None = None,
) -> float:
    """nDCG@K with discount 1/log2(i + 1) for position i (1-based).

    Gains are binary by default. With `gains`, a relevant item's gain is gains[item] (1.0 when it is
    not in the mapping) and an item outside `relevant` gains 0 whatever the mapping says, so
    `relevant` alone decides what counts. The ideal DCG puts the min(|relevant|, K) largest gains
    first.
    """
    relevant = set(relevant)
    top = _top_k(ranked, k)
    gain_of = {item: float(gains.get(item, 1.0)) if gains else 1.0 for item in relevant}
    ideal_gains = sorted(gain_of.values(), reverse=True)[:k]
    ideal = _dcg(ideal_gains)
    if ideal <= 0:
        return 0.0
    return _dcg([gain_of.get(item, 0.0) for item in top]) / ideal


def _dcg(gains_in_rank_order: Sequence[float]) -> float:
    return sum(gain / math.log2(position + 1) for position, gain in enumerate(gains_in_rank_order, start=1))


def first_relevant_rank(ranked: Sequence[Hashable], relevant: Collection[Hashable]) -> int | None:
    """1-based rank of the first relevant item among distinct items, None when none is ranked."""
    relevant = set(relevant)
    for position, item in enumerate(_distinct(ranked), start=1):
        if item in relevant:
            return position
    return None


def reciprocal_rank(ranked: Sequence[Hashable], relevant: Collection[Hashable]) -> float:
    """1 / rank of the first relevant item; 0 when no relevant item is ranked."""
    rank = first_relevant_rank(ranked, relevant)
    return 0.0 if rank is None else 1.0 / rank


def summarize(runs: Sequence[Run], ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Means over queries; each run is (ranked list, relevant items) for one query.

    Keys: "R@K" for K in ks (hit rate, CLIP-paper R@K, see the module docstring); with M = max(ks):
    "P@M", "mAP@M", "nDCG@M", "MRR"; "curve": {K: hit rate for K in 1..M} for recall@K plots;
    "queries": the number of queries.
    """
    if not runs:
        raise ValueError("summarize needs at least one query")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty positive ranks, got {ks}")
    max_k = max(ks)
    # A query's hit@K for every K follows from its first relevant rank: compute that once.
    first_ranks = np.array([first_relevant_rank(r, rel) or np.inf for r, rel in runs], dtype=float)
    curve = {k: float(np.mean(first_ranks <= k)) for k in range(1, max_k + 1)}
    summary: dict[str, Any] = {f"R@{k}": curve[k] for k in ks}
    summary[f"P@{max_k}"] = _mean(precision_at_k(r, rel, max_k) for r, rel in runs)
    summary[f"mAP@{max_k}"] = _mean(average_precision_at_k(r, rel, max_k) for r, rel in runs)
    summary[f"nDCG@{max_k}"] = _mean(ndcg_at_k(r, rel, max_k) for r, rel in runs)
    summary["MRR"] = float(np.mean(np.where(np.isfinite(first_ranks), 1.0 / first_ranks, 0.0)))
    summary["curve"] = curve
    summary["queries"] = len(runs)
    return summary


def _mean(values: Iterable[float]) -> float:
    return float(np.mean(np.fromiter(values, dtype=float)))
