"""Ingest throughput: files -> vectors + rows, against the bare encoder on already-decoded tensors.

Same model, same images, same batch size, medians of interleaved runs (so load changes hit all alike):
- bare: encoder forward (torch.inference_mode) on pre-decoded, pre-processed batches;
- pipeline: mmsearch.ingest.ingest on the image folder (hash, decode in threads with look-ahead,
  encode, SQLite rows + vectors per batch, FAISS publish), for 1 and 2 decode threads;
- options: dynamic int8 Linear layers (`mmsearch index --quantize int8`) and ONNX Runtime (fp32 graph
  exported locally), each with its speed-up over fp32 and its agreement with fp32 (top-10 overlap of
  image->image and text->image retrieval on this folder, mean cosine of the vectors);
- achieved GFLOP/s of the encoder (FLOPs counted by torch.utils.flop_counter) vs a large fp32 matmul.
Weights: the shipped trained model mmsearch-fashion when it exists (agreement is meaningful), else
ViT-B-32 with `--pretrained random` (speed figures are valid, agreement on random weights is not).

    python benchmarks/bench_ingest.py            # 192 images 640x480, 3 repeats
    python benchmarks/bench_ingest.py --quick    # 48 images, 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import os
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


def pick_model() -> tuple[str, str | None, bool]:
    from mmsearch.encoders import shipped_model_dir

    if shipped_model_dir("mmsearch-fashion") is not None:
        return "mmsearch-fashion", None, True
    return "ViT-B-32", "random", False


def encode_batches(fn, batches) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        fn(batch)
    return time.perf_counter() - t0


def run_pipeline(folder: Path, encoder, batch_size: int, workers: int, tmp: Path) -> float:
    from mmsearch.ingest import IngestOptions, ingest

    index_dir = Path(tempfile.mkdtemp(dir=tmp))
    t0 = time.perf_counter()
    report = ingest(folder, index_dir, IngestOptions(batch_size=batch_size, workers=workers, index_type="flat"),
                    encoder=encoder)
    elapsed = time.perf_counter() - t0
    assert report.added == len(list(folder.glob("*.jpg"))) and not report.failed, report.to_dict()
    shutil.rmtree(index_dir)
    return elapsed


def export_onnx(model, image_size: int, path: Path) -> None:
    import torch

    class Visual(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.encode_image(x)

    torch.onnx.export(Visual(model), torch.zeros(1, 3, image_size, image_size), str(path), input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      opset_version=17, dynamo=False)


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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


def encoder_flops(model, image_size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, repeat = (48, 1) if args.quick else (args.images, args.repeat)

    import torch

    from mmsearch.encoders import Encoder, load_encoder, quantize_model
    from mmsearch.images import load_image

    name, pretrained, trained = pick_model()
    tmp = Path(tempfile.mkdtemp(prefix="mmsearch-bench-ingest-"))
    try:
        paths = make_images(tmp / "images", n)
        encoder = load_encoder(name, pretrained)
        int8 = Encoder(quantize_model(copy.deepcopy(encoder.model), "int8"), encoder.preprocess, encoder.tokenizer,
                       encoder.ref)
        t0 = time.perf_counter()
        pixels = torch.stack([encoder.preprocess(load_image(p)) for p in paths])
        decode_ms = 1000 * (time.perf_counter() - t0) / n
        batches = list(torch.split(pixels, args.batch_size))
        image_size = pixels.shape[-1]
        variants = {"fp32": encoder.encode_pixels, "int8": int8.encode_pixels}
        if not args.no_onnx:
            onnx_path = tmp / "visual.onnx"
            export_onnx(encoder.model, image_size, onnx_path)
            session = ort_session(onnx_path)
            variants["onnxruntime"] = lambda b: normalise(session.run(None, {"input": b.numpy()})[0])
        for fn in variants.values():  # warm up
            fn(batches[0][:2])
        runs: dict[str, list[float]] = {k: [] for k in [*variants, "pipeline_w1", "pipeline_w2", "pipeline_int8_w1"]}
        for r in range(repeat):  # interleaved
            for key, fn in variants.items():
                runs[key].append(encode_batches(fn, batches))
            runs["pipeline_w1"].append(run_pipeline(tmp / "images", encoder, args.batch_size, 1, tmp))
            runs["pipeline_w2"].append(run_pipeline(tmp / "images", encoder, args.batch_size, 2, tmp))
            runs["pipeline_int8_w1"].append(run_pipeline(tmp / "images", int8, args.batch_size, 1, tmp))
            print(f"repeat {r + 1}/{repeat}: " + ", ".join(f"{k} {n / v[-1]:.2f} img/s" for k, v in runs.items()),
                  flush=True)
        ips = {k: n / statistics.median(v) for k, v in runs.items()}
        ref_img = np.concatenate([variants["fp32"](b) for b in batches])
        ref_txt = encoder.encode_texts(QUERIES)
        agree = {"int8": agreement(ref_img, ref_txt, np.concatenate([int8.encode_pixels(b) for b in batches]),
                                   int8.encode_texts(QUERIES))}
        if "onnxruntime" in variants:
            agree["onnxruntime"] = agreement(ref_img, ref_txt,
                                             np.concatenate([variants["onnxruntime"](b) for b in batches]), ref_txt)
        flops = encoder_flops(encoder.model, image_size)
        peak = matmul_gflops()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "machine": machine(), "model": f"{name}" + (f" --pretrained {pretrained}" if pretrained else ""),
        "trained_weights": trained, "images": n, "image_size_on_disk": "640x480 JPEG q90",
        "batch_size": args.batch_size, "repeat": repeat, "torch_threads": torch.get_num_threads(),
        "decode_preprocess_ms_per_image_1thread": decode_ms,
        "images_per_s": ips,
        "pipeline_over_bare": {k: ips[k] / ips["fp32"] for k in ("pipeline_w1", "pipeline_w2")},
        "pipeline_int8_over_bare_int8": ips["pipeline_int8_w1"] / ips["int8"],
        "speedup_over_fp32": {k: ips[k] / ips["fp32"] for k in variants if k != "fp32"},
        "agreement_with_fp32": agree,
        "encoder_gflop_per_image": flops / 1e9,
        "achieved_gflops": {k: flops * ips[k] / 1e9 for k in variants},
        "matmul_fp32_gflops": peak,
    }
    result["achieved_over_matmul"] = {k: v / peak for k, v in result["achieved_gflops"].items()}
    note = ("" if trained else " (RANDOM weights: agreement figures are not meaningful; no trained "
            "mmsearch-fashion under mmsearch/models/)")
    rows = [["bare fp32 (decoded tensors)", f"{ips['fp32']:.2f}", "1.00", f"{result['achieved_gflops']['fp32']:.0f}"],
            ["pipeline fp32, 1 decode thread", f"{ips['pipeline_w1']:.2f}",
             f"{result['pipeline_over_bare']['pipeline_w1']:.3f}", "-"],
            ["pipeline fp32, 2 decode threads", f"{ips['pipeline_w2']:.2f}",
             f"{result['pipeline_over_bare']['pipeline_w2']:.3f}", "-"],
            ["bare int8 dynamic", f"{ips['int8']:.2f}", f"{result['speedup_over_fp32']['int8']:.3f}",
             f"{result['achieved_gflops']['int8']:.0f}"],
            ["pipeline int8, 1 decode thread", f"{ips['pipeline_int8_w1']:.2f}",
             f"{ips['pipeline_int8_w1'] / ips['fp32']:.3f}", "-"]]
    if "onnxruntime" in ips:
        rows.append(["bare onnxruntime fp32", f"{ips['onnxruntime']:.2f}",
                     f"{result['speedup_over_fp32']['onnxruntime']:.3f}",
                     f"{result['achieved_gflops']['onnxruntime']:.0f}"])
    text = (f"Ingest, {result['model']}{note}, {n} images 640x480 JPEG, batch {args.batch_size}, "
            f"torch threads {torch.get_num_threads()}, median of {repeat} interleaved runs\n"
            + fmt_table(["variant", "images/s", "x bare fp32", "GFLOP/s"], rows)
            + f"\n\nencoder {result['encoder_gflop_per_image']:.2f} GFLOP/image; "
            f"fp32 matmul 2048^3: {peak:.0f} GFLOP/s "
            f"-> encoder fp32 reaches {result['achieved_over_matmul']['fp32']:.2f} of it"
            f"\ndecode+preprocess: {decode_ms:.1f} ms/image on one thread"
            f"\npipeline int8 / bare int8: {result['pipeline_int8_over_bare_int8']:.3f}\n"
            + fmt_table(["option", "img->img top10 overlap", "text->img top10 overlap", "mean cos"],
                        [[k, f"{v['image_to_image_top10_overlap']:.3f}", f"{v['text_to_image_top10_overlap']:.3f}",
                          f"{v['mean_cosine_image_vectors']:.4f}"] for k, v in agree.items()]))
    write_results("bench_ingest_quick" if args.quick else "bench_ingest", result, text)


if __name__ == "__main__":
    main()
