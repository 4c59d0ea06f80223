"""ONNX Runtime image encoding for ingest: `mmsearch index [--runtime auto|onnx] [--quantize int8]`.

The image tower is exported once per model (and variant) into the ONNX cache (onnxcache.py) and
checked against torch on a probe batch before it is used: fp32 must agree within FP32_TOLERANCE;
int8 (onnxruntime dynamic quantisation: int8 weights, activations quantised per batch, integer
matmuls that use the CPU's VNNI/AMX units) must keep a mean cosine of INT8_MIN_COSINE with torch's
vectors. With `--runtime onnx` a variant that fails its export or check is an error: the user asked
for it. With `--runtime auto` (ingest's default) the same failure is a warning and torch encodes the
images; the failure is remembered in the cache, so later runs do not pay for the export again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import ModelLoadError
from .onnxcache import (
    cache_root,
    export_method,
    int8_flavour,
    l2_normalised,
    model_key,
    ort_session,
    publish,
    quantize_int8,
    read_meta,
)
from .shortcut import class_token_forward

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
VARIANTS = ("fp32", "int8")
# 2: the meta records the preprocessing (onnxencoder.py); 3: onnxcache.quantize_int8's int8;
# 4: the last block for the class token alone (shortcut.py); 5: attention as one contrib operator
# (fusedattention.py)
EXPORT_FORMAT = 5
FP32_FILE, MODEL_FILE = "image-fp32.onnx", "image.onnx"
FP32_TOLERANCE = 1e-3  # max |onnx - torch| over normalised probe vectors
INT8_MIN_COSINE = 0.99  # mean cosine(onnx int8, torch fp32) over the probe batch
PROBE_BATCH = 8
MAX_STREAMS = 4  # concurrent runs of the session per batch; the cores are shared out among them
# Images per session run: small enough that a stream finishing early takes the next slice instead of
# idling, big enough for full-speed matmuls (ViT-B-32 int8 on 2 cores: 8 and 16 the same img/s, 2 9% less).
SLICE_IMAGES = 8
T = TypeVar("T")


def stream_layout(cores: int | None = None) -> tuple[int, int]:
    """(streams, threads per stream) for this machine.

    A batch is split into slices run concurrently by `streams` threads on one session (shared
    weights), each with its own intra-op threads. On few cores one thread per stream wins twice: no
    per-operator barrier between threads (a decode thread preempting one of them stalled every
    operator of the other), and bigger matmuls per thread. Measured on 2 cores: 2 streams x 1 thread
    94-100 img/s, 1 x 2: 84-86."""
    cores = max(1, cores or os.cpu_count() or 1)
    streams = min(cores, MAX_STREAMS)
    return streams, max(1, cores // streams)


class OnnxImageTower:
    """pixels (N, 3, H, W) float32 -> L2-normalised float32 vectors.

    A batch is cut into slices of SLICE_IMAGES, queued on `streams` threads that share one session
    (and its weights); a stream that finishes a slice takes the next one, of this batch or the next.
    run_on_stream lends those threads to a caller (ingest decodes a slice's images on the stream that
    then encodes them)."""

    def __init__(self, session, variant: str, streams: int = 1, slice_images: int = SLICE_IMAGES):
        self.session, self.variant, self.streams, self.slice_images = session, variant, streams, slice_images
        self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="onnx-stream")

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.submit(pixels)()

    def submit(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        """Start encoding a batch on the streams; returns a function that waits for its vectors.

        A caller that submits the next batch before waiting (ingest) keeps every stream busy: a
        stream that finishes its slice starts on the next batch instead of waiting for the others."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.streams == 1 or len(pixels) <= self.slice_images:
            vectors = self.encode_here(pixels)
            return lambda: vectors
        slices = [pixels[i : i + self.slice_images] for i in range(0, len(pixels), self.slice_images)]
        futures = [self._pool.submit(self.encode_here, part) for part in slices]
        return lambda: np.concatenate([f.result() for f in futures])

    def run_on_stream(self, job: Callable[[], T]) -> Future[T]:
        """Run job() on a stream thread, queued behind the slices already submitted. A job that
        prepares pixels and encodes them with encode_here keeps both on one core, one after the other,
        instead of a decode thread preempting the streams mid-matmul (ingest: see
        ingest._in_stream_batches)."""
        return self._pool.submit(job)

    def encode_here(self, pixels: np.ndarray) -> np.ndarray:
        """Encode on the calling thread (a stream thread, in a run_on_stream job)."""
        return l2_normalised(self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0])


def export_folder(ref, variant: str) -> Path:
    flavour = (int8_flavour(),) if variant == "int8" else ()  # 7- or 8-bit weights: per machine
    return cache_root("image-onnx") / model_key(ref, "image", EXPORT_FORMAT, variant, *flavour)


def cached_image_tower(ref, variant: str, one_stream: bool = False) -> tuple[OnnxImageTower, dict] | None:
    """(tower, its export's meta) when this model's variant is already exported, else None. Imports
    neither torch nor open_clip: `mmsearch index` (runtime auto or onnx) starts from it (onnxencoder.py).
    one_stream: every core on one run (a query's picture), not ingest's streams."""
    folder = export_folder(ref, variant)
    meta = read_meta(folder)
    if meta is None or meta.get("format") != EXPORT_FORMAT:
        return None
    return _tower(folder, variant, one_stream), meta


def _tower(folder: Path, variant: str, one_stream: bool = False) -> OnnxImageTower:
    streams, threads = (1, None) if one_stream else stream_layout()  # None: one thread per core
    return OnnxImageTower(ort_session(folder / MODEL_FILE, threads=threads), variant, streams)


def image_tower(encoder, variant: str = "fp32") -> OnnxImageTower:
    """The verified ONNX image tower of encoder's model, exporting it on first use."""
    if variant not in VARIANTS:
        raise ModelLoadError(f"unknown ONNX variant {variant!r}; choose from {', '.join(VARIANTS)}")
    folder = export_folder(encoder.ref, variant)
    if read_meta(folder) is None:
        try:
            publish(folder, lambda staging: _export(encoder, variant, staging))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot export the image tower of {encoder.ref.label()} to ONNX: {exc}") from exc
    return _tower(folder, variant)


def auto_image_tower(encoder, variant: str = "fp32") -> OnnxImageTower | None:
    """runtime 'auto': the verified ONNX image tower, or None (torch encodes) for a model that does not
    export or fails its check. The failure is logged and recorded beside the export's folder, so the
    next run of this model (same files, same onnxruntime) goes straight to torch."""
    marker = unsupported_marker(encoder.ref, variant)
    recorded = _read_marker(marker)
    if recorded is not None:
        log.info("encoding images with torch: %s (recorded in %s)", recorded, marker)
        return None
    try:
        return image_tower(encoder, variant)
    except ModelLoadError as exc:  # the model does not export, or its export fails the check
        log.warning("%s; encoding images with torch instead", exc)
        _write_marker(marker, str(exc))
    except Exception as exc:  # a damaged cached export: not the model's fault, so not recorded
        log.warning("cannot load the cached ONNX image tower of %s (%s); encoding images with torch instead",
                    encoder.ref.label(), exc)
    return None


def unsupported_marker(ref, variant: str) -> Path:
    folder = export_folder(ref, variant)
    return folder.with_name(folder.name + ".unsupported.json")


def _marker_key() -> dict:
    try:
        import onnxruntime

        version = onnxruntime.__version__
    except ImportError:  # recorded as such: installing onnxruntime later makes the next run try again
        version = None
    return {"format": EXPORT_FORMAT, "onnxruntime": version}


def _read_marker(marker: Path) -> str | None:
    """The recorded reason, when it was recorded by this export format and onnxruntime version."""
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in _marker_key().items()):
        return None
    return str(recorded.get("reason"))


def _write_marker(marker: Path, reason: str) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        staging = marker.with_name(f".{marker.name}.{os.getpid()}")
        staging.write_text(json.dumps({**_marker_key(), "reason": reason}), encoding="utf-8")
        os.replace(staging, marker)
    except OSError as exc:  # a read-only cache: the next run tries the export again
        log.info("cannot record the failed ONNX export in %s: %s", marker, exc)


def _export(encoder, variant: str, staging: Path) -> dict:
    import torch

    size = encoder.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    probe = torch.from_numpy(np.random.default_rng(0).standard_normal((PROBE_BATCH, 3, *size), dtype=np.float32))
    fp32_path = staging / (FP32_FILE if variant != "fp32" else MODEL_FILE)
    want = encoder.encode_pixels(probe)
    form = _export_fp32(encoder, probe, want, fp32_path)
    if variant == "int8":
        quantize_int8(fp32_path, staging / MODEL_FILE)
        fp32_path.unlink()
    got = OnnxImageTower(ort_session(staging / MODEL_FILE), variant).encode(probe.numpy())
    cosine = float((got * want).sum(axis=1).mean())
    max_diff = float(np.abs(got - want).max())
    if variant == "fp32" and max_diff > FP32_TOLERANCE:
        raise ModelLoadError(f"ONNX image tower of {encoder.ref.label()} differs from torch by {max_diff:.2g}")
    if variant == "int8" and cosine < INT8_MIN_COSINE:
        raise ModelLoadError(f"int8 ONNX image tower of {encoder.ref.label()} drifts too far from fp32 "
                             f"(mean cosine {cosine:.4f} < {INT8_MIN_COSINE})")
    log.info("exported the %s ONNX image tower of %s (cosine to torch %.5f)", variant, encoder.ref.label(), cosine)
    config = getattr(encoder.preprocess, "config", None)  # pixels.FastPreprocess: rebuilt without open_clip
    return {"format": EXPORT_FORMAT, "model": encoder.ref.label(), "variant": variant, "dim": encoder.dim,
            "input_side": encoder.input_side, "preprocess": config() if config else None,
            "probe_mean_cosine": cosine, "probe_max_abs_diff": max_diff,
            "class_token_shortcut": form != "plain", "fused_attention": form == "fused attention",
            "int8_weight_bits": (7 if int8_flavour() == "w7" else 8) if variant == "int8" else None}


def _export_fp32(encoder, probe, want: np.ndarray, path: Path) -> str:
    """Export the fp32 tower in the fastest form that applies and agrees with torch: the class-token
    shortcut with fused attention, the shortcut alone, the plain forward. Returns the form."""
    from .fusedattention import OPSETS

    fused = class_token_forward(encoder.model, probe[:2], fused_attention=True)
    if fused is not None:
        try:
            export_method(encoder.model, fused, probe[:1], path, "pixels", custom_opsets=OPSETS)
            got = OnnxImageTower(ort_session(path), "fp32").encode(probe.numpy())
            max_diff = float(np.abs(got - want).max())
            if max_diff <= FP32_TOLERANCE:
                return "fused attention"
            log.warning("fused-attention export of %s differs from torch by %.2g; exporting plain attention",
                        encoder.ref.label(), max_diff)
        except Exception as exc:  # an onnxruntime without the contrib operator: the plain graph still works
            log.warning("fused-attention export of %s failed (%s); exporting plain attention", encoder.ref.label(), exc)
    shortcut = class_token_forward(encoder.model, probe[:2])
    export_method(encoder.model, shortcut or "encode_image", probe[:1], path, "pixels")
    return "class-token shortcut" if shortcut is not None else "plain"
