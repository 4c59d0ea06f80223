"""Contrastive fine-tuning of an open_clip model on a catalog (the `mmsearch train` command).

Symmetric InfoNCE (the CLIP loss) with a learnable temperature, AdamW with linear warm-up and
cosine decay. Catalog captions repeat ("a red ankle boot" thousands of times), so items with the
same canonical caption are positives of each other, never negatives (multi-positive targets).
Captions are paraphrased during training so that a text tower trained from scratch learns more
than the catalog's one phrasing; with `group_column`, images of the same product are also pulled
together (image-image InfoNCE), which keeps a product's identity apart from its colour.

Everything is seeded per step (data order per epoch, augmentation and captions per step), so a
run resumed from its checkpoint continues exactly where it stopped. Nothing is pickled: weights
and optimizer state are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .catalog import CatalogItem, read_catalog
from .config import PRECISIONS, ModelRef, now_iso, write_json_atomic
from .encoders import (
    RANDOM,
    create_model,
    encode_text_trimmed,
    image_transform,
    register_packaged_configs,
    resolve_model_name,
    save_model_dir,
    set_torch_threads,
)
from .errors import ItemError, MMSearchError
from .images import load_image

log = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
MODEL_CARD = "model_card.json"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100
GROUP_LOSS_WEIGHT = 1.0  # image-image term relative to the image-text term
KEEP_CAPTION_P = 0.25  # share of steps an item shows its own caption rather than a paraphrase
LOSS_WINDOW = 50  # steps averaged into the reported final loss
TOKEN_CACHE_SIZE = 200_000  # distinct training texts whose token ids are kept
FREEZE_CHOICES = (None, "image", "text")

Progress = Callable[[dict], None]


class TrainError(MMSearchError):
    """Training cannot start or continue (bad options, too few usable items, stale checkpoint)."""


@dataclass
class TrainOptions:
    model: str = "mmsearch-fashion-tiny"  # anything load_encoder can load
    pretrained: str | None = None  # None with a packaged config = from scratch (random init, explicit)
    epochs: int | None = None  # stop after this many epochs ...
    minutes: float | None = None  # ... or this much wall-clock training time, whichever comes first
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    val_fraction: float = 0.05
    freeze: str | None = None  # None | "image" | "text": freeze a whole tower
    train_last_blocks: int | None = None  # train only the last N blocks of each tower (+ heads, logit_scale)
    augment: bool = True  # geometric image augmentation (never colour: colour is a label)
    flip_only: bool = False  # augmentation = horizontal flips only: exact pixels, no resampling blur (tiny images)
    caption_templates: bool = True  # paraphrase captions during training
    group_column: str | None = None  # metadata column naming the product: its variants are image-image positives
    resume: bool = False
    workers: int = 0  # threads decoding images (0 = in the calling thread)
    caption_bank: int = 512  # distinct catalog captions added as extra texts to every batch (0: none)
    precision: str = "fp32"  # PRECISIONS: bf16 autocast of both towers, or of the image tower only

    def validate(self) -> None:
        if self.epochs is None and self.minutes is None:
            raise TrainError("give epochs or minutes (or both) to say when training stops")
        if self.epochs is not None and self.epochs < 1:
            raise TrainError(f"epochs must be >= 1, got {self.epochs}")
        if self.minutes is not None and self.minutes <= 0:
            raise TrainError(f"minutes must be > 0, got {self.minutes}")
        if self.batch_size < 2:
            raise TrainError("batch_size must be >= 2 (a contrastive batch needs negatives)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.freeze not in FREEZE_CHOICES:
            raise TrainError(f"freeze must be 'image', 'text' or None, got {self.freeze!r}")
        if self.train_last_blocks is not None and self.train_last_blocks < 0:
            raise TrainError("train_last_blocks must be >= 0")
        if self.caption_bank < 0:
            raise TrainError("caption_bank must be >= 0")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# ---------------------------------------------------------------------------------------------
# Captions: canonical form (identity of positives) and paraphrases (augmentation)

ARTICLES = ("a", "an", "the")
COLOUR_MODIFIERS = ("light", "dark", "pale", "bright", "deep")
COLOUR_SYNONYMS = {
    "red": ("crimson", "scarlet"),
    "orange": ("tangerine", "amber"),
    "yellow": ("mustard", "lemon"),
    "green": ("emerald", "olive"),
    "blue": ("navy", "cobalt", "azure"),
    "purple": ("violet", "plum"),
    "pink": ("rose", "fuchsia"),
    "brown": ("chocolate", "coffee"),
    "black": ("jet black", "ebony"),
    "white": ("ivory", "snow white"),
    "grey": ("gray", "charcoal", "silver"),
    "gray": ("grey", "charcoal", "silver"),
    "beige": ("tan", "cream"),
}
# Shoppers' words for common categories; the head noun ("boot" for "ankle boot") comes by rule.
CATEGORY_SYNONYMS = {
    "t-shirt": ("tee", "tshirt"),
    "trousers": ("pants", "slacks"),
    "pullover": ("sweater", "jumper"),
    "sneaker": ("trainer", "running shoe"),
    "bag": ("handbag", "purse"),
    "coat": ("overcoat",),
    "dress": ("frock",),
    "shirt": ("blouse",),
    "sandal": ("summer sandal",),
}
TEMPLATES = (
    "{a_c} {c} {n}",  # a red ankle boot
    "{c} {n}",  # red ankle boot
    "{c} {p}",  # red ankle boots
    "{p} in {c}",  # ankle boots in red
    "{a_n} {n} in {c}",  # an ankle boot in red
    "a photo of {a_c} {c} {n}",
    "{n}, {c}",
    "{c} colored {n}",
)
# Query noise a shopper adds around the product words: (prefix, suffix).
FILLERS = (
    ("buy", ""), ("find", ""), ("looking for", ""), ("new", ""), ("classic", ""), ("cheap", ""),
    ("stylish", ""), ("", "online"), ("", "for women"), ("", "for men"), ("", "please"), ("best", "online"),
)
FILLER_P = 0.2
WRAP_TEMPLATES = ("{x}", "a photo of {x}", "an image of {x}", "{x}, product photo")
_SPACES = re.compile(r"\s+")


def canonical_caption(caption: str) -> str:
    """Case, spacing and a final full stop do not change what a caption says."""
    return _SPACES.sub(" ", caption.strip().lower()).rstrip(" .")


def parse_caption(caption: str) -> tuple[str, str] | None:
    """'a red ankle boot' -> ('red', 'ankle boot'); None when it is not '[a|an] <colour> <category>'."""
    words = canonical_caption(caption).split()
    if words and words[0] in ARTICLES:
        words = words[1:]
    known = set(COLOUR_SYNONYMS)
    for size in (2, 1):
        head = words[:size]
        if len(words) <= size or head[-1] not in known:
            continue
        if size == 2 and head[0] not in COLOUR_MODIFIERS:
            continue
        return " ".join(head), " ".join(words[size:])
    return None


def _article(word: str, noun: str) -> str:
    """'a'/'an' by the next word's sound (roughly), none before a plural noun ('red trousers')."""
    if _is_plural(noun):
        return ""
    return "an" if word[:1] in "aeiou" else "a"


def _is_plural(noun: str) -> bool:
    words = noun.split()
    last = words[words.index("of") - 1] if "of" in words[1:-1] else words[-1]  # "pair of trousers": "pair"
    return last.endswith("s") and not last.endswith(("ss", "us"))


def _plural(noun: str) -> str:
    words = noun.split()
    if "of" in words[:-1]:  # "pair of trousers" -> "pairs of trousers"
        at = words.index("of")
        return " ".join([_plural(" ".join(words[:at]))] + words[at:])
    last = words[-1]
    if last.endswith(("ss", "sh", "ch", "x", "z")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    elif not _is_plural(last):
        last += "s"
    return " ".join(words[:-1] + [last])


def _colour_forms(colour: str) -> list[str]:
    *modifier, base = colour.split()
    return [" ".join(modifier + [word]) for word in (base, *COLOUR_SYNONYMS.get(base, ()))]


def _noun_forms(category: str) -> list[str]:
    """The category, its head noun ('boot', 'trousers' from 'pair of trousers') and synonyms."""
    words = category.split()
    head = " ".join(words[words.index("of") + 1 :]) if "of" in words[:-1] else words[-1]
    forms = [category, head, *CATEGORY_SYNONYMS.get(head, ())]
    return list(dict.fromkeys(form for form in forms if form))


@lru_cache(maxsize=65536)
def caption_variants(caption: str) -> tuple[str, ...]:
    """Every paraphrase the augmentation can produce for a caption (the canonical one first)."""
    canonical = canonical_caption(caption)
    parsed = parse_caption(canonical)
    if parsed is None:
        return tuple(dict.fromkeys(t.format(x=canonical) for t in WRAP_TEMPLATES))
    variants = [canonical]
    for colour in _colour_forms(parsed[0]):
        for noun in _noun_forms(parsed[1]):
            fields = {"c": colour, "n": noun, "p": _plural(noun), "a_c": _article(colour, noun),
                      "a_n": _article(noun, noun)}
            variants.extend(_SPACES.sub(" ", template.format(**fields)).strip() for template in TEMPLATES)
    return tuple(dict.fromkeys(variants))


def augment_caption(caption: str, rng: np.random.Generator) -> str:
    """The caption itself now and then (it is how catalog queries read), else a random paraphrase,
    sometimes with a filler word around it so that words which say nothing about the product get ignored."""
    if rng.random() < KEEP_CAPTION_P:
        return caption
    variants = caption_variants(caption)
    text = variants[int(rng.integers(len(variants)))]
    if rng.random() < FILLER_P:
        prefix, suffix = FILLERS[int(rng.integers(len(FILLERS)))]
        text = f"{prefix} {text} {suffix}".strip()
    return text


# ---------------------------------------------------------------------------------------------
# Losses


def multi_positive_targets(labels: torch.Tensor) -> torch.Tensor:
    """Row-normalised 'same label' matrix: each row is a distribution over the row's positives."""
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
              text_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE on normalised embeddings; equal labels are positives in both directions.

    `texts` may hold more rows than `images` (the batch's captions, then caption-bank captions with
    `text_labels`): every text is a candidate for every image; a text with no image of its label in
    the batch is only a negative.
    """
    text_labels = labels if text_labels is None else text_labels
    logits = scale * images @ texts.T
    positives = (labels[:, None] == text_labels[None, :]).float()
    image_to_text = soft_cross_entropy(logits, positives / positives.sum(dim=1, keepdim=True))
    rows = positives.sum(dim=0) > 0
    per_text = positives.T[rows]
    text_to_image = soft_cross_entropy(logits.T[rows], per_text / per_text.sum(dim=1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def group_loss(images: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Image-image InfoNCE: other images of the same group are the positives; self is excluded."""
    eye = torch.eye(len(groups), dtype=torch.bool)
    positives = (groups[:, None] == groups[None, :]) & ~eye
    rows = positives.any(dim=1)
    if not rows.any():
        return images.sum() * 0.0
    logits = (scale * images @ images.T).masked_fill(eye, -1e4)  # finite: 0 * -inf would be NaN
    targets = positives[rows].float()
    return soft_cross_entropy(logits[rows], targets / targets.sum(dim=1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# Data: every image decoded once, kept as uint8 at the model's input size


@dataclass
class TrainData:
    pixels: torch.Tensor  # uint8 (N, 3, H, W), already resized/cropped by the eval preprocessing
    captions: list[str]  # canonical caption per item
    labels: torch.Tensor  # int64 (N,): index into `unique_captions`
    unique_captions: list[str]
    groups: torch.Tensor | None  # int64 (N,) when group_column is set
    train_idx: np.ndarray
    val_idx: np.ndarray
    skipped: list[str] = field(default_factory=list)


def load_training_data(catalog: str | Path, model: torch.nn.Module, options: TrainOptions) -> TrainData:
    parsed = read_catalog(catalog)
    skipped = [f"{err.item}: {err.reason}" for err in parsed.failed]
    usable = []
    for item in parsed.items:
        if item.image is None or not item.caption:
            skipped.append(f"{item.key}: needs both an image and a caption to train on")
        else:
            usable.append(item)
    pixels, usable = _decode_all(usable, model, options.workers, skipped)
    for line in skipped:
        log.warning("skipping %s", line)
    if len(usable) < 4:
        raise TrainError(f"{catalog}: only {len(usable)} usable items (image + caption); need at least 4")
    captions = [canonical_caption(item.caption) for item in usable]
    unique = sorted(set(captions))
    index = {caption: i for i, caption in enumerate(unique)}
    labels = torch.tensor([index[c] for c in captions], dtype=torch.long)
    groups = _group_ids(usable, options.group_column)
    train_idx, val_idx = split_items(len(usable), groups, options.val_fraction, options.seed)
    return TrainData(pixels, captions, labels, unique, groups, train_idx, val_idx, skipped)


def _decode_all(items: list[CatalogItem], model, workers: int, skipped: list[str]):
    to_uint8 = _uint8_transform(model)

    def decode(item: CatalogItem):
        try:
            return to_uint8(load_image(item.image, item.key))
        except ItemError as exc:
            return exc

    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(decode, items, chunksize=256))
    else:
        results = [decode(item) for item in items]
    kept = [(item, pix) for item, pix in zip(items, results) if not isinstance(pix, ItemError)]
    skipped.extend(f"{err.item}: {err.reason}" for err in results if isinstance(err, ItemError))
    if not kept:
        return torch.zeros(0, dtype=torch.uint8), []
    return torch.stack([pix for _, pix in kept]), [item for item, _ in kept]


def _uint8_transform(model):
    """The eval preprocessing minus Normalize, as uint8: exactly what inference sees, 4x less memory."""
    from torchvision.transforms import Compose, Normalize

    preprocess = image_transform(model, is_train=False)
    steps = [t for t in preprocess.transforms if not isinstance(t, Normalize)]
    to_tensor = Compose(steps)
    return lambda image: (to_tensor(image) * 255.0).round_().to(torch.uint8)


def _group_ids(items: list[CatalogItem], column: str | None) -> torch.Tensor | None:
    if column is None:
        return None
    missing = [item.key for item in items if item.metadata.get(column) in (None, "")]
    if len(missing) == len(items):
        raise TrainError(f"group column {column!r} is empty or absent in the catalog")
    # an item without a group is a group of its own
    names = [str(item.metadata.get(column)) if item.key not in missing else f"\0{item.key}" for item in items]
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(name, len(index)) for name in names], dtype=torch.long)


def split_items(n: int, groups: torch.Tensor | None, val_fraction: float, seed: int):
    """Deterministic hold-out; whole groups go to one side so a product's variants never leak."""
    units = np.arange(n) if groups is None else groups.numpy()
    unique_units = np.unique(units)
    n_val = int(round(val_fraction * len(unique_units)))
    n_val = min(n_val, len(unique_units) - 2)
    chosen = np.random.default_rng([seed, 7]).permutation(unique_units)[: max(n_val, 0)]
    is_val = np.isin(units, chosen)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def epoch_order(train_idx: np.ndarray, groups: torch.Tensor | None, seed: int, epoch: int) -> np.ndarray:
    """Shuffled per epoch from (seed, epoch) alone; a group's items stay adjacent so they share batches."""
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        return train_idx[rng.permutation(len(train_idx))]
    keys = groups.numpy()[train_idx]
    unique_keys = np.unique(keys)
    rank = np.empty(int(unique_keys.max()) + 1, dtype=np.int64)
    rank[rng.permutation(unique_keys)] = np.arange(len(unique_keys))
    jitter = rng.permutation(len(train_idx))
    return train_idx[np.lexsort((jitter, rank[keys]))]


# ---------------------------------------------------------------------------------------------
# Image augmentation: geometry only (random zoom/shift crop and flip); colour is a label


class PixelPipeline:
    def __init__(self, model: torch.nn.Module):
        cfg = model.visual.preprocess_cfg
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self.mean) / self.std

    @staticmethod
    def flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each image mirrored left-right with probability 1/2; pixels are moved, never resampled."""
        mirrored = torch.rand(batch.shape[0], generator=generator) < 0.5
        return torch.where(mirrored.view(-1, 1, 1, 1), batch.flip(-1), batch)

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random-resized-crop-like zoom (0.8-1.05), shifts up to 1/16 of the side, horizontal flips."""
        n = batch.shape[0]
        zoom = torch.empty(n).uniform_(0.8, 1.05, generator=generator)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        shift = torch.empty(n, 2).uniform_(-0.125, 0.125, generator=generator)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = zoom * flip
        theta[:, 1, 1] = zoom
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        # border padding repeats the edge (the backdrop) instead of inventing a black frame
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Model: creation, frozen parts, optimizer

HEAD_NAMES = ("ln_final", "text_projection", "ln_post", "proj", "attn_pool", "attnpool", "head")
BLOCK_LISTS = ("transformer.resblocks", "trunk.stages", "trunk.blocks", "trunk.layers")
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def build_model(options: TrainOptions, resume_dir: Path | None) -> torch.nn.Module:
    """The base model, or the checkpoint in resume_dir; a packaged config without weights starts random."""
    if resume_dir is not None:
        return create_model(ModelRef(str(resume_dir)))
    pretrained = options.pretrained
    if pretrained is None and options.model in register_packaged_configs():
        pretrained = RANDOM
    return create_model(ModelRef(options.model, pretrained))


def text_prefix(model: torch.nn.Module) -> str:
    return "text." if hasattr(model, "text") else ""  # CustomTextCLIP nests the text tower


def tower_of(name: str) -> str:
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return "shared"
    return "text"


def _block_prefixes(module: torch.nn.Module, prefix: str) -> list[str]:
    """Parameter-name prefixes of a tower's blocks, in order (transformer blocks or conv stages)."""
    for path in BLOCK_LISTS:
        blocks = module.get_submodule(path) if _has_submodule(module, path) else None
        if blocks is not None:
            return [f"{prefix}{path}.{i}." for i in range(len(blocks))]
    for owner in ("", "trunk."):
        stages = [f"{owner}{s}" for s in STAGE_NAMES if _has_submodule(module, f"{owner}{s}")]
        if stages:
            return [f"{prefix}{s}.{i}." for s in stages for i in range(len(module.get_submodule(s)))]
    raise TrainError(f"train_last_blocks: cannot find the blocks of {type(module).__name__}")


def _has_submodule(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def trainable_names(model: torch.nn.Module, freeze: str | None, last_blocks: int | None) -> set[str]:
    """Names of the parameters that train, after freezing a tower and/or all but the last blocks."""
    names = {name for name, _ in model.named_parameters()}
    keep = {name for name in names if tower_of(name) != freeze}
    if last_blocks is None:
        return keep
    prefix = text_prefix(model)
    towers = {"image": (model.visual, "visual."), "text": (model.text if prefix else model, prefix)}
    for tower, (module, prefix) in towers.items():
        if tower == freeze:
            continue
        blocks = _block_prefixes(module, prefix)
        open_blocks = tuple(blocks[len(blocks) - last_blocks :]) if last_blocks else ()
        heads = tuple(f"{prefix}{head}" for head in HEAD_NAMES)
        for name in names:
            if tower_of(name) == tower and not name.startswith(open_blocks + heads):
                keep.discard(name)
    return keep


def apply_freeze(model: torch.nn.Module, keep: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def set_train_mode(model: torch.nn.Module, keep: set[str]) -> None:
    """Train mode, except modules with nothing to train: their batch-norm statistics must not move."""
    model.train()
    for prefix, module in model.named_modules():
        params = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
        if params and not any(p in keep for p in params):
            module.eval()


def make_optimizer(model: torch.nn.Module, keep: set[str], options: TrainOptions):
    """AdamW; like open_clip, no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if name not in keep:
            continue
        exempt = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append((name, param))
    if not decay and not no_decay:
        raise TrainError("nothing to train: every parameter is frozen")
    groups = [(decay, options.weight_decay), (no_decay, 0.0)]
    groups = [(members, wd) for members, wd in groups if members]
    param_groups = [{"params": [p for _, p in members], "weight_decay": wd} for members, wd in groups]
    try:  # the fused kernel is ~6x faster on CPU (torch >= 2.4); same maths
        optimizer = torch.optim.AdamW(param_groups, lr=options.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(param_groups, lr=options.lr, betas=(0.9, 0.98), eps=1e-6)
    return optimizer, [name for members, _ in groups for name, _ in members]


def is_conv_tower(model: torch.nn.Module) -> bool:
    """Conv towers (ResNets, timm convnets) run faster channels-last on CPU; a ViT has one conv only."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.visual.modules()) > 1


def lr_at(step: int, progress: float, options: TrainOptions) -> float:
    """Linear warm-up over warmup_steps, then cosine decay over the run's progress (0..1)."""
    warm = min(1.0, (step + 1) / options.warmup_steps) if options.warmup_steps > 0 else 1.0
    return options.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# Checkpoint state (safetensors + JSON, never pickle)


def optimizer_state(optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim/{names[index]}/{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in state["param_groups"]]
    for group, saved in zip(state["param_groups"], groups):
        saved["params"] = [names[i] for i in group["params"]]
    return tensors, groups


def restore_optimizer(optimizer, names: list[str], tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    index = {name: i for i, name in enumerate(names)}
    current = [[names[i] for i in g["params"]] for g in optimizer.state_dict()["param_groups"]]
    if [g["params"] for g in groups] != current:
        raise TrainError("checkpoint optimizer does not match the model's trainable parameters (other options?)")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, name, field_name = key.split("/")
            state.setdefault(index[name], {})[field_name] = value
    param_groups = [dict(g, params=[index[n] for n in g["params"]], betas=tuple(g["betas"])) for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def load_resume_state(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    meta_path, tensor_path = out_dir / STATE_JSON, out_dir / STATE_TENSORS
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    card_path = out_dir / MODEL_CARD
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    if card.get("steps") != meta["step"]:
        raise TrainError(f"{out_dir}: model weights (step {card.get('steps')}) and training state "
                         f"(step {meta['step']}) disagree; cannot resume")
    return meta, load_file(str(tensor_path))


# ---------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def evaluate(model, tokenizer, pipeline: PixelPipeline, data: TrainData, batch_size: int = 512) -> dict:
    """text->image R@1/R@5/P@10 (relevant = same caption) and image->text top-1 over all captions."""
    if len(data.val_idx) == 0:
        return {}
    was_training = model.training
    model.eval()
    images = _encode_pixels(model, pipeline, data.pixels[data.val_idx], batch_size)
    texts = _encode_texts(model, tokenizer, data.unique_captions, batch_size)
    model.train(was_training)
    labels = data.labels[data.val_idx]
    sims = images @ texts.T
    metrics = {"i2t_top1": float((sims.argmax(dim=1) == labels).float().mean())}
    queries = labels.unique()
    ranked = labels[sims[:, queries].T.argsort(dim=1, descending=True)]  # (queries, val) labels by rank
    relevant = ranked == queries[:, None]
    for k in (1, 5):
        metrics[f"t2i_R@{k}"] = float(relevant[:, :k].any(dim=1).float().mean())
    metrics["t2i_P@10"] = float(relevant[:, :10].float().sum(dim=1).div(10).mean())
    metrics["n_val"] = len(data.val_idx)
    return metrics


def _encode_pixels(model, pipeline: PixelPipeline, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    chunks = [model.encode_image(pipeline.normalise(pixels[i : i + batch_size]), normalize=True)
              for i in range(0, len(pixels), batch_size)]
    return torch.cat(chunks).float()


def _encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    chunks = [F.normalize(encode_text_trimmed(model, tokenizer(list(texts[i : i + batch_size]))), dim=-1)
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks).float()


# ---------------------------------------------------------------------------------------------
# The training run


class _Run:
    def __init__(self, model, data: TrainData, options: TrainOptions, out_dir: Path, catalog: Path,
                 progress: Progress | None):
        import open_clip

        self.model, self.data, self.options, self.out_dir, self.catalog = model, data, options, out_dir, catalog
        self.progress = progress or (lambda event: None)
        self.tokenizer = open_clip.get_tokenizer(resolve_model_name(options.model))
        self.token_cache: dict[str, torch.Tensor] = {}
        self.pipeline = PixelPipeline(model)
        self.channels_last = is_conv_tower(model)
        if self.channels_last:
            model.visual.to(memory_format=torch.channels_last)
        self.keep = trainable_names(model, options.freeze, options.train_last_blocks)
        apply_freeze(model, self.keep)
        self.optimizer, self.param_names = make_optimizer(model, self.keep, options)
        self.batch = min(options.batch_size, len(data.train_idx))
        self.steps_per_epoch = max(1, len(data.train_idx) // self.batch)  # the short tail rotates by shuffling
        self.total_steps = options.epochs * self.steps_per_epoch if options.epochs else None
        self.step, self.minutes_before, self.history = 0, 0.0, []
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.started = time.monotonic()
        self.updating = False

    # -- state ------------------------------------------------------------------------------

    def minutes(self) -> float:
        return self.minutes_before + (time.monotonic() - self.started) / 60.0

    def progress_fraction(self) -> float:
        fractions = [0.0]
        if self.total_steps:
            fractions.append(self.step / self.total_steps)
        if self.options.minutes:
            fractions.append(self.minutes() / self.options.minutes)
        return max(fractions)

    def finished(self) -> bool:
        return (self.total_steps is not None and self.step >= self.total_steps) or (
            self.options.minutes is not None and self.minutes() >= self.options.minutes)

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if meta["n_items"] != len(self.data.captions) or meta["steps_per_epoch"] != self.steps_per_epoch:
            raise TrainError(f"{self.out_dir}: checkpoint was trained on a different catalog or batch size")
        restore_optimizer(self.optimizer, self.param_names, tensors, meta["param_groups"])
        torch.set_rng_state(tensors["rng/torch"])
        self.step, self.minutes_before = meta["step"], meta["minutes"]
        self.history, self.losses = meta["history"], deque(meta["recent_losses"], maxlen=LOSS_WINDOW)
        log.info("resuming %s at step %d (epoch %.2f)", self.out_dir, self.step, self.step / self.steps_per_epoch)

    # -- loop -------------------------------------------------------------------------------

    def fit(self) -> dict:
        last_validated = self.history[-1]["step"] if self.history else None
        try:
            while not self.finished():
                epoch = self.step // self.steps_per_epoch
                order = epoch_order(self.data.train_idx, self.data.groups, self.options.seed, epoch)
                self.run_epoch(epoch, order)
                self.validate()
                self.checkpoint()
                last_validated = self.step
        except KeyboardInterrupt:
            if not self.updating:  # between steps the state is consistent: keep it for --resume
                self.checkpoint()
            raise
        if last_validated != self.step:
            self.validate()
            self.checkpoint()
        return self.report()

    def run_epoch(self, epoch: int, order: np.ndarray) -> None:
        set_train_mode(self.model, self.keep)
        while self.step // self.steps_per_epoch == epoch and not self.finished():
            position = self.step % self.steps_per_epoch
            loss = self.train_step(order[position * self.batch : (position + 1) * self.batch])
            self.losses.append(loss)
            self.progress({"event": "step", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                           "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "logit_scale": float(self.model.logit_scale.detach().exp()), "minutes": self.minutes(),
                           "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch})

    def train_step(self, batch: np.ndarray) -> float:
        lr = lr_at(self.step, self.progress_fraction(), self.options)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, texts, labels, groups = self.make_batch(batch)
        bank = self.caption_bank()
        texts = texts + [self.data.unique_captions[i] for i in bank]
        self.updating = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.options.precision != "fp32"):
            image_emb = F.normalize(self.model.encode_image(images).float(), dim=-1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.options.precision == "bf16"):
            text_emb = self.encode_batch_texts(texts)
        scale = self.model.logit_scale.exp()
        loss = clip_loss(image_emb, text_emb, scale, labels, torch.cat([labels, bank]))
        if groups is not None:
            loss = loss + GROUP_LOSS_WEIGHT * group_loss(image_emb, scale, groups)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        self.updating = False
        return float(loss.detach())

    def make_batch(self, batch: np.ndarray):
        """Pixels, captions and labels of a batch; randomness from (seed, step) only, so resumable."""
        generator = torch.Generator().manual_seed(self.options.seed * 1_000_003 + self.step)
        rng = np.random.default_rng([self.options.seed, self.step])
        index = torch.from_numpy(batch)
        images = self.pipeline.normalise(self.data.pixels[index])
        if self.options.augment and self.options.flip_only:
            images = self.pipeline.flip(images, generator)
        elif self.options.augment:
            images = self.pipeline.augment(images, generator)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        captions = [self.data.captions[i] for i in batch]
        if self.options.caption_templates:
            captions = [augment_caption(c, rng) for c in captions]
        groups = self.data.groups[index] if self.data.groups is not None else None
        return images, captions, self.data.labels[index], groups

    def caption_bank(self) -> torch.Tensor:
        """Labels of catalog captions added to the batch's texts as extra candidates.

        With few distinct captions (a colour x category catalog has 110), a batch often misses the
        hard negatives ("a red shirt" for a red t-shirt); adding every caption puts them all in.
        """
        size = min(self.options.caption_bank, len(self.data.unique_captions))
        if size == len(self.data.unique_captions):
            return torch.arange(size)
        rng = np.random.default_rng([self.options.seed, self.step, 1])
        return torch.from_numpy(rng.choice(len(self.data.unique_captions), size, replace=False))

    def encode_batch_texts(self, texts: list[str]) -> torch.Tensor:
        """Each distinct string once: catalog batches repeat captions, so this saves most text compute."""
        unique = list(dict.fromkeys(texts))
        where = {text: i for i, text in enumerate(unique)}
        embeddings = F.normalize(encode_text_trimmed(self.model, self.tokenize(unique)).float(), dim=-1)
        return embeddings[torch.tensor([where[t] for t in texts])]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids, cached: the same few thousand captions and paraphrases come back every step, and
        BPE + ftfy cleaning cost ~10% of a small model's step."""
        missing = [t for t in texts if t not in self.token_cache]
        if missing:
            if len(self.token_cache) > TOKEN_CACHE_SIZE:
                self.token_cache.clear()
            self.token_cache.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self.token_cache[t] for t in texts])

    def validate(self) -> None:
        metrics = evaluate(self.model, self.tokenizer, self.pipeline, self.data)
        entry = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                 "minutes": round(self.minutes(), 3), "loss": self.mean_loss(), **metrics}
        self.history.append(entry)
        self.progress({"event": "validation", **entry, "val": metrics})

    def mean_loss(self) -> float | None:
        return float(np.mean(self.losses)) if self.losses else None

    # -- output -----------------------------------------------------------------------------

    def checkpoint(self) -> None:
        save_model_dir(self.model, self.options.model, self.out_dir, self.card())
        tensors, groups = optimizer_state(self.optimizer, self.param_names)
        tensors["rng/torch"] = torch.get_rng_state()
        tmp = self.out_dir / (STATE_TENSORS + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.out_dir / STATE_TENSORS)
        write_json_atomic(self.out_dir / STATE_JSON, {
            "step": self.step, "epoch": self.step // self.steps_per_epoch, "minutes": self.minutes(),
            "steps_per_epoch": self.steps_per_epoch, "n_items": len(self.data.captions),
            "param_groups": groups, "history": self.history, "recent_losses": list(self.losses),
            "options": asdict(self.options)})
        self.progress({"event": "checkpoint", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                       "minutes": self.minutes(), "path": str(self.out_dir)})

    def card(self) -> dict:
        final = self.history[-1] if self.history else {}
        return {
            "base_model": self.options.model, "pretrained": self.options.pretrained,
            "data": str(self.catalog), "n_items": len(self.data.captions), "n_train": len(self.data.train_idx),
            "n_val": len(self.data.val_idx), "n_skipped": len(self.data.skipped),
            "unique_captions": len(self.data.unique_captions), "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4), "minutes": round(self.minutes(), 3),
            "final_loss": self.mean_loss(), "metrics": {k: v for k, v in final.items() if k not in ("step",)},
            "options": asdict(self.options), "trained": now_iso(), "trainer": "mmsearch.train",
        }

    def report(self) -> dict:
        card = self.card()
        return {"out_dir": str(self.out_dir), "steps": self.step, "epochs": card["epochs"],
                "minutes": card["minutes"], "final_loss": card["final_loss"], "val": card["metrics"],
                "history": self.history, "skipped": self.data.skipped}


def train(catalog: str | Path, out_dir: Path, options: TrainOptions, progress: Progress | None = None) -> dict:
    """Fine-tune (or train from scratch) on a catalog; out_dir becomes a model load_encoder can load."""
    options.validate()
    set_torch_threads()
    out_dir, catalog = Path(out_dir), Path(catalog).expanduser().resolve()
    state = load_resume_state(out_dir) if options.resume else None
    if options.resume and state is None:
        log.info("no training state in %s: starting from the base model", out_dir)
    model = build_model(options, out_dir if state else None)
    torch.manual_seed(options.seed)
    data = load_training_data(catalog, model, options)
    run = _Run(model, data, options, out_dir, catalog, progress)
    if state is not None:
        run.restore(*state)
    return run.fit()
