"""Attention-weighted scoring of candidate items against a composed query. Pure numpy, no I/O.

A query is a list of parts (texts or images, each an L2-normalised vector q_p) with weights w_p;
a negative weight means "not like this". An item has up to two L2-normalised vectors, [image, caption],
with a boolean mask for the ones it lacks.

attention_fuse scores in three steps:

1. s[n,p,m] = q_p . v[n,m] for the modalities item n has.
2. Per part, attention over the item's present modalities:
   alpha[n,p,m] = softmax_m(s / modality_tau + log prior_m) and S[n,p] = sum_m alpha * s.
   modality_tau -> 0 picks the best-matching modality, -> inf averages them.
3. Positive parts are pooled by attention too: beta[n,p] = softmax_p(S / part_tau + log w_p).
   part_tau < 0 is a soft AND (the worst-matching part weighs most), part_tau > 0 a soft OR.
   Each negative part subtracts lambda_p * S[n,p] with lambda_p = |w_p| / sum of positive weights,
   so "-1:striped" next to one positive part of weight 1 subtracts the whole striped similarity.
   A query of negative parts only scores -sum(|w_p| S_p) / sum(|w_p|). Parts of weight 0 are ignored.

Limits: a temperature with |tau| < HARD_TAU is its limit, not a division by ~0: modality_tau picks the
best modality (ties split in proportion to the priors); part_tau picks the worst positive part when it
is <= 0 (0 itself means hard AND) and the best when it is > 0 (ties split in proportion to w_p).

Items with no vector at all score EMPTY_SCORE (-inf, so they sort last) with every weight 0 and part
scores 0; for every other item scores == (part_weights * part_scores).sum(1) exactly, which explain()
relies on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

HARD_TAU = 1e-6  # below this a temperature means its limit (hard max/min)
TIE_TOL = 1e-12  # values this close count as tied in the hard limits: dot products of "equal" vectors jitter
EMPTY_SCORE = -math.inf  # score of an item with no vector: sorts after everything real
MODALITY_NAMES = ("image", "caption")
SUM_MODALITIES = ("best", "image", "text", "mean")


@dataclass
class FusionParams:
    modality_tau: float = 0.05  # temperature of the softmax over an item's modalities, per part (>= 0)
    part_tau: float = -0.1  # temperature over positive parts: < 0 soft AND, > 0 soft OR, ~0 hard limit
    image_weight: float = 1.0  # prior of the image modality: adds log(w) to its logits (> 0)
    text_weight: float = 1.0  # prior of the caption modality (> 0)

    def __post_init__(self):
        for name in ("modality_tau", "part_tau", "image_weight", "text_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"FusionParams.{name} must be finite")
        if self.modality_tau < 0:
            raise ValueError("modality_tau must be >= 0 (a negative one would prefer the worst modality)")
        # A zero prior would make an item whose only vector is that modality unscorable (all -inf logits).
        if self.image_weight <= 0 or self.text_weight <= 0:
            raise ValueError("image_weight and text_weight must be > 0")


@dataclass
class FusionResult:
    scores: np.ndarray  # (n_items,) final fused score; EMPTY_SCORE for items with no vector
    part_scores: np.ndarray  # (n_items, n_parts) S_p, each part's attention-pooled similarity
    part_weights: np.ndarray  # (n_items, n_parts) beta for positive parts, -lambda for negative ones
    modality_weights: np.ndarray  # (n_items, n_parts, 2) attention over [image, caption], 0 where missing
    similarities: np.ndarray  # (n_items, n_parts, 2) raw cosine similarities, nan where missing


def _masked_softmax(logits: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    """Softmax over the entries where mask is True; all-zero (never nan) where none is."""
    logits = np.where(mask, logits, -np.inf)
    top = logits.max(axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # all-masked rows: keep exp() away from -inf - -inf
    e = np.where(mask, np.exp(logits - top), 0.0)
    denom = e.sum(axis=axis, keepdims=True)
    return np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)


def _attention(values, log_prior, mask, tau: float, axis: int, zero_direction: int) -> np.ndarray:
    """softmax(values / tau + log_prior) over mask, or its exact limit when |tau| < HARD_TAU."""
    if abs(tau) >= HARD_TAU:
        return _masked_softmax(values / tau + log_prior, mask, axis)
    # The limit keeps only the extreme entries, weighted by their priors (the priors' log is
    # negligible next to values / tau, except between exact ties).
    direction = zero_direction if tau == 0 else (1 if tau > 0 else -1)
    signed = np.where(mask, direction * values, -np.inf)
    best = signed.max(axis=axis, keepdims=True)
    extreme = mask & (signed >= best - TIE_TOL)
    return _masked_softmax(np.broadcast_to(log_prior, values.shape), extreme, axis)


def _check_query(query_vecs, part_weights) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(query_vecs, dtype=np.float64)
    w = np.asarray(part_weights, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"query_vecs must be (n_parts >= 1, d), got shape {q.shape}")
    if w.shape != (q.shape[0],):
        raise ValueError(f"part_weights must have shape ({q.shape[0]},), got {w.shape}")
    if not (np.isfinite(q).all() and np.isfinite(w).all()):
        raise ValueError("query vectors and weights must be finite")
    if not np.any(w != 0):
        raise ValueError("every query part has weight 0: nothing to score")
    return q, w


def _check_items(item_vecs, item_mask, d: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(item_mask, dtype=bool)
    v = np.asarray(item_vecs, dtype=np.float64)
    if v.ndim != 3 or v.shape[1:] != (2, d):
        raise ValueError(f"item_vecs must be (n_items, 2, {d}), got shape {v.shape}")
    if mask.shape != v.shape[:2]:
        raise ValueError(f"item_mask must have shape {v.shape[:2]}, got {mask.shape}")
    # Missing slots may hold anything (zeros, nan); zero them so nothing leaks into the dot products.
    return np.where(mask[:, :, None], v, 0.0), mask


def _part_mixing(part_scores: np.ndarray, w: np.ndarray, has_any: np.ndarray, tau: float) -> np.ndarray:
    """(n_items, n_parts) weights: beta over positive parts, -lambda for negative ones, 0 for empty items."""
    pos, neg = w > 0, w < 0
    n = part_scores.shape[0]
    if pos.any():
        log_w = np.log(np.where(pos, w, 1.0))  # dummy 1 keeps log() quiet on parts the mask drops anyway
        beta = _attention(part_scores, log_w, pos[None, :] & has_any[:, None], tau, 1, zero_direction=-1)
        neg_scale = w[pos].sum()
    else:
        beta = np.zeros((n, w.size))
        neg_scale = np.abs(w[neg]).sum()  # pure negative query: a weighted mean of the similarities
    lam = np.where(neg, np.abs(w) / neg_scale, 0.0)
    return beta - lam[None, :] * has_any[:, None]


def attention_fuse(
    query_vecs: np.ndarray,
    part_weights: np.ndarray,
    item_vecs: np.ndarray,
    item_mask: np.ndarray,
    params: FusionParams,
) -> FusionResult:
    """Score items against a weighted multi-part query; see the module docstring for the formulas.

    query_vecs (P, d), part_weights (P,), item_vecs (N, 2, d) as [image, caption], item_mask (N, 2).
    """
    q, w = _check_query(query_vecs, part_weights)
    v, mask = _check_items(item_vecs, item_mask, q.shape[1])
    return fuse_similarities(np.einsum("pd,nmd->npm", q, v), w, mask, params)


def fuse_similarities(sims: np.ndarray, w: np.ndarray, mask: np.ndarray, params: FusionParams) -> FusionResult:
    """attention_fuse from the similarities s[n,p,m] themselves (0 where mask[n,m] is False): what a
    caller that already has them (FAISS's exact inner products) uses, with no item vector read."""
    present = np.broadcast_to(mask[:, None, :], sims.shape)
    log_prior = np.log([params.image_weight, params.text_weight])
    alpha = _attention(sims, log_prior, present, params.modality_tau, 2, zero_direction=1)
    part_scores = (alpha * sims).sum(axis=2)  # missing sims are 0 here and alpha is 0 there anyway
    has_any = mask.any(axis=1)
    mixing = _part_mixing(part_scores, w, has_any, params.part_tau)
    # Computed from the returned arrays themselves so the explanation identity holds bit for bit.
    scores = (mixing * part_scores).sum(axis=1)
    scores[~has_any] = EMPTY_SCORE
    return FusionResult(
        scores=scores,
        part_scores=part_scores,
        part_weights=mixing,
        modality_weights=alpha,
        similarities=np.where(present, sims, np.nan),
    )


def one_part_one_modality(similarities: np.ndarray, column: int) -> FusionResult:
    """fuse_similarities' result for one positive part and items that all have the one modality
    `column` (a query against one FAISS index): each softmax is then over a single entry, weight 1,
    so every item's score is its similarity. In closed form: the general path's thirty array
    operations were a tenth of a warm query's search."""
    n = len(similarities)
    scores = np.asarray(similarities, dtype=np.float64)
    sims = np.full((n, 1, 2), np.nan)
    sims[:, 0, column] = scores
    alpha = np.zeros((n, 1, 2))
    alpha[:, 0, column] = 1.0
    return FusionResult(scores=scores.copy(), part_scores=scores[:, None].copy(), part_weights=np.ones((n, 1)),
                        modality_weights=alpha, similarities=sims)


def _by_modality(values: np.ndarray, present: np.ndarray) -> dict:
    return {name: float(values[m]) if present[m] else None for m, name in enumerate(MODALITY_NAMES)}


def _explain_part(result: FusionResult, row: int, p: int, label: str, empty: bool) -> dict:
    weight = float(result.part_weights[row, p])
    sim = float(result.part_scores[row, p])
    mod_sims = result.similarities[row, p]
    present = ~np.isnan(mod_sims)
    return {
        "part": label,
        "weight_in_score": weight,
        "similarity": None if empty else sim,
        "contribution": weight * sim,
        "modality_attention": _by_modality(result.modality_weights[row, p], present),
        "similarity_by_modality": _by_modality(mod_sims, present),
    }


def explain(result: FusionResult, row: int, part_labels: list[str]) -> dict:
    """JSON-friendly breakdown of one item's score; the parts' contributions sum to the score.

    An item with no vector gets score None (JSON has no -inf), zero weights and None similarities.
    """
    n_parts = result.part_scores.shape[1]
    if len(part_labels) != n_parts:
        raise ValueError(f"{len(part_labels)} labels for {n_parts} query parts")
    score = float(result.scores[row])
    empty = not math.isfinite(score)
    parts = [_explain_part(result, row, p, label, empty) for p, label in enumerate(part_labels)]
    return {"score": None if empty else score, "parts": parts}


def sum_fuse_query(query_vecs: np.ndarray, part_weights: np.ndarray) -> np.ndarray:
    """(d,) float32 L2-normalised weighted sum of the part vectors: the baseline's single FAISS query.

    Raises ValueError when the parts cancel out (e.g. "red" and "-1:red"): no direction to search.
    """
    q, w = _check_query(query_vecs, part_weights)
    summed = w @ q
    norm = float(np.linalg.norm(summed))
    # Relative to the weights' scale: unit parts with weights ~1e-3 are still a fine query.
    if norm <= 1e-6 * float(np.abs(w).sum()):
        raise ValueError("the weighted query parts cancel out: the summed query is ~zero")
    return (summed / norm).astype(np.float32)


def sum_score(
    query_vecs: np.ndarray,
    part_weights: np.ndarray,
    item_vecs: np.ndarray,
    item_mask: np.ndarray,
    modality: str = "best",
) -> np.ndarray:
    """(n_items,) cosine of each item with the summed query.

    modality: "best" (max over present vectors), "image", "text" (caption) or "mean" (of present ones).
    Items lacking the requested vector(s) score EMPTY_SCORE.
    """
    if modality not in SUM_MODALITIES:
        raise ValueError(f"modality must be one of {SUM_MODALITIES}, got {modality!r}")
    q = sum_fuse_query(query_vecs, part_weights).astype(np.float64)
    v, mask = _check_items(item_vecs, item_mask, q.shape[0])
    sims = np.einsum("nmd,d->nm", v, q)  # (N, 2); not @, which wakes an OpenBLAS helper thread (see search.py)
    if modality in ("image", "text"):
        col = 0 if modality == "image" else 1
        return np.where(mask[:, col], sims[:, col], EMPTY_SCORE)
    if modality == "best":
        return np.where(mask, sims, -np.inf).max(axis=1)
    count = mask.sum(axis=1)
    total = np.where(mask, sims, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.full(total.shape, EMPTY_SCORE), where=count > 0)


def fit_taus(
    score_fn: Callable[[FusionParams], float],
    grid_modality: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 1.0),
    grid_part: Sequence[float] = (-1.0, -0.2, -0.1, -0.05, 0.05, 0.1, 1.0),
    base: FusionParams | None = None,
) -> tuple[FusionParams, float]:
    """Grid-search (modality_tau, part_tau) maximising score_fn(params); priors come from base.

    The first grid point wins ties, so order the grids by preference. NaN metrics are skipped.
    """
    base = base or FusionParams()
    best_params, best_value = None, -math.inf
    for m_tau in grid_modality:
        for p_tau in grid_part:
            params = replace(base, modality_tau=m_tau, part_tau=p_tau)
            value = float(score_fn(params))
            if not math.isnan(value) and (best_params is None or value > best_value):
                best_params, best_value = params, value
    if best_params is None:
        raise ValueError("empty grid, or score_fn returned NaN for every grid point")
    return best_params, best_value


fit_params = fit_taus  # the name the tune command was first specified with
