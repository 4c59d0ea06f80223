"""FAISS wrapper: choose and build an index type, add/remove by id, search, save/load atomically.

Vectors are L2-normalised, so inner product is cosine similarity. Ids are the SQLite item ids.

Layouts (bytes per 512-d vector): flat = IDMap(FlatIP), 2048 + 8; hnsw = IDMap(HNSW32,Flat),
2048 + ~270 (graph) + 8; ivfpq = IVF{2.5 sqrt N}[_HNSW32 at >= 1M],PQ64x8 with its own ids, 64 + 8
(+ ~6 for the coarse centroids at 1M: 2.5 sqrt N rather than FAISS's usual 4 keeps the total under 80).
No IDMap2: its reverse hash map costs ~40 bytes per vector and nothing here reconstructs by id.
Search knobs (efSearch / nprobe) are tuned at build time on a sample of perturbed stored vectors
against exact search, until the sample's recall@10 less two standard errors reaches the target; for
ivfpq the recall recorded is the one of the search path, i.e. the true top-10 found among the
RERANK_DEPTH PQ candidates that search.py re-scores exactly. An hnsw index takes its vectors in
locality_order, so that a search's reads land close together in memory, and a query's graph search
starts at its nearest of ENTRY_SAMPLE stored vectors instead of FAISS's single entry point.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from . import filterwalk
from .config import IndexParams

log = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX_ITEMS = 50_000  # exact search stays within tens of ms below this (512-d, one core)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 160  # at 1M, 80 needed efSearch 384-512 for the tuner's margin, 160 needs 96-128
ENTRY_SAMPLE = 1024  # hnsw: stored vectors compared with each query to pick its graph entry (_search_from_entries)
IVF_HNSW_MIN_ITEMS = 1_000_000  # from here the IVF coarse quantizer is itself an HNSW graph
LOCALITY_BRANCHING = 64  # k-means children per node of the layout tree (see locality_order)
LOCALITY_LEAF = 256  # groups this small stay in their order: 512 KB of 512-d vectors, a few pages each
RECALL_TARGET = 0.95
RECALL_MARGIN_SE = 2.0  # the knob's recall must clear the target by this many standard errors
RERANK_DEPTH = 256  # candidates re-scored exactly by the query engine (FusionConfig.candidates)
FILTERED_EF_SEARCH = 256  # least efSearch of a filtered HNSW search: walks through items the filter drops
FILTER_EXACT_GAP = 0.0  # a filtered hnsw hit this much below the query's best sampled vector: scan exactly
FILTER_EXACT_MAX = 200_000  # ... when the filter keeps at most this many items (~70 ms at 512-d, one core)
TUNE_QUERIES = 2000
TUNE_VALUES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# nprobe from 4: lists capped for memory (ivf_lists) hold ~1,200 vectors at 100k, and 16 of them scanned
# 19k codes (1.2 ms) where fewer do. Not from 1: the tuner's queries (stored vectors moved to cosine 0.8)
# sit in their source's list, and nprobe 1, which it accepted, gave held-out queries 0.966 at 100k
IVF_TUNE_VALUES = (4, 6, 8, 12, *TUNE_VALUES)
DEFAULT_MAX_MEMORY = 4 * 1024**3
IVFPQ_BYTES_PER_VECTOR = 80  # the most an ivfpq index may hold per vector, fixed costs included
PQ_CENTROIDS = 256  # per sub-quantiser (8-bit codes): the codebook is PQ_CENTROIDS * dim floats
BITMAP_MAX_ID = 1 << 28  # filters over ids below this use a bitmap (at most 32 MiB); larger ids a hash set


def estimate_bytes(kind: str, n_items: int, dim: int) -> int:
    """Resident bytes of an index of this kind (vectors, graph, codes, ids, centroids, codebooks)."""
    if kind == "flat":
        return n_items * (4 * dim + 8)
    if kind == "hnsw":
        return n_items * (4 * dim + 2 * 4 * HNSW_M + 4 * HNSW_M // 2 + 16)
    return n_items * _ivfpq_vector_bytes(dim) + (ivf_lists(n_items, dim) + PQ_CENTROIDS) * 4 * dim


def choose_index_type(n_items: int, dim: int, max_memory: int = DEFAULT_MAX_MEMORY) -> str:
    """autofaiss-like rule: exact while cheap, HNSW while it fits the memory budget, else IVF-PQ."""
    if n_items <= FLAT_MAX_ITEMS and estimate_bytes("flat", n_items, dim) <= max_memory:
        return "flat"
    return "hnsw" if estimate_bytes("hnsw", n_items, dim) <= max_memory else "ivfpq"


def ivf_lists(n_items: int, dim: int = 512) -> int:
    """~2.5 sqrt(N) inverted lists, at least 39 training points each (FAISS's k-means minimum), and
    few enough that the index stays within IVFPQ_BYTES_PER_VECTOR.

    Each list costs a 4*dim-byte centroid (plus its HNSW links from 1M), and the PQ codebook a fixed
    256 * 4*dim bytes: at 100k x 512-d, 2.5 sqrt(N) = 790 lists would add 16 bytes per vector and the
    codebook 5 to the 72 of code + id (93 measured); at 1M the memory cap (~3,100 lists) does not bind.
    Never fewer than sqrt(N)/4 lists (a probe would scan too many codes): below ~80k items at 512-d the
    codebook alone breaks the budget, and such a small ivfpq index is only built when asked for."""
    n = max(n_items, 1)
    by_count = min(int(2.5 * math.sqrt(n)), n // 39)
    # 1 byte per vector left for the coarse quantizer's links and the file's headers
    spare = (IVFPQ_BYTES_PER_VECTOR - _ivfpq_vector_bytes(dim) - 1) * n - PQ_CENTROIDS * 4 * dim
    by_memory = max(spare // (4 * dim), int(math.sqrt(n) / 4))
    return max(1, min(by_count, by_memory))


def _ivfpq_vector_bytes(dim: int) -> int:
    """What each vector itself costs in an ivfpq index: its PQ code and its 8-byte id."""
    return _pq_m(dim) + 8


def _pq_m(dim: int) -> int:
    """PQ sub-quantisers: <= 64 bytes/vector (<= 80 with the id), a divisor of dim, >= 4 dims each."""
    for m in (64, 48, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


@contextmanager
def _one_thread_if(single: bool):
    """FAISS parallelises over queries: one query gains nothing from OpenMP threads, and waking them
    costs milliseconds on a busy machine (measured: 4 ms vs 0.1 ms per HNSW search under load).
    The count before is restored (os.cpu_count() here took 40 us per query)."""
    if not single:
        yield
        return
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


class IdFilter:
    """The ids a filtered search may return, as a FAISS selector (held here: FAISS reads its memory).

    A bitmap over ids, not FAISS's IDSelectorBatch: the batch builds a hash set of every allowed id,
    for each query 20-25 ms for half of 1M items, ten times the search; the bitmap takes ~1 ms. Ids
    past BITMAP_MAX_ID (SQLite's rowids of a catalog that fits here stay far below) use the batch."""

    def __init__(self, allowed: np.ndarray):
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        self.count = len(allowed)  # at most the items it keeps (ids need not be in the index)
        self.bitmap = None
        top = int(allowed.max()) if len(allowed) else -1
        if top >= 0 and int(allowed.min()) >= 0 and top < BITMAP_MAX_ID:
            bits = np.zeros(top + 1, dtype=bool)
            bits[allowed] = True
            self.bitmap = np.packbits(bits, bitorder="little")  # FAISS tests bit (id & 7) of byte id >> 3
            self.selector = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))
        else:
            self.selector = faiss.IDSelectorBatch(allowed)
            self.sorted_ids = np.unique(allowed)

    def keeps(self, ids: np.ndarray) -> np.ndarray:
        """Which of these ids the filter keeps."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.bitmap is None:
            if not len(self.sorted_ids):
                return np.zeros(len(ids), dtype=bool)
            at = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
            return self.sorted_ids[at] == ids
        inside = (ids >= 0) & (ids < 8 * len(self.bitmap))
        kept = np.zeros(len(ids), dtype=bool)
        held = ids[inside]
        kept[inside] = (self.bitmap[held >> 3] >> (held & 7).astype(np.uint8)) & 1
        return kept


class _Walk(NamedTuple):
    """What an unfiltered hnsw search reuses (VectorIndex._walk)."""

    key: tuple  # (ntotal, efSearch) it was built for
    hnsw: faiss.IndexHNSW
    ids: np.ndarray  # position -> id: a view of the index's id map
    sign: float  # multiplies similarities into FAISS's hnsw distances
    params: faiss.SearchParametersHNSW  # efSearch set, no selector


class VectorIndex:
    def __init__(self, index: faiss.Index, params: IndexParams):
        self.index = index
        self.params = params
        # (ntotal, positions, vectors, the vectors in an exact index): see _search_from_entries
        self._entries: tuple[int, np.ndarray, np.ndarray, faiss.IndexFlatIP] | None = None
        self._walk_state: _Walk | None = None  # see _walk
        self._apply_search_params()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, index_type: str = "auto",
              max_memory: int = DEFAULT_MAX_MEMORY, locality: bool = True) -> VectorIndex:
        """locality: an hnsw index takes its vectors in locality_order (neighbours next to each other
        in memory), not in the order given."""
        kind = choose_index_type(len(ids), dim, max_memory) if index_type == "auto" else index_type
        if kind not in INDEX_TYPES[1:]:
            raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
        index = _new_index(kind, dim, len(ids))
        if not index.is_trained:
            _train(index, vectors)
        built = cls(index, IndexParams(index_type=kind, requested=index_type,
                                       entry_sample=min(ENTRY_SAMPLE, len(ids)) if kind == "hnsw" else None))
        if kind == "hnsw" and locality:
            built._add_in_order(ids, vectors, locality_order(vectors))
        else:
            built.add(ids, vectors)
        if kind != "flat" and len(ids):
            built.tune(np.asarray(ids, dtype=np.int64), vectors)
        return built

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def _add_in_order(self, ids: np.ndarray, vectors: np.ndarray, order: np.ndarray) -> None:
        """Add vectors[order] in one call (a transient copy of them).

        Why hnsw wants locality_order: a search reads ~1,600 scattered 2 KB vectors at 1M items
        (efSearch 256), and right after the text encoder has run none of them is cached, so in
        insertion order each read is a cache and TLB miss of its own. Neighbours next to each other
        make a search's reads fall in a few regions: at 1M, the same graph with its vectors shuffled
        took 0.53 against 0.46 ms per query at efSearch 96, 2.98 against 1.88 at 512 (a worse graph),
        and 1.2 against 0.8 ms right after an encoder run (efSearch 256, a prototype). The build is
        faster too (178 against 205 s at 1M, efConstruction 80): its inserts find neighbours cached.
        One call, not chunks: FAISS inserts a call's vectors from the highest graph level down, so
        the upper levels span the whole catalog; sorted chunks build them from the first clusters
        only (1M, efConstruction 160: the tuner then needed efSearch 512, against 128 in one call)."""
        self.add(np.asarray(ids, dtype=np.int64)[order], vectors[order])

    def permute(self, order: np.ndarray) -> None:
        """Move an hnsw index's entry at position order[i] to position i; the graph, and so every
        result, stays the same, and the id map follows (FAISS permute_entries). For the benchmark's
        same-graph comparison of layouts. The entry sample stays the same vectors at their new
        positions (a reloaded copy samples its new layout)."""
        order = np.ascontiguousarray(order, dtype=np.int64)
        entries = self._entry_sample() if self.params.entry_sample and self.ntotal else None
        ids = faiss.vector_to_array(self.index.id_map)
        self._hnsw().permute_entries(order)
        faiss.copy_array_to_vector(ids[order], self.index.id_map)
        self._walk_state = None  # its id map view may point at the old buffer
        if entries is not None:
            moved_to = np.empty_like(order)
            moved_to[order] = np.arange(len(order))
            self._entries = (self.ntotal, moved_to[entries[0]], *self._entries[2:])

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
        n = self.ntotal
        k = max(1, min(k, n)) if n else 1
        id_filter = IdFilter(allowed) if allowed is not None else None  # held until FAISS is done with it
        with _one_thread_if(len(queries) == 1):
            if self.params.entry_sample and n:
                return self._search_from_entries(queries, k, id_filter, n)
            params = self._search_parameters(id_filter)
            return self.index.search(queries, k, params=params) if params else self.index.search(queries, k)

    def _search_from_entries(self, queries: np.ndarray, k: int, id_filter: IdFilter | None = None,
                             n: int | None = None):
        """HNSW search of the bottom graph level, started at the query's nearest vector of a fixed sample.

        Why: FAISS descends the upper levels greedily from one entry point, and on clustered vectors
        it can end in the wrong cluster, where no efSearch short of ~1000 finds the way back: at 1M
        synthetic items (efSearch 96) 3-5 % of queries found none of their true top-10 (top score
        0.19 against 0.80). Started at the best of 1,024 stored vectors, 0.1 % did, recall@10 rose
        from 0.958 to 0.994, and efSearch 24 gave 0.989 in 0.20 ms against 0.37 ms for 0.958 at 96.
        Comparing a query with the sample costs ~0.03 ms. With a filter the entry is the same: the
        walk goes through items the filter drops and returns only those it keeps. (Starting at the
        nearest sampled vector the filter keeps did worse, 1M items, filters keeping half, a tenth
        or a region of 5 %: recall@10 0.998 / 0.980 / 0.978 against 0.998 / 0.997 / 0.988.)"""
        n = self.ntotal if n is None else n
        walk = self._walk(n)
        hnsw, ids, search = walk.hnsw, walk.ids, walk.params
        positions, _ = self._entry_sample(n)
        sample_index = self._entries[3]
        translated = None  # SWIG keeps no reference to a selector set on the params: it must outlive the search
        if id_filter is not None:
            search = faiss.SearchParametersHNSW()
            translated = faiss.IDSelectorTranslated(self.index.id_map, id_filter.selector)  # the walk asks by position
            search.sel = translated
            search.efSearch = max(walk.params.efSearch, FILTERED_EF_SEARCH)
        # The query against the sample by FAISS, on the thread count search() set, not by numpy: its
        # OpenBLAS wakes a helper thread for this product, and on a busy machine about one single
        # query in ten then waited ~8 ms for it (0.03 ms otherwise).
        entry_sims, best = sample_index.search(queries, 1)
        entries = np.ascontiguousarray(positions[best[:, 0]], dtype=np.int32)
        entry_distances = np.ascontiguousarray(walk.sign * entry_sims[:, 0], dtype=np.float32)
        scores = np.empty((len(queries), k), dtype=np.float32)
        found = np.empty((len(queries), k), dtype=np.int64)
        hnsw.search_level_0(len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(entries),
                            faiss.swig_ptr(entry_distances), faiss.swig_ptr(scores), faiss.swig_ptr(found),
                            1, 1, search)
        if id_filter is not None and id_filter.count <= FILTER_EXACT_MAX:
            lost = self._rescan_lost_queries(hnsw, queries, k, translated, entry_sims[:, 0], scores, found)
            graph = filterwalk.Graph.of(hnsw, self.index.id_map)
            for q in np.setdiff1d(np.arange(len(queries)), lost):  # rescanned rows are exact already
                scores[q], found[q] = filterwalk.expand(graph, id_filter.keeps, queries[q], scores[q], found[q], k)
        return scores, np.where(found >= 0, ids[np.maximum(found, 0)], -1)

    @staticmethod
    def _rescan_lost_queries(hnsw, queries, k, selector, best_sampled, scores, found) -> np.ndarray:
        """Exact filtered search, in place, for the queries whose filtered graph walk got lost.

        Why: when the filter keeps a region of the space (a category) and the query lies elsewhere,
        the walk stops at the region's edge without its true top-10: at 1M items, a 5 % region,
        recall@10 0.37. Such a walk's best hit scores below the query's best sampled vector (found
        for the entry, before the filter), which at 1M happened for 54 % of those queries and for
        at most 0.9 % of queries under other filters (half, a tenth, the region from inside it).
        Scanning the kept vectors of a 5 % region in the index's own storage takes ~18 ms. The other
        queries' hits are then grown through the kept nodes (filterwalk.expand). Returns the rows
        scanned."""
        lost = np.flatnonzero((found[:, 0] < 0) | (best_sampled - scores[:, 0] > FILTER_EXACT_GAP))
        if len(lost):
            storage = faiss.downcast_index(hnsw.storage)  # flat: searched by position, as the walk
            params = faiss.SearchParameters(sel=selector)
            scores[lost], found[lost] = storage.search(queries[lost], k, params=params)
        return lost

    def _entry_sample(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions, vectors) of the entry sample: evenly spaced positions, so that in locality order
        every region of the catalog has its share. Read on the first search (from a memory-mapped
        file: ENTRY_SAMPLE pages) and again once vectors were added. n: ntotal, when the caller has it."""
        n = self.ntotal if n is None else n
        if self._entries is None or self._entries[0] != n:
            positions = np.unique(np.linspace(0, n - 1, min(self.params.entry_sample, n)).astype(np.int64))
            vectors = np.ascontiguousarray(faiss.downcast_index(self._hnsw().storage).reconstruct_batch(positions),
                                           dtype=np.float32)
            sample_index = faiss.IndexFlatIP(vectors.shape[1])
            sample_index.add(vectors)
            self._entries = (n, positions, vectors, sample_index)
        return self._entries[1], self._entries[2]

    def _walk(self, n: int) -> _Walk:
        """The objects every hnsw search reads, built once per (ntotal, efSearch): right after the text
        encoder has flushed the caches each SWIG call costs tens of microseconds, and a warm query
        made a dozen of them here."""
        key = (n, self.params.ef_search)
        walk = self._walk_state
        if walk is None or walk.key != key:
            hnsw = self._hnsw()
            params = faiss.SearchParametersHNSW()
            params.efSearch = self.params.ef_search or hnsw.hnsw.efSearch
            # Older FAISS releases negate inner products in HNSW (smaller is nearer), and the entries'
            # must be negated too; newer ones keep similarities (is_similarity). A wrong sign drops the entry.
            sign = 1.0 if getattr(hnsw.hnsw, "is_similarity", False) else -1.0
            # a view of the id map, not a copy: an add moves it, and changes ntotal, so the key
            ids = faiss.rev_swig_ptr(self.index.id_map.data(), self.index.id_map.size())
            walk = self._walk_state = _Walk(key, hnsw, ids, sign, params)
        return walk

    def _hnsw(self) -> faiss.IndexHNSW:
        return faiss.downcast_index(self.index.index)

    def _search_parameters(self, id_filter: IdFilter | None):
        if id_filter is None:
            return None
        selector = id_filter.selector
        kind = self.params.index_type
        if kind == "hnsw":
            ef_search = max(self.params.ef_search or 64, FILTERED_EF_SEARCH)
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search)
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

    def tune(self, ids: np.ndarray, vectors: np.ndarray, n_queries: int = TUNE_QUERIES, k: int = 10) -> float:
        """Raise efSearch / nprobe until recall@10 against exact search reaches the target.

        Queries are stored vectors moved off themselves (cosine ~0.8 to their source), so they are
        not in the index, like real queries. HNSW: recall of its own top-10. IVF-PQ: recall of the
        search path, the exact top-10 among the RERANK_DEPTH PQ candidates re-scored exactly.
        The target is met when the sample's recall less RECALL_MARGIN_SE standard errors reaches it:
        with 500 queries and the bare mean, the knob picked at 1M gave 0.953 on its own sample and
        0.935-0.970 on others (a per-query recall varies, so a sample's mean does by ~0.009)."""
        queries = tuning_queries(vectors, n_queries)
        truth = ids[_exact_top_k(vectors, queries, k)]
        knob = "ef_search" if self.params.index_type == "hnsw" else "nprobe"
        depth = k if self.params.index_type == "hnsw" else min(RERANK_DEPTH, self.ntotal)
        recall = bound = 0.0
        value = None
        for value in TUNE_VALUES if knob == "ef_search" else IVF_TUNE_VALUES:
            setattr(self.params, knob, value)
            self._apply_search_params()
            _, found = self.search(queries, depth)
            recall, bound = _recall_bound(_per_query_recall(found, truth))
            if bound >= RECALL_TARGET:
                break
        if bound < RECALL_TARGET:
            log.warning("%s: recall@10 %.3f (lower bound %.3f) below %.2f even at %s=%s",
                        self.params.index_type, recall, bound, RECALL_TARGET, knob, value)
        self.params.measured_recall_at_10 = round(float(recall), 4)
        log.info("%s tuned: %s=%s recall@10=%.3f, lower bound %.3f (%d queries, depth %d)",
                 self.params.index_type, knob, value, recall, bound, len(queries), depth)
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
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap(hnsw)
    lists = ivf_lists(n_items, dim)
    coarse = f"IVF{lists}_HNSW32" if n_items >= IVF_HNSW_MIN_ITEMS else f"IVF{lists}"
    # 'np': no polysemous training (minutes of annealing, only useful for Hamming-filtered search)
    return faiss.index_factory(dim, f"{coarse},PQ{_pq_m(dim)}x8np", faiss.METRIC_INNER_PRODUCT)


def _train(index: faiss.Index, vectors: np.ndarray) -> None:
    """Train IVF-PQ on a sample: ~40 points per list for the coarse k-means, 256 per PQ centroid."""
    ivf = faiss.extract_index_ivf(index)
    size = min(len(vectors), max(40 * ivf.nlist, 256 * 256))
    sample = vectors[np.sort(np.random.default_rng(0).choice(len(vectors), size=size, replace=False))]
    ivf.cp.max_points_per_centroid = 40
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None:
        pq.cp.max_points_per_centroid = 256
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def locality_order(vectors: np.ndarray, branching: int = LOCALITY_BRANCHING, leaf: int = LOCALITY_LEAF,
                   seed: int = 1) -> np.ndarray:
    """A permutation of range(len(vectors)) that puts near vectors next to each other.

    Recursive spherical k-means: split into `branching` clusters, each cluster in turn, down to groups
    of <= `leaf`; the order is the tree's leaves left to right. Each split trains on a sample and
    assigns its members in blocks, so no copy of all the vectors is made. ~6 s at 1M x 512-d on two
    cores (a flat 4,096-means took 38 s, and its order gave slower searches)."""
    out: list[np.ndarray] = []
    stack = [np.arange(len(vectors), dtype=np.int64)]
    while stack:
        members = stack.pop()
        k = min(branching, len(members) // 39)  # FAISS's k-means wants >= 39 points per centroid
        if len(members) <= leaf or k < 2:
            out.append(members)
            continue
        assign = _cluster(vectors, members, k, seed)
        grouped = np.argsort(assign, kind="stable")
        bounds = np.searchsorted(assign[grouped], np.arange(k + 1))
        stack.extend(members[grouped[bounds[c] : bounds[c + 1]]] for c in reversed(range(k)))
    return np.concatenate(out)  # never empty: an empty input is one empty leaf


def _cluster(vectors: np.ndarray, members: np.ndarray, k: int, seed: int, block: int = 100_000) -> np.ndarray:
    """The nearest of k spherical k-means centroids (trained on <= 64 k members) for each member."""
    rng = np.random.default_rng([seed, len(members)])
    sample = members if len(members) <= 64 * k else np.sort(rng.choice(members, 64 * k, replace=False))
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=6, spherical=True, seed=seed, max_points_per_centroid=64)
    kmeans.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    assign = np.empty(len(members), dtype=np.int64)
    for start in range(0, len(members), block):
        part = np.ascontiguousarray(vectors[members[start : start + block]], dtype=np.float32)
        assign[start : start + block] = kmeans.index.search(part, 1)[1][:, 0]
    return assign


def tuning_queries(vectors: np.ndarray, n: int, cosine: float = 0.8, seed: int = 0) -> np.ndarray:
    """n stored vectors, each rotated away from itself to the given cosine: plausible, unseen queries."""
    rng = np.random.default_rng(seed)
    base = np.asarray(vectors[np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))],
                      dtype=np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to the source
    noise /= np.linalg.norm(noise, axis=1, keepdims=True) + 1e-12
    out = cosine * base + math.sqrt(1 - cosine**2) * noise
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k positions, in blocks so a large store is never copied whole."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    found = np.zeros((len(queries), k), dtype=np.int64)
    block = 200_000
    for start in range(0, len(vectors), block):
        part = np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)
        d, i = faiss.knn(queries, part, min(k, len(part)), metric=faiss.METRIC_INNER_PRODUCT)
        scores, found = _merge_top_k(scores, found, d, i + start, k)
    return found


def _merge_top_k(s1, i1, s2, i2, k):
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each query's fraction of its exact ids (k) found among its ANN ids (depth >= k)."""
    return np.array([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)])


def _recall_bound(per_query: np.ndarray) -> tuple[float, float]:
    """(mean recall, mean less RECALL_MARGIN_SE standard errors of that mean)."""
    mean = float(per_query.mean())
    se = float(per_query.std(ddof=1)) / math.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
    return mean, mean - RECALL_MARGIN_SE * se


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the exact ids (Q, k) found among the ANN ids (Q, depth >= k)."""
    return float(_per_query_recall(found, truth).mean())
