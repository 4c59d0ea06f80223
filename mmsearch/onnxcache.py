"""The per-machine cache of ONNX exports (text tower for cold queries, image tower for ingest).

An export lives in `$MMSEARCH_CACHE/<kind>/<key>/` (default `~/.cache/mmsearch`), where the key names
the model: its reference plus the size and mtime of every local file it reads, so retrained weights
get a new export. A folder is published by one atomic rename once verified, so a reader sees no
folder or a complete one. Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from .config import SHIPPED_MODELS_DIR, ModelRef

CACHE_ENV = "MMSEARCH_CACHE"
META_FILE = "meta.json"


def cache_root(kind: str) -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mmsearch")
    return Path(root) / kind


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def model_key(ref: ModelRef, *extra) -> str:
    """Names an export: the model reference, `extra` (format, variant) and every local file it reads."""
    parts: list = [*extra, ref.name, ref.pretrained]
    for value in (ref.name, ref.pretrained):
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.exists() and (SHIPPED_MODELS_DIR / value).is_dir():
            path = SHIPPED_MODELS_DIR / value
        if path.is_dir():
            parts += [_file_identity(p) for p in sorted(path.iterdir()) if p.is_file()]
        elif path.is_file():
            parts.append(_file_identity(path))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def publish(folder: Path, build: Callable[[Path], dict | None]) -> Path | None:
    """Run build(staging) in a temp folder beside `folder`; it writes files and returns the meta to
    record (None: do not publish). Then rename it into place; a concurrent winner is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".export-"))
    staging.chmod(0o755)  # mkdtemp makes 0700; the cache is as readable as the indexes that use it
    try:
        meta = build(staging)
        if meta is None:
            return None
        (staging / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.rename(staging, folder)
        except OSError:  # another process published it first
            if read_meta(folder) is None:
                raise
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


SPIN_STOP_KEY = "session.force_spinning_stop"


def ort_session(path: Path, fast_start: bool = False, threads: int | None = None):
    """fast_start: no graph optimisation at load (for files from save_ort_format: what a one-query
    process wants); otherwise all of them (what a long encoding run wants). threads: intra-op threads
    (default: one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    options.log_severity_level = 3
    # Worker threads spin between the ops of a run (fast hand-offs), then by default go on spinning
    # after it returns, on the cores the caller's next step needs: a warm query's FAISS search and row
    # read right after the text encoder (1M items, AVX2 EPYC, 3 alternating runs of 81 queries each)
    # took 1.59 / 1.63 / 1.75 ms over the bare encoder, and 1.42 / 1.14 / 1.20 ms with spinning
    # stopped at the end of each run. The encoder's own time did not change.
    options.add_session_config_entry(SPIN_STOP_KEY, "1")
    if fast_start:  # an .ort file saved by save_ort_format is already optimised
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def save_ort_format(onnx_path: Path, ort_path: Path) -> None:
    """Convert to ORT format with basic (hardware-independent) optimisations, so a new process starts
    the session without parsing protobuf or optimising the graph again."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(ort_path)
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


# Dynamic int8 for both towers: every weight MatMul in int8 with a scale per output column; nothing
# else (not the image tower's patch-embedding Conv, not the text tower's token-embedding Gather).
# onnxruntime's ConvInteger took ViT-B-32-256 on the AVX-512 VNNI EPYC from 42-50 to 34-38 img/s, and
# 21.3 to 19.7 on the AVX2-only one (fp32 Conv is 7 % of the int8 tower's time). Per-channel scales:
# the same img/s on the VNNI EPYC (43.5 / 43.9), 22.6 against 19.7 per-tensor on the AVX2 one, a
# closer mean cosine to fp32 (0.99990 / 0.99986); captions' top-10 overlap with fp32 0.957 -> 0.964.
# Changing these settings must change both exports' cache keys (imageonnx.EXPORT_FORMAT,
# textonnx.CAPTION_INT8_KEY; both hold int8_flavour() too), or old exports stay in use.
INT8_OP_TYPES = ["MatMul"]
# x86 without an int8 dot-product instruction (VNNI, AMX): onnxruntime's u8 x s8 kernel adds pairs of
# products in int16 (AVX2 vpmaddubsw), which saturates once weights use all 8 bits (255 * 127 * 2 >
# 32767): on the AVX2-only EPYC the caption tower's mean cosine to fp32 was 0.9978 and its
# text->caption top-10 overlap 0.925. With 7-bit weights (reduce_range) 0.99997 and 0.963, image towers
# 0.996 -> 0.997, at the same speed. With VNNI/AMX the sums are 32-bit: 8 bits kept there.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")


@cache
def int8_reduce_range(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine's int8 exports quantise weights to 7 bits (see INT8_DOT_FLAGS)."""
    if platform.machine().lower() not in X86_MACHINES:
        return False  # Arm's int8 dot products (sdot, i8mm) accumulate in 32 bits
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return True  # unknown x86: 7 bits cost nothing in speed, 8 bits may saturate
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return not flags & set(INT8_DOT_FLAGS)


def int8_flavour() -> str:
    """The int8 exports' cache-key part for this machine's weight width (w7 / w8)."""
    return "w7" if int8_reduce_range() else "w8"


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                     op_types_to_quantize=INT8_OP_TYPES, per_channel=True, reduce_range=int8_reduce_range())


def export_method(model, method: str | Callable, example, path: Path, input_name: str,
                  output_name: str = "vectors", custom_opsets: dict | None = None) -> None:
    """Export `model.<method>(x)` (encode_text / encode_image), or method(x) for a function of the
    model's modules (shortcut.class_token_forward), to ONNX with a dynamic batch axis.
    custom_opsets: {domain: version} of the contrib operators the method writes (fusedattention)."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return (method if callable(method) else getattr(self.model, method))(x)

    # grad on: nn.MultiheadAttention's fused inference kernel has no ONNX export, the plain path does
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape checks; callers compare outputs with torch
        torch.onnx.export(Tower().eval(), (example,), str(path), input_names=[input_name],
                          output_names=[output_name], opset_version=17, dynamo=False,
                          custom_opsets=custom_opsets or {},
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})


def l2_normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 and contiguous (what every encoder returns)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return np.ascontiguousarray(vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12))
