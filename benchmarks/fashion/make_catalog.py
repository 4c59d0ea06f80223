"""Colour product catalog from Fashion-MNIST: each grey photo tinted in named colours, with captions.

Fashion-MNIST (Zalando, MIT licence) comes from Debian's `dataset-fashion-mnist` package:
70,000 28x28 grey product photos in 10 categories, train 60k / test 10k. Every photo becomes one or
more RGB product images ("a red ankle boot"), so a catalog has two attributes a query can ask for,
category and colour, and the ground truth of a search is known exactly.

    python -m benchmarks.fashion.make_catalog --split test --out data/fashion-test
    python -m benchmarks.fashion.make_catalog --split test --colors-per-item 3 --out data/fashion-composed

writes OUT/images/*.png and OUT/catalog.csv (id,image,caption,category,color,product), image paths
relative to the CSV; `product` is the source photo index, shared by the colour variants of a photo.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mmsearch.errors import CatalogError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_COMMAND = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 2051  # idx3: uint8 images, header = magic, count, rows, cols (big-endian int32)
IDX_LABELS_MAGIC = 2049  # idx1: uint8 labels, header = magic, count

# Label index -> the category name a shopper would type, and the phrase that reads well in a caption.
CATEGORIES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CAPTION_NOUNS = {"trouser": "pair of trousers"}

# Colour name -> (shadow RGB, highlight RGB). The photo's grey texture moves each pixel between the
# two, so the texture stays visible even for black and white; both ends keep the hue (no whitening
# toward pink or darkening toward brown) so the named colour is what a viewer sees.
COLORS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((125, 10, 10), (235, 35, 30)),
    "orange": ((185, 85, 0), (255, 150, 25)),
    "yellow": ((195, 170, 0), (255, 238, 60)),
    "green": ((10, 95, 25), (60, 190, 70)),
    "blue": ((10, 40, 145), (60, 125, 255)),
    "purple": ((70, 20, 115), (160, 75, 215)),
    "pink": ((200, 80, 140), (255, 165, 215)),
    "brown": ((70, 38, 14), (150, 90, 45)),
    "black": ((8, 8, 8), (80, 80, 80)),
    "white": ((200, 200, 200), (255, 255, 255)),
    "grey": ((95, 95, 95), (170, 170, 170)),
}
# Neutral backgrounds only, so the background never looks like a colour of its own. A colour is put
# on one whose luminance differs from the colour's by at least MIN_CONTRAST (black on light, white
# on dark, mid colours on either).
BACKGROUNDS = (242, 208, 52, 18)
MIN_CONTRAST = 70
PAD = 2  # 28 + 2*2 = 32: the tiny fashion model's input size, reached without resampling blur

# Grey levels are first scaled so the photo's bright end is 1.0 (dark photos would otherwise give
# dark, muddy colours); then alpha rises from 0 to 1 between these levels, which drops the sensor
# noise (values 1-3) of the black background and keeps the anti-aliased outline soft.
ALPHA_FLOOR = 0.03
ALPHA_FULL = 0.15


def luminance(rgb) -> float:
    """Rec. 709 luma on 0..255, precise enough to rank backgrounds by contrast."""
    red, green, blue = rgb
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def backgrounds_for(color_name: str) -> list[int]:
    shadow, highlight = (np.array(end, dtype=float) for end in COLORS[color_name])
    middle = luminance((shadow + highlight) / 2)
    return [level for level in BACKGROUNDS if abs(level - middle) >= MIN_CONTRAST]


def tint(gray: np.ndarray, color_name: str, rng: np.random.Generator) -> Image.Image:
    """One 28x28 uint8 grey photo (product bright on black) -> 32x32 RGB product in that colour.

    The background is a random neutral grey level with enough contrast for the colour.
    """
    if color_name not in COLORS:
        raise ValueError(f"unknown colour {color_name!r}; known: {', '.join(COLORS)}")
    level = _normalised_levels(gray)
    alpha = np.clip((level - ALPHA_FLOOR) / (ALPHA_FULL - ALPHA_FLOOR), 0.0, 1.0)[..., None]
    shadow, highlight = (np.array(end, dtype=float) for end in COLORS[color_name])
    product = shadow + level[..., None] * (highlight - shadow)
    background = float(rng.choice(backgrounds_for(color_name)))
    rgb = alpha * product + (1.0 - alpha) * background
    rgb = np.pad(rgb, ((PAD, PAD), (PAD, PAD), (0, 0)), constant_values=background)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def _normalised_levels(gray: np.ndarray) -> np.ndarray:
    gray = np.asarray(gray, dtype=float)
    foreground = gray[gray > 16]
    bright_end = np.percentile(foreground, 99) if foreground.size else max(gray.max(), 1.0)
    return np.clip(gray / bright_end, 0.0, 1.0)


def caption_for(category: str, color_name: str) -> str:
    noun = CAPTION_NOUNS.get(category, category)
    article = "an" if color_name[0] in "aeiou" else "a"
    return f"{article} {color_name} {noun}"


def load_fashion_mnist(split: str, data_dir: str | Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the "train" or "test" split."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    image_path, label_path = (Path(data_dir) / name for name in SPLIT_FILES[split])
    for path in (image_path, label_path):
        if not path.is_file():
            raise CatalogError(f"Fashion-MNIST file not found: {path}\nInstall the dataset with:\n  {APT_COMMAND}")
    images = _read_idx(image_path, IDX_IMAGES_MAGIC, header_ints=4)
    labels = _read_idx(label_path, IDX_LABELS_MAGIC, header_ints=2)
    if len(images) != len(labels):
        raise CatalogError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    return images, labels


def _read_idx(path: Path, magic: int, header_ints: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise CatalogError(f"{path}: unreadable gzip file: {exc}") from exc
    header = np.frombuffer(raw, dtype=">i4", count=header_ints) if len(raw) >= 4 * header_ints else None
    if header is None or header[0] != magic:
        raise CatalogError(f"{path}: not an idx file (bad magic number)")
    shape = tuple(int(n) for n in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * header_ints)
    if data.size != int(np.prod(shape)):
        raise CatalogError(f"{path}: truncated, expected {shape} values")
    return data.reshape(shape)


def build_catalog(
    split: str = "test",
    out: str | Path = "data/fashion-test",
    seed: int = 0,
    limit: int | None = None,
    colors_per_item: int = 1,
    data_dir: str | Path = DATA_DIR,
) -> Path:
    """Write OUT/images/*.png and OUT/catalog.csv; returns the CSV path.

    Each of the first `limit` photos (all when None) gets `colors_per_item` distinct random colours;
    the same seed gives the same catalog.
    """
    if not 1 <= colors_per_item <= len(COLORS):
        raise ValueError(f"colors_per_item must be in 1..{len(COLORS)}, got {colors_per_item}")
    images, labels = load_fashion_mnist(split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    color_names = list(COLORS)
    rows = []
    for product, (gray, label) in enumerate(zip(images, labels)):
        for color_index in rng.choice(len(color_names), size=colors_per_item, replace=False):
            rows.append(_write_item(out, split, product, gray, CATEGORIES[label], color_names[color_index], rng))
    return _write_csv(out / "catalog.csv", rows)


def _write_item(out: Path, split, product: int, gray, category: str, color_name: str, rng) -> dict:
    item_id = f"{split}-{product:05d}-{color_name}"
    image = f"images/{item_id}.png"
    tint(gray, color_name, rng).save(out / image, compress_level=1)  # tiny files: speed over size
    return {
        "id": item_id,
        "image": image,
        "caption": caption_for(category, color_name),
        "category": category,
        "color": color_name,
        "product": product,
    }


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "caption", "category", "color", "product"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=sorted(SPLIT_FILES), default="test")
    parser.add_argument("--out", default="data/fashion-test", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos")
    parser.add_argument(
        "--colors-per-item", type=int, default=1, help="distinct colour variants per photo (default: 1)"
    )
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="Fashion-MNIST .gz files (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        csv_path = build_catalog(
            args.split, args.out, args.seed, args.limit, args.colors_per_item, data_dir=args.data_dir
        )
    except (CatalogError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
