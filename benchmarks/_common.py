"""Shared helpers of the speed benchmarks: timing medians, RSS, machine info, clustered embeddings, results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def proc_status() -> dict[str, float]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def machine() -> dict:
    import faiss
    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
            "load_avg_at_start": os.getloadavg()}


def embeddings(n: int, dim: int = 512, seed: int = 0, centres: int = 4096, chunk: int = 100_000) -> np.ndarray:
    """Synthetic embeddings with the structure of real ones, L2-normalised float32.

    A Gaussian mixture of `centres` cluster centres on the unit sphere (themselves grouped around 64
    super-centres), with within-cluster variation of low intrinsic dimension (48 shared directions)
    plus a little isotropic noise. Uniform random vectors would make every ANN index look broken;
    isotropic noise alone makes all points of a cluster equidistant. Deterministic in (n, seed)."""
    base = np.random.default_rng(12345)  # the mixture itself is shared by every seed (queries too)
    supers = base.standard_normal((64, dim)).astype(np.float32)
    supers /= np.linalg.norm(supers, axis=1, keepdims=True)
    centre = supers[base.integers(0, 64, centres)] + 0.8 * base.standard_normal((centres, dim)).astype(
        np.float32) / np.sqrt(dim)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    basis = np.linalg.qr(base.standard_normal((dim, 48)))[0].T.astype(np.float32)  # (48, dim) orthonormal
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rng = np.random.default_rng([seed, start])
        m = min(chunk, n - start)
        x = centre[rng.integers(0, centres, m)]
        x = x + 0.45 * (rng.standard_normal((m, 48)).astype(np.float32) / np.sqrt(48)) @ basis
        x = x + 0.15 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_results(name: str, payload: dict, table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float), encoding="utf-8")
    (RESULTS / f"{name}.txt").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {path} and {path.with_suffix('.txt')}")
    return path


def fmt_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
