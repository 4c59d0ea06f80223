"""mmsearch vs rclip (PyPI) on the same machine, same folder, same architecture (ViT-B-32-256).

rclip downloads its ONNX model from the Hugging Face hub on first run; offline, this benchmark gives it
model files of the same architecture exported locally with random weights where it looks for them:
$RCLIP_DATADIR/ViT-B-32-256-datacomp_s34b_b86k/{visual,textual}.onnx (input 'input', output 'output')
and $RCLIP_DATADIR/tokenizer/bpe_simple_vocab_16e6.txt.gz (open_clip ships the same file). Only speed
is compared; mmsearch runs ViT-B-32-256 with `--pretrained random` too.

Indexing: wall time of `rclip QUERY` on a fresh database holding the N-image folder minus the same on a
1-image folder (start-up, model load and the query cancel out), i.e. (N-1) images / difference; likewise
`mmsearch index` as it runs by default (ONNX Runtime fp32), with `--runtime torch`, and with
`--quantize int8` (ONNX Runtime int8). Also the whole wall times. Medians of interleaved repeats.
mmsearch's ONNX text tower (what `index` exports once per model for torch-free cold queries) is
exported before timing, into a private MMSEARCH_CACHE.
Cold query at N items: rclip's own database schema filled with N synthetic clustered vectors (rclip
reads every vector from SQLite on each query); mmsearch's index of the same vectors (bench_query's
store + auto index type, or --big-index-type for N >= 1M to bound build time). Each tool in a new process.

rclip is installed in its own virtualenv (it pins older numpy/pillow/huggingface_hub):
    python -m venv ~/.cache/mmsearch-bench/rclip-venv && ~/.cache/mmsearch-bench/rclip-venv/bin/pip install rclip
    python benchmarks/bench_rclip.py               # 192 images; cold queries at 10k, 100k, 1M
    python benchmarks/bench_rclip.py --quick       # 32 images; cold query at 5k
    python benchmarks/bench_rclip.py --images 480 --cold-sizes ""   # indexing only, more images
"""

from __future__ import annotations

import argparse
import gzip
import os
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
from _common import embeddings, fmt_table, machine, write_results  # noqa: E402

ARCH = "ViT-B-32-256"
RCLIP_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
DEFAULT_VENV = Path.home() / ".cache" / "mmsearch-bench" / "rclip-venv"
ROOT = Path(__file__).parent.parent


def export_rclip_models(datadir: Path) -> None:
    import open_clip
    import torch

    from mmsearch.onnxcache import export_method

    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None).eval()
    target = datadir / RCLIP_SUBDIR
    target.mkdir(parents=True, exist_ok=True)

    # rclip's file layout: input 'input', output 'output'
    export_method(model, "encode_image", torch.zeros(1, 3, 256, 256), target / "visual.onnx", "input", "output")
    tokens = open_clip.get_tokenizer(ARCH)(["a photo"])
    export_method(model, "encode_text", tokens, target / "textual.onnx", "input", "output")
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    (datadir / "tokenizer").mkdir(exist_ok=True)
    shutil.copy(vocab, datadir / "tokenizer" / vocab.name)
    with gzip.open(vocab) as fh:  # sanity: a real vocabulary file
        assert fh.read(100)


def export_mmsearch_onnx(datadir: Path) -> None:
    """mmsearch's once-per-model exports, made before timing: the text tower (torch-free cold queries)
    and the fp32 and int8 image towers (the default `--runtime auto`, and `--quantize int8`)."""
    from bench_query import MODEL, PRETRAINED

    from mmsearch.encoders import load_encoder
    from mmsearch.textonnx import export_text_encoder

    os.environ["MMSEARCH_CACHE"] = str(datadir / "mmsearch-cache")
    for name in (MODEL, ARCH):
        assert export_text_encoder(load_encoder(name, PRETRAINED)) is not None
    for quantize in (None, "int8"):
        load_encoder(ARCH, PRETRAINED, quantize=quantize, runtime="onnx")


def timed(cmd, cwd=None, env=None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {out.stderr[-1500:]}")
    return elapsed


def envs(datadir: Path) -> tuple[dict, dict]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    base["HF_HUB_OFFLINE"] = "1"
    base["MMSEARCH_CACHE"] = str(datadir / "mmsearch-cache")  # the ONNX text tower, exported once per run
    rclip = {**base, "RCLIP_DATADIR": str(datadir)}
    mm = {**base, "PYTHONPATH": str(ROOT)}
    return rclip, mm


def indexing(rclip_bin: Path, folder: Path, one: Path, datadir: Path, tmp: Path, repeat: int, n: int) -> dict:
    """Indexing throughput with start-up cancelled out: wall time on the N-image folder minus wall time
    on a 1-image folder, for each tool (fresh database / index each time, interleaved repeats)."""
    rclip_env, mm_env = envs(datadir)
    # mm: the default (--runtime auto: ONNX Runtime fp32 for this model); mm_int8: ONNX Runtime int8
    variants = {"rclip": None, "mm": [], "mm_torch": ["--runtime", "torch"], "mm_int8": ["--quantize", "int8"]}
    runs = {f"{v}_{size}": [] for v in variants for size in ("n", "1")}

    def mm_index(key: str, photos: Path, index_dir: Path) -> float:
        return timed([sys.executable, "-m", "mmsearch", "index", str(photos), "--index", str(index_dir), "--model",
                      ARCH, "--pretrained", "random", "-q", *variants[key]], env=mm_env)

    # untimed, for both tools: the first mmsearch run of a model exports its ONNX towers
    timed([str(rclip_bin), "-f", "red dress"], cwd=one, env=rclip_env)
    for key in ("mm", "mm_torch", "mm_int8"):
        mm_index(key, one, tmp / f"warm-up-{key}")
        shutil.rmtree(tmp / f"warm-up-{key}")
    for r in range(repeat):
        for size, photos in (("n", folder), ("1", one)):
            for p in datadir.glob("db.sqlite3*"):
                p.unlink()
            runs[f"rclip_{size}"].append(timed([str(rclip_bin), "-f", "red dress"], cwd=photos, env=rclip_env))
            for key in ("mm", "mm_torch", "mm_int8"):
                index_dir = tmp / f"{key}-{size}-{r}"
                runs[f"{key}_{size}"].append(mm_index(key, photos, index_dir))
                shutil.rmtree(index_dir)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"images": n, "wall_s_median": med, "runs": runs}
    for key in variants:
        out[f"{key}_images_per_s"] = (n - 1) / (med[f"{key}_n"] - med[f"{key}_1"])
    out["mmsearch_over_rclip"] = out["mm_images_per_s"] / out["rclip_images_per_s"]
    out["mmsearch_torch_over_rclip"] = out["mm_torch_images_per_s"] / out["rclip_images_per_s"]
    out["mmsearch_int8_over_rclip"] = out["mm_int8_images_per_s"] / out["rclip_images_per_s"]
    out["whole_wall_rclip_over_mmsearch"] = med["rclip_n"] / med["mm_n"]
    return out


RCLIP_FILL = r"""
import sys, numpy as np
from rclip import db
d = db.DB(sys.argv[1])
vecs = np.load(sys.argv[2], mmap_mode="r")
folder = sys.argv[3]
for start in range(0, len(vecs), 50_000):
    rows = [(f"{folder}/img{i:07d}.jpg", 1.7e9, 50_000, np.ascontiguousarray(vecs[i]).tobytes(), f"{i:064x}")
            for i in range(start, min(start + 50_000, len(vecs)))]
    d._con.executemany("INSERT INTO images(deleted, indexing, filepath, modified_at, size, vector, hash) "
                       "VALUES (NULL, NULL, ?, ?, ?, ?, ?)", rows)
    d._con.commit()
d.close()
"""


def cold_queries(rclip_bin: Path, sizes: list[int], tmp: Path, datadir: Path, repeat: int, big_type: str) -> list:
    from bench_query import build_store

    from mmsearch.collection import Collection

    rclip_env, mm_env = envs(datadir)
    results = []
    for n in sizes:
        vectors = embeddings(n)
        folder = tmp / f"photos{n}"
        folder.mkdir()
        vec_path = tmp / "vecs.npy"
        np.save(vec_path, vectors)
        rdata = tmp / f"rclip{n}"
        rdata.mkdir()
        for item in (RCLIP_SUBDIR, "tokenizer"):
            os.symlink(datadir / item, rdata / item)
        subprocess.run([str(rclip_bin.parent / "python"), "-c", RCLIP_FILL, str(rdata / "db.sqlite3"), str(vec_path),
                        str(folder)], check=True)
        index_dir = tmp / f"mm{n}"
        build_store(index_dir, vectors)
        del vectors
        kind = big_type if n >= 1_000_000 else "auto"
        collection = Collection.open(index_dir)
        t0 = time.perf_counter()
        with collection.write_lock(repair=False):
            collection.save_faiss(kind)
        build_s = time.perf_counter() - t0
        chosen = collection.manifest.index.index_type
        collection.close()
        renv = {**rclip_env, "RCLIP_DATADIR": str(rdata)}
        rc, mm = [], []
        for _ in range(repeat):
            rc.append(timed([str(rclip_bin), "-n", "-f", "red dress"], cwd=folder, env=renv))
            mm.append(timed([sys.executable, "-m", "mmsearch", "search", "red dress", "--index", str(index_dir)],
                            env=mm_env))
        row = {"n": n, "mmsearch_index_type": chosen, "mmsearch_index_build_s": build_s,
               "rclip_cold_query_s": statistics.median(rc), "mmsearch_cold_query_s": statistics.median(mm),
               "runs": {"rclip": rc, "mmsearch": mm}}
        row["mmsearch_over_rclip"] = row["mmsearch_cold_query_s"] / row["rclip_cold_query_s"]
        print(row, flush=True)
        results.append(row)
        shutil.rmtree(index_dir)
        shutil.rmtree(rdata)
        vec_path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rclip-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold-sizes", default="10000,100000,1000000")
    parser.add_argument("--big-index-type", default="ivfpq", help="mmsearch index type at N >= 1M (build time)")
    parser.add_argument("--skip-indexing", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", help="result file name in benchmarks/results (default: by what was run)")
    args = parser.parse_args()
    rclip_bin = args.rclip_venv / "bin" / "rclip"
    if not rclip_bin.exists():
        sys.exit(f"rclip not found at {rclip_bin}; see this file's docstring to install it")
    n, repeat = (32, 1) if args.quick else (args.images, args.repeat)
    sizes = [5_000] if args.quick else [int(s) for s in args.cold_sizes.split(",") if s]
    from bench_ingest import make_images

    tmp = Path(tempfile.mkdtemp(prefix="mmsearch-bench-rclip-"))
    try:
        datadir = tmp / "rclip-data"
        export_rclip_models(datadir)
        export_mmsearch_onnx(datadir)
        result = {"machine": machine(), "architecture": f"{ARCH}, random weights for both (speed only)",
                  "rclip_version": subprocess.run([str(rclip_bin), "--version"], capture_output=True,
                                                  text=True).stdout.strip()}
        if not args.skip_indexing:
            folder, one = tmp / "photos", tmp / "photo1"
            make_images(folder, n)
            one.mkdir()
            first = sorted(folder.iterdir())[0]
            shutil.copy(first, one / first.name)
            result["indexing"] = indexing(rclip_bin, folder, one, datadir, tmp, repeat, n)
        result["cold_query"] = cold_queries(rclip_bin, sizes, tmp, datadir, repeat, args.big_index_type)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"mmsearch vs {result['rclip_version']} ({result['architecture']}), medians of {repeat}"]
    if "indexing" in result:
        ix = result["indexing"]
        w = ix["wall_s_median"]
        keys = ("rclip", "mm", "mm_torch", "mm_int8")
        lines.append(fmt_table(["", "rclip", "mmsearch default (onnx fp32)", "mmsearch --runtime torch",
                                "mmsearch --quantize int8 (onnx)"], [
            [f"whole wall s ({n} images)", *(f"{w[k + '_n']:.1f}" for k in keys)],
            ["whole wall s (1 image)", *(f"{w[k + '_1']:.1f}" for k in keys)],
            ["indexing images/s", *(f"{ix[k + '_images_per_s']:.2f}" for k in keys)],
            ["x rclip (target >= 2)", *(f"{ix[k + '_images_per_s'] / ix['rclip_images_per_s']:.2f}" for k in keys)],
        ]))
    if sizes:
        lines.append("\nCold query (new process each; rclip -n reads every vector from SQLite)")
        lines.append(fmt_table(["N", "rclip s", "mmsearch s", "mmsearch index",
                                "mmsearch / rclip (target <= 0.2 at 1M)"],
                               [[r["n"], f"{r['rclip_cold_query_s']:.2f}", f"{r['mmsearch_cold_query_s']:.2f}",
                                 r["mmsearch_index_type"], f"{r['mmsearch_over_rclip']:.3f}"]
                                for r in result["cold_query"]]))
    name = args.name or ("bench_rclip_quick" if args.quick else "bench_rclip" if sizes else "bench_rclip_indexing")
    write_results(name, result, "\n".join(lines))


if __name__ == "__main__":
    main()
