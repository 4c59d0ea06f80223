"""Query path at scale: ANN latency / recall / memory per index type, warm and cold end-to-end queries.

For each N (default 10k, 100k, 1M) on clustered synthetic 512-d embeddings (benchmarks/_common.py):
- a real index folder: SQLite rows (key, path, caption, metadata) + vectors bulk-inserted through the
  store's engine and models, FAISS files published by Collection.save_faiss (auto index choice);
- flat / hnsw / ivfpq built by VectorIndex.build (efSearch / nprobe tuned to recall@10 >= 0.95);
  per type: build time, bytes per vector, RSS after load (fresh process, mmap and not), single-thread
  latency (median over held-out queries), recall@10 vs exact (ivfpq: raw PQ and after exact re-rank
  of the 256 candidates, which is what search.py does);
- warm end-to-end text query (Searcher, model loaded) vs the bare text encoder the search runs (the
  ONNX text export, cut to the query's tokens), same process; torch's text encoder timed beside it;
- cold CLI query (`python -m mmsearch search ...` in a new process) and its import/model-load floor.
The encoder is ViT-B-32 with `--pretrained random` (speed only; random weights rank nothing useful).

    python benchmarks/bench_query.py            # 10k, 100k, 1M (about an hour on 2 cores)
    python benchmarks/bench_query.py --quick    # 2k, 20k smoke run
    python benchmarks/bench_query.py --ann-only --kinds ivfpq   # index types alone, no store or model
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mmsearch CLI (cli.py) sets it; before torch loads

import argparse  # noqa: E402
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import embeddings, fmt_table, machine, median_time, proc_status, write_results  # noqa: E402

MODEL, PRETRAINED = "ViT-B-32", "random"
CATEGORIES = ["dress", "shirt", "sneaker", "boot", "bag", "coat", "sandal", "trouser", "pullover", "hat"]


def build_store(index_dir: Path, vectors: np.ndarray) -> None:
    """Items + vectors through the library's schema (SQLAlchemy core bulk insert, 20k rows a transaction)."""
    from sqlalchemy import insert

    from mmsearch.collection import Collection
    from mmsearch.config import ModelRef, now_iso
    from mmsearch.store import Item, MetaField, Vector, _bump_generation

    collection = Collection.create(index_dir, ModelRef(MODEL, PRETRAINED), vectors.shape[1])
    store = collection.store
    stamp = now_iso()
    from sqlalchemy.orm import Session

    for start in range(0, len(vectors), 20_000):
        stop = min(start + 20_000, len(vectors))
        items = [{"id": i + 1, "key": f"sku{i:07d}", "image": f"/catalog/img/{i:07d}.jpg",
                  "caption": f"{CATEGORIES[i % 10]} number {i}", "image_hash": f"{i:064x}", "caption_hash": None,
                  "meta": {"category": CATEGORIES[i % 10], "price": float(i % 500), "brand": f"b{i % 97}"},
                  "updated": stamp} for i in range(start, stop)]
        vecs = [{"item_id": i + 1, "modality": "image", "data": vectors[i].tobytes()} for i in range(start, stop)]
        with Session(store.engine) as session, session.begin():
            session.execute(insert(Item), items)
            session.execute(insert(Vector), vecs)
            if start == 0:
                session.execute(insert(MetaField), [{"name": n} for n in ("category", "price", "brand")])
            _bump_generation(session)
    collection.close()


def publish(index_dir: Path, image_index) -> None:
    """Publish an already-built index as the collection's image index (no rebuild)."""
    from mmsearch.collection import Collection

    collection = Collection.open(index_dir)
    try:
        with collection.write_lock(repair=False):  # repair would rebuild what we are about to publish
            collection.adopt("image", image_index, collection.store.generation())
            collection.save_faiss(image_index.params.index_type)
    finally:
        collection.close()


LOAD_PROBE = r"""
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import faiss, numpy as np
from _common import proc_status
from mmsearch.config import IndexParams
from mmsearch.index import VectorIndex
faiss.omp_set_num_threads(1)
q = np.load({queries!r})
before = proc_status()
t0 = time.perf_counter()
index = VectorIndex.load({path!r} , IndexParams(**json.loads({params!r})), mmap={mmap})
load_s = time.perf_counter() - t0
after_load = proc_status()
t0 = time.perf_counter(); index.search(q[:1], 10); first_s = time.perf_counter() - t0
for row in q[1:21]: index.search(row, 10)
after = proc_status()
print(json.dumps({{"load_ms": 1000 * load_s, "first_query_ms": 1000 * first_s,
                  "anon_mib_after_load": after_load["RssAnon"] - before["RssAnon"],
                  "anon_mib": after["RssAnon"] - before["RssAnon"],
                  "file_mib": after["RssFile"] - before["RssFile"]}}))
"""


def load_probe(path: Path, params: dict, queries_path: Path, mmap: bool) -> dict:
    fd = os.open(path, os.O_RDONLY)  # evict the file from the page cache: a cold load
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    code = LOAD_PROBE.format(root=str(Path(__file__).parent.parent), bench=str(Path(__file__).parent),
                             queries=str(queries_path), path=str(path), params=json.dumps(params), mmap=mmap)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ann_stats(kind, index, vectors, ids, queries, truth, tmp: Path, queries_path: Path, build_s: float) -> dict:
    import faiss

    from mmsearch.index import _recall

    faiss.omp_set_num_threads(1)
    path = tmp / f"{kind}.faiss"
    index.save(path)
    lat = []
    for row in queries:
        t0 = time.perf_counter()
        index.search(row, 10)
        lat.append(time.perf_counter() - t0)
    _, found = index.search(queries, 10)
    out = {"build_s": build_s, "file_bytes": path.stat().st_size,
           "bytes_per_vector": path.stat().st_size / len(ids),
           "ratio_to_raw_vectors": path.stat().st_size / vectors.nbytes,
           "params": {k: v for k, v in vars(index.params).items() if v is not None},
           "latency_ms_median_1thread": 1000 * statistics.median(lat),
           "latency_ms_p90_1thread": 1000 * float(np.percentile(lat, 90)),
           "recall_at_10": _recall(found, truth)}
    if kind == "ivfpq":
        lat256 = []
        for row in queries:
            t0 = time.perf_counter()
            index.search(row, 256)
            lat256.append(time.perf_counter() - t0)
        _, cand = index.search(queries, 256)
        out["recall_at_10_after_exact_rerank_of_256"] = _recall(cand, truth)
        out["latency_ms_median_k256_1thread"] = 1000 * statistics.median(lat256)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    out["load_mmap"] = load_probe(path, vars(index.params), queries_path, True)
    out["load_nommap"] = load_probe(path, vars(index.params), queries_path, False)
    path.unlink()
    return out


def warm_query(index_dir: Path, repeat: int) -> dict:
    from mmsearch.encoders import load_encoder
    from mmsearch.search import Searcher, build_query
    from mmsearch.textonnx import export_text_encoder

    encoder = load_encoder(MODEL, PRETRAINED)
    export_text_encoder(encoder)  # as `mmsearch index` does: the cold CLI query below runs torch-free
    texts = ["red leather ankle boot", "striped summer dress", "black backpack", "white sneaker"]
    with Searcher(index_dir) as searcher:  # as `serve` and the Python API run: words by the ONNX export
        searcher.search(build_query(texts=[texts[0]]))  # loads the index, fills the calibration cache
        # the bare baseline is the text encoder the search itself runs (the ONNX export, trimmed to the
        # query's tokens); torch's encoder (loaded here all the same) is timed beside it for reference
        query_encoder = searcher.text_encoder
        times: dict[str, list[float]] = {"bare": [], "full": [], "torch": []}

        def timed(name, call, *args):
            t0 = time.perf_counter()
            out = call(*args)
            times[name].append(time.perf_counter() - t0)
            return out

        # bare and whole query interleaved, so load changes hit both alike, in alternating order, so
        # each follows the other as often (whatever ran just before leaves the caches and the cores
        # in its state: right after torch's encoder, ONNX's took ~3 ms longer)
        for i in range(repeat):
            text = texts[i % len(texts)]
            if i % 2:
                result = timed("full", searcher.search, build_query(texts=[text]))
            timed("bare", query_encoder.encode_texts, [text])
            if not i % 2:
                result = timed("full", searcher.search, build_query(texts=[text]))
        for i in range(repeat):  # torch's encoder, for reference, on its own
            timed("torch", encoder.encode_texts, [texts[i % len(texts)]])
        assert len(result.results) == 10
        kind = searcher.collection.vector_index("image").params.index_type
    b, f, t = (statistics.median(times[name]) for name in ("bare", "full", "torch"))
    return {"index_type": kind, "text_encoder": type(query_encoder).__name__, "bare_text_encoder_ms": 1000 * b,
            "torch_text_encoder_ms": 1000 * t, "end_to_end_ms": 1000 * f, "ratio": f / b,
            "overhead_ms": 1000 * (f - b)}


COLD_FLOOR = r"""
import sys; sys.path.insert(0, {root!r})
from mmsearch.encoders import load_encoder
load_encoder({model!r}, {pretrained!r}).encode_texts(["red leather ankle boot"])
"""


def cold_query(index_dir: Path, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "mmsearch", "search", "red leather ankle boot", "--index", str(index_dir),
           "--format", "json"]
    floor_cmd = [sys.executable, "-c", COLD_FLOOR.format(root=str(Path(__file__).parent.parent), model=MODEL,
                                                         pretrained=PRETRAINED)]
    cli, floor = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        cli.append(time.perf_counter() - t0)
        assert out.returncode == 0 and len(json.loads(out.stdout)["results"]) == 10, out.stderr[-500:]
        t0 = time.perf_counter()
        subprocess.run(floor_cmd, capture_output=True, check=True, env=env)
        floor.append(time.perf_counter() - t0)
    c, f = statistics.median(cli), statistics.median(floor)
    return {"cli_search_s": c, "import_and_model_load_and_encode_s": f, "ratio": c / f, "overhead_s": c - f}


def exact_ms(vectors: np.ndarray, queries: np.ndarray) -> float:
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    faiss.omp_set_num_threads(1)
    try:
        return 1000 * median_time(lambda: exact.search(queries[:1], 10), repeat=7)
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)


def run_size(n: int, dim: int, n_queries: int, workdir: Path, repeat: int, kinds: list[str],
             ann_only: bool = False) -> dict:

    from mmsearch.index import VectorIndex, _exact_top_k, choose_index_type

    print(f"\n=== N = {n:,} ===", flush=True)
    t0 = time.perf_counter()
    vectors = embeddings(n, dim)
    ids = np.arange(1, n + 1, dtype=np.int64)
    queries = embeddings(n_queries, dim, seed=10_000_019)  # held-out points of the same mixture
    queries_path = workdir / "queries.npy"
    np.save(queries_path, queries)
    truth = ids[_exact_top_k(vectors, queries, 10)]
    print(f"data {time.perf_counter() - t0:.1f}s", flush=True)
    index_dir = workdir / f"idx{n}"
    out: dict = {"n": n, "dim": dim, "raw_vector_bytes": vectors.nbytes}
    if not ann_only:
        t0 = time.perf_counter()
        build_store(index_dir, vectors)
        out["store_build_s"] = time.perf_counter() - t0
        out["sqlite_bytes"] = (index_dir / "items.sqlite").stat().st_size
        print(f"store {out['store_build_s']:.1f}s", flush=True)
    out["exact_flat_ms_1thread"] = exact_ms(vectors, queries)
    auto = choose_index_type(n, dim)
    out["auto_index_type"] = auto
    out["kinds"] = {}
    built = {}
    for kind in kinds:
        t0 = time.perf_counter()
        index = VectorIndex.build(dim, ids, vectors, kind)
        build_s = time.perf_counter() - t0
        out["kinds"][kind] = ann_stats(kind, index, vectors, ids, queries, truth, workdir, queries_path, build_s)
        if kind == "hnsw":  # the same graph with its vectors in random order, then put back
            shuffle = np.random.default_rng(0).permutation(index.ntotal)
            index.permute(shuffle)
            label = "hnsw, same graph, random layout"
            out["kinds"][label] = ann_stats(kind, index, vectors, ids, queries, truth, workdir, queries_path, build_s)
            print(label, json.dumps(out["kinds"][label]), flush=True)
            index.permute(np.argsort(shuffle))
        print(kind, json.dumps(out["kinds"][kind]), flush=True)
        if kind == auto and not ann_only:
            built[kind] = index
        else:
            del index
    if ann_only:
        return out
    image_index = built.get(auto) or VectorIndex.build(dim, ids, vectors, auto)
    del vectors
    publish(index_dir, image_index)
    del image_index, built
    out["warm_query"] = warm_query(index_dir, repeat=max(repeat, 15))
    print("warm", out["warm_query"], flush=True)
    out["cold_query"] = cold_query(index_dir, repeat=repeat)
    print("cold", out["cold_query"], flush=True)
    shutil.rmtree(index_dir, ignore_errors=True)
    return out


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for kind, k in r["kinds"].items():
            rows.append([r["n"], kind, f"{k['build_s']:.1f}", k["params"].get("ef_search") or
                         k["params"].get("nprobe") or "-", f"{k['latency_ms_median_1thread']:.2f}",
                         f"{k['recall_at_10']:.3f}",
                         f"{k.get('recall_at_10_after_exact_rerank_of_256', float('nan')):.3f}",
                         f"{k['bytes_per_vector']:.0f}", f"{k['ratio_to_raw_vectors']:.3f}",
                         f"{k['load_nommap']['anon_mib']:.0f}", f"{k['load_mmap']['anon_mib']:.0f}",
                         f"{k['load_mmap']['file_mib']:.0f}"])
    ann = fmt_table(["N", "index", "build s", "ef/nprobe", "ms/query 1thr", "R@10", "R@10 rerank256",
                     "B/vec", "x raw", "RSS MiB", "RSS mmap anon", "mmap file pages"], rows)
    rows = [[r["n"], r["auto_index_type"], f"{r['warm_query'].get('torch_text_encoder_ms', float('nan')):.1f}",
             f"{r['warm_query']['bare_text_encoder_ms']:.1f}",
             f"{r['warm_query']['end_to_end_ms']:.1f}", f"{r['warm_query']['ratio']:.3f}",
             f"{r['cold_query']['import_and_model_load_and_encode_s']:.2f}", f"{r['cold_query']['cli_search_s']:.2f}",
             f"{r['cold_query']['ratio']:.2f}", f"{r['exact_flat_ms_1thread']:.1f}",
             f"{r['sqlite_bytes'] / 2**20:.0f}"] for r in results if "warm_query" in r]
    head = ("ANN per index type (single thread; recall vs exact on held-out clustered queries; RSS = anonymous "
            "memory after load + 21 queries, in a fresh process, file evicted from page cache first)\n" + ann)
    if not rows:  # --ann-only
        return head
    e2e = fmt_table(["N", "auto", "warm: torch text enc ms", "warm: query's text enc ms", "warm: search ms",
                     "ratio (<=1.15)", "cold: floor s",
                     "cold: CLI s", "cold ratio", "flat 1thr ms", "SQLite MiB"], rows)
    return (head + "\n\nEnd to end (ViT-B-32 random weights: speed only; medians, ratios against the same-run "
            "baseline)\n" + e2e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2k and 20k items, fewer repeats")
    parser.add_argument("--workdir", type=Path, help="where index folders go (default: a temp dir)")
    parser.add_argument("--ann-only", action="store_true", help="index types only: no store, no end-to-end queries")
    parser.add_argument("--name", default=None, help="results file name (default bench_query[_quick])")
    args = parser.parse_args()
    sizes = [2_000, 20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeat = 3 if args.quick else args.repeat
    workdir = Path(tempfile.mkdtemp(prefix="mmsearch-bench-", dir=args.workdir))
    results = []
    payload = {"machine": machine(), "model": f"{MODEL} --pretrained {PRETRAINED} (random weights: speed only)",
               "results": results}
    name = args.name or ("bench_query_quick" if args.quick else "bench_query")
    try:
        for n in sizes:
            results.append(run_size(n, args.dim, args.queries, workdir, repeat, args.kinds.split(","), args.ann_only))
            write_results(name, payload, table(results))  # after every size: a long run keeps what it did
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload["peak_rss_mib"] = proc_status()["VmHWM"]
    write_results(name, payload, table(results))


if __name__ == "__main__":
    main()
