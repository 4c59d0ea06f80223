"""Fashion-MNIST colour catalog on synthetic photos: no need for the dataset-fashion-mnist package."""

import colorsys
import csv
import gzip

import numpy as np
import pytest

from benchmarks.fashion import make_catalog
from benchmarks.fashion.make_catalog import COLORS, build_catalog, caption_for, load_fashion_mnist, tint
from mmsearch.errors import CatalogError

CHROMATIC = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
NEUTRAL = ["black", "white", "grey"]
HUE_TOLERANCE = 0.04  # of the hue circle (about 15 degrees)


def _synthetic_photo() -> np.ndarray:
    """Fashion-MNIST look: product bright on a black background, with a texture gradient."""
    gray = np.zeros((28, 28), dtype=np.uint8)
    gray[6:22, 8:20] = np.linspace(90, 250, 12, dtype=np.uint8)[None, :]
    return gray


def _product_and_background(image):
    rgb = np.asarray(image, dtype=float)
    inside = rgb[2 + 6 : 2 + 22, 2 + 8 : 2 + 20].reshape(-1, 3)  # 2 px of padding around the 28x28 photo
    return inside, rgb[0, 0]


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0]


def _luma(rgb) -> float:
    return float(np.dot(rgb, [0.2126, 0.7152, 0.0722]))


def test_there_are_at_least_eight_colours_each_with_a_background():
    assert len(COLORS) >= 8
    assert all(make_catalog.backgrounds_for(name) for name in COLORS)


@pytest.mark.parametrize("color_name", CHROMATIC)
def test_product_pixels_take_the_colour_hue(color_name):
    image = tint(_synthetic_photo(), color_name, np.random.default_rng(0))
    assert image.mode == "RGB" and image.size == (32, 32)
    inside, _ = _product_and_background(image)
    expected = _hue(COLORS[color_name][1])
    hue_distance = abs(_hue(inside.mean(axis=0)) - expected)
    assert min(hue_distance, 1 - hue_distance) < HUE_TOLERANCE


@pytest.mark.parametrize("color_name", CHROMATIC + NEUTRAL)
def test_product_stands_out_and_keeps_its_texture(color_name):
    for seed in range(4):  # the background is random: try several
        inside, background = _product_and_background(tint(_synthetic_photo(), color_name, np.random.default_rng(seed)))
        assert abs(_luma(inside.mean(axis=0)) - _luma(background)) > 40
        lumas = inside @ [0.2126, 0.7152, 0.0722]
        assert lumas.max() - lumas.min() > 25  # the grey gradient is still visible


def test_black_and_white_products_are_neutral_and_apart():
    rng = np.random.default_rng(0)
    black, _ = _product_and_background(tint(_synthetic_photo(), "black", rng))
    white, _ = _product_and_background(tint(_synthetic_photo(), "white", rng))
    assert np.ptp(black.mean(axis=0)) < 3 and np.ptp(white.mean(axis=0)) < 3  # no hue cast
    assert _luma(white.mean(axis=0)) - _luma(black.mean(axis=0)) > 120


def test_unknown_colour_is_refused():
    with pytest.raises(ValueError, match="unknown colour"):
        tint(_synthetic_photo(), "chartreuse", np.random.default_rng(0))


def test_captions_read_naturally():
    assert caption_for("ankle boot", "red") == "a red ankle boot"
    assert caption_for("trouser", "orange") == "an orange pair of trousers"


def _fake_loader(split, data_dir=None):
    photos = np.stack([_synthetic_photo(), _synthetic_photo().T, np.roll(_synthetic_photo(), 3, axis=0)])
    return photos, np.array([9, 1, 0], dtype=np.uint8)


def _read_rows(csv_path):
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_build_catalog_writes_images_and_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(make_catalog, "load_fashion_mnist", _fake_loader)
    csv_path = build_catalog("test", tmp_path / "out", seed=1, limit=2)
    columns, rows = _read_rows(csv_path)
    assert csv_path == tmp_path / "out" / "catalog.csv"
    assert columns == ["id", "image", "caption", "category", "color", "product"]
    assert [row["product"] for row in rows] == ["0", "1"]  # limit=2 keeps the first two photos
    assert [row["category"] for row in rows] == ["ankle boot", "trouser"]
    for row in rows:
        assert not row["image"].startswith("/") and (csv_path.parent / row["image"]).is_file()
        assert row["caption"] == caption_for(row["category"], row["color"])


def test_colour_variants_share_the_product(tmp_path, monkeypatch):
    monkeypatch.setattr(make_catalog, "load_fashion_mnist", _fake_loader)
    _, rows = _read_rows(build_catalog("test", tmp_path / "a", seed=3, colors_per_item=4))
    assert len(rows) == 3 * 4 and len({row["id"] for row in rows}) == 12
    for product in ("0", "1", "2"):
        colours = [row["color"] for row in rows if row["product"] == product]
        assert len(colours) == 4 == len(set(colours))
    _, again = _read_rows(build_catalog("test", tmp_path / "b", seed=3, colors_per_item=4))
    assert again == rows  # same seed, same catalog


def _write_idx(path, magic, array):
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_loader_reads_idx_files(tmp_path):
    photos, labels = _fake_loader("test")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", make_catalog.IDX_IMAGES_MAGIC, photos)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", make_catalog.IDX_LABELS_MAGIC, labels)
    images, read_labels = load_fashion_mnist("test", tmp_path)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, photos)
    np.testing.assert_array_equal(read_labels, labels)


def test_missing_dataset_names_the_apt_command(tmp_path, capsys):
    with pytest.raises(CatalogError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    assert make_catalog.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
