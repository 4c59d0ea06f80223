"""`mmsearch index` in ONNX Runtime (the default runtime) without open_clip: an encoder built from the ONNX cache alone.

Loading the torch encoder means importing open_clip (which pulls in torchvision and torch._dynamo)
and building the model: seconds before the first photo is read, paid again by every incremental
`mmsearch index` run. Once a model's image tower (the variant asked for) and text tower are
exported and verified (imageonnx.py, textonnx.py, at the first index run), everything ingest needs
is in the cache: the two ONNX graphs, the vector size and the preprocessing parameters
(pixels.FastPreprocess.config). This encoder runs them; torch is still imported for the SIMD resize
of pixels.py, open_clip is not. Anything missing (a first run, a transform FastPreprocess cannot
rebuild, MMSEARCH_FAST_TEXT=0) means the torch encoder is loaded as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .config import ModelRef
from .errors import ModelLoadError
from .imageonnx import OnnxImageTower, cached_image_tower
from .pixels import FastPreprocess
from .textonnx import FastTextEncoder, exported_folder, load_fast_text_encoder_from, usable_caption_int8

log = logging.getLogger(__name__)


class OnnxEncoder:
    """What ingest uses of encoders.Encoder (ref, dim, input_side, preprocess, image_tower,
    encode_texts, encode_captions, encode_pixels / submit_pixels / encode_images), with every tower in
    onnxruntime (the int8 variant: int8 images and captions, fp32 words)."""

    def __init__(self, ref: ModelRef, dim: int, input_side: int, preprocess: FastPreprocess,
                 image_tower: OnnxImageTower, text_folder: Path, caption_folder: Path):
        self.ref, self.dim, self.input_side = ref, dim, input_side
        self.preprocess, self.image_tower = preprocess, image_tower
        # textonnx's exports, each loaded when first needed (0.9 s for ViT-B-32's fp32 text tower);
        # the caption folder is the int8 export or the text one
        self.folders = {"text": text_folder, "caption": caption_folder}
        self._loaded: dict[Path, FastTextEncoder] = {}

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self._text("text").encode_texts(texts, batch_size)

    def encode_captions(self, texts: Sequence[str]) -> np.ndarray:
        return self._text("caption").encode_texts(texts)

    def _text(self, role: str) -> FastTextEncoder:
        folder = self.folders[role]
        if folder not in self._loaded:
            try:
                # one thread: ingest encodes captions beside the image streams, which keep every core busy
                self._loaded[folder] = load_fast_text_encoder_from(folder, self.dim, threads=1)
            except Exception as exc:
                raise ModelLoadError(f"cached ONNX text tower of {self.ref.label()} in {folder} is "
                                     f"unusable ({exc}); delete that folder to export it again") from exc
        return self._loaded[folder]

    def encode_pixels(self, pixels) -> np.ndarray:
        """Encode an already-preprocessed batch (N, 3, H, W), a torch tensor or an array."""
        return self.image_tower.encode(np.asarray(pixels))

    def submit_pixels(self, pixels) -> Callable[[], np.ndarray]:
        return self.image_tower.submit(np.asarray(pixels))

    def encode_images(self, images, batch_size: int = 64) -> np.ndarray:
        import torch

        chunks = [self.encode_pixels(torch.stack([self.preprocess(img) for img in images[i : i + batch_size]]))
                  for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)


def load_onnx_encoder(ref: ModelRef, variant: str) -> OnnxEncoder | None:
    """The encoder for this model and image variant from the cache, or None when anything it needs
    is not there yet (the caller loads the torch encoder, which exports what is missing)."""
    cached = cached_image_tower(ref, variant)
    if cached is None:
        return None
    tower, meta = cached
    if not meta.get("preprocess") or not meta.get("input_side"):
        return None
    text_folder = exported_folder(ref, int(meta["dim"]))
    caption_folder = usable_caption_int8(ref, int(meta["dim"])) if variant == "int8" else text_folder
    if text_folder is None or caption_folder is None:  # not exported yet: the torch-loaded path does it
        return None
    log.info("encoding with the cached ONNX towers of %s (%s images and captions)", ref.label(), variant)
    return OnnxEncoder(ref, int(meta["dim"]), int(meta["input_side"]), FastPreprocess.from_config(meta["preprocess"]),
                       tower, text_folder, caption_folder or text_folder)  # False: fp32 captions
