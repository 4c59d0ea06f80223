"""A torch-free text encoder for fast cold queries.

A new `mmsearch search` process spends seconds importing torch and open_clip and building the model,
far more than the search itself. So when an index is built, the model's text tower is exported once
to ONNX (in a per-machine cache keyed by the model's identity) and checked against torch; a text
query then runs it with onnxruntime and a pure-Python copy of open_clip's CLIP BPE tokenizer.

Importing this module does not import torch. `export_text_encoder` does (it runs at index time).
The fast path is used only when the export proved equivalent (same tokens as open_clip's tokenizer
on probe texts, vectors within EXPORT_TOLERANCE); anything else falls back to the torch encoder.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from .config import ModelRef
from .onnxcache import (
    META_FILE,
    cache_root,
    export_method,
    int8_flavour,
    l2_normalised,
    model_key,
    ort_session,
    publish,
    quantize_int8,
    read_meta,
    save_ort_format,
)

log = logging.getLogger(__name__)

DISABLE_ENV = "MMSEARCH_FAST_TEXT"  # "0": never use (or write) the ONNX text encoder
EXPORT_FORMAT = 3  # bump when the exported graph's inputs/outputs change (3: dynamic length)
# An index built before format 3 keeps its torch-free queries until its next `mmsearch index` exports
# format 3: a format-2 graph is the same tower over the whole context (its meta has no "trim").
FULL_CONTEXT_FORMAT = 2
ONNX_FILE = "text.onnx"  # the exported graph (deleted once converted)
ORT_FILE = "text.ort"  # ORT format (flatbuffers, basic optimisations applied): ~40% faster session start
EXPORT_TOLERANCE = 1e-4  # max |onnx - torch| over normalised vectors of the probe texts
PROBE_TEXTS = (
    "a red ankle boot", "Ankle boots in RED!", "show me   crimson dresses for sale",
    "café crème & naïve façade", "it's a 3-pack of socks (size 42)", "",
    "日本語のテキスト", "emoji 👗👠 test", "&amp; html &lt;escaped&gt;", "x" * 400,
    "a very long caption " * 20,
)


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


CAPTION_INT8_MIN_COSINE = 0.99  # mean cosine(int8 caption tower, torch fp32) over the probe texts
CAPTION_INT8_KEY = "int8-matmul-per-channel"  # the int8 caption export's cache name: new with quantize_int8's settings


def export_folder(ref: ModelRef, variant: str = "fp32", export_format: int = EXPORT_FORMAT) -> Path:
    """fp32: the query tower; int8: the dynamically quantised caption tower (export_caption_int8)."""
    extra = () if variant == "fp32" else (f"{CAPTION_INT8_KEY}-{int8_flavour()}" if variant == "int8" else variant,)
    return cache_root("text-onnx") / model_key(ref, "text", export_format, *extra)


# ---------------------------------------------------------------------------------------------
# The CLIP BPE tokenizer (open_clip's SimpleTokenizer, clean='lower'), without torch.
# Copied in spirit from https://github.com/openai/CLIP (MIT License, Copyright (c) 2021 OpenAI).


def open_clip_bpe_path() -> Path:
    """open_clip's vocabulary file, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes]))


class ClipTokenizer:
    """Text -> (N, context_length) int64 token ids, identical to open_clip's default tokenizer."""

    def __init__(self, context_length: int, bpe_path: Path | None = None):
        import regex

        lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        self.context_length = context_length
        self.cache = {"<start_of_text>": "<start_of_text>", "<end_of_text>": "<end_of_text>"}  # as in open_clip
        self.pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot, *self.encode(text), self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
            out[row, : len(tokens)] = tokens
        return out

    def encode(self, text: str) -> list[int]:
        byte_map = _bytes_to_unicode()
        ids = []
        for word in self.pattern.findall(_clean(text)):
            unicode_word = "".join(byte_map[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(unicode_word).split(" "))
        return ids

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            word = _merge(word, best)
        self.cache[token] = " ".join(word)
        return self.cache[token]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def _clean(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


# ---------------------------------------------------------------------------------------------
# Query time: onnxruntime


class FastTextEncoder:
    """encode_texts like encoders.Encoder, from the exported ONNX text tower."""

    def __init__(self, session, tokenizer: ClipTokenizer, dim: int, trim: bool = False):
        self.session, self.tokenizer, self.dim = session, tokenizer, dim
        self.trim = trim  # the graph takes any length: cut the padding after the longest end token

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        chunks = [self.session.run(None, {"tokens": self._tokens(texts[i : i + batch_size])})[0]
                  for i in range(0, len(texts), batch_size)]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalised(np.concatenate(chunks))

    def _tokens(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts))
        return np.ascontiguousarray(tokens[:, : _prefix_length(tokens)]) if self.trim else tokens


def load_fast_text_encoder(ref: ModelRef, dim: int) -> FastTextEncoder | None:
    """The verified export for this model, or None (then the caller uses the torch encoder)."""
    if not enabled():
        return None
    folder = export_folder(ref)
    if not (folder / META_FILE).is_file():
        folder = export_folder(ref, export_format=FULL_CONTEXT_FORMAT)
        if not (folder / META_FILE).is_file():  # neither this format nor the previous one
            return None
    try:
        return load_fast_text_encoder_from(folder, dim)
    except Exception as exc:  # a damaged cache or a missing onnxruntime must never break a search
        log.warning("fast text encoder for %s unusable (%s); using torch", ref.label(), exc)
        return None


def exported_folder(ref: ModelRef, dim: int, variant: str = "fp32") -> Path | None:
    """The model's export folder when it holds a complete export of this format and dimension
    (nothing loaded: load_fast_text_encoder_from does that); None otherwise, or when disabled."""
    folder = export_folder(ref, variant)
    meta = read_meta(folder) if enabled() else None
    if not meta or meta.get("format") != EXPORT_FORMAT or meta.get("dim") != dim:
        return None
    return folder if (folder / ORT_FILE).is_file() else None


def load_fast_text_encoder_from(folder: Path, dim: int, threads: int | None = None) -> FastTextEncoder:
    """threads: the session's intra-op threads (default one per core)."""
    meta = read_meta(folder) or {}
    if meta.get("format") not in (EXPORT_FORMAT, FULL_CONTEXT_FORMAT) or meta.get("dim") != dim:
        raise ValueError(f"export in {folder} is for another format or dimension")
    session = ort_session(folder / ORT_FILE, fast_start=True, threads=threads)
    return FastTextEncoder(session, ClipTokenizer(int(meta["context_length"])), dim, trim=bool(meta.get("trim")))


# ---------------------------------------------------------------------------------------------
# Index time: export with torch and verify


def export_text_encoder(encoder) -> Path | None:
    """Export encoder's text tower once per model; returns the cache folder, or None when the model's
    tokenizer or graph cannot be reproduced exactly (the torch path is then the only path)."""
    if not enabled():
        return None
    folder = export_folder(encoder.ref)
    if (folder / META_FILE).is_file():
        return folder
    if getattr(encoder, "model", None) is None:  # onnxencoder.OnnxEncoder: its export went missing mid-run
        log.warning("the ONNX text tower of %s left the cache; the next `mmsearch index` exports it again",
                    encoder.ref.label())
        return None
    context_length = _plain_clip_context_length(encoder.tokenizer)
    if context_length is None:
        log.info("fast text path off for %s: its tokenizer is not open_clip's CLIP BPE", encoder.ref.label())
        return None
    try:
        tokenizer = ClipTokenizer(context_length)
        expected = np.asarray(encoder.tokenizer(list(PROBE_TEXTS)))
        if not np.array_equal(tokenizer(PROBE_TEXTS), expected):
            log.info("fast text path off for %s: tokenizer mismatch", encoder.ref.label())
            return None
        return publish(folder, lambda staging: _export(encoder, tokenizer, staging))
    except Exception as exc:  # export is an optimisation: failing it must not fail the index
        log.warning("could not export the text encoder of %s to ONNX (%s); queries use torch",
                    encoder.ref.label(), exc)
        return None


def _plain_clip_context_length(tokenizer) -> int | None:
    from open_clip.tokenizer import SimpleTokenizer

    if type(tokenizer) is not SimpleTokenizer or tokenizer.reduction_fn is not None:
        return None
    if getattr(tokenizer.clean_fn, "__name__", "") != "_clean_lower" or len(tokenizer.all_special_ids) != 2:
        return None
    return int(tokenizer.context_length)


def _export(encoder, tokenizer: ClipTokenizer, staging: Path) -> dict | None:
    """Write the graph into staging and check it against torch; the meta to publish, or None.

    A CLIP text tower is exported with a dynamic sequence length ("trim"): queries and captions then
    run only up to their longest end token, not the whole context (a short query on ViT-B-32: 10 ms
    instead of 40). The check covers the whole context and every probe text's own length."""
    import torch

    tokens = torch.from_numpy(tokenizer(PROBE_TEXTS[:2]))
    trim = _trimmable(encoder.model)
    if trim:
        _export_prefix(encoder.model, tokens[:, : _prefix_length(tokens.numpy())], staging / ONNX_FILE)
    else:
        export_method(encoder.model, "encode_text", tokens, staging / ONNX_FILE, "tokens")
    meta = {"format": EXPORT_FORMAT, "model": encoder.ref.label(), "dim": encoder.dim,
            "context_length": tokenizer.context_length, "trim": trim}
    want, *got = _probe_export(encoder, staging, meta)
    error = float(max(np.abs(vectors - want).max() for vectors in got))
    if error > EXPORT_TOLERANCE:
        log.warning("ONNX text encoder of %s differs from torch by %.2g; not used", encoder.ref.label(), error)
        return None
    return {**meta, "max_abs_diff": error}


def export_caption_int8(encoder) -> Path | None:
    """The int8 caption tower of encoder's model (`mmsearch index --quantize int8` in ONNX Runtime),
    exported on first use: the trimmed text graph with ONNX Runtime's dynamic int8 quantisation
    (ViT-B-32, 12-token captions on one thread: 1.8 ms per caption against 7.1 in fp32). Queries keep
    the fp32 tower. None when the model's text tower cannot be exported this way or drifts from torch
    below CAPTION_INT8_MIN_COSINE: its captions then use the fp32 tower, the more exact one (the
    verdict is cached too, so the export is not retried on every run)."""
    folder = export_folder(encoder.ref, "int8")
    if read_meta(folder) is None:
        try:
            publish(folder, lambda staging: _export_int8(encoder, staging))
        except Exception as exc:  # an extra on top of int8 images: failing it must not fail the index
            log.warning("could not export the int8 caption tower of %s (%s); captions use fp32",
                        encoder.ref.label(), exc)
            return None
    meta = read_meta(folder) or {}
    if not meta.get("usable"):
        log.info("captions of %s use the fp32 text tower: %s", encoder.ref.label(), meta.get("reason", "no export"))
        return None
    return folder


def usable_caption_int8(ref: ModelRef, dim: int) -> Path | None | bool:
    """The int8 caption export: its folder, False when it was found unusable, None when not tried yet."""
    meta = read_meta(export_folder(ref, "int8"))
    if meta is None:
        return None
    return exported_folder(ref, dim, "int8") if meta.get("usable") else False


def _export_int8(encoder, staging: Path) -> dict:
    import torch

    context_length = _plain_clip_context_length(encoder.tokenizer)
    verdict = {"format": EXPORT_FORMAT, "model": encoder.ref.label(), "variant": "int8", "dim": encoder.dim}
    if context_length is None or not _trimmable(encoder.model):
        return {**verdict, "usable": False, "reason": "not an open_clip CLIP text tower and tokenizer"}
    tokenizer = ClipTokenizer(context_length)
    tokens = tokenizer(PROBE_TEXTS[:2])
    fp32 = staging / "text-fp32.onnx"
    _export_prefix(encoder.model, torch.from_numpy(tokens[:, : _prefix_length(tokens)]), fp32)
    quantize_int8(fp32, staging / ONNX_FILE)
    fp32.unlink()
    meta = {**verdict, "context_length": tokenizer.context_length, "trim": True}
    want, *got = _probe_export(encoder, staging, meta)
    cosine = float(min((vectors * want).sum(axis=1).mean() for vectors in got))
    if cosine < CAPTION_INT8_MIN_COSINE:
        (staging / ORT_FILE).unlink()
        return {**verdict, "usable": False, "probe_mean_cosine": cosine,
                "reason": f"int8 drifts from fp32 (mean cosine {cosine:.4f} < {CAPTION_INT8_MIN_COSINE})"}
    log.info("exported the int8 ONNX caption tower of %s (cosine to torch %.5f)", encoder.ref.label(), cosine)
    return {**meta, "usable": True, "probe_mean_cosine": cosine}


def _probe_export(encoder, staging: Path, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert staging's graph to ORT format, record its meta and load it; the probe texts' vectors
    (torch's, the export's on the whole batch, the export's one text at a time: every text's own
    length) for the caller's check."""
    save_ort_format(staging / ONNX_FILE, staging / ORT_FILE)
    (staging / ONNX_FILE).unlink()
    (staging / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    fast = load_fast_text_encoder_from(staging, encoder.dim, threads=1)
    one_by_one = np.concatenate([fast.encode_texts([text]) for text in PROBE_TEXTS])
    return encoder.encode_texts(PROBE_TEXTS), fast.encode_texts(PROBE_TEXTS), one_by_one


def _trimmable(model) -> bool:
    from .encoders import trims_text

    return trims_text(model) and model.transformer.batch_first


def _prefix_length(tokens: np.ndarray) -> int:
    """Positions up to the batch's longest end token (the highest id): all a CLIP text tower reads."""
    return int(tokens.argmax(axis=1).max()) + 1 if tokens.size else tokens.shape[1]


def _export_prefix(model, tokens, path: Path) -> None:
    """Export encoders.encode_text_prefix with dynamic batch and length axes.

    nn.MultiheadAttention reshapes by the traced sequence length as a constant, so while tracing each
    block's attention runs as the same matmuls with that axis left to -1 (_traceable_attention)."""
    import torch

    from .encoders import encode_text_prefix

    class Prefix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return encode_text_prefix(self.model, x)

    blocks = list(model.transformer.resblocks)
    for block in blocks:  # an instance attribute shadows the method, for the trace only
        block.attention = partial(_traceable_attention, block)
    try:
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape reads; the export is checked against torch
            torch.onnx.export(Prefix().eval(), (tokens,), str(path), input_names=["tokens"],
                              output_names=["vectors"], opset_version=17, dynamo=False,
                              dynamic_axes={"tokens": {0: "batch", 1: "length"}, "vectors": {0: "batch"}})
    finally:
        for block in blocks:
            del block.attention


def _traceable_attention(block, q_x, k_x=None, v_x=None, attn_mask=None):
    """open_clip ResidualAttentionBlock.attention (self-attention, batch first) as plain matmuls."""
    import torch.nn.functional as F

    attn = block.attn
    batch, width, heads = q_x.shape[0], q_x.shape[2], attn.num_heads
    q, k, v = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def split(t):  # (batch, length, width) -> (batch, heads, length, head width)
        return t.reshape(batch, -1, heads, width // heads).transpose(1, 2)

    scores = (split(q) * (width // heads) ** -0.5) @ split(k).transpose(-1, -2)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    mixed = (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(batch, -1, width)
    return attn.out_proj(mixed)
