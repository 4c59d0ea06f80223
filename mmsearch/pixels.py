"""open_clip's eval preprocessing, computed with torch's uint8 resize kernels.

open_clip's transform for a model is Resize(shorter side, bicubic, antialias) -> CenterCrop ->
ToTensor -> Normalize on a PIL image. PIL's bicubic resize dominates it (0.8 ms for a 320x240 image on
this machine's cores); torch's antialiased uint8 resize on a channels-last tensor computes the same
filter with SIMD in about a third of the time, with ToTensor and Normalize folded into one
multiply-add. The result is within two grey levels of open_clip's before normalisation (rounding
of the resize; most pixels are identical), and it is only used for a transform of exactly that shape: any other
transform (squash, letterbox, custom steps) runs as open_clip built it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import centre_crop_origin, shorter_side_size

_MODES = ("bicubic", "bilinear")  # torchvision InterpolationMode values F.interpolate also takes


class FastPreprocess:
    """Callable PIL image -> normalised float32 tensor (3, H, W), like the transform it replaces.

    It also takes the (H, W, 3) uint8 RGB arrays of images.load_pixels (what ingest decodes to), so
    a JPEG goes from libjpeg-turbo to the resize without a Pillow image in between."""

    accepts_arrays = True  # ingest decodes to arrays for it (images.load_pixels)

    def __init__(self, shorter_side: int, crop: tuple[int, int], mode: str, mean, std, fallback=None):
        self.shorter_side, self.crop, self.mode = shorter_side, tuple(crop), mode
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.fallback = fallback  # the transform replaced: it handles what this one does not (padding)
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)  # ToTensor's /255 and Normalize's /std in one factor
        self.shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def config(self) -> dict | None:
        """The parameters that rebuild it without open_clip (from_config), or None when it needs its
        fallback: a crop larger than the resized image (torchvision pads it)."""
        if any(c > self.shorter_side for c in self.crop):
            return None
        return {"shorter_side": self.shorter_side, "crop": list(self.crop), "mode": self.mode,
                "mean": self.mean, "std": self.std}

    @classmethod
    def from_config(cls, config: dict) -> FastPreprocess:
        return cls(int(config["shorter_side"]), tuple(config["crop"]), str(config["mode"]), config["mean"],
                   config["std"])

    def __call__(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        return self.normalise(self.prepare(img))

    def prepare(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        """uint8 pixels (what ingest's decoding hands over: 4x less to copy), or the fallback's floats."""
        pixels = self.uint8(img)
        if pixels is not None:
            return pixels
        return self.fallback(Image.fromarray(img) if isinstance(img, np.ndarray) else img)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> the normalised float32 the model takes; floats pass through."""
        if pixels.dtype != torch.uint8:
            return pixels
        return pixels.float().mul_(self.scale).sub_(self.shift)

    def collate(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        """A float batch from prepare()'s outputs: one vectorised normalisation for all of them."""
        if all(p.dtype == torch.uint8 for p in prepared):
            return self.normalise(torch.stack(prepared))
        return torch.stack([self.normalise(p) for p in prepared])

    def uint8(self, img: Image.Image | np.ndarray) -> torch.Tensor | None:
        """The resized, centre-cropped pixels (3, H, W) uint8, before normalisation; None for an
        image smaller than the crop after resizing (torchvision pads it)."""
        hwc = torch.from_numpy(_rgb_array(img))
        chw = hwc.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: the layout the uint8 kernels want
        height, width = chw.shape[-2:]
        new_h, new_w = shorter_side_size(height, width, self.shorter_side)
        if (new_h, new_w) != (height, width):
            chw = F.interpolate(chw, size=(new_h, new_w), mode=self.mode, antialias=True)
        crop_h, crop_w = self.crop
        if new_h < crop_h or new_w < crop_w:
            return None
        top, left = centre_crop_origin(new_h, new_w, crop_h, crop_w)
        return chw[0, :, top : top + crop_h, left : left + crop_w].contiguous()


def _rgb_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB that torch can wrap: an RGB array as it is (load_pixels' arrays are
    writable), a PIL image converted and copied."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {img.dtype} {img.shape}")
        return img if img.flags.writeable else img.copy()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # writable copy: torch wants it


def fast_preprocess(transform):
    """A FastPreprocess equal to open_clip's `transform`, or None when it is not the standard shape."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    names = [type(s).__name__ for s in steps]
    if names not in (["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"],
                     ["Resize", "CenterCrop", "ToTensor", "Normalize"]):
        return None
    resize, crop, normalize = steps[0], steps[1], steps[-1]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    mode = getattr(resize.interpolation, "value", None)
    if size is None or mode not in _MODES or resize.max_size is not None or resize.antialias is False:
        return None
    if not isinstance(normalize, T.Normalize) or len(normalize.mean) != 3:
        return None
    crop_size = tuple(crop.size) if not isinstance(crop.size, int) else (crop.size, crop.size)
    return FastPreprocess(size, crop_size, mode, list(normalize.mean), list(normalize.std), fallback=transform)
