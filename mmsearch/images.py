"""Safe image decoding: every failure becomes an ItemError that names the file and the reason."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MAX_IMAGE_PIXELS
from .errors import ItemError

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def load_image(path: str | Path, item: str | None = None) -> Image.Image:
    """Decode fully to RGB: first frame of animations, EXIF orientation honoured, bombs refused."""
    label = item or str(path)
    path = Path(path)
    try:
        if not path.is_file():
            raise ItemError(label, f"image file not found: {path}")
        if path.stat().st_size == 0:
            raise ItemError(label, f"empty image file: {path}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ItemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(label, f"image too large (decompression bomb guard): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ItemError(label, f"not an image file: {path}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ItemError(label, f"unreadable or truncated image {path}: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten transparency on white, scale 16-bit, convert CMYK/palette/grey to RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")
