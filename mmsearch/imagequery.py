"""Image queries without torch or open_clip: the model's cached ONNX image tower, open_clip's eval
preprocessing done with Pillow and numpy.

`mmsearch index` exports the image tower once per model (imageonnx.py, the default runtime) and
records the preprocessing it checked (pixels.FastPreprocess.config). A query picture in a new process
used to import torch and open_clip and build the model first: 4.8-5.9 s for one picture on the demo
index, against 0.85 s for words. Here the export runs in onnxruntime and the picture is resized as
torchvision's Resize does on a PIL image (it calls Pillow's resize), centre-cropped, scaled and
normalised in numpy, without importing torch. A model without a usable fp32 export (not indexed
with it yet, another transform) keeps the torch encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .config import ModelRef
from .imageonnx import OnnxImageTower, cached_image_tower, export_folder
from .images import centre_crop_origin, shorter_side_size

log = logging.getLogger(__name__)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class PilPreprocess:
    """PIL image -> normalised float32 array (3, H, W): Resize(shorter side) -> CenterCrop -> ToTensor ->
    Normalize, from a FastPreprocess config (shorter_side, crop, mode, mean, std)."""

    def __init__(self, config: dict):
        self.shorter_side = int(config["shorter_side"])
        self.crop_h, self.crop_w = (int(c) for c in config["crop"])
        self.resample = _RESAMPLE[config["mode"]]
        std = np.asarray(config["std"], dtype=np.float32).reshape(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # ToTensor's /255 and Normalize's /std in one factor
        self.shift = np.asarray(config["mean"], dtype=np.float32).reshape(3, 1, 1) / std

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = img if img.mode == "RGB" else img.convert("RGB")
        height, width = shorter_side_size(img.height, img.width, self.shorter_side)
        if (width, height) != img.size:
            img = img.resize((width, height), self.resample)
        top, left = centre_crop_origin(height, width, self.crop_h, self.crop_w)
        pixels = np.asarray(img.crop((left, top, left + self.crop_w, top + self.crop_h)), dtype=np.float32)
        return pixels.transpose(2, 0, 1) * self.scale - self.shift


class ImageQueryEncoder:
    """What a query needs of encoders.Encoder for pictures: input_side and encode_images."""

    def __init__(self, ref: ModelRef, dim: int, input_side: int, preprocess: PilPreprocess, tower: OnnxImageTower):
        self.ref, self.dim, self.input_side = ref, dim, input_side
        self.preprocess, self.tower = preprocess, tower

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        chunks = [self.tower.encode(np.stack([self.preprocess(img) for img in images[i : i + batch_size]]))
                  for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)


def load_image_query_encoder(ref: ModelRef, dim: int) -> ImageQueryEncoder | None:
    """The encoder for query pictures from the model's cached fp32 ONNX export, or None when there is
    no usable one (the caller loads the torch encoder). A damaged export is logged, not raised."""
    try:
        cached = cached_image_tower(ref, "fp32", one_stream=True)
        if cached is None:
            return None
        tower, meta = cached
        if meta.get("dim") != dim or not meta.get("preprocess"):  # FastPreprocess had no config: torch pads
            return None
        preprocess = PilPreprocess(meta["preprocess"])
    except Exception as exc:  # a damaged cache or an unknown resize mode must never break a search
        log.warning("cannot use the cached ONNX image tower in %s (%s); loading the torch model",
                    export_folder(ref, "fp32"), exc)
        return None
    log.info("query pictures go to the cached ONNX image tower of %s", ref.label())
    return ImageQueryEncoder(ref, dim, int(meta["input_side"]), preprocess, tower)
