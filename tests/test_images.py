"""Reduced-scale JPEG decoding for the encoder's input size (load_image(min_side=...))."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmsearch.images import load_image


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
