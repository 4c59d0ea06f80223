"""open_clip loading and encoding. Embeddings are L2-normalised float32 numpy arrays.

A model is named by one of:
- a model directory written by mmsearch (open_clip_config.json + open_clip_model.safetensors);
- a model shipped in the package (mmsearch/models/NAME);
- 'hf-hub:ORG/NAME' (offline from the local Hugging Face cache with HF_HUB_OFFLINE=1);
- an open_clip zoo name or packaged config, with `pretrained` a tag, a local .safetensors/.pt
  file, or 'random' (explicit random init, for tests and training from scratch).
Nothing falls back to random weights silently, and nothing is unpickled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .config import PACKAGE_DIR, SHIPPED_MODELS_DIR, ModelRef
from .errors import ModelLoadError
from .shortcut import class_token_forward

if TYPE_CHECKING:
    from .onnxencoder import OnnxEncoder

log = logging.getLogger(__name__)

CONFIG_DIR = PACKAGE_DIR / "model_configs"
MODEL_CONFIG_FILE = "open_clip_config.json"
MODEL_WEIGHTS_FILE = "open_clip_model.safetensors"
RANDOM = "random"


@lru_cache(maxsize=1)
def register_packaged_configs() -> list[str]:
    """Make mmsearch's own model shapes (tiny test and fashion configs) known to open_clip."""
    import open_clip

    from .convnet import register_with_timm

    register_with_timm()  # configs may name mmsearch's own timm towers
    open_clip.add_model_config(CONFIG_DIR)
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def shipped_model_dir(name: str) -> Path | None:
    path = SHIPPED_MODELS_DIR / name
    return path if (path / MODEL_CONFIG_FILE).is_file() else None


def set_torch_threads() -> None:
    """Use every core for intra-op work; the default can be lower inside containers."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))


class Encoder:
    """An open_clip model with its preprocessing and tokenizer."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, ref: ModelRef):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.ref = ref
        self.dim = int(_embed_dim(model))
        self.image_tower = None  # an imageonnx.OnnxImageTower when loaded with runtime "onnx" (or "auto")
        self.caption_encoder = None  # textonnx's int8 caption tower with runtime="onnx", quantize="int8"
        self.quantized = False  # True once load_encoder has made the torch image tower dynamic int8
        self._shortcut: tuple | None = None  # (the visual tower it was checked on, its forward or None)
        size = model.visual.image_size
        self.input_side = int(min(size) if isinstance(size, (tuple, list)) else size)  # decode images to >= this

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size]))
            chunks.append(encode_text_trimmed(self.model, tokens).float())
        return _normalise(chunks, self.dim)

    def encode_captions(self, texts: Sequence[str]) -> np.ndarray:
        """Catalog captions at ingest: the int8 caption tower when there is one, else encode_texts."""
        return (self.caption_encoder or self).encode_texts(texts)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode an already-preprocessed batch (N, 3, H, W)."""
        if self.image_tower is not None:
            return self.image_tower.encode(pixels.numpy())
        return _normalise([self._image_forward(pixels).float()], self.dim)

    def _image_forward(self, pixels: torch.Tensor):
        """model.encode_image(pixels), through shortcut.py's class-token path where it applies: checked
        on the first batch's first image (one image: a cold image query pays two extra forwards of
        one picture, not of its whole batch), again whenever the visual tower is replaced (torch int8
        replaces it)."""
        visual = self.model.visual
        if self._shortcut is None or self._shortcut[0] is not visual:
            self._shortcut = (visual, class_token_forward(self.model, pixels[:1]))
        return (self._shortcut[1] or self.model.encode_image)(pixels)

    def submit_pixels(self, pixels: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start encoding a batch; returns a function that waits for its vectors. The ONNX tower runs
        in the background (the caller can prepare the next batch meanwhile), torch right here."""
        if self.image_tower is not None:
            return self.image_tower.submit(pixels.numpy())
        vectors = self.encode_pixels(pixels)
        return lambda: vectors

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(img) for img in images[start : start + batch_size]])
            chunks.append(torch.from_numpy(self.encode_pixels(batch)))
        return _normalise(chunks, self.dim)


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """model.encode_text(tokens), with the padding after the longest text's end token cut off.

    open_clip's CLIP text tower is causal and pools at the end token (the highest id), so positions
    after every text's end cannot change any output: same vectors (to float rounding) for a fraction
    of the work, since catalog captions are ~10 tokens of ViT-B-32's 77-token context. Other towers
    (custom or Hugging Face text models, other pooling) run as they are."""
    if not (trims_text(model) and tokens.ndim == 2 and len(tokens)):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=1).max()) + 1  # the longest text's end token ("argmax" pooling)
    if length >= tokens.shape[1]:
        return model.encode_text(tokens)
    return encode_text_prefix(model, tokens[:, :length])


def trims_text(model: torch.nn.Module) -> bool:
    """Whether encode_text_prefix computes this model's encode_text on a cut-off token prefix: an
    open_clip CLIP text tower (causal mask, pooled at the end token)."""
    import open_clip

    return (isinstance(model, open_clip.CLIP) and model.text_pool_type == "argmax"
            and isinstance(model.attn_mask, torch.Tensor))


def encode_text_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """model.encode_text on tokens cut after their longest text's end token (for trims_text models).
    Every length comes from tokens.shape, so an ONNX trace of it keeps the length dynamic."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(tokens.shape[0]), tokens.argmax(dim=1)]
    projection = model.text_projection  # a matrix, a Linear or None, as in CLIP.encode_text
    if projection is None:
        return x
    return x @ projection if isinstance(projection, torch.Tensor) else projection(x)


def _embed_dim(model: torch.nn.Module) -> int:
    declared = getattr(model.visual, "output_dim", None)  # open_clip towers declare it: no forward pass
    if isinstance(declared, int) and declared > 0:
        return declared
    with torch.inference_mode():
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return model.encode_image(torch.zeros(1, 3, *size)).shape[-1]


def _normalise(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    out = torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def resolve_model_name(name: str) -> str:
    """Map a directory or shipped model name onto open_clip's 'local-dir:' schema."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / MODEL_CONFIG_FILE).is_file():
            raise ModelLoadError(f"model directory {path} has no {MODEL_CONFIG_FILE}")
        return f"local-dir:{path.resolve()}"
    shipped = shipped_model_dir(name)
    if shipped is not None:
        return f"local-dir:{shipped}"
    return name


def canonical_ref(name: str, pretrained: str | None) -> ModelRef:
    """Absolute paths for files and directories so the manifest works from any cwd."""
    path = Path(name).expanduser()
    if path.is_dir():
        name = str(path.resolve())
    if pretrained and pretrained != RANDOM and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    return ModelRef(name=name, pretrained=pretrained)


QUANTIZE_MODES = ("int8",)


def quantize_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """CPU speed option: 'int8' = dynamic int8 quantisation of the image tower's nn.Linear layers (weights
    int8, activations quantised per batch); attention in-projections stay fp32 (nn.MultiheadAttention keeps
    them as raw parameters) and so does the text tower (open_clip reads its weight dtype; queries are one
    text each). Vectors move slightly: benchmarks/bench_ingest.py reports the speed-up and top-10 agreement."""
    if mode not in QUANTIZE_MODES:
        raise ModelLoadError(f"unknown quantisation {mode!r}; choose from {', '.join(QUANTIZE_MODES)}")
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    model.eval()
    # exact nn.Linear only (nn.MultiheadAttention's out_proj subclass is read as raw weights), and not
    # ModifiedResNet's attention pool, which reads its projections' .weight/.bias directly
    linears = {name: default_dynamic_qconfig for name, module in model.visual.named_modules()
               if type(module) is torch.nn.Linear and not name.startswith("attnpool")}
    model.visual = quantize_dynamic(model.visual, linears, dtype=torch.qint8)
    return model


def load_encoder(name: str, pretrained: str | None = None, quantize: str | None = None,
                 runtime: str = "torch") -> Encoder | OnnxEncoder:
    """Load a model for encoding; raise ModelLoadError with the reason instead of guessing.

    runtime 'onnx' encodes images with the model's ONNX export run by onnxruntime (quantize 'int8':
    its dynamic int8 variant), and a failed export or check is an error. Once both towers of the
    model are exported, that is an onnxencoder.OnnxEncoder, which never imports open_clip nor builds
    the torch model; before, the torch model is loaded (its text tower encodes captions) and the
    image tower exported. runtime 'auto' (ingest's default) is 'onnx' for every model that exports and
    passes the check, and torch, with a warning, for one that does not (imageonnx.auto_image_tower)."""
    from .imageonnx import RUNTIMES, auto_image_tower, image_tower
    from .pixels import fast_preprocess

    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if quantize and quantize not in QUANTIZE_MODES:
        raise ModelLoadError(f"unknown quantisation {quantize!r}; choose from {', '.join(QUANTIZE_MODES)}")
    set_torch_threads()
    ref = canonical_ref(name, pretrained)
    variant = quantize or "fp32"
    if runtime != "torch":
        from .onnxencoder import load_onnx_encoder

        try:
            if (cached := load_onnx_encoder(ref, variant)) is not None:
                return cached
        except Exception:  # a damaged cached export: auto_image_tower says so, then torch encodes
            if runtime == "onnx":
                raise
    import open_clip

    register_packaged_configs()
    model = create_model(ref)
    preprocess = image_transform(model, is_train=False)
    preprocess = fast_preprocess(preprocess) or preprocess
    tokenizer = open_clip.get_tokenizer(resolve_model_name(ref.name))
    encoder = Encoder(model, preprocess, tokenizer, ref)
    if runtime == "onnx":
        encoder.image_tower = image_tower(encoder, variant)
    elif runtime == "auto":  # the export's check encodes with the fp32 torch model: quantise after it
        encoder.image_tower = auto_image_tower(encoder, variant)
    if quantize and encoder.image_tower is None:
        encoder = Encoder(quantize_model(model, quantize), preprocess, tokenizer, ref)
        encoder.quantized = True
    if encoder.image_tower is not None and quantize == "int8":
        from .textonnx import export_caption_int8, load_fast_text_encoder_from

        captions = export_caption_int8(encoder)
        if captions is not None:
            encoder.caption_encoder = load_fast_text_encoder_from(captions, encoder.dim, threads=1)
    return encoder


def image_transform(model: torch.nn.Module, is_train: bool, aug_cfg=None):
    """open_clip's preprocessing for this model (train adds its random-resized-crop augmentation)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=is_train, aug_cfg=aug_cfg)


def create_model(ref: ModelRef) -> torch.nn.Module:
    import open_clip

    register_packaged_configs()
    resolved = resolve_model_name(ref.name)
    schema_model = resolved.startswith(("hf-hub:", "local-dir:"))
    pretrained = ref.pretrained
    if not schema_model:
        if resolved not in open_clip.list_models():
            raise ModelLoadError(f"unknown model '{ref.name}': not a model directory, shipped model, "
                                 "hf-hub: id or open_clip model name")
        if not pretrained:
            raise ModelLoadError(f"model '{ref.name}' needs pretrained weights: a tag "
                                 f"({', '.join(open_clip.list_pretrained_tags_by_model(resolved)) or 'none known'})"
                                 ", a .safetensors/.pt file, or 'random' to train from scratch")
        if pretrained != RANDOM and _looks_like_path(pretrained) and not Path(pretrained).is_file():
            raise ModelLoadError(f"checkpoint file not found: {pretrained}")
    random_init = pretrained == RANDOM
    if random_init:
        log.warning("model %s initialised with random weights (explicitly requested)", ref.name)
        torch.manual_seed(0)
    try:
        return open_clip.create_model(
            resolved,
            pretrained=None if (random_init or schema_model) else pretrained,
            require_pretrained=not random_init,
            weights_only=True,
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/pickle errors
        raise ModelLoadError(f"cannot load model '{ref.label()}': {_short(exc)}") from exc


def _looks_like_path(value: str) -> bool:
    return value.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in value


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def save_model_dir(model: torch.nn.Module, model_name: str, out_dir: Path, card: dict | None = None) -> Path:
    """Write a model directory that load_encoder (and open_clip's local-dir:) can read."""
    import json

    import open_clip
    from safetensors.torch import save_file

    register_packaged_configs()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(resolve_model_name(model_name))
    config = {"model_cfg": model_cfg, "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out_dir / (MODEL_WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out_dir / MODEL_WEIGHTS_FILE)
    if card is not None:
        (out_dir / "model_card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    return out_dir
