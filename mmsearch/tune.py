"""Fit the fusion's temperatures and modality priors on labelled queries (`mmsearch tune`).

Input: a JSONL file, one labelled query per line, in the batch-query format plus the ids that
should be found: {"parts": [{"image": "boot.jpg"}, {"text": "blue"}], "relevant": ["boot-blue"]}.
Candidates are retrieved once per query; each grid point only re-scores them, so a grid of a few
hundred settings over a few hundred queries takes seconds. The best setting, and whichever of
`attention` / `sum` scores higher, is written into the index manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import fusion
from .errors import QueryError
from .metrics import hit_at_k, reciprocal_rank
from .search import Query, Searcher, _sum_fuse, fusion_params, query_from_json

log = logging.getLogger(__name__)

PRIOR_GRID = (0.5, 1.0, 2.0)  # image_weight / text_weight ratios tried


@dataclass
class _Prepared:
    query: Query
    relevant: set[str]
    vectors: np.ndarray
    weights: np.ndarray
    keys: dict[str, np.ndarray]  # strategy -> candidate keys
    item_vecs: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]


def read_labelled_queries(path: Path) -> list[tuple[Query, set[str]]]:
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            relevant = {str(r) for r in record.pop("relevant")}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QueryError(f"{path.name} line {line_no}: needs a JSON object with 'relevant' ids ({exc})") from exc
        query = query_from_json(_resolve_images(record, path.parent))
        out.append((query, relevant))
    if not out:
        raise QueryError(f"{path}: no labelled queries")
    return out


def _resolve_images(record: dict, base: Path) -> dict:
    def fix(value):
        p = Path(str(value))
        return str(p if p.is_absolute() else base / p)

    if record.get("image"):
        record["image"] = fix(record["image"])
    for part in record.get("parts") or []:
        if isinstance(part, dict) and part.get("image"):
            part["image"] = fix(part["image"])
    return record


def tune_index(index_dir: Path, queries_path: Path, k: int = 10, save: bool = True, progress=None) -> dict:
    labelled = read_labelled_queries(queries_path)
    with Searcher(index_dir) as searcher:
        prepared = [_prepare(searcher, q, rel) for q, rel in labelled]
        if progress:
            progress("encoded", len(prepared), len(prepared))
        base = fusion_params(searcher.manifest.fusion)
        best, best_value = _grid(prepared, base, k)
        sum_value = _metric(prepared, None, k)
        default_value = _metric(prepared, base, k)
        chosen = "attention" if best_value >= sum_value else "sum"
        report = {"queries": len(prepared), "k": k,
                  "before": {"params": asdict(base), **best_value_dict(default_value)},
                  "attention": {**best_value_dict(best_value), "params": asdict(best)},
                  "sum": best_value_dict(sum_value), "chosen": chosen, "saved": save}
        if save:
            collection = searcher.collection
            with collection.write_lock():
                config = collection.manifest.fusion
                config.modality_tau, config.part_tau = best.modality_tau, best.part_tau
                config.image_weight, config.text_weight = best.image_weight, best.text_weight
                config.strategy = chosen
                collection.manifest.save(collection.dir)
    return report


def best_value_dict(value: tuple[float, float]) -> dict:
    return {f"R@{value[2]}": round(value[0], 4), "MRR": round(value[1], 4)}


def _prepare(searcher: Searcher, query: Query, relevant: set[str]) -> _Prepared:
    vectors, weights = searcher.encode_parts(query.parts)
    target = query.resolved_target()
    modalities = ["image", "text"] if target == "item" else [target]
    prepared = _Prepared(query, relevant, vectors, weights, {}, {}, {})
    for strategy in ("attention", "sum"):
        ids = searcher._candidates(vectors, weights, modalities, strategy, query.k, None)
        rows = searcher.collection.store.items([int(i) for i in ids])
        ids = np.array([i for i in ids if int(i) in rows], dtype=np.int64)
        prepared.keys[strategy] = np.array([rows[int(i)].key for i in ids], dtype=object)
        prepared.item_vecs[strategy], prepared.masks[strategy] = searcher.item_vectors(ids, modalities)
    return prepared


def _metric(prepared: list[_Prepared], params: fusion.FusionParams | None, k: int) -> tuple[float, float, int]:
    """(mean hit@k, mean reciprocal rank) with attention(params), or the sum baseline when params is None."""
    hits, rrs = [], []
    for p in prepared:
        strategy = "sum" if params is None else "attention"
        vecs, mask = p.item_vecs[strategy], p.masks[strategy]
        if params is None:
            scores = _sum_fuse(p.vectors, p.weights, vecs, mask).scores
        else:
            scores = fusion.attention_fuse(p.vectors, p.weights, vecs, mask, params).scores
        ranked = list(p.keys[strategy][np.argsort(-scores, kind="stable")])
        hits.append(hit_at_k(ranked, p.relevant, k))
        rrs.append(reciprocal_rank(ranked, p.relevant))
    return float(np.mean(hits)), float(np.mean(rrs)), k


def _grid(prepared, base: fusion.FusionParams, k: int):
    best, best_value = base, _metric(prepared, base, k)
    for image_weight in PRIOR_GRID:
        start = replace(base, image_weight=image_weight, text_weight=1.0)
        params, _ = fusion.fit_taus(lambda p: _score(prepared, p, k), base=start)
        value = _metric(prepared, params, k)
        if value[:2] > best_value[:2]:
            best, best_value = params, value
    return best, best_value


def _score(prepared, params, k) -> float:
    hit, rr, _ = _metric(prepared, params, k)
    return hit + 1e-3 * rr  # hit rate first, MRR breaks ties
