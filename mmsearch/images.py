"""Safe image decoding: every failure becomes an ItemError that names the file and the reason."""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MAX_IMAGE_PIXELS
from .errors import ItemError

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# No format needs more bytes than this for MAX_IMAGE_PIXELS (an uncompressed 64M-pixel RGB BMP is 192 MB);
# a bigger "image" (a sparse file, a disk dump) is refused before a single byte is hashed or decoded.
MAX_IMAGE_BYTES = 512 * 1024**2
# Longest side / shortest side kept; see _limit_aspect.
MAX_ASPECT = 20


def open_image_file(path: str | Path, label: str) -> BinaryIO:
    """Open a regular file for reading, or raise an ItemError saying why not.

    O_NONBLOCK and the fstat check keep a FIFO or a device (/dev/zero, /dev/stdin) from hanging or
    streaming forever: only regular files are read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ItemError(label, f"image file not found: {path}") from None
    except PermissionError:
        raise ItemError(label, f"permission denied reading {path}") from None
    except OSError as exc:
        raise ItemError(label, f"cannot read image {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte in the path
        raise ItemError(label, f"invalid image path {path!r}: {exc}") from None
    try:
        _check_regular(os.fstat(fd), path, label)
    except ItemError:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _check_regular(st: os.stat_result, path, label: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ItemError(label, f"is a directory, not an image file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise ItemError(label, f"not a regular file (a pipe, socket or device): {path}")
    if st.st_size == 0:
        raise ItemError(label, f"empty image file: {path}")
    if st.st_size > MAX_IMAGE_BYTES:
        raise ItemError(label, f"file too large for an image ({st.st_size:,} bytes; limit "
                               f"{MAX_IMAGE_BYTES:,}): {path}")


def load_image(path: str | Path, item: str | None = None, min_side: int | None = None,
               digest=None) -> Image.Image:
    """Decode to RGB: first frame of animations, EXIF orientation honoured, bombs refused.

    min_side: the encoder's input size. A JPEG is then decoded by libjpeg at the smallest 1/2, 1/4 or
    1/8 scale whose shorter side stays >= min_side (DCT-domain scaling, a proper low-pass): the encoder
    shrinks it to min_side anyway, and decoding a 12-megapixel photo this way is several times faster.

    digest: a hashlib object fed the whole file, read once for hashing and decoding (ingest
    fingerprints each new file as it decodes it); the file size is already capped by MAX_IMAGE_BYTES."""
    label = item or str(path)
    try:
        with open_image_file(path, label) as fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            source = fh
            if digest is not None:
                data = fh.read()
                digest.update(data)
                source = io.BytesIO(data)
            with Image.open(source) as img:
                img.seek(0)
                if min_side:
                    _draft(img, min_side)
                img.load()
                return _limit_aspect(_to_rgb(_exif_upright(img, label)))
    except ItemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(label, f"image too large (decompression bomb guard): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ItemError(label, f"not an image file: {path}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ItemError(label, f"unreadable or truncated image {path}: {exc}") from exc
    except Exception as exc:  # hostile files reach decoder paths that raise anything (struct.error, ...)
        raise ItemError(label, f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def _draft(img: Image.Image, min_side: int) -> None:
    width, height = img.size
    shorter = min(width, height)
    if img.format == "JPEG" and shorter > 2 * min_side:
        scale = shorter / min_side  # draft keeps both sides >= the requested ones
        img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))


def _exif_upright(img: Image.Image, label: str) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the pixels as stored, not the item failed."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # Pillow's EXIF parser raises many types on garbage tags
        log.info("%s: ignoring malformed EXIF orientation (%s)", label, exc)
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten transparency on white, scale 16-bit, convert CMYK/palette/grey to RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def _limit_aspect(img: Image.Image) -> Image.Image:
    """Keep the centre of an extremely long image, at most MAX_ASPECT:1.

    Encoders resize the shorter side to their input size, so a 60000x2 strip would become a
    multi-gigapixel tensor (an out-of-memory kill, not an error); their centre crop means they only
    look at the middle anyway, so cropping first changes nothing they see."""
    width, height = img.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return img
    if width > height:
        keep = MAX_ASPECT * height
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    keep = MAX_ASPECT * width
    top = (height - keep) // 2
    return img.crop((0, top, width, top + keep))
