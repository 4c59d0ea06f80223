"""HNSW construction: insertion order and efConstruction against build time and the efSearch the tuner needs.

For N clustered synthetic 512-d vectors (bench_query's mixture), build IndexHNSWFlat(M=32) three ways:
  random       efConstruction 80, vectors in the order given (mmsearch before the tenth session)
  sorted       efConstruction 80, vectors in mmsearch.index.locality_order
  sorted_efc160  efConstruction 160, locality order (what VectorIndex.build does now)
each by VectorIndex.build (so with its tuner's choice of efSearch), and for each, recall@10 against exact
search at efSearch 64..512 on 2000 other queries of the tuner's kind (stored vectors moved to cosine
0.8), as the mean and as the tuner's bound (mean less two standard errors).

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
EF_SEARCH = (64, 96, 128, 192, 256, 384, 512)


def run_variant(name: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    import mmsearch.index as index_module
    from mmsearch.index import VectorIndex, _per_query_recall, _recall_bound

    ef_construction, ordered = VARIANTS[name]
    saved = index_module.HNSW_EF_CONSTRUCTION
    index_module.HNSW_EF_CONSTRUCTION = ef_construction
    try:
        t0 = time.perf_counter()
        index = VectorIndex.build(vectors.shape[1], np.arange(len(vectors)), vectors, "hnsw", locality=ordered)
        build_s = time.perf_counter() - t0  # includes the order (~6 s at 1M) and the tuner (~15 s)
    finally:
        index_module.HNSW_EF_CONSTRUCTION = saved
    out = {"variant": name, "ef_construction": ef_construction, "build_s": build_s,
           "tuner_choice": index.params.ef_search, "recall": {}}
    for ef in EF_SEARCH:
        index.params.ef_search = ef
        index._apply_search_params()
        _, found = index.search(queries, 10)
        mean, bound = _recall_bound(_per_query_recall(found, truth))
        out["recall"][ef] = {"mean": mean, "bound": bound}
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
    queries = tuning_queries(vectors, TUNE_QUERIES, seed=5)  # another sample than the tuner's (seed 0)
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    results = [run_variant(name, vectors, queries, truth) for name in args.variants.split(",")]
    rows = [[r["variant"], r["ef_construction"], f"{r['build_s']:.1f}",
             *(f"{r['recall'][ef]['mean']:.4f} / {r['recall'][ef]['bound']:.4f}" for ef in EF_SEARCH),
             r["tuner_choice"]] for r in results]
    table = (f"HNSW32 construction, N = {args.n:,} x 512 (clustered synthetic), 2 threads; recall@10 on "
             f"{len(queries)} perturbed stored vectors: mean / mean - 2 SE\n"
             + fmt_table(["variant", "efConstruction", "build + order + tune s",
                          *(f"efSearch {ef}" for ef in EF_SEARCH), "tuner's efSearch"], rows))
    write_results(args.name, {"machine": machine(), "n": args.n, "results": results}, table)
    print(table)


if __name__ == "__main__":
    main()
