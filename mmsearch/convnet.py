"""Small VGG-style image towers for low-resolution catalogs, registered with timm for open_clip.

open_clip builds an image tower from a timm model name (`vision_cfg.timm_model_name`), so a model
config names one of ARCHITECTURES and open_clip's TimmModel adds the pooling and projection. They
exist because the stock towers waste a CPU's time on 28-32 px product photos: ModifiedResNet's stem
divides the resolution by 4 at once (so its inputs were upsampled to 64 px), and ViTs and ResNet-18
cost several times more per image. Three stages of two 3x3 convolutions run at 32, 16 and 8 px
(`mmsearch_convnet_s`: 16/32/64 channels, 80k parameters, 20 MFLOP per image forward, vs 37 MFLOP
for the 64 px ModifiedResNet). `mmsearch_convnet_m` (32/64/128) costs 4x the FLOPs but, in bf16 on
AMX cores, trains at the same step time as the 24/48/96 width, because oneDNN's bf16 kernels like
channel counts in multiples of 32. Pooling over a 4x4 grid (`timm_pool: "avg4"`) rather than
globally keeps where things are in the photo, which is most of what tells a shirt from a coat.
Measured in README "Fine-tuning".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvNetCfg:
    channels: tuple[int, ...]  # width of each stage; the resolution halves between stages
    convs_per_stage: int = 2  # 3x3 conv + batch norm + ReLU blocks per stage


ARCHITECTURES = {
    "mmsearch_convnet_s": ConvNetCfg(channels=(16, 32, 64)),
    "mmsearch_convnet_w24": ConvNetCfg(channels=(24, 48, 96)),
    "mmsearch_convnet_m": ConvNetCfg(channels=(32, 64, 128)),
}


class ConvNet(nn.Module):
    """Stages of conv-BN-ReLU blocks with 2x2 max pooling between them, then pooling.

    forward() returns pooled features (N, num_features); open_clip's TimmModel projects them.
    Pooling (`timm_pool` in the model config): "avg" averages the last feature map globally;
    "avgN" averages it over an N x N grid and flattens, keeping where things are (a collar, a sleeve's
    length), which is what tells a shirt from a coat at 32 px; "" returns the feature map."""

    def __init__(self, cfg: ConvNetCfg, in_chans: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_chans
        for stage, channels in enumerate(cfg.channels):
            if stage:
                blocks.append(nn.MaxPool2d(2))
            for _ in range(cfg.convs_per_stage):
                blocks += [nn.Conv2d(width, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                           nn.ReLU(inplace=True)]
                width = channels
        self.features = nn.Sequential(*blocks)
        self.channels = width
        self.num_features = width
        self.global_pool, self.grid = "avg", 1
        self.default_cfg = self.pretrained_cfg = {"pool_size": None, "num_classes": 0}

    def reset_classifier(self, num_classes: int = 0, global_pool: str = "avg") -> None:
        """timm's interface: open_clip asks for no classifier and the config's pooling."""
        if num_classes:
            raise ValueError("mmsearch convnets are embedding trunks: no classifier head")
        grid = _grid_of(global_pool)
        if grid is None:
            raise ValueError(f"unsupported pooling {global_pool!r}: use 'avg', 'avgN' (an N x N grid) or ''")
        self.global_pool, self.grid = global_pool, grid
        self.num_features = self.channels * grid * grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if not self.global_pool:
            return x
        if self.grid == 1:
            return x.mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(x, self.grid).flatten(1)


def _grid_of(pool: str) -> int | None:
    """'avg' -> 1, 'avg4' -> 4, '' -> 0 (no pooling); None for anything else."""
    if pool == "":
        return 0
    if pool == "avg":
        return 1
    digits = pool.removeprefix("avg")
    return int(digits) if pool.startswith("avg") and digits.isdigit() and int(digits) > 0 else None


def register_with_timm() -> bool:
    """Make ARCHITECTURES creatable by name in timm (what open_clip calls); False without timm."""
    try:
        from timm.models import is_model, register_model
    except ImportError:
        return False
    for name, cfg in ARCHITECTURES.items():
        if not is_model(name):
            register_model(_factory(name, cfg))
    return True


def _factory(name: str, cfg: ConvNetCfg):
    def create(pretrained: bool = False, **kwargs) -> ConvNet:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights; load a checkpoint instead")
        return ConvNet(cfg, in_chans=kwargs.get("in_chans", 3))

    create.__name__ = name  # timm registers the function under its name
    create.__module__ = __name__
    return create
