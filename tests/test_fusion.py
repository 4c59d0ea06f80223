"""Hand-computed checks of mmsearch.fusion: attention over modalities and query parts."""

import json
import math

import numpy as np
import pytest

from mmsearch.fusion import (
    FusionParams,
    attention_fuse,
    explain,
    fit_taus,
    fuse_similarities,
    one_part_one_modality,
    sum_fuse_query,
    sum_score,
)

D = 4
E = np.eye(D)  # orthonormal axes: cosine similarities by construction
BOTH = [True, True]


def unit(*coords):
    v = np.asarray(coords, dtype=np.float64)
    return v / np.linalg.norm(v)


def items(*pairs):
    """pairs of (image, caption) vectors, None for missing -> (item_vecs, item_mask)."""
    vecs = np.full((len(pairs), 2, D), np.nan)  # nan in missing slots: must never leak
    mask = np.zeros((len(pairs), 2), dtype=bool)
    for n, pair in enumerate(pairs):
        for m, vec in enumerate(pair):
            if vec is not None:
                vecs[n, m], mask[n, m] = vec, True
    return vecs, mask


def fuse(query, weights, pairs, **params):
    vecs, mask = items(*pairs)
    return attention_fuse(np.asarray(query), np.asarray(weights, float), vecs, mask, FusionParams(**params))


def random_case(seed, n=20, p=3):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(p, D))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    v = rng.normal(size=(n, 2, D))
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    mask = rng.random((n, 2)) < 0.8
    mask[0] = [True, False]
    mask[1] = [False, True]
    return q, v, mask


# Image s=0.5, caption s=0.3 against part e0.
MIXED = (unit(0.5, math.sqrt(0.75), 0, 0), unit(0.3, 0, math.sqrt(0.91), 0))


def test_modality_attention_hand_computed_and_sums_to_one():
    r = fuse([E[0]], [1], [MIXED], modality_tau=0.1)
    a_img = 1 / (1 + math.exp(-2))  # e^5 / (e^5 + e^3)
    np.testing.assert_allclose(r.modality_weights[0, 0], [a_img, 1 - a_img], atol=1e-12)
    np.testing.assert_allclose(r.similarities[0, 0], [0.5, 0.3], atol=1e-12)
    assert r.part_scores[0, 0] == pytest.approx(a_img * 0.5 + (1 - a_img) * 0.3, abs=1e-12)
    assert r.scores[0] == pytest.approx(r.part_scores[0, 0], abs=1e-12)


def test_modality_weights_sum_to_one_over_present_modalities():
    q, v, mask = random_case(0)
    r = attention_fuse(q, np.array([1.0, 2.0, -0.5]), v, mask, FusionParams())
    sums = r.modality_weights.sum(axis=2)
    has_any = mask.any(axis=1)
    np.testing.assert_allclose(sums[has_any], 1.0, atol=1e-12)
    assert (r.modality_weights[~np.broadcast_to(mask[:, None, :], r.modality_weights.shape)] == 0).all()


def test_tiny_modality_tau_picks_best_and_huge_tau_averages():
    sharp = fuse([E[0]], [1], [MIXED], modality_tau=1e-4)
    np.testing.assert_allclose(sharp.modality_weights[0, 0], [1, 0], atol=1e-9)
    assert sharp.scores[0] == pytest.approx(0.5, abs=1e-9)
    flat = fuse([E[0]], [1], [MIXED], modality_tau=1e4)
    np.testing.assert_allclose(flat.modality_weights[0, 0], [0.5, 0.5], atol=1e-4)
    assert flat.scores[0] == pytest.approx(0.4, abs=1e-4)


def test_zero_tau_is_the_hard_limit():
    r = fuse([E[0], E[1]], [1, 1], [MIXED], modality_tau=0.0, part_tau=0.0)
    np.testing.assert_array_equal(r.modality_weights[0, 0], [1, 0])  # e0: image 0.5 > caption 0.3
    np.testing.assert_array_equal(r.modality_weights[0, 1], [1, 0])  # e1: image .866 > caption 0
    np.testing.assert_array_equal(r.part_weights[0], [1, 0])  # hard AND: the worse part (0.5) only
    assert r.scores[0] == pytest.approx(0.5, abs=1e-12)
    hard_or = fuse([E[0], E[1]], [1, 1], [MIXED], modality_tau=0.0, part_tau=1e-9)
    assert hard_or.scores[0] == pytest.approx(math.sqrt(0.75), abs=1e-12)


def test_prior_weights_shift_modality_attention():
    tau = 0.1
    base = fuse([E[0]], [1], [MIXED], modality_tau=tau)
    boosted = fuse([E[0]], [1], [MIXED], modality_tau=tau, text_weight=3.0)
    # Caption logits gain log 3: alpha_caption = 3e^3 / (e^5 + 3e^3).
    expected = 3 / (math.exp(2) + 3)
    assert boosted.modality_weights[0, 0, 1] == pytest.approx(expected, abs=1e-12)
    assert boosted.modality_weights[0, 0, 1] > base.modality_weights[0, 0, 1]
    assert boosted.scores[0] < base.scores[0]  # more weight on the worse-matching caption
    with pytest.raises(ValueError):
        FusionParams(image_weight=0.0)


def test_single_part_single_modality_is_the_cosine():
    q, v, mask = random_case(1, n=6, p=1)
    mask[:] = [True, False]
    r = attention_fuse(q, np.array([1.0]), v, mask, FusionParams())
    np.testing.assert_allclose(r.scores, v[:, 0] @ q[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(r.part_weights, 1.0)


@pytest.mark.parametrize("column", [0, 1])
@pytest.mark.parametrize("params", [FusionParams(), FusionParams(modality_tau=0.0, part_tau=0.0),
                                    FusionParams(modality_tau=2.0, part_tau=0.5, image_weight=3.0)])
def test_one_part_one_modality_closed_form_equals_the_general_fusion(column, params):
    q, v, mask = random_case(7, n=9, p=1)
    mask[:] = False
    mask[:, column] = True
    general = attention_fuse(q, np.array([2.5]), v, mask, params)
    sims = np.where(mask[:, None, :], np.einsum("pd,nmd->npm", q, v), 0.0)
    assert np.array_equal(fuse_similarities(sims, np.array([2.5]), mask, params).scores, general.scores)
    closed = one_part_one_modality(sims[:, 0, column], column)
    for field in ("scores", "part_scores", "part_weights", "modality_weights"):
        np.testing.assert_allclose(getattr(closed, field), getattr(general, field), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isnan(closed.similarities), np.isnan(general.similarities))
    assert explain(closed, 3, ["q"]) == explain(general, 3, ["q"])


def test_negative_part_lowers_similar_items_only():
    red, striped = E[0], E[1]
    plain_red = (red, None)
    red_striped = (unit(1, 1, 0, 0), None)
    without = fuse([red], [1], [plain_red, red_striped])
    with_neg = fuse([red, striped], [1, -1], [plain_red, red_striped])
    assert with_neg.scores[0] == pytest.approx(without.scores[0], abs=1e-12) == pytest.approx(1.0)
    # Full striped similarity subtracted: 0.707 - 0.707.
    assert without.scores[1] == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert with_neg.scores[1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(with_neg.part_weights[1], [1, -1], atol=1e-12)
    half = fuse([red, striped], [2, -1], [red_striped])  # lambda = 1/2
    assert half.scores[0] == pytest.approx(math.sqrt(0.5) / 2, abs=1e-12)


def test_pure_negative_query_is_documented_weighted_mean():
    r = fuse([E[0], E[1]], [-1, -3], [(unit(1, 1, 0, 0), None), (E[2], None)])
    np.testing.assert_allclose(r.scores, [-math.sqrt(0.5), 0.0], atol=1e-12)
    np.testing.assert_allclose(r.part_weights[0], [-0.25, -0.75], atol=1e-12)


BOTH_PARTS = (unit(1, 1, 0, 0), None)  # 0.707 on each of e0, e1
ONE_PART = (E[0], None)  # 1.0 on e0, 0 on e1


def test_soft_and_prefers_item_matching_every_part():
    r = fuse([E[0], E[1]], [1, 1], [BOTH_PARTS, ONE_PART], part_tau=-0.1)
    assert r.scores[0] > r.scores[1]
    assert r.scores[0] == pytest.approx(math.sqrt(0.5), abs=1e-12)  # equal parts: beta = 1/2 each
    # beta over (S=1, S=0) with tau=-0.1: e^-10 / (e^-10 + 1) on the matching part.
    b = math.exp(-10) / (math.exp(-10) + 1)
    np.testing.assert_allclose(r.part_weights[1], [b, 1 - b], atol=1e-12)
    assert r.scores[1] == pytest.approx(b, abs=1e-12)


def test_positive_part_tau_behaves_like_or():
    r = fuse([E[0], E[1]], [1, 1], [BOTH_PARTS, ONE_PART], part_tau=0.1)
    assert r.scores[1] > r.scores[0]
    assert r.scores[1] == pytest.approx(1 / (1 + math.exp(-10)), abs=1e-12)


def test_part_weights_shift_part_attention():
    # beta = softmax(S / tau + log w): with equal S the weights alone decide.
    r = fuse([E[0], E[1]], [3, 1], [(unit(1, 1, 0, 0), None)])
    np.testing.assert_allclose(r.part_weights[0], [0.75, 0.25], atol=1e-12)


def test_scores_equal_weighted_part_scores_exactly():
    q, v, mask = random_case(2)
    for part_tau in (-0.1, 0.0, 0.3):
        r = attention_fuse(q, np.array([1.0, 0.5, -0.7]), v, mask, FusionParams(part_tau=part_tau))
        np.testing.assert_array_equal(r.scores, (r.part_weights * r.part_scores).sum(axis=1))


def test_missing_modalities_masked_without_nan():
    r = fuse([E[0], E[1]], [1, -0.5], [(E[0], None), (None, E[0]), (None, None)])
    for arr in (r.part_scores, r.part_weights, r.modality_weights):
        assert not np.isnan(arr).any()
    assert not np.isnan(r.scores).any()
    np.testing.assert_allclose(r.scores[:2], [1.0, 1.0], atol=1e-12)
    assert np.isnan(r.similarities[0, :, 1]).all() and np.isnan(r.similarities[1, :, 0]).all()
    np.testing.assert_array_equal(r.modality_weights[0, 0], [1, 0])
    np.testing.assert_array_equal(r.modality_weights[1, 0], [0, 1])
    # No vector at all: sorts last, nothing attended.
    assert r.scores[2] == -math.inf
    assert (r.part_weights[2] == 0).all() and (r.modality_weights[2] == 0).all()


def test_explain_contributions_sum_to_score_and_is_json():
    q, v, mask = random_case(3)
    r = attention_fuse(q, np.array([1.0, 2.0, -1.0]), v, mask, FusionParams())
    labels = ["red dress", "photo.jpg", "-striped"]
    for row in range(len(v)):
        if not mask[row].any():
            continue
        info = explain(r, row, labels)
        json.dumps(info, allow_nan=False)
        assert sum(p["contribution"] for p in info["parts"]) == pytest.approx(info["score"], abs=1e-6)
        assert [p["part"] for p in info["parts"]] == labels
    row0 = explain(r, 0, labels)["parts"][0]  # item 0 has an image only
    assert row0["modality_attention"] == {"image": 1.0, "caption": None}
    assert row0["similarity_by_modality"]["caption"] is None
    assert row0["similarity_by_modality"]["image"] == pytest.approx(float(v[0, 0] @ q[0]), abs=1e-12)


def test_explain_item_without_vectors():
    r = fuse([E[0]], [1], [(None, None)])
    info = explain(r, 0, ["q"])
    json.dumps(info, allow_nan=False)
    assert info["score"] is None and info["parts"][0]["contribution"] == 0


def test_sum_fuse_query_is_normalised():
    out = sum_fuse_query(np.stack([E[0], E[1]]), np.array([1.0, -3.0]))
    assert out.dtype == np.float32 and out.shape == (D,)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out, unit(1, -3, 0, 0), atol=1e-6)


def test_sum_fuse_query_zero_raises():
    with pytest.raises(ValueError):
        sum_fuse_query(np.stack([E[0], E[0]]), np.array([1.0, -1.0]))
    with pytest.raises(ValueError):
        sum_fuse_query(np.stack([E[0]]), np.array([0.0]))


def test_sum_score_modalities():
    vecs, mask = items((E[0], E[1]), (None, unit(1, 1, 0, 0)), (None, None))
    q = np.stack([E[0]])
    w = np.array([1.0])
    r2 = math.sqrt(0.5)
    np.testing.assert_allclose(sum_score(q, w, vecs, mask), [1.0, r2, -math.inf])
    np.testing.assert_allclose(sum_score(q, w, vecs, mask, "image"), [1.0, -math.inf, -math.inf])
    np.testing.assert_allclose(sum_score(q, w, vecs, mask, "text"), [0.0, r2, -math.inf])
    np.testing.assert_allclose(sum_score(q, w, vecs, mask, "mean"), [0.5, r2, -math.inf])
    with pytest.raises(ValueError):
        sum_score(q, w, vecs, mask, "audio")


def test_bad_inputs_raise():
    vecs, mask = items((E[0], None))
    with pytest.raises(ValueError):
        attention_fuse(np.stack([E[0]]), np.array([0.0]), vecs, mask, FusionParams())
    with pytest.raises(ValueError):
        attention_fuse(np.stack([E[0]]), np.array([1.0, 1.0]), vecs, mask, FusionParams())
    with pytest.raises(ValueError):
        FusionParams(modality_tau=-0.1)


def test_fit_taus_finds_grid_maximum():
    target = (0.05, -0.2)

    def metric(p):
        return -abs(p.modality_tau - target[0]) - abs(p.part_tau - target[1])

    params, value = fit_taus(metric, base=FusionParams(text_weight=2.0))
    assert (params.modality_tau, params.part_tau) == target
    assert value == pytest.approx(0.0) and params.text_weight == 2.0
    with pytest.raises(ValueError):
        fit_taus(lambda p: float("nan"))
