"""pixels.FastPreprocess against the open_clip transform it replaces."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from mmsearch.encoders import image_transform
from mmsearch.pixels import FastPreprocess, fast_preprocess

GREY_LEVEL = 1 / 255


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return img.filter(ImageFilter.GaussianBlur(1.5))


@pytest.fixture(scope="module")
def transforms(tiny_encoder):
    reference = image_transform(tiny_encoder.model, is_train=False)
    fast = fast_preprocess(reference)
    assert isinstance(fast, FastPreprocess)
    return reference, fast


def unnormalised(pixels: torch.Tensor, transform) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (transform.transforms[-1].mean, transform.transforms[-1].std))
    return pixels * std + mean


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (64, 64), (20, 17), (1000, 70), (70, 1000), (65, 64)])
def test_same_pixels_as_open_clip_within_rounding(transforms, size):
    reference, fast = transforms
    img = photo(*size)
    want, got = reference(img), fast(img)
    assert got.shape == want.shape and got.dtype == torch.float32
    diff = (unnormalised(got, reference) - unnormalised(want, reference)).abs()
    assert diff.max() <= 2 * GREY_LEVEL + 1e-6  # rounding of the resize, never a shifted or other crop
    assert diff.mean() <= 0.25 * GREY_LEVEL  # most pixels identical


def test_uint8_prepare_then_collate_equals_one_by_one(transforms):
    _, fast = transforms
    images = [photo(90, 60, seed) for seed in range(3)]
    prepared = [fast.prepare(img) for img in images]
    assert all(p.dtype == torch.uint8 for p in prepared)
    torch.testing.assert_close(fast.collate(prepared), torch.stack([fast(img) for img in images]))


def test_grey_and_rgba_images_are_converted_like_open_clip(transforms):
    reference, fast = transforms
    for img in (photo(80, 80).convert("L"), photo(80, 80).convert("RGBA")):
        diff = (fast(img) - reference(img.convert("RGB"))).abs().max()
        assert diff * 0.3 <= 2 * GREY_LEVEL


def test_other_transform_shapes_are_left_to_open_clip():
    normalize = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    squash = T.Compose([T.Resize((32, 32)), T.ToTensor(), normalize])
    nearest = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(32), T.ToTensor(),
                         normalize])
    capped = T.Compose([T.Resize(32, max_size=40), T.CenterCrop(32), T.ToTensor(), normalize])
    assert fast_preprocess(squash) is None and fast_preprocess(nearest) is None and fast_preprocess(capped) is None
    assert isinstance(fast_preprocess(T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), normalize])),
                      FastPreprocess)


def test_a_crop_bigger_than_the_resize_falls_back_to_torchvision_padding():
    reference = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    fast = fast_preprocess(reference)
    img = photo(40, 30)
    assert fast.prepare(img).dtype == torch.float32  # the fallback's output
    torch.testing.assert_close(fast(img), reference(img))


def test_loaded_encoders_use_the_fast_path(tiny_encoder):
    assert isinstance(tiny_encoder.preprocess, FastPreprocess)
