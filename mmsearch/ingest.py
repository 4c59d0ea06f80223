"""Ingest: read a catalog, decode images in parallel, encode in batches, write store and FAISS.

Incremental: an item is re-encoded only when its image bytes or caption changed (sha256), items
that left the catalog are removed (unless delete=False), and bad items are skipped and reported.
Each batch is committed to SQLite on its own, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .catalog import CatalogItem, read_catalog
from .collection import Collection, VectorChanges
from .config import DEFAULT_MODEL, DEFAULT_PRETRAINED, MODALITIES
from .encoders import Encoder, canonical_ref, load_encoder
from .errors import ItemError, MMSearchError
from .images import load_image, load_pixels, open_image_file
from .index import DEFAULT_MAX_MEMORY
from .store import ItemRecord
from .textonnx import export_text_encoder

log = logging.getLogger(__name__)
T = TypeVar("T")

Progress = Callable[[str, int, int], None]  # (stage, done, total)
DECODE_LOOKAHEAD = 3  # batches decoded ahead of the encoder (0: each batch decodes after the previous encodes)
FIRST_BATCH_DIVISOR = 8  # the first batch is this much smaller, so the encoder starts after a few decodes
# Smallest tail slice, in images. ViT-B-32 int8 on 2 cores: with 2 the streams finished within 20 ms
# of each other (with 4, up to 90 ms apart); a 2-image run costs 9% more per image than 8, on a few images.
MIN_TAIL_SLICE = 2


@dataclass
class IngestOptions:
    model: str | None = None  # None: the index's model, or the default for a new index
    pretrained: str | None = None
    batch_size: int = 32  # images per encoder forward pass
    workers: int = 0  # decode + hashing threads; 0 = one per core (the ONNX tower decodes on its streams)
    delete: bool = True  # remove items that left the catalog
    index_type: str | None = None  # None: what the index was last built with ("auto" for a new one)
    max_memory: int = DEFAULT_MAX_MEMORY
    wait_for_lock: bool = False
    quantize: str | None = None  # 'int8': dynamic int8 image tower (CPU speed option; vectors move slightly)
    # 'auto': the image tower runs in onnxruntime (exported and checked once per model) where the model
    # exports, else in torch; 'onnx': onnxruntime or an error; 'torch': always torch
    runtime: str = "auto"


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[ItemError] = field(default_factory=list)
    index_updated: list[str] = field(default_factory=list)  # FAISS indexes updated in place, not rebuilt
    images_encoded: int = 0  # image vectors written by this run
    image_runtime: str | None = None  # what encodes the images: "onnxruntime fp32", "torch int8", ...

    def to_dict(self) -> dict:
        return {"added": self.added, "updated": self.updated, "removed": self.removed,
                "unchanged": self.unchanged, "index_updated_in_place": self.index_updated,
                "images_encoded": self.images_encoded, "image_runtime": self.image_runtime,
                "failed": [{"item": e.item, "reason": e.reason} for e in self.failed]}


@dataclass
class _Work:
    item: CatalogItem
    image_hash: str | None
    caption_hash: str | None
    encode_image: bool
    encode_text: bool
    is_new: bool


def ingest(catalog: str | Path, index_dir: Path, options: IngestOptions | None = None,
           progress: Progress | None = None, encoder: Encoder | None = None) -> IngestReport:
    options = options or IngestOptions()
    progress = progress or (lambda stage, done, total: None)
    parsed = read_catalog(catalog)
    report = IngestReport(failed=list(parsed.failed))
    collection, encoder = _open_or_create(index_dir, options, encoder)
    try:
        with collection.write_lock(wait=options.wait_for_lock):
            # an existing index's model loads under the lock: a second writer is refused at once,
            # not after loading a model it cannot use (seconds, in which the first writer may finish)
            encoder = encoder or _index_encoder(collection, options)
            report.image_runtime = image_runtime(encoder)
            with _long_lived_frozen():  # after the model loads: its objects are frozen out of the GC too
                _run(collection, encoder, parsed.items, options, report, progress)
    finally:
        collection.close()
    return report


def image_runtime(encoder) -> str:
    """Which runtime and weights encode images: what `--runtime auto` chose, for the report."""
    tower = getattr(encoder, "image_tower", None)
    if tower is not None:
        return f"onnxruntime {tower.variant}"
    return "torch int8" if getattr(encoder, "quantized", False) else "torch fp32"


@contextmanager
def _long_lived_frozen():
    """Keep Python's cyclic GC off the objects that exist before the run (the model, torch, the
    catalog): a full collection scans each of them, ~440k for ViT-B-32, 250 ms holding the GIL that
    the decode threads need while the encoder streams wait for pixels. Objects made during the run
    are collected as usual; the frozen ones go back to the GC afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _open_or_create(index_dir: Path, options: IngestOptions,
                    encoder: Encoder | None) -> tuple[Collection, Encoder | None]:
    """The collection, and the encoder: None for an existing index when none was given (it loads
    under the write lock, _index_encoder); a new index needs it now for its vector size."""
    if (index_dir / "manifest.json").exists():
        collection = Collection.open(index_dir)
        built_with = collection.manifest.model
        if options.model and canonical_ref(options.model, options.pretrained) != built_with:
            collection.close()
            raise MMSearchError(f"index {index_dir} was built with model {built_with.label()}; "
                                "use a new --index for another model")
        return collection, encoder
    if encoder is None:
        name = options.model or DEFAULT_MODEL
        pretrained = options.pretrained if options.model else (options.pretrained or DEFAULT_PRETRAINED)
        encoder = load_encoder(name, pretrained, options.quantize, options.runtime)
    return Collection.create(index_dir, encoder.ref, encoder.dim), encoder


def _index_encoder(collection: Collection, options: IngestOptions) -> Encoder:
    built_with = collection.manifest.model
    return load_encoder(built_with.name, built_with.pretrained, options.quantize, options.runtime)


def _run(collection: Collection, encoder: Encoder, items: list[CatalogItem], options: IngestOptions,
         report: IngestReport, progress: Progress) -> None:
    known = collection.store.fingerprints()
    start_generation = collection.store.generation()
    changes = VectorChanges({m: {i for i, _, _, mods in known.values() if m in mods} for m in MODALITIES})
    workers = options.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        plan = _plan(items, known, pool, report, progress)
        _encode_and_write(collection, encoder, plan, options, pool, report, progress, changes)
    seen = {it.key for it in items} | {e.item for e in report.failed}
    gone = [known[key][0] for key in known if key not in seen]
    if gone and options.delete:
        collection.store.delete_items(gone)
        changes.delete(gone)
        report.removed = len(gone)
    progress("saving index", 0, 1)
    index_type = options.index_type or collection.manifest.index.requested
    if collection.store.generation() != start_generation:  # else save_faiss keeps the published files
        report.index_updated = collection.update_published(changes, start_generation, index_type,
                                                           options.max_memory)
    collection.save_faiss(index_type, options.max_memory)
    progress("saving index", 1, 1)
    export_text_encoder(encoder)  # once per model: later text queries skip torch


def _plan(items, known, pool, report, progress) -> list[_Work]:
    """Decide what must be encoded. Items already in the store are hashed first (threads) to see
    what changed; a new item is encoded whatever its hash, so its image is hashed later by the decode
    job that reads it anyway (one read per file, and the encoder starts without a hashing pass)."""
    plan: list[_Work] = []
    stored = [item for item in items if item.key in known]
    hashes = dict(zip((item.key for item in stored), pool.map(_hash_item, stored)))
    for done, item in enumerate(items, start=1):
        progress("checking", done, len(items))
        old = known.get(item.key)
        if old is None:
            caption_hash = _caption_hash(item)
            plan.append(_Work(item, None, caption_hash, item.image is not None, caption_hash is not None, True))
            continue
        result = hashes[item.key]
        if isinstance(result, ItemError):
            report.failed.append(result)
            continue
        image_hash, caption_hash = result
        _, old_image, old_caption, stored_modalities = old
        encode_image = image_hash != old_image or (image_hash is not None and "image" not in stored_modalities)
        encode_text = caption_hash != old_caption or (caption_hash is not None and "text" not in stored_modalities)
        if encode_image or encode_text:
            plan.append(_Work(item, image_hash, caption_hash, encode_image, encode_text, False))
        else:
            report.unchanged += 1
    return plan


def _caption_hash(item: CatalogItem) -> str | None:
    return hashlib.sha256(item.caption.encode("utf-8")).hexdigest() if item.caption else None


def _hash_item(item: CatalogItem) -> tuple[str | None, str | None] | ItemError:
    caption_hash = _caption_hash(item)
    if item.image is None:
        return None, caption_hash
    try:
        digest = hashlib.sha256()
        with open_image_file(item.image, item.key) as fh:  # regular files only: a FIFO would hang
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except ItemError as exc:
        return exc
    except OSError as exc:
        return ItemError(item.key, f"cannot read image {item.image}: {exc.strerror or exc}")
    return digest.hexdigest(), caption_hash


def _encode_and_write(collection, encoder, plan, options, pool, report, progress, changes: VectorChanges) -> None:
    """Encode batch after batch; each batch's rows are committed by a writer thread while the next
    batch encodes (SQLite's fsync no longer stalls the encoder). At most one commit is in flight and
    commits stay in batch order, so a killed run still leaves a prefix of whole batches.

    Image encoding runs one batch ahead of the writes: with the ONNX tower's streams, a stream that
    finishes its slice of batch k starts on batch k+1 at once."""
    total, done = len(plan), 0
    progress("encoding", 0, total)
    in_stream = encoder.image_tower is not None
    batches = _in_stream_batches if in_stream else _pipelined_batches
    with ExitStack() as stack:
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        if in_stream:
            stack.enter_context(_one_torch_thread())
        commit = None  # the writer's in-flight commit
        encoding: deque = deque()

        def write_oldest() -> None:
            nonlocal commit, done
            size, images_done, text_by_key = encoding.popleft()
            commit = _write(collection, writer, commit, images_done(), text_by_key, report, changes)
            done += size
            progress("encoding", min(done, total), total)

        source = stack.enter_context(closing(batches(plan, encoder, options.batch_size, pool)))
        for size, batch, images_done in source:
            text_rows = [w for w in batch if w.encode_text and w.item.caption]  # a removed caption: no vector
            text_vecs = encoder.encode_captions([w.item.caption for w in text_rows]) if text_rows else []
            encoding.append((size, images_done, dict(zip((w.item.key for w in text_rows), text_vecs))))
            if len(encoding) > 1:
                write_oldest()
        while encoding:
            write_oldest()
        if commit is not None:
            commit.result()


@contextmanager
def _one_torch_thread():
    """torch's ops run on their calling thread for the length of the block (the ONNX tower's run).

    Its streams already keep every core busy, so the torch ops around them (resizing and normalising
    pixels on the stream threads, captions here) gain nothing from OpenMP helpers, and each helper
    woken preempts a stream: with 2 threads a crop copy took 0.09 ms instead of 0.007, a batch's
    normalisation 0.28 ms per image instead of 0.05. Threads that first run torch inside the block
    (the streams) keep one thread; this thread gets its own count back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write(collection, writer, commit, images: _Images, text_by_key: dict, report: IngestReport,
           changes: VectorChanges):
    """Hand one batch's rows to the writer thread once the previous commit (`commit`) is done;
    returns the new in-flight commit."""
    report.failed.extend(images.failed)
    records = [_record(w, images.vectors.get(w.item.key), text_by_key.get(w.item.key)) for w in images.kept]
    if commit is not None:
        commit.result()  # re-raises a failed commit before anything later is written
    return writer.submit(_commit, collection, records, images.kept, report, changes) if records else None


def _commit(collection, records: list[ItemRecord], batch: list[_Work], report: IngestReport,
            changes: VectorChanges) -> None:
    ids = collection.store.write_batch(records)
    for record in records:  # only once committed: a failed batch changed nothing
        for modality, vector in record.vectors.items():
            changes.replace(ids[record.key], modality, vector is not None)
        report.images_encoded += record.vectors.get("image") is not None
    for w in batch:
        if w.is_new:
            report.added += 1
        else:
            report.updated += 1


@dataclass
class _Images:
    """A batch (or slice) once its images are decoded and encoded."""

    kept: list[_Work]  # the works still to write: their images decoded (or none to decode)
    failed: list[ItemError]  # images that could not be read or decoded: those items are skipped
    vectors: dict[str, np.ndarray]  # item key -> image vector


BatchSource = Iterator[tuple[int, list[_Work], Callable[[], _Images]]]


def _batches(plan: list[_Work], batch_size: int) -> list[list[_Work]]:
    """The plan cut into batches; the first is smaller, so the encoder starts after a few decodes."""
    first = max(1, batch_size // FIRST_BATCH_DIVISOR)
    return [b for b in [plan[:first]] + [plan[i : i + batch_size] for i in range(first, len(plan), batch_size)] if b]


class _Decoder:
    """How this encoder's images go from files to a float batch: the loader (images.load_pixels
    for a preprocess that takes arrays, else images.load_image), then prepare and collate."""

    def __init__(self, encoder: Encoder):
        preprocess = encoder.preprocess
        self.prepare = getattr(preprocess, "prepare", preprocess)  # pixels.FastPreprocess: uint8
        self.collate = getattr(preprocess, "collate", torch.stack)
        self.loader = load_pixels if getattr(preprocess, "accepts_arrays", False) else load_image
        self.input_side = encoder.input_side

    def decode(self, work: _Work) -> tuple[torch.Tensor, str] | ItemError | None:
        """(pixels, the image file's hash) for a work with an image to encode, an ItemError for a bad
        file, None for the others. A new item's file is hashed here, as it is read."""
        if not (work.encode_image and work.item.image):
            return None
        digest = hashlib.sha256() if work.image_hash is None else None
        try:
            pixels = self.prepare(self.loader(work.item.image, work.item.key, min_side=self.input_side, digest=digest))
        except ItemError as exc:
            return exc
        except Exception as exc:  # a transform failing on a strange image is an item problem, not a crash
            return ItemError(work.item.key, f"cannot preprocess image: {exc}")
        return pixels, digest.hexdigest() if digest is not None else work.image_hash

    def assemble(self, works: list[_Work], decoded: list) -> tuple[list, list, torch.Tensor | None, list[str]]:
        """(works kept, ItemErrors, the float batch of their pixels or None, the pixels' item keys)."""
        kept, failed, tensors, keys = [], [], [], []
        for work, result in zip(works, decoded):
            if isinstance(result, ItemError):
                failed.append(result)
                continue
            if result is not None:
                pixels, image_hash = result
                work = replace(work, image_hash=image_hash)
                tensors.append(pixels)
                keys.append(work.item.key)
            kept.append(work)
        return kept, failed, self.collate(tensors) if tensors else None, keys


def _pipelined_batches(plan, encoder, batch_size, pool) -> BatchSource:
    """The torch encoder's batches: images decode in the pool (bounded look-ahead) while the encoder,
    which uses every core itself, runs batch after batch here.

    Each batch is also collated (stacked and normalised) in the pool, so the encoding thread only
    ever waits for pixels that are not decoded yet. The pool runs jobs in submission order, so a
    batch's collate job starts only after its decode jobs have started: it cannot wait on a job
    queued behind it."""
    decoder, batches = _Decoder(encoder), _batches(plan, batch_size)

    def submit(batch):
        decodes = [pool.submit(decoder.decode, w) for w in batch]
        return pool.submit(lambda: decoder.assemble(batch, [f.result() for f in decodes]))

    for batch, assembled in _submitted_ahead(batches, submit):
        kept, failed, pixels, keys = assembled.result()
        vectors = encoder.submit_pixels(pixels) if pixels is not None else (lambda: [])
        yield len(batch), kept, partial(_encoded, kept, failed, keys, vectors)


def _encoded(kept: list[_Work], failed: list[ItemError], keys: list[str], vectors: Callable) -> _Images:
    """The batch's _Images once the encoder's vectors for it are ready."""
    return _Images(kept, failed, dict(zip(keys, vectors())))


def _in_stream_batches(plan, encoder, batch_size, pool) -> BatchSource:
    """The ONNX tower's batches: each slice of a batch is decoded and then encoded by one of the
    tower's stream threads (OnnxImageTower.run_on_stream). No decode thread preempts a stream in the
    middle of its matmuls, and every core stays on one job at a time (measured on 2 cores, ViT-B-32
    int8: the session spends the same CPU per photo here as on pre-decoded batches, where beside two
    decode threads it spent a few % more)."""
    decoder, tower, batches = _Decoder(encoder), encoder.image_tower, _batches(plan, batch_size)

    def encode_slice(works: list[_Work]) -> _Images:
        kept, failed, pixels, keys = decoder.assemble(works, [decoder.decode(w) for w in works])
        return _Images(kept, failed, dict(zip(keys, tower.encode_here(pixels.numpy()))) if pixels is not None else {})

    left = len(plan)  # works not yet handed to a stream
    unfinished: set[Future] = set()  # slices queued or running on the streams

    def submit(batch):
        nonlocal left
        futures, start = [], 0
        while start < len(batch):
            works = batch[start : start + _guided_slice(left, tower.streams, tower.slice_images)]
            futures.append(future := tower.run_on_stream(partial(encode_slice, works)))
            unfinished.add(future)
            future.add_done_callback(unfinished.discard)
            start, left = start + len(works), left - len(works)
        return futures

    try:
        for batch, slices in _submitted_ahead(batches, submit):
            yield len(batch), batch, partial(_gathered, slices)
    except BaseException:  # closed early (a failed commit, Ctrl-C): no queued slices left on the streams
        for future in list(unfinished):  # (after the last batch, the caller still waits for its slices)
            future.cancel()
        raise


def _submitted_ahead(batches: list[list[_Work]], submit: Callable[[list[_Work]], T]) -> Iterator[tuple[list[_Work], T]]:
    """(batch, submit(batch)) in order, each batch submitted DECODE_LOOKAHEAD batches before its turn."""
    pending = deque(submit(batch) for batch in batches[:DECODE_LOOKAHEAD])
    for i, batch in enumerate(batches):
        if i + DECODE_LOOKAHEAD < len(batches):
            pending.append(submit(batches[i + DECODE_LOOKAHEAD]))
        yield batch, pending.popleft()


def _guided_slice(left: int, streams: int, full: int) -> int:
    """Images in the next slice: `full`, until the end of the run comes near; then a share of what is
    left, down to MIN_TAIL_SLICE (OpenMP's guided schedule), so the streams finish nearly together
    instead of one idling while the other encodes a whole slice."""
    return max(1, min(full, left, max(MIN_TAIL_SLICE, left // (2 * streams))))


def _gathered(slices: list[Future]) -> _Images:
    """One batch's _Images from its slices', in order."""
    parts = [f.result() for f in slices]
    return _Images([w for p in parts for w in p.kept], [e for p in parts for e in p.failed],
                   {k: v for p in parts for k, v in p.vectors.items()})


def _record(work: _Work, image_vec, text_vec) -> ItemRecord:
    item = work.item
    vectors: dict[str, np.ndarray | None] = {}
    if work.encode_image:
        vectors["image"] = image_vec
    if work.encode_text:
        vectors["text"] = text_vec
    return ItemRecord(key=item.key, image=str(item.image) if item.image else None, caption=item.caption,
                      image_hash=work.image_hash, caption_hash=work.caption_hash, meta=item.metadata,
                      vectors=vectors)
