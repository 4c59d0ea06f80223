"""Re-indexing a grown catalog: FAISS files updated in place against the previous full rebuild.

For each N (default 100k and 1M): an index of N items (clustered synthetic 512-d image vectors with
their rows, hnsw, as bench_query builds it), then real `ingest` runs (ViT-B-32 random weights, ONNX
Runtime int8, `delete=False` so the synthetic items stay):
- add M new photos: the published hnsw file is loaded, the M vectors added, the file published again
  (`Collection.update_published`); the same with a fresh M photos and the update switched off, which
  is what every run did before: rebuild every FAISS index from all the store's vectors;
- the same folder again, nothing changed: the published files are kept as they are; and with that
  switched off (a rebuild);
- recall@10 against exact search over every stored vector, the same held-out queries before and after
  the update.

    python benchmarks/bench_update.py                      # 100k and 1M (about 20 minutes on 2 cores)
    python benchmarks/bench_update.py --sizes 20000 --add 16   # a smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mmsearch CLI (cli.py) sets it; before torch loads

import argparse  # noqa: E402
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import embeddings, fmt_table, machine, proc_status, write_results  # noqa: E402
from bench_ingest import make_images  # noqa: E402
from bench_query import MODEL, PRETRAINED, build_store, publish  # noqa: E402


def timed_ingest(folder: Path, index_dir: Path, encoder, update: bool) -> tuple[float, list[str]]:
    """(wall seconds, the modalities updated in place) of one ingest; update=False: as before this
    change, every FAISS index rebuilt from the store."""
    from mmsearch import collection as collection_module
    from mmsearch.ingest import IngestOptions, ingest

    cls = collection_module.Collection
    saved = cls.update_published, cls._fresh_file
    if not update:
        cls.update_published = lambda self, *a, **k: []
        cls._fresh_file = lambda self, *a, **k: None
    try:
        t0 = time.perf_counter()
        report = ingest(folder, index_dir, IngestOptions(delete=False, batch_size=32), encoder=encoder)
        return time.perf_counter() - t0, report.index_updated
    finally:
        cls.update_published, cls._fresh_file = saved


def recall_at_10(index_dir: Path, vectors: np.ndarray, n_queries: int = 1000) -> float:
    """The published image index's recall@10 against exact search over every stored vector."""
    from mmsearch.collection import Collection
    from mmsearch.index import _exact_top_k, _recall, tuning_queries

    collection = Collection.open(index_dir)
    try:
        ids, stored = collection.all_vectors("image")
        queries = tuning_queries(vectors, n_queries, seed=11)
        truth = ids[_exact_top_k(stored, queries, 10)]
        _, found = collection.vector_index("image").search(queries, 10)
        return _recall(found, truth)
    finally:
        collection.close()


def run_size(n: int, add: int, workdir: Path, encoder) -> dict:
    from mmsearch.index import VectorIndex

    print(f"\n=== N = {n:,} ===", flush=True)
    vectors = embeddings(n, 512)
    index_dir = workdir / f"idx{n}"
    build_store(index_dir, vectors)
    t0 = time.perf_counter()
    index = VectorIndex.build(512, np.arange(1, n + 1, dtype=np.int64), vectors, "hnsw")
    build_s = time.perf_counter() - t0
    publish(index_dir, index)
    tuned_recall = index.params.measured_recall_at_10  # on the tuner's own sample of queries
    del index
    photos = {name: workdir / f"{name}{n}" for name in ("update", "rebuild")}
    for seed, folder in enumerate(photos.values()):
        make_images(folder, add, seed=100 + seed)
        for path in folder.iterdir():  # distinct keys: the two folders hold different items
            path.rename(folder / f"{folder.name}-{path.name}")
    out = {"n": n, "added": add, "hnsw_build_s": build_s, "tuned_recall_at_10": tuned_recall,
           "built_recall_at_10": recall_at_10(index_dir, vectors)}
    out["add_update_s"], out["add_update_modalities"] = timed_ingest(photos["update"], index_dir, encoder, True)
    print(f"add {add}, updated in place: {out['add_update_s']:.1f} s {out['add_update_modalities']}", flush=True)
    out["updated_recall_at_10"] = recall_at_10(index_dir, vectors)
    out["add_rebuild_s"], _ = timed_ingest(photos["rebuild"], index_dir, encoder, False)
    print(f"add {add}, rebuilt: {out['add_rebuild_s']:.1f} s", flush=True)
    out["rerun_keep_s"], _ = timed_ingest(photos["rebuild"], index_dir, encoder, True)
    out["rerun_rebuild_s"], _ = timed_ingest(photos["rebuild"], index_dir, encoder, False)
    print(f"unchanged re-run: {out['rerun_keep_s']:.1f} s kept, {out['rerun_rebuild_s']:.1f} s rebuilt", flush=True)
    out["rss_mib"] = proc_status()
    shutil.rmtree(index_dir)
    return out


def table(results: list[dict]) -> str:
    rows = [[r["n"], r["added"], round(r["add_update_s"], 1), round(r["add_rebuild_s"], 1),
             round(r["add_rebuild_s"] / r["add_update_s"], 1), round(r["rerun_keep_s"], 1),
             round(r["rerun_rebuild_s"], 1), round(r["rerun_rebuild_s"] / r["rerun_keep_s"], 1),
             round(r["built_recall_at_10"], 3), round(r["updated_recall_at_10"], 3)] for r in results]
    headers = ["N", "added photos", "add: update s", "add: rebuild s", "x faster", "re-run: keep s",
               "re-run: rebuild s", "x faster", "R@10 built", "R@10 updated"]
    return ("Re-indexing a grown catalog: hnsw image index of N synthetic items, ingest of new photos "
            "(ViT-B-32 random, ONNX Runtime int8); one run each\n" + fmt_table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--add", type=int, default=64, help="new photos per ingest")
    parser.add_argument("--workdir", type=Path, help="where index folders go (default: a temp dir)")
    parser.add_argument("--name", default="bench_update", help="results file name")
    args = parser.parse_args()
    from mmsearch.encoders import load_encoder

    encoder = load_encoder(MODEL, PRETRAINED, "int8", "onnx")
    workdir = Path(tempfile.mkdtemp(prefix="mmsearch-bench-", dir=args.workdir))
    results: list[dict] = []
    payload = {"machine": machine(), "model": f"{MODEL} --pretrained {PRETRAINED}, ONNX Runtime int8",
               "results": results}
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            results.append(run_size(n, args.add, workdir, encoder))
            write_results(args.name, payload, table(results))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
