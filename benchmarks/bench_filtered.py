"""Filtered HNSW search: recall@10 and latency of the plain FAISS descent against the entry sample.

A filter that keeps more than `search.EXACT_FILTER_LIMIT` items goes to FAISS with an id selector
(efSearch at least 256). This builds an hnsw index of N clustered synthetic 512-d vectors (bench_query's
mixture) with `VectorIndex.build`, and for each filter compares two ways of searching the same graph:

  plain   FAISS's own search: greedy descent of the upper levels from one entry point, then the
          bottom level with the selector (indexes built before the entry sample search so)
  entry   `VectorIndex.search` now: the bottom level from the query's nearest stored vector of the
          entry sample; when the filter keeps at most 200,000 items, an exact scan of the kept vectors
          for a query whose best hit scores below that sampled vector (a walk lost outside the
          filter's region), and for the others the hits grown through the graph's kept nodes
          (`mmsearch/filterwalk.py`)

Filters: none; every other id (half); every tenth id (a tenth); one "category" of sixteen, a region of
the embedding space (items whose largest coordinate along 16 random directions is the first): a filter
that follows the vectors, like a product category. Queries: held-out points of the mixture (as
bench_query); for the category, once points that fall in it (a shopper searching within a category)
and once the held-out points that do not (their true top-10 lie on the category's edge). Recall
against exact search over the items the filter keeps; "at 0": the share of queries that found none
of their true top-10; latency: one query at a time on one thread, the selector's construction
included (the query engine builds one per query).

    python benchmarks/bench_filtered.py              # 1M, ~12 min on 2 cores
    python benchmarks/bench_filtered.py --n 100000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))

from benchmarks._common import embeddings, fmt_table, machine, write_results  # noqa: E402


def category_of(vectors: np.ndarray) -> np.ndarray:
    """Which of 16 random directions each vector leans to most: a region of the embedding space."""
    directions = np.random.default_rng(7).standard_normal((16, vectors.shape[1])).astype(np.float32)
    return np.concatenate([(vectors[s:s + 100_000] @ directions.T).argmax(axis=1)
                           for s in range(0, len(vectors), 100_000)])


def cases(ids: np.ndarray, vectors: np.ndarray, n_queries: int) -> list[tuple[str, np.ndarray | None, np.ndarray]]:
    """(filter name, allowed ids, queries): held-out points of the mixture; for the category filter
    once those that fall in the category (a shopper searching within it) and once the others."""
    queries = embeddings(n_queries, 512, seed=10_000_019)
    pool = embeddings(40 * n_queries, 512, seed=20_000_003)
    in_category = ids[category_of(vectors) == 0]
    return [("none", None, queries), ("half", ids[::2], queries), ("tenth", ids[::10], queries),
            ("category, query in it", in_category, pool[category_of(pool) == 0][:n_queries]),
            ("category, query elsewhere", in_category, queries[category_of(queries) != 0])]


def measure(index, queries: np.ndarray, truth: np.ndarray, allowed: np.ndarray | None, timed: int) -> dict:
    from mmsearch.index import _per_query_recall, _recall_bound

    _, found = index.search(queries, 10, allowed)
    per_query = _per_query_recall(found, truth)
    mean, bound = _recall_bound(per_query)
    times = []  # one query at a time: VectorIndex.search runs a single query on one FAISS thread
    for q in queries[:timed]:
        t0 = time.perf_counter()
        index.search(q[None], 10, allowed)
        times.append(time.perf_counter() - t0)
    return {"recall_at_10": mean, "bound": bound, "at_zero": float((per_query == 0).mean()),
            "ms_median_1thread": 1000 * statistics.median(times)}


def main() -> None:
    import faiss

    from mmsearch.config import IndexParams
    from mmsearch.index import VectorIndex

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--timed", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--name", default="bench_filtered")
    args = parser.parse_args()
    vectors = embeddings(args.n, 512)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    t0 = time.perf_counter()
    entry = VectorIndex.build(512, ids, vectors, "hnsw")
    build_s = time.perf_counter() - t0
    plain = VectorIndex(entry.index, IndexParams(**{**vars(entry.params), "entry_sample": None}))
    print(f"built in {build_s:.0f} s: {entry.params}", flush=True)
    results = []
    for name, allowed, queries in cases(ids, vectors, args.queries):
        keep = np.ones(len(ids), bool) if allowed is None else np.isin(ids, allowed)
        _, positions = faiss.knn(queries, vectors[keep], 10, metric=faiss.METRIC_INNER_PRODUCT)
        truth = ids[keep][positions]
        row = {"filter": name, "kept": int(keep.sum()), "queries": len(queries)}
        for label, index in (("plain", plain), ("entry", entry)):
            row[label] = measure(index, queries, truth, allowed, args.timed)
        print(row, flush=True)
        results.append(row)
    rows = [[r["filter"], f"{r['kept']:,}", r["queries"], *(v for label in ("plain", "entry") for v in (
        f"{r[label]['recall_at_10']:.3f}", f"{100 * r[label]['at_zero']:.1f} %",
        f"{r[label]['ms_median_1thread']:.2f}"))] for r in results]
    table = (f"Filtered HNSW search, N = {args.n:,} x 512 (clustered synthetic), efSearch "
             f"{entry.params.ef_search} (filtered: at least 256); held-out queries, "
             f"{args.timed} timed one at a time\n"
             + fmt_table(["filter", "items kept", "queries", "plain R@10", "plain at 0", "plain ms", "entry R@10",
                          "entry at 0", "entry ms"], rows))
    write_results(args.name, {"machine": machine(), "n": args.n, "build_s": build_s,
                              "params": vars(entry.params), "results": results}, table)


if __name__ == "__main__":
    main()
