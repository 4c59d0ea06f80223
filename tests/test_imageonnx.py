"""ONNX Runtime image encoding (`index --runtime onnx [--quantize int8]`) against the torch path."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmsearch import imageonnx
from mmsearch.cli import cli
from mmsearch.encoders import load_encoder
from mmsearch.errors import ModelLoadError

PRODUCTS = ["boot-red", "boot-blue", "sneaker-green", "sneaker-white", "dress-yellow", "dress-purple",
            "bag-brown", "bag-black"]


@pytest.fixture
def pixels(catalog_dir, tiny_encoder) -> torch.Tensor:
    paths = sorted(p for p in (catalog_dir / "images").iterdir() if p.stem in PRODUCTS)
    return torch.stack([tiny_encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("variant,min_cosine", [("fp32", 0.99999), ("int8", imageonnx.INT8_MIN_COSINE)])
def test_onnx_tower_agrees_with_torch(tiny_encoder, pixels, tmp_path, monkeypatch, variant, min_cosine):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    tower = imageonnx.image_tower(tiny_encoder, variant)
    got, want = tower.encode(pixels.numpy()), tiny_encoder.encode_pixels(pixels)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * want).sum(axis=1).min() >= min_cosine
    if variant == "fp32":
        np.testing.assert_allclose(got, want, atol=imageonnx.FP32_TOLERANCE)
    (folder,) = (tmp_path / "cache" / "image-onnx").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["variant"] == variant and meta["probe_mean_cosine"] >= min_cosine
    mtime = (folder / "image.onnx").stat().st_mtime_ns
    imageonnx.image_tower(tiny_encoder, variant)  # cached: not exported again
    assert (folder / "image.onnx").stat().st_mtime_ns == mtime


def test_int8_that_drifts_too_far_is_refused(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(imageonnx, "INT8_MIN_COSINE", 1.01)  # unreachable: any int8 export fails the check
    with pytest.raises(ModelLoadError, match="drifts too far from fp32"):
        imageonnx.image_tower(tiny_encoder, "int8")
    assert not any((tmp_path / "cache" / "image-onnx").iterdir())  # nothing half-published


def test_unknown_runtime_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="unknown runtime 'tensorrt'; choose from torch, onnx"):
        load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="tensorrt")


@pytest.mark.slow
def test_cli_index_with_onnx_int8_finds_each_image(tmp_path, catalog_dir, tiny_checkpoint):
    path = tmp_path / "idx"
    result = CliRunner().invoke(cli, ["index", str(catalog_dir / "catalog.csv"), "--index", str(path), "--model",
                                      "mmsearch-tiny", "--pretrained", str(tiny_checkpoint), "--runtime", "onnx",
                                      "--quantize", "int8", "-q", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 9
    for key in PRODUCTS:
        image = next((catalog_dir / "images").glob(f"{key}.*"))
        out = CliRunner().invoke(cli, ["search", "--image", str(image), "--index", str(path), "--format", "json"])
        assert json.loads(out.stdout)["results"][0]["id"] == key


@pytest.mark.parametrize("cores,layout", [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (16, (4, 4)), (6, (4, 1))])
def test_stream_layout_shares_the_cores_out(cores, layout):
    assert imageonnx.stream_layout(cores) == layout


def test_a_batch_split_across_streams_keeps_its_order(tiny_encoder, pixels, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    tower = imageonnx.image_tower(tiny_encoder, "fp32")
    one = imageonnx.OnnxImageTower(tower.session, "fp32", streams=1).encode(pixels.numpy())
    for streams in (2, 3, len(pixels) + 2):  # uneven slices, and more streams than images
        got = imageonnx.OnnxImageTower(tower.session, "fp32", streams=streams).encode(pixels.numpy())
        np.testing.assert_allclose(got, one, atol=1e-6)
