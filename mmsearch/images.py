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

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo straight into numpy: the fast JPEG path of load_pixels
    import simplejpeg
except ImportError:  # pragma: no cover - Pillow's path does the same, a little slower
    simplejpeg = None

from .config import MAX_IMAGE_PIXELS
from .errors import ItemError

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# No format needs more bytes than this for MAX_IMAGE_PIXELS (an uncompressed 64M-pixel RGB BMP is 192 MB);
# a bigger "image" (a sparse file, a disk dump) is refused before a single byte is hashed or decoded.
MAX_IMAGE_BYTES = 512 * 1024**2
# Longest side / shortest side kept; see _limit_aspect.
MAX_ASPECT = 20
EXIF_ORIENTATION = 0x0112


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
    return _load(path, item or str(path), min_side, digest, as_array=False)


def load_pixels(path: str | Path, item: str | None = None, min_side: int | None = None,
                digest=None) -> np.ndarray:
    """load_image's RGB pixels as an (H, W, 3) uint8 array, with the same guards and errors.

    A plain JPEG (baseline or progressive YCbCr/grey, upright EXIF) skips Pillow's pixel path: its
    header is still read and checked by Pillow, then libjpeg-turbo (simplejpeg) decodes it at the same
    DCT scale straight into the array, without Pillow's copies (bit-identical pixels, a third less
    CPU: ingest's decoding shares the cores with the encoder)."""
    return _load(path, item or str(path), min_side, digest, as_array=True)


def _load(path, label: str, min_side: int | None, digest, as_array: bool):
    try:
        with open_image_file(path, label) as fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            data = fh.read() if digest is not None or (as_array and simplejpeg is not None) else None
            if digest is not None:
                digest.update(data)
            with Image.open(io.BytesIO(data) if data is not None else fh) as img:
                pixels = _decode_plain_jpeg(data, img, min_side) if as_array and data is not None else None
                if pixels is not None:
                    return _limit_aspect_array(pixels)
                img.seek(0)
                if min_side:
                    _draft(img, min_side)
                img.load()
                rgb = _limit_aspect(_to_rgb(_exif_upright(img, label)))
                return np.array(rgb) if as_array else rgb  # a writable copy: torch wants one
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


def _plain_jpeg(img: Image.Image) -> bool:
    """A JPEG that simplejpeg decodes to the same RGB as Pillow: one frame, 3-channel or grey, upright."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):  # CMYK / YCCK go through Pillow
        return False
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: Pillow's path logs it and keeps the stored pixels
        return False
    return orientation == 1


def _decode_plain_jpeg(data: bytes, img: Image.Image, min_side: int | None) -> np.ndarray | None:
    """RGB pixels at the DCT scale Pillow's draft picks for load_image (the same size, the same
    pixels); None for another kind of image, or when libjpeg-turbo would decode another size: Pillow's
    path then runs."""
    if not _plain_jpeg(img):
        return None
    width, height = _reduced_size(img.size, min_side)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height, min_width=width)
    return pixels if pixels.shape[:2] == (height, width) else None


def _draft_request(size: tuple[int, int], min_side: int | None) -> tuple[int, int] | None:
    """The size load_image asks Pillow's JPEG draft for: both sides >= the encoder's input side."""
    width, height = size
    shorter = min(width, height)
    if not min_side or shorter <= 2 * min_side:
        return None
    scale = shorter / min_side
    return math.ceil(width / scale), math.ceil(height / scale)


def _reduced_size(size: tuple[int, int], min_side: int | None) -> tuple[int, int]:
    """The size Pillow's draft decodes to for _draft_request: the largest 1/8, 1/4 or 1/2 scale that
    keeps both requested sides (JpegImagePlugin.draft), rounded up like libjpeg."""
    request = _draft_request(size, min_side)
    if request is None:
        return size
    fits = min(size[0] // request[0], size[1] // request[1])
    scale = next(s for s in (8, 4, 2, 1) if fits >= s)
    return -(-size[0] // scale), -(-size[1] // scale)


def _draft(img: Image.Image, min_side: int) -> None:
    request = _draft_request(img.size, min_side)
    if img.format == "JPEG" and request is not None:  # draft keeps both sides >= the requested ones
        img.draft("RGB", request)


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
    box = _aspect_box(*img.size)
    return img if box is None else img.crop(box)


def _limit_aspect_array(pixels: np.ndarray) -> np.ndarray:
    """_limit_aspect for an (H, W, 3) array: the same centre crop, as a view."""
    box = _aspect_box(pixels.shape[1], pixels.shape[0])
    return pixels if box is None else pixels[box[1] : box[3], box[0] : box[2]]


def _aspect_box(width: int, height: int) -> tuple[int, int, int, int] | None:
    """The (left, top, right, bottom) centre box at MAX_ASPECT:1, or None when the image is within it."""
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return None
    if width > height:
        keep = MAX_ASPECT * height
        left = (width - keep) // 2
        return left, 0, left + keep, height
    keep = MAX_ASPECT * width
    top = (height - keep) // 2
    return 0, top, width, top + keep


# open_clip's eval transform's geometry (torchvision Resize(int) then CenterCrop): shared by ingest's
# torch resize (pixels.py) and the torch-free query path (imagequery.py), so both crop the same pixels.
def shorter_side_size(height: int, width: int, side: int) -> tuple[int, int]:
    """torchvision's Resize(int) output (height, width): shorter side -> side, longer side truncated."""
    if width <= height:
        return int(side * height / width), side
    return side, int(side * width / height)


def centre_crop_origin(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """torchvision's CenterCrop (top, left) for a crop no larger than the image."""
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
