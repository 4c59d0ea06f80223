"""Query pictures through the cached ONNX image tower, preprocessed without torch (imagequery.py)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmsearch import imageonnx
from mmsearch.cli import cli
from mmsearch.encoders import Encoder, image_transform, load_encoder
from mmsearch.imagequery import ImageQueryEncoder, PilPreprocess
from mmsearch.search import Searcher, build_query

PRODUCTS = ["boot-red", "boot-blue", "sneaker-green", "sneaker-white", "dress-yellow", "dress-purple",
            "bag-brown", "bag-black"]


def _index(tmp_path, catalog_dir, checkpoint, *extra) -> str:
    path = tmp_path / "idx"
    result = CliRunner().invoke(cli, ["index", str(catalog_dir / "catalog.csv"), "--index", str(path), "--model",
                                      "mmsearch-tiny", "--pretrained", str(checkpoint), "-q", *extra])
    assert result.exit_code == 0, result.output
    return str(path)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (224, 224), (1000, 225), (97, 61)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_pil_preprocess_is_open_clips_eval_transform(size, mode):
    from torchvision import transforms as T

    side, crop = 56, (56, 56)
    mean, std = [0.48, 0.45, 0.40], [0.26, 0.26, 0.27]
    want = T.Compose([T.Resize(side, interpolation=T.InterpolationMode(mode)), T.CenterCrop(crop), T.ToTensor(),
                      T.Normalize(mean, std)])
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = PilPreprocess({"shorter_side": side, "crop": list(crop), "mode": mode, "mean": mean, "std": std})(img)
    assert got.dtype == np.float32 and got.shape == (3, *crop)
    np.testing.assert_allclose(got, want(img).numpy(), atol=1e-5)


def test_pil_preprocess_matches_the_models_own_transform(tiny_encoder):
    transform = image_transform(tiny_encoder.model, is_train=False)  # open_clip's, not FastPreprocess
    img = Image.new("RGB", (90, 60), (200, 30, 90))
    img.paste((10, 200, 40), (20, 10, 60, 50))
    got = PilPreprocess(tiny_encoder.preprocess.config())(img)
    np.testing.assert_allclose(got, transform(img).numpy(), atol=1e-5)


def test_a_query_picture_goes_to_the_exported_tower_with_torchs_vectors(tmp_path, catalog_dir, tiny_checkpoint,
                                                                       private_cache):
    path = _index(tmp_path, catalog_dir, tiny_checkpoint)  # the default runtime exports the image tower
    reference = load_encoder("mmsearch-tiny", str(tiny_checkpoint))
    images = [Image.open(next((catalog_dir / "images").glob(f"{key}.*"))).convert("RGB") for key in PRODUCTS]
    with Searcher(path) as searcher:
        encoder = searcher.image_encoder
        assert isinstance(encoder, ImageQueryEncoder) and searcher._encoder is None  # no torch model built
        got, want = encoder.encode_images(images), reference.encode_images(images)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert (got * want).sum(axis=1).min() > 0.999  # Pillow's resize against torch's: grey-level rounding
        for key in PRODUCTS:
            image = next((catalog_dir / "images").glob(f"{key}.*"))
            hits = searcher.search(build_query(images=[str(image)], target="image", k=1)).results
            assert hits[0].id == key and hits[0].score > 0.999


def test_without_an_export_a_query_picture_loads_the_torch_model(tmp_path, catalog_dir, tiny_checkpoint,
                                                                  private_cache):
    path = _index(tmp_path, catalog_dir, tiny_checkpoint, "--runtime", "torch")
    assert not (private_cache / "image-onnx").exists()
    with Searcher(path) as searcher:
        assert isinstance(searcher.image_encoder, Encoder)
    own = load_encoder("mmsearch-tiny", str(tiny_checkpoint))
    with Searcher(path, encoder=own) as searcher:  # the caller's encoder always wins
        assert searcher.image_encoder is own


def test_a_damaged_export_falls_back_to_torch_with_a_warning(tmp_path, catalog_dir, tiny_checkpoint,
                                                              private_cache, caplog):
    path = _index(tmp_path, catalog_dir, tiny_checkpoint)
    (folder,) = (private_cache / "image-onnx").iterdir()
    (folder / imageonnx.MODEL_FILE).write_bytes(b"not a graph")
    image = next((catalog_dir / "images").glob("bag-brown.*"))
    with caplog.at_level(logging.WARNING, logger="mmsearch"), Searcher(path) as searcher:
        hits = searcher.search(build_query(images=[str(image)], target="image", k=1)).results
        assert isinstance(searcher.image_encoder, Encoder)
    assert hits[0].id == "bag-brown"
    assert f"cannot use the cached ONNX image tower in {folder}" in caplog.text


@pytest.mark.slow
def test_cold_cli_image_query_never_imports_torch(tmp_path, catalog_dir, tiny_checkpoint, private_cache):
    path = _index(tmp_path, catalog_dir, tiny_checkpoint)
    image = next((catalog_dir / "images").glob("sneaker-green.*"))
    script = ("import sys, json\nfrom mmsearch.cli import cli\n"
              "args = ['search', '--image', sys.argv[2], '--target', 'image', '--index', sys.argv[1], '--format', "
              "'json']\ntry:\n    cli(args)\nexcept SystemExit:\n    pass\n"
              "print(json.dumps({'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", script, path, str(image)], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    *lines, last = out.stdout.strip().splitlines()
    assert json.loads("\n".join(lines))["results"][0]["id"] == "sneaker-green"
    assert json.loads(last) == {"torch": False, "open_clip": False}
