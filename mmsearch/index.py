"""FAISS wrapper: choose and build an index type, add/remove by id, search, save/load atomically.

Vectors are L2-normalised, so inner product is cosine similarity. Ids are the SQLite item ids.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import faiss
import numpy as np

from .config import IndexParams

log = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX_ITEMS = 50_000  # exact search stays within tens of ms below this (512-d, one core)
HNSW_M = 32
RECALL_TARGET = 0.95
DEFAULT_MAX_MEMORY = 4 * 1024**3


def choose_index_type(n_items: int, dim: int, max_memory: int = DEFAULT_MAX_MEMORY) -> str:
    """autofaiss-like rule: exact while cheap, HNSW while it fits the memory budget, else IVF-PQ."""
    if n_items <= FLAT_MAX_ITEMS:
        return "flat"
    hnsw_bytes = n_items * (4 * dim + 8 * HNSW_M + 8)
    return "hnsw" if hnsw_bytes <= max_memory else "ivfpq"


def _pq_m(dim: int) -> int:
    """PQ sub-quantisers: 64 bytes/vector (<= 80 with the id), a divisor of dim."""
    for m in (64, 48, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and m <= dim:
            return m
    return 1


class VectorIndex:
    def __init__(self, index: faiss.Index, params: IndexParams):
        self.index = index
        self.params = params
        self._apply_search_params()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, index_type: str = "auto",
              max_memory: int = DEFAULT_MAX_MEMORY) -> VectorIndex:
        kind = choose_index_type(len(ids), dim, max_memory) if index_type == "auto" else index_type
        if kind not in INDEX_TYPES[1:]:
            raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
        index = _new_index(kind, dim, len(ids))
        if not index.is_trained:
            sample = vectors[np.random.default_rng(0).permutation(len(vectors))[:100_000]]
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        built = cls(index, IndexParams(index_type=kind, requested=index_type))
        built.add(ids, vectors)
        if kind != "flat" and len(ids):
            built.tune(np.asarray(ids, dtype=np.int64), vectors)
        return built

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        """Flat and IVF support removal; HNSW does not (the caller rebuilds from the store)."""
        if len(ids):
            self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))

    @property
    def supports_remove(self) -> bool:
        return self.params.index_type != "hnsw"

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None):
        """(scores, ids) of shape (Q, k); missing slots have id -1."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, self.ntotal)) if self.ntotal else 1
        params = self._search_parameters(allowed)
        return self.index.search(queries, k, params=params) if params else self.index.search(queries, k)

    def _search_parameters(self, allowed: np.ndarray | None):
        if allowed is None:
            return None
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        kind = self.params.index_type
        if kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.params.ef_search or 64, 256))
        if kind == "ivfpq":
            return faiss.SearchParametersIVF(sel=selector, nprobe=max(self.params.nprobe or 16, 64))
        return faiss.SearchParameters(sel=selector)

    def _apply_search_params(self) -> None:
        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "index") else self.index
        if self.params.ef_search and hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = self.params.ef_search
        if self.params.nprobe:
            ivf = faiss.try_extract_index_ivf(inner)
            if ivf is not None:
                ivf.nprobe = self.params.nprobe

    def tune(self, ids: np.ndarray, vectors: np.ndarray, n_queries: int = 500, k: int = 10) -> float:
        """Raise efSearch / nprobe until recall@10 against exact search reaches the target."""
        rng = np.random.default_rng(0)
        queries = vectors[rng.choice(len(vectors), size=min(n_queries, len(vectors)), replace=False)]
        truth = ids[_exact_top_k(vectors, queries, k)]
        knob = "ef_search" if self.params.index_type == "hnsw" else "nprobe"
        recall = 0.0
        for value in (16, 32, 64, 128, 256, 512, 1024):
            setattr(self.params, knob, value)
            self._apply_search_params()
            _, found = self.search(queries, k)
            recall = _recall(found, truth)
            if recall >= RECALL_TARGET:
                break
        self.params.measured_recall_at_10 = round(float(recall), 4)
        log.info("%s tuned: %s=%s recall@10=%.3f", self.params.index_type, knob, value, recall)
        return recall

    def save(self, path: Path) -> None:
        """Write to a temp file, fsync, rename: a reader or a crash never sees a partial file."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, params: IndexParams, mmap: bool = True) -> VectorIndex:
        flags = faiss.IO_FLAG_MMAP_IFC if mmap and hasattr(faiss, "IO_FLAG_MMAP_IFC") else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            index = faiss.read_index(str(path))
        return cls(index, params)

    @classmethod
    def empty(cls, dim: int) -> VectorIndex:
        return cls(_new_index("flat", dim, 0), IndexParams(index_type="flat"))


def _new_index(kind: str, dim: int, n_items: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        return faiss.IndexIDMap2(hnsw)
    lists = max(1, min(int(8 * math.sqrt(max(n_items, 1))), max(n_items // 39, 1)))
    m = _pq_m(dim)
    coarse = f"IVF{lists}_HNSW32" if n_items >= 1_000_000 else f"IVF{lists}"
    return faiss.index_factory(dim, f"IDMap2,{coarse},PQ{m}x8", faiss.METRIC_INNER_PRODUCT)


def _exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Recall@k of the ANN ids against the exact ids, both (Q, k)."""
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth))
    return hits / truth.size
