"""HNSW construction: insertion order and efConstruction against build time and the efSearch the tuner needs.

For N clustered synthetic 512-d vectors (bench_query's mixture), build IndexHNSWFlat(M=32) three ways:
  random       efConstruction 80, vectors in the order given (mmsearch before the tenth session)
  sorted       efConstruction 80, vectors in mmsearch.index.locality_order
  sorted_efc160  efConstruction 160, locality order (what VectorIndex.build does now)
and for each, recall@10 against exact search at efSearch 128..512 on the tuner's own kind of queries
(2000 stored vectors moved to cosine 0.8), as the mean and as the tuner's bound (mean less two standard
errors; the tuner takes the first efSearch whose bound reaches 0.95).

    python benchmarks/bench_hnsw_build.py              # 1M, ~15 min on 2 cores
    python benchmarks/bench_hnsw_build.py --n 200000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))

from benchmarks._common import embeddings, fmt_table, machine, write_results  # noqa: E402

VARIANTS = {"random": (80, False), "sorted": (80, True), "sorted_efc160": (160, True)}
EF_SEARCH = (128, 192, 256, 384, 512)


def run_variant(name: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    import faiss

    from mmsearch.index import HNSW_M, _per_query_recall, _recall_bound, locality_order

    ef_construction, ordered = VARIANTS[name]
    t0 = time.perf_counter()
    order = locality_order(vectors) if ordered else np.arange(len(vectors))
    order_s = time.perf_counter() - t0
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    t0 = time.perf_counter()
    for start in range(0, len(order), 100_000):
        index.add(np.ascontiguousarray(vectors[order[start : start + 100_000]]))
    out = {"variant": name, "ef_construction": ef_construction, "order_s": order_s,
           "build_s": time.perf_counter() - t0, "recall": {}}
    for ef in EF_SEARCH:
        index.hnsw.efSearch = ef
        _, found = index.search(queries, 10)
        found = np.where(found >= 0, order[np.maximum(found, 0)], -1)  # positions -> input rows
        mean, bound = _recall_bound(_per_query_recall(found, truth))
        out["recall"][ef] = {"mean": mean, "bound": bound}
    out["tuner_choice"] = next((ef for ef in EF_SEARCH if out["recall"][ef]["bound"] >= 0.95), None)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    import faiss

    from mmsearch.index import TUNE_QUERIES, tuning_queries

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--name", default="bench_hnsw_build")
    args = parser.parse_args()
    vectors = embeddings(args.n, 512)
    queries = tuning_queries(vectors, TUNE_QUERIES)
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    results = [run_variant(name, vectors, queries, truth) for name in args.variants.split(",")]
    rows = [[r["variant"], r["ef_construction"], f"{r['order_s']:.1f}", f"{r['build_s']:.1f}",
             *(f"{r['recall'][ef]['mean']:.4f} / {r['recall'][ef]['bound']:.4f}" for ef in EF_SEARCH),
             r["tuner_choice"] or "-"] for r in results]
    table = (f"HNSW32 construction, N = {args.n:,} x 512 (clustered synthetic), 2 threads; recall@10 on "
             f"{len(queries)} perturbed stored vectors: mean / mean - 2 SE\n"
             + fmt_table(["variant", "efConstruction", "order s", "build s",
                          *(f"efSearch {ef}" for ef in EF_SEARCH), "tuner's efSearch"], rows))
    write_results(args.name, {"machine": machine(), "n": args.n, "results": results}, table)
    print(table)


if __name__ == "__main__":
    main()
