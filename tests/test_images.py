"""Reduced-scale JPEG decoding for the encoder's input size (load_image / load_pixels with min_side)."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmsearch import images
from mmsearch.errors import ItemError
from mmsearch.images import load_image, load_pixels


def photo(path, size, fmt="JPEG"):
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize(size, Image.BICUBIC)
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("size,expected", [((1600, 1200), (400, 300)), ((4000, 600), (2000, 300)),
                                           ((1200, 1600), (300, 400))])
def test_big_jpeg_decodes_at_reduced_scale_keeping_the_input_side(tmp_path, size, expected):
    img = load_image(photo(tmp_path / "a.jpg", size), min_side=224)
    assert img.size == expected and img.mode == "RGB"
    assert min(img.size) >= 224


@pytest.mark.parametrize("name,size,fmt", [("small.jpg", (400, 300), "JPEG"), ("big.png", (1600, 1200), "PNG")])
def test_small_jpegs_and_other_formats_decode_fully(tmp_path, name, size, fmt):
    assert load_image(photo(tmp_path / name, size, fmt), min_side=224).size == size


def test_reduced_decode_keeps_vectors(tmp_path, tiny_encoder):
    path = photo(tmp_path / "a.jpg", (1600, 1200))
    full = tiny_encoder.preprocess(load_image(path))
    reduced = tiny_encoder.preprocess(load_image(path, min_side=tiny_encoder.input_side))
    vectors = tiny_encoder.encode_pixels(torch.stack([full, reduced]))
    assert float(vectors[0] @ vectors[1]) > 0.99


def _jpeg(path, size, mode="RGB", progressive=False, exif=None):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC).convert(mode)
    img.save(path, "JPEG", quality=90, progressive=progressive, **({"exif": exif} if exif else {}))
    return path


@pytest.mark.parametrize("size", [(640, 480), (1000, 750), (1600, 1200), (4000, 600), (481, 961), (300, 200)])
@pytest.mark.parametrize("mode,progressive", [("RGB", False), ("L", False), ("RGB", True)])
def test_load_pixels_gives_load_image_pixels(tmp_path, size, mode, progressive):
    """The libjpeg-turbo path: the same size and bit-identical pixels as Pillow's draft decode."""
    path = _jpeg(tmp_path / "a.jpg", size, mode, progressive)
    for min_side in (None, 224):
        want = np.asarray(load_image(path, min_side=min_side))
        got = load_pixels(path, min_side=min_side)
        assert got.dtype == np.uint8 and got.shape == want.shape and got.flags.writeable
        np.testing.assert_array_equal(got, want)


def test_load_pixels_takes_the_libjpeg_path_only_for_plain_jpegs(tmp_path, monkeypatch):
    calls = []
    real = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = _jpeg(tmp_path / "plain.jpg", (640, 480))
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # rotated: Pillow's path applies it
    rotated = _jpeg(tmp_path / "rotated.jpg", (640, 480), exif=exif.tobytes())
    png = photo(tmp_path / "a.png", (640, 480), "PNG")
    cmyk = _jpeg(tmp_path / "cmyk.jpg", (640, 480), "CMYK")
    assert load_pixels(plain, min_side=224).shape == (240, 320, 3) and len(calls) == 1
    assert load_pixels(rotated, min_side=224).shape == (320, 240, 3) and len(calls) == 1
    for path in (png, cmyk):
        np.testing.assert_array_equal(load_pixels(path, min_side=224), np.asarray(load_image(path, min_side=224)))
    assert len(calls) == 1


def test_load_pixels_reports_a_truncated_jpeg(tmp_path):
    path = _jpeg(tmp_path / "a.jpg", (640, 480))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ItemError, match="unreadable or truncated image"):
        load_pixels(path, "item-7", min_side=224)


def test_load_pixels_hashes_the_file_it_reads(tmp_path):
    path = _jpeg(tmp_path / "a.jpg", (640, 480))
    digest = hashlib.sha256()
    load_pixels(path, min_side=224, digest=digest)
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_pixels_crops_extreme_aspect_like_load_image(tmp_path):
    path = _jpeg(tmp_path / "strip.jpg", (4000, 100))
    np.testing.assert_array_equal(load_pixels(path), np.asarray(load_image(path)))
    assert load_pixels(path).shape == (100, 2000, 3)


def test_fast_preprocess_takes_arrays_like_images(tmp_path, tiny_encoder):
    path = _jpeg(tmp_path / "a.jpg", (640, 480))
    fast = tiny_encoder.preprocess
    torch.testing.assert_close(fast(load_pixels(path, min_side=224)), fast(load_image(path, min_side=224)),
                               rtol=0, atol=0)


def test_load_pixels_refuses_a_jpeg_bomb_before_decoding(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "a.jpg", (640, 480))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 307,200 pixels: over twice the limit
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: pytest.fail("decoded a bomb"))
    with pytest.raises(ItemError, match="decompression bomb guard"):
        load_pixels(path, "item-9", min_side=224)
