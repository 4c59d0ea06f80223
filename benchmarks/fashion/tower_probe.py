"""Which image tower learns the coloured Fashion-MNIST categories fastest on this CPU?

A cheap probe used to pick the tower of the shipped model before spending 15-minute contrastive
runs: each tower (the image side of an mmsearch model config) gets a linear head over the 110
colour x category classes and is trained with plain cross-entropy for --minutes of wall-clock time
(AdamW, warm-up then cosine decay, batch 64), then scored on the 10,000 test photos in one random
colour each. It prints images/s, epochs reached and category / colour / both accuracy per tower.

    python -m benchmarks.fashion.tower_probe --minutes 3
    python -m benchmarks.fashion.tower_probe --minutes 3 --towers mmsearch-fashion-cnn --hflip

The photos are tinted in memory with make_catalog.tint (train: seed 1, test: seed 2); no files are
written except the --cache of tinted arrays.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.fashion.make_catalog import COLORS, load_fashion_mnist, tint

TOWERS = ("mmsearch-fashion-rn", "mmsearch-fashion-cnn")
CLASSES = 110  # 10 categories x 11 colours
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # open_clip's defaults
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def tinted_split(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) photos in one random colour each, and labels category * 11 + colour."""
    images, labels = load_fashion_mnist(split)
    colours = list(COLORS)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(colours), len(images))
    pixels = np.stack([np.asarray(tint(img, colours[c], rng)) for img, c in zip(images, picks)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels * 11 + picks)


def load_data(cache: Path):
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        (xtr, ytr), (xte, yte) = tinted_split("train", 1), tinted_split("test", 2)
        torch.save({"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}, cache)
    data = torch.load(cache, weights_only=True)
    return data["xtr"], data["ytr"], data["xte"], data["yte"]


class Tower(nn.Module):
    """The image tower of an mmsearch/open_clip model config, fed at its own input size."""

    def __init__(self, config: str):
        super().__init__()
        import open_clip

        from mmsearch.encoders import register_packaged_configs

        register_packaged_configs()
        self.visual = open_clip.create_model(config).visual
        size = self.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size
        self.head = nn.LazyLinear(CLASSES)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.size:  # the eval preprocessing's bicubic resize
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.head(self.visual(pixels))


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def probe(config: str, data, minutes: float, batch: int, lr: float, hflip: bool, bf16: bool = False) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    model = Tower(config)
    model(normalised(xtr[:2]))  # materialise the lazy head (.to() refuses uninitialised parameters)
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    started, step, planned = time.perf_counter(), 0, None
    while time.perf_counter() - started < minutes * 60:
        order = torch.randperm(len(xtr), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            elapsed = time.perf_counter() - started
            if elapsed >= minutes * 60:
                break
            if step == 20:  # the step budget, from the speed of the first steps
                planned = int(minutes * 60 / (elapsed / 20))
            progress = min(1.0, step / planned) if planned else 0.0
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress))
            index = order[start : start + batch]
            pixels = normalised(xtr[index])
            if hflip:
                flip = torch.rand(len(index), generator=generator) < 0.5
                pixels[flip] = pixels[flip].flip(-1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(pixels).float()
            loss = F.cross_entropy(logits, ytr[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(normalised(xte[i : i + 1000])).argmax(1) for i in range(0, len(xte), 1000)])
    return {"tower": config, "hflip": hflip, "images_per_s": step * batch / seconds,
            "epochs": step * batch / len(xtr), "category": float((predicted // 11 == yte // 11).float().mean()),
            "colour": float((predicted % 11 == yte % 11).float().mean()),
            "both": float((predicted == yte).float().mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), help="model config names")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hflip", action="store_true", help="random horizontal flips")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as train --precision bf16-image)")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/fashion/probe-data.pt"))
    args = parser.parse_args(argv)
    data = load_data(args.cache)
    print(f"{'tower':<24} {'img/s':>7} {'epochs':>6} {'category':>8} {'colour':>6} {'both':>6}")
    for config in args.towers:
        r = probe(config, data, args.minutes, args.batch_size, args.lr, args.hflip, args.bf16)
        print(f"{config:<24} {r['images_per_s']:>7.0f} {r['epochs']:>6.2f} {r['category']:>8.4f} "
              f"{r['colour']:>6.4f} {r['both']:>6.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
