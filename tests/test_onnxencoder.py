"""`--runtime onnx` from the cache alone: same pixels, vectors and rows as the torch-loaded path,
without importing open_clip; anything missing from the cache loads the torch encoder as before."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from int8_graph import assert_weight_matmuls_int8_per_channel

from mmsearch import imageonnx, textonnx
from mmsearch.collection import Collection
from mmsearch.encoders import Encoder, load_encoder
from mmsearch.images import load_pixels
from mmsearch.ingest import IngestOptions, ingest
from mmsearch.onnxencoder import OnnxEncoder
from mmsearch.pixels import FastPreprocess

TEXTS = ["a red ankle boot", "striped summer dress with two deep pockets", "", "a long caption " * 30]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _exported(checkpoint, variant: str) -> Encoder:
    """The torch-loaded encoder, after it exported both towers (what a first `mmsearch index` does)."""
    encoder = load_encoder("mmsearch-tiny", str(checkpoint), quantize=variant if variant != "fp32" else None,
                           runtime="onnx")
    assert isinstance(encoder, Encoder) and textonnx.export_text_encoder(encoder) is not None
    return encoder


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_once_exported_onnx_loads_from_the_cache_and_encodes_like_the_torch_loaded_encoder(
        cache, tiny_checkpoint, catalog_dir, variant):
    first = _exported(tiny_checkpoint, variant)
    cached = load_encoder("mmsearch-tiny", str(tiny_checkpoint), quantize=variant if variant != "fp32" else None,
                          runtime="onnx")
    assert isinstance(cached, OnnxEncoder) and cached.image_tower.variant == variant
    assert (cached.ref, cached.dim, cached.input_side) == (first.ref, first.dim, first.input_side)
    photo = load_pixels(catalog_dir / "images" / "boot-red.jpg", min_side=cached.input_side)
    assert torch.equal(cached.preprocess(photo.copy()), first.preprocess(photo.copy()))
    pixels = torch.stack([first.preprocess(photo.copy())] * 3)
    np.testing.assert_allclose(cached.encode_pixels(pixels), first.encode_pixels(pixels), atol=1e-6)
    np.testing.assert_allclose(cached.encode_texts(TEXTS), first.encode_texts(TEXTS), atol=1e-4)


def test_anything_missing_from_the_cache_loads_the_torch_encoder(cache, tiny_checkpoint, monkeypatch):
    def loaded():
        return load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="onnx")

    encoder = loaded()  # exports the image tower only: no text tower yet
    assert isinstance(encoder, Encoder)
    assert isinstance(loaded(), Encoder)
    textonnx.export_text_encoder(encoder)
    assert isinstance(loaded(), OnnxEncoder)
    assert isinstance(load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="torch"), Encoder)
    monkeypatch.setenv(textonnx.DISABLE_ENV, "0")
    assert isinstance(loaded(), Encoder)
    monkeypatch.delenv(textonnx.DISABLE_ENV)
    meta_file = imageonnx.export_folder(encoder.ref, "fp32") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "preprocess": None}))  # a transform FastPreprocess cannot rebuild
    assert isinstance(loaded(), Encoder)


def test_an_ingest_whose_cached_text_tower_vanished_still_finishes(cache, tmp_path, catalog_dir, tiny_checkpoint):
    import shutil

    first = _exported(tiny_checkpoint, "fp32")
    cached = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="onnx")
    cached.encode_texts(["a red boot"])  # loaded: the run needs nothing more from the folder
    shutil.rmtree(textonnx.export_folder(first.ref))
    report = ingest(catalog_dir / "catalog.csv", tmp_path / "idx", IngestOptions(batch_size=4), encoder=cached)
    assert report.added == 9 and textonnx.export_text_encoder(cached) is None


def test_a_damaged_cached_text_tower_is_a_clear_error_naming_its_folder(cache, tiny_checkpoint):
    first = _exported(tiny_checkpoint, "fp32")
    folder = textonnx.export_folder(first.ref)
    cached = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="onnx")
    (folder / textonnx.ORT_FILE).write_bytes(b"not a model")
    with pytest.raises(Exception, match="unusable.*delete that folder") as err:
        cached.encode_texts(["a red boot"])
    assert str(folder) in str(err.value)


def test_preprocess_config_round_trips_and_refuses_a_padding_crop(tiny_encoder, catalog_dir):
    config = tiny_encoder.preprocess.config()
    rebuilt = FastPreprocess.from_config(json.loads(json.dumps(config)))
    photo = load_pixels(catalog_dir / "images" / "boot-blue.jpg", min_side=tiny_encoder.input_side)
    assert torch.equal(rebuilt(photo.copy()), tiny_encoder.preprocess(photo.copy()))
    assert FastPreprocess(32, (40, 40), "bicubic", [0.5] * 3, [0.5] * 3).config() is None


def test_ingest_with_the_cached_encoder_stores_what_the_torch_loaded_one_does(
        cache, tmp_path, catalog_dir, tiny_checkpoint):
    first = _exported(tiny_checkpoint, "fp32")
    cached = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="onnx")
    assert isinstance(cached, OnnxEncoder)
    stored = {}
    for name, encoder in (("torch-loaded", first), ("cached", cached)):
        report = ingest(catalog_dir / "catalog.csv", tmp_path / name, IngestOptions(batch_size=4), encoder=encoder)
        assert report.added == 9 and sorted(e.item for e in report.failed) == ["notes", "truncated"]
        collection = Collection.open(tmp_path / name)
        try:
            stored[name] = {kind: _by_key(collection, kind) for kind in ("image", "text")}
        finally:
            collection.close()
    for kind, atol in (("image", 1e-6), ("text", 1e-4)):
        want, got = stored["torch-loaded"][kind], stored["cached"][kind]
        assert sorted(got) == sorted(want) and want
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=atol)


def _by_key(collection, kind: str) -> dict:
    ids, vectors = collection.all_vectors(kind)
    items = collection.store.items([int(i) for i in ids])
    return {items[int(i)].key: v for i, v in zip(ids, vectors)}


@pytest.mark.slow
def test_cli_index_rerun_with_onnx_never_imports_open_clip(cache, tmp_path, catalog_dir, tiny_checkpoint):
    args = ["index", str(catalog_dir / "catalog.csv"), "--model", "mmsearch-tiny", "--pretrained",
            str(tiny_checkpoint), "--runtime", "onnx", "--format", "json"]
    script = ("import sys, json\nfrom mmsearch.cli import cli\n"
              "try:\n    cli(sys.argv[1:])\n"
              "except SystemExit:\n    pass\n"
              "print(json.dumps({'open_clip': 'open_clip' in sys.modules}))\n")

    def run(index: str) -> tuple[dict, dict]:
        out = subprocess.run([sys.executable, "-c", script, *args, "--index", str(tmp_path / index)],
                             capture_output=True, text=True, check=True, env=dict(os.environ))
        *lines, last = out.stdout.strip().splitlines()
        return json.loads("\n".join(lines)), json.loads(last)

    first_report, first_modules = run("first")  # exports both towers: open_clip builds the model
    again_report, again_modules = run("again")
    assert first_modules == {"open_clip": True} and again_modules == {"open_clip": False}
    assert first_report["added"] == again_report["added"] == 9


def test_int8_onnx_encodes_captions_with_the_int8_text_tower_and_words_with_fp32(cache, tiny_checkpoint):
    first = _exported(tiny_checkpoint, "int8")
    assert first.caption_encoder is not None
    meta = json.loads((textonnx.export_folder(first.ref, "int8") / "meta.json").read_text())
    assert meta["usable"] and meta["probe_mean_cosine"] >= textonnx.CAPTION_INT8_MIN_COSINE
    captions, words = first.encode_captions(TEXTS), first.encode_texts(TEXTS)
    assert not np.allclose(captions, words, atol=1e-5)  # a different (quantised) tower ...
    assert (captions * words).sum(axis=1).mean() >= textonnx.CAPTION_INT8_MIN_COSINE  # ... close to fp32
    cached = load_encoder("mmsearch-tiny", str(tiny_checkpoint), quantize="int8", runtime="onnx")
    assert isinstance(cached, OnnxEncoder)
    np.testing.assert_allclose(cached.encode_captions(TEXTS), captions, atol=1e-6)
    np.testing.assert_allclose(cached.encode_texts(TEXTS), words, atol=1e-4)
    fp32 = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="onnx")
    assert fp32.caption_encoder is None
    np.testing.assert_array_equal(fp32.encode_captions(TEXTS), fp32.encode_texts(TEXTS))


def test_int8_ingest_stores_the_int8_caption_vectors(cache, tmp_path, catalog_dir, tiny_checkpoint):
    encoder = _exported(tiny_checkpoint, "int8")
    ingest(catalog_dir / "catalog.csv", tmp_path / "idx", IngestOptions(batch_size=4), encoder=encoder)
    collection = Collection.open(tmp_path / "idx")
    try:
        stored = _by_key(collection, "text")
        items = {i.key: i for i in collection.store.items(list(range(1, 40))).values()}
    finally:
        collection.close()
    keys = sorted(stored)
    got = np.stack([stored[key] for key in keys])
    captions = [items[key].caption for key in keys]
    # int8 activations are quantised per batch, so a vector depends a little on its batch-mates
    assert (got * encoder.encode_captions(captions)).sum(axis=1).min() >= textonnx.CAPTION_INT8_MIN_COSINE
    assert np.abs(got - encoder.encode_texts(captions)).max() > 1e-4  # not the fp32 tower's vectors


def test_int8_caption_tower_quantises_its_weight_matmuls_per_channel_and_not_the_embedding(
        cache, tiny_encoder, monkeypatch):
    import onnx
    import onnxruntime.quantization as quantization

    graphs = []
    real = quantization.quantize_dynamic

    def recording(model_input, model_output, **options):  # the real quantiser; its output graph kept
        real(model_input, model_output, **options)
        graphs.append(onnx.load(str(model_output)).graph)

    monkeypatch.setattr(quantization, "quantize_dynamic", recording)
    assert textonnx.export_caption_int8(tiny_encoder) is not None
    (graph,) = graphs
    ops = assert_weight_matmuls_int8_per_channel(graph)
    assert "Gather" in ops and "DequantizeLinear" not in ops  # the token embedding is read in fp32


def test_a_text_tower_int8_cannot_export_keeps_fp32_captions_and_the_verdict_is_cached(
        cache, tiny_encoder, monkeypatch):
    monkeypatch.setattr(tiny_encoder, "tokenizer", lambda texts: np.zeros((len(texts), 77), dtype=np.int64))
    assert textonnx.export_caption_int8(tiny_encoder) is None
    meta = json.loads((textonnx.export_folder(tiny_encoder.ref, "int8") / "meta.json").read_text())
    assert meta["usable"] is False and "CLIP" in meta["reason"]
    assert textonnx.usable_caption_int8(tiny_encoder.ref, tiny_encoder.dim) is False


def test_an_int8_caption_tower_that_drifts_is_not_used(cache, tiny_encoder, monkeypatch):
    monkeypatch.setattr(textonnx, "CAPTION_INT8_MIN_COSINE", 1.01)  # no int8 tower can reach it
    assert textonnx.export_caption_int8(tiny_encoder) is None
    folder = textonnx.export_folder(tiny_encoder.ref, "int8")
    assert "drifts" in json.loads((folder / "meta.json").read_text())["reason"]
    assert not (folder / textonnx.ORT_FILE).exists()


def test_an_int8_caption_export_that_fails_keeps_fp32_captions(cache, tiny_encoder, monkeypatch):
    def broken(encoder, staging):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(textonnx, "_export_int8", broken)
    assert textonnx.export_caption_int8(tiny_encoder) is None
    assert textonnx.usable_caption_int8(tiny_encoder.ref, tiny_encoder.dim) is None  # retried next run
