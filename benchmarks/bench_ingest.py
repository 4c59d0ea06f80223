"""Ingest throughput: files -> vectors + rows, against the bare encoder on already-decoded tensors.

Same model (ViT-B-32, random weights: speed only), same images, same batch size, medians of
interleaved runs (so load changes hit all alike):
- bare: the image encoder on pre-decoded, pre-processed batches, for each way `mmsearch index` can
  encode: torch fp32 (`--runtime torch`), torch dynamic int8 (`--runtime torch --quantize int8`), ONNX
  Runtime fp32 (the default, `--runtime auto`, for this model) and ONNX Runtime dynamic int8
  (`--quantize int8`), exported and checked by the library;
- pipeline: mmsearch.ingest.ingest on the image folder (hash, decode with look-ahead, encode, SQLite
  rows + vectors per batch, FAISS publish), against its own bare encoder. torch: decode threads feed
  the encoder; ONNX Runtime: each stream thread decodes a slice of images, then encodes it;
- agreement of each option with torch fp32: top-10 overlap of image->image and text->image retrieval
  and mean cosine, with trained weights (mmsearch-fashion) on the demo catalog's product photos;
- achieved GFLOP/s of the encoder (FLOPs counted by torch.utils.flop_counter) vs a large fp32 matmul;
- CPU accounting (process CPU time per image, all threads): what the pipeline spends beyond its bare
  encoder (decode, preprocess, rows, threads), and the ceiling that puts on pipeline / bare when the
  encoder alone already keeps every core busy (ceiling = bare core-ms / pipeline core-ms).

    python benchmarks/bench_ingest.py            # 192 images 640x480, 3 repeats
    python benchmarks/bench_ingest.py --quick    # 48 images, 1 repeat
    python benchmarks/bench_ingest.py --images 960 --skip-agreement --name bench_ingest_960   # steady state
    python benchmarks/bench_ingest.py --captions --variant "onnxruntime int8" --skip-agreement \
        --name bench_ingest_captions                # every photo with a caption (a CSV catalog)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mmsearch index` (cli.py) sets it; before torch loads

import argparse  # noqa: E402
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import fmt_table, machine, write_results  # noqa: E402

QUERIES = ["red dress", "black leather boot", "white sneaker", "striped shirt", "blue jeans", "brown handbag",
           "summer sandal", "grey hoodie", "green coat", "yellow hat", "wool pullover", "running shoe"]


def make_images(folder: Path, n: int, size=(640, 480), seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields + texture + shapes), quality 90: realistic decode cost."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size, Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, size[0] - 60), rng.integers(0, size[1] - 60)
            draw.ellipse([x0, y0, x0 + rng.integers(30, 200), y0 + rng.integers(30, 200)],
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / f"img{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def process_cpu() -> float:
    """CPU seconds of this process so far, every thread (encoder streams, decode pool, writer)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def encode_batches(encoder, batches) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to encode every batch, each submitted before the previous one is
    waited for, as ingest does: the ONNX tower's streams never wait for a whole batch to finish."""
    c0, t0 = process_cpu(), time.perf_counter()
    waiting = None
    for batch in batches:
        submitted = encoder.submit_pixels(batch)
        if waiting is not None:
            waiting()
        waiting = submitted
    waiting()
    return time.perf_counter() - t0, process_cpu() - c0


CAPTION_WORDS = ["red", "blue", "leather", "cotton", "summer", "winter", "ankle", "boot", "dress", "shirt",
                 "striped", "slim", "wool", "canvas", "black", "white"]


def captioned_catalog(paths: list[Path]) -> Path:
    """A CSV catalog of the photos, each with a product title of 9-10 words (`--captions`)."""
    import csv

    catalog = paths[0].parent / "catalog.csv"
    with catalog.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "caption"])
        for i, path in enumerate(paths):
            words = [CAPTION_WORDS[(i * k + k) % len(CAPTION_WORDS)] for k in range(1, 9)]
            writer.writerow([f"p{i:05d}", path.name, " ".join(words) + f" size {i % 7}"])
    return catalog


def run_pipeline(folder: Path, encoder, batch_size: int, workers: int, tmp: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole ingest of the folder (or its catalog.csv, with
    --captions) into a new index."""
    from mmsearch.ingest import IngestOptions, ingest

    index_dir = Path(tempfile.mkdtemp(dir=tmp))
    c0, t0 = process_cpu(), time.perf_counter()
    catalog = folder / "catalog.csv" if (folder / "catalog.csv").is_file() else folder
    report = ingest(catalog, index_dir, IngestOptions(batch_size=batch_size, workers=workers, index_type="flat"),
                    encoder=encoder)
    elapsed, cpu = time.perf_counter() - t0, process_cpu() - c0
    assert report.added == len(list(folder.glob("*.jpg"))) and not report.failed, report.to_dict()
    shutil.rmtree(index_dir)
    return elapsed, cpu


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def top10_overlap(ref_q, ref_db, q, db, exclude_self: bool) -> float:
    def top(qv, dbv):
        s = qv @ dbv.T
        if exclude_self:
            np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :10]

    a, b = top(ref_q, ref_db), top(q, db)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))


def agreement(ref_img, ref_txt, img, txt) -> dict:
    return {"image_to_image_top10_overlap": top10_overlap(ref_img, ref_img, img, img, True),
            "text_to_image_top10_overlap": top10_overlap(ref_txt, ref_img, txt, img, False),
            "mean_cosine_image_vectors": float(np.mean(np.sum(ref_img * img, axis=1)))}


def matmul_gflops(size: int = 2048, repeat: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def encoder_flops(encoder, image_size: int) -> float:
    """FLOPs per image of the forward the encoder runs (with shortcut.py's class-token path: ~7 % fewer
    than encode_image for ViT-B-32)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pixel = torch.zeros(1, 3, image_size, image_size)
    encoder.encode_pixels(pixel)  # its first batch also checks the shortcut against encode_image
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder.encode_pixels(pixel)
    return float(counter.get_total_flops())


VARIANTS = {  # name: (runtime, quantize)
    "torch fp32": ("torch", None),
    "torch int8": ("torch", "int8"),
    "onnxruntime fp32": ("onnx", None),
    "onnxruntime int8": ("onnx", "int8"),
}
PIPELINES = {  # name: (variant, IngestOptions.workers: decode threads for torch, hashing only for ONNX)
    "pipeline torch fp32, 1 decode thread": ("torch fp32", 1),
    "pipeline torch fp32, 2 decode threads": ("torch fp32", 2),
    "pipeline onnxruntime fp32 (default), decode on its streams": ("onnxruntime fp32", 2),
    "pipeline onnxruntime int8, decode on its streams": ("onnxruntime int8", 2),  # see ingest._in_stream_batches
}
AGREEMENT_MODEL = "mmsearch-fashion"  # trained weights, so top-10 agreement means something


def load_variants(name: str, pretrained: str | None, keys=tuple(VARIANTS)) -> dict:
    from mmsearch.encoders import load_encoder

    def load(key: str):
        runtime, quantize = VARIANTS[key]
        return load_encoder(name, pretrained, quantize, runtime)

    return {key: load(key) for key in keys}


def selected(args) -> tuple[list[str], list[str]]:
    """(variants, pipelines) this run times: --variant narrows both (a variant's pipeline comes with
    it), so one option can be repeated many times in the time the whole table takes once."""
    variants = args.variant or list(VARIANTS)
    return variants, [k for k, (v, _) in PIPELINES.items() if v in variants]


def speed(args, tmp: Path) -> dict:
    import torch

    from mmsearch.images import load_pixels

    n, repeat = (48, 1) if args.quick else (args.images, args.repeat)
    paths = make_images(tmp / "images", n)
    if args.captions:
        captioned_catalog(paths)
    variants, pipelines = selected(args)
    encoders = load_variants(args.model, args.pretrained, [k for k in VARIANTS if k == "torch fp32" or k in variants])
    fp32 = encoders["torch fp32"]  # the reference preprocessing and FLOP count; timed only when selected
    t0 = time.perf_counter()  # as ingest decodes: JPEG at reduced DCT scale, then the eval preprocessing
    pixels = torch.stack([fp32.preprocess(load_pixels(p, min_side=fp32.input_side)) for p in paths])
    decode_ms = 1000 * (time.perf_counter() - t0) / n
    batches = list(torch.split(pixels, args.batch_size))
    for encoder in encoders.values():  # warm up
        encoder.encode_pixels(batches[0][:2])
    warm = tmp / "warm-up"  # a first ingest exports the text tower to ONNX once per model: not timed
    warm.mkdir()
    for path in paths[:8]:
        shutil.copy(path, warm)
    for key in pipelines:
        run_pipeline(warm, encoders[PIPELINES[key][0]], args.batch_size, PIPELINES[key][1], tmp)
    runs: dict[str, list[float]] = {k: [] for k in [*variants, *pipelines]}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeat):  # interleaved, so load changes hit every variant alike
        for key in variants:
            _record(runs, cpu, key, encode_batches(encoders[key], batches))
        for key in pipelines:
            variant, workers = PIPELINES[key]
            _record(runs, cpu, key, run_pipeline(tmp / "images", encoders[variant], args.batch_size, workers, tmp))
        print(f"repeat {r + 1}/{repeat}: " + ", ".join(f"{k} {n / v[-1]:.2f} img/s" for k, v in runs.items()),
              flush=True)
    ips = {k: n / statistics.median(v) for k, v in runs.items()}
    cpu_ms = {k: 1000 * statistics.median(v) / n for k, v in cpu.items()}
    flops = encoder_flops(fp32, pixels.shape[-1])
    captions = caption_encoding(fp32, repeat)
    return {"model": args.model + (f" --pretrained {args.pretrained}" if args.pretrained else ""), "images": n,
            "captions": bool(args.captions),
            "repeat": repeat, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
            "decode_preprocess_ms_per_image_1thread": decode_ms, "images_per_s": ips,
            "variants": variants, "pipelines": pipelines,
            "x_bare_torch_fp32": {k: v / ips["torch fp32"] for k, v in ips.items()} if "torch fp32" in ips else {},
            "pipeline_over_its_bare_encoder": {k: ips[k] / ips[PIPELINES[k][0]] for k in pipelines},
            "cpu_core_ms_per_image": cpu_ms, "cores": os.cpu_count(),
            "cpu_busy_fraction": {k: cpu_ms[k] * ips[k] / 1000 / (os.cpu_count() or 1) for k in cpu_ms},
            "pipeline_cpu_ceiling": {k: cpu_ms[PIPELINES[k][0]] / cpu_ms[k] for k in pipelines},
            "raw_runs_s": runs, "raw_cpu_s": cpu,
            "encoder_gflop_per_image": flops / 1e9, "caption_encoding_torch_fp32": captions,
            "achieved_gflops": {k: flops * ips[k] / 1e9 for k in variants}}


def _record(runs: dict, cpu: dict, key: str, measured: tuple[float, float]) -> None:
    runs[key].append(measured[0])
    cpu[key].append(measured[1])


def caption_encoding(encoder, repeat: int) -> dict:
    """Catalog captions through the torch text tower: the whole context (open_clip's encode_text) vs
    cut after the longest caption's end token (Encoder.encode_texts). Same vectors, less work."""
    import torch

    captions = [f"{c} {n}" for c in ("red", "dark blue", "light grey", "black leather") for n in QUERIES] * 6
    tokens = encoder.tokenizer(captions)

    def full() -> None:
        with torch.inference_mode():
            encoder.model.encode_text(tokens)

    def trimmed() -> None:
        encoder.encode_texts(captions, batch_size=len(captions))

    def seconds(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    full()  # warm-up
    times = {name: statistics.median(seconds(fn) for _ in range(repeat))
             for name, fn in (("full", full), ("trimmed", trimmed))}
    return {"captions": len(captions), "context": int(tokens.shape[1]),
            "longest_tokens": int(tokens.argmax(dim=1).max()) + 1,
            "full_ms_per_caption": 1000 * times["full"] / len(captions),
            "trimmed_ms_per_caption": 1000 * times["trimmed"] / len(captions),
            "speedup": times["full"] / times["trimmed"]}


def agreement_on_demo() -> dict | None:
    """Top-10 agreement with torch fp32 of each variant, with trained weights on real product photos
    (the demo catalog: 300 Fashion-MNIST items, their captions as text queries)."""
    import csv

    import torch

    from mmsearch.encoders import shipped_model_dir
    from mmsearch.images import load_image

    demo = Path(__file__).parent.parent / "demo" / "catalog.csv"
    if shipped_model_dir(AGREEMENT_MODEL) is None or not demo.is_file():
        return None
    rows = list(csv.DictReader(demo.open(encoding="utf-8")))
    encoders = load_variants(AGREEMENT_MODEL, None)
    ref = encoders["torch fp32"]
    pixels = torch.stack([ref.preprocess(load_image(demo.parent / r["image"])) for r in rows])
    queries = sorted({r["caption"] for r in rows})
    captions = [r["caption"] for r in rows]
    ref_img, ref_txt, ref_cap = ref.encode_pixels(pixels), ref.encode_texts(queries), ref.encode_texts(captions)
    out = {}
    for key, enc in encoders.items():
        if key == "torch fp32":
            continue
        txt, cap = enc.encode_texts(queries), enc.encode_captions(captions)  # int8 ONNX: an int8 caption tower
        out[key] = {**agreement(ref_img, ref_txt, enc.encode_pixels(pixels), txt),
                    "text_to_caption_top10_overlap": top10_overlap(ref_txt, ref_cap, txt, cap, False),
                    "mean_cosine_caption_vectors": float(np.mean(np.sum(ref_cap * cap, axis=1)))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random", help="speed only: random weights are fine")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--captions", action="store_true",
                        help="the pipeline ingests a CSV catalog: every photo has a caption to encode as well")
    parser.add_argument("--skip-agreement", action="store_true", help="speed only (no trained-model agreement)")
    parser.add_argument("--name", help="results file name (default bench_ingest, or bench_ingest_quick)")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help="time only this encoder and its pipeline (repeatable; default: all four)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmsearch-bench-ingest-"))
    os.environ.setdefault("MMSEARCH_CACHE", str(tmp / "cache"))  # ONNX exports: made fresh, not timed
    try:
        result = {"machine": machine(), "image_size_on_disk": "640x480 JPEG q90", **speed(args, tmp)}
        result["agreement_with_torch_fp32"] = None if args.skip_agreement else agreement_on_demo()
        result["matmul_fp32_gflops"] = matmul_gflops()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["achieved_over_matmul"] = {k: v / result["matmul_fp32_gflops"] for k, v in result["achieved_gflops"].items()}
    write_results(args.name or ("bench_ingest_quick" if args.quick else "bench_ingest"), result, report(result))


def report(result: dict) -> str:
    ips, ratio, gflops = result["images_per_s"], result["x_bare_torch_fp32"], result["achieved_gflops"]
    variants, pipelines = result.get("variants", list(VARIANTS)), result.get("pipelines", list(PIPELINES))
    rows = [[k, f"{ips[k]:.2f}", f"{ratio[k]:.3f}" if ratio else "-", f"{gflops[k]:.0f}"] for k in variants]
    rows += [[k, f"{ips[k]:.2f}", f"{ratio[k]:.3f}" if ratio else "-",
              f"{result['pipeline_over_its_bare_encoder'][k]:.3f} of bare {PIPELINES[k][0]}"] for k in pipelines]
    text = (f"Ingest, {result['model']}, {result['images']} images 640x480 JPEG"
            + (" (pipeline: a CSV catalog, each photo with a caption)" if result.get("captions") else "")
            + f", batch {result['batch_size']}, "
            f"torch threads {result['torch_threads']}, median of {result['repeat']} interleaved runs\n"
            + fmt_table(["variant", "images/s", "x bare torch fp32", "GFLOP/s | pipeline / bare"], rows)
            + f"\n\nencoder {result['encoder_gflop_per_image']:.2f} GFLOP/image; fp32 matmul 2048^3: "
            f"{result['matmul_fp32_gflops']:.0f} GFLOP/s -> each encoder reaches, of it: "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["achieved_over_matmul"].items())
            + f"\ndecode+preprocess as ingest does it: {result['decode_preprocess_ms_per_image_1thread']:.1f} ms/image "
            "on one thread")
    text += "\n\n" + cpu_report(result)
    cap = result.get("caption_encoding_torch_fp32")
    if cap:
        text += (f"\ncaption encoding (torch fp32 text tower, {cap['captions']} captions of <= {cap['longest_tokens']} "
                 f"tokens, context {cap['context']}): whole context {cap['full_ms_per_caption']:.2f} ms/caption, "
                 f"cut after the longest {cap['trimmed_ms_per_caption']:.2f} ms/caption ({cap['speedup']:.1f}x)")
    agree = result["agreement_with_torch_fp32"]
    if agree:
        text += (f"\n\nAgreement with torch fp32, {AGREEMENT_MODEL} (trained) on demo/ (300 product photos, "
                 "their captions as queries)\n"
                 + fmt_table(["variant", "img->img top10 overlap", "text->img top10 overlap", "mean cos",
                              "text->caption top10 overlap", "caption mean cos"],
                             [[k, f"{v['image_to_image_top10_overlap']:.3f}", f"{v['text_to_image_top10_overlap']:.3f}",
                               f"{v['mean_cosine_image_vectors']:.4f}", f"{v['text_to_caption_top10_overlap']:.3f}",
                               f"{v['mean_cosine_caption_vectors']:.4f}"] for k, v in agree.items()]))
    return text


def paired_ratios(result: dict) -> dict[str, list[float]]:
    """Each repeat's pipeline / bare (bare seconds / pipeline seconds of the same repeat): the spread
    the medians above hide on a shared machine."""
    runs = result["raw_runs_s"]
    return {key: [b / p for b, p in zip(runs[PIPELINES[key][0]], runs[key])]
            for key in result.get("pipelines", PIPELINES)}


def cpu_report(result: dict) -> str:
    """Where the pipeline's CPU goes: its encoder, and the rest (decode, preprocess, rows, threads)."""
    cpu_ms, busy, ceiling = result["cpu_core_ms_per_image"], result["cpu_busy_fraction"], result["pipeline_cpu_ceiling"]
    rows = []
    for key in result.get("pipelines", PIPELINES):
        variant = PIPELINES[key][0]
        rows.append([key, f"{cpu_ms[variant]:.2f}", f"{cpu_ms[key]:.2f}", f"{cpu_ms[key] - cpu_ms[variant]:.2f}",
                     f"{busy[variant]:.2f} / {busy[key]:.2f}", f"{ceiling[key]:.3f}",
                     f"{result['pipeline_over_its_bare_encoder'][key]:.3f}"])
    paired = "\n".join(f"{key}: pipeline / bare per repeat (against the same repeat's bare run) "
                        + ", ".join(f"{r:.3f}" for r in ratios) + f"; median {statistics.median(ratios):.3f}"
                        for key, ratios in paired_ratios(result).items())
    return (paired + "\n\n"
            f"CPU per image (process CPU time, all threads; {result['cores']} cores), medians\n"
            + fmt_table(["pipeline", "bare core-ms", "pipeline core-ms", "extra core-ms", "cores busy bare / pipe",
                         "ceiling", "measured"], rows)
            + "\nceiling = bare core-ms / pipeline core-ms: the best pipeline / bare when the bare encoder already "
            "keeps every core busy")


if __name__ == "__main__":
    main()
