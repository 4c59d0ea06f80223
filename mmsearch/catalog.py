"""Read a catalog (CSV, JSONL or a folder of images) into items; bad rows become ItemErrors."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import IMAGE_EXTENSIONS
from .errors import CatalogError, ItemError

CAPTION_COLUMNS = ("caption", "title", "text")
RESERVED_COLUMNS = ("id", "image", *CAPTION_COLUMNS)
MAX_CAPTION_CHARS = 2000  # longer captions are cut (encoders truncate tokens anyway)


@dataclass
class CatalogItem:
    key: str  # the user's id, unique within a catalog
    image: Path | None  # absolute path to the image file
    caption: str | None
    metadata: dict = field(default_factory=dict)
    source: str = ""  # where it came from, for error messages ("catalog.csv row 12")


@dataclass
class Catalog:
    items: list[CatalogItem]
    failed: list[ItemError]


def read_catalog(path: str | Path) -> Catalog:
    path = Path(path).expanduser()
    if not path.exists():
        raise CatalogError(f"catalog not found: {path}")
    if path.is_dir():
        rows = _read_folder(path)
    elif path.suffix.lower() == ".csv":
        rows = _read_csv(path)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path)
    else:
        raise CatalogError(f"{path}: unknown catalog format (use .csv, .jsonl or a folder of images)")
    return _dedupe(rows)


def _dedupe(rows: Iterator[CatalogItem | ItemError]) -> Catalog:
    items: list[CatalogItem] = []
    failed: list[ItemError] = []
    first_seen: dict[str, str] = {}
    for row in rows:
        if isinstance(row, ItemError):
            failed.append(row)
        elif row.key in first_seen:
            failed.append(ItemError(row.key, f"duplicate id (first at {first_seen[row.key]}, again at {row.source})"))
        else:
            first_seen[row.key] = row.source
            items.append(row)
    return Catalog(items, failed)


def _read_csv(path: Path) -> Iterator[CatalogItem | ItemError]:
    # surrogateescape keeps undecodable bytes so that only the rows holding them are rejected
    try:
        text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise CatalogError(f"{path}: empty CSV (no header row)")
    header = [h.strip() for h in header]
    _check_header(path, header)
    for line_no, values in enumerate(reader, start=2):
        source = f"{path.name} row {line_no}"
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield ItemError(source, f"row has {len(values)} fields, header has {len(header)}")
            continue
        if any(_has_bad_bytes(v) for v in values):
            yield ItemError(source, "not valid UTF-8 (bad encoding)")
            continue
        record = {k: _parse_scalar(v) for k, v in zip(header, values)}
        yield _make_item(record, path.parent, line_no, source)


def _read_jsonl(path: Path) -> Iterator[CatalogItem | ItemError]:
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    for line_no, raw in enumerate(lines, start=1):
        source = f"{path.name} line {line_no}"
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield ItemError(source, "not valid UTF-8 (bad encoding)")
            continue
        except ValueError as exc:
            yield ItemError(source, f"invalid JSON: {exc}")
            continue
        if not isinstance(record, dict):
            yield ItemError(source, "a JSONL line must be an object")
            continue
        yield _make_item(record, path.parent, line_no, source)


def _read_folder(root: Path) -> Iterator[CatalogItem | ItemError]:
    for image in _walk_images(root):
        key = image.relative_to(root).as_posix()
        sidecar = image.with_suffix(".txt")
        caption = None
        if sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as exc:
                yield ItemError(key, f"unreadable caption file {sidecar.name}: {exc}")
                continue
        yield CatalogItem(key=key, image=image.absolute(), caption=_clip_caption(caption), source=key)


def _walk_images(root: Path) -> Iterator[Path]:
    """Recursive, sorted, follows symlinked folders once (a symlink loop is not walked twice)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                yield Path(dirpath) / name


def _check_header(path: Path, header: list[str]) -> None:
    if "image" not in header and not any(c in header for c in CAPTION_COLUMNS):
        raise CatalogError(f"{path}: needs an 'image' column or a caption column (caption, title or text)")
    duplicates = {h for h in header if header.count(h) > 1}
    if duplicates:
        raise CatalogError(f"{path}: duplicate column names: {', '.join(sorted(duplicates))}")


def _make_item(record: dict, base: Path, row_no: int, source: str) -> CatalogItem | ItemError:
    image_value = record.get("image")
    caption = next((record[c] for c in CAPTION_COLUMNS if record.get(c) not in (None, "")), None)
    image = None
    if image_value not in (None, ""):
        image = Path(str(image_value)).expanduser()
        image = image if image.is_absolute() else base / image
    if caption is not None and not isinstance(caption, str):
        caption = str(caption)
    caption = _clip_caption(caption.strip() if caption else None)
    raw_key = record.get("id")
    if raw_key not in (None, ""):
        key = str(raw_key)
    elif image_value not in (None, ""):
        key = str(image_value)
    else:
        key = f"row-{row_no}"
    if image is None and caption is None:
        return ItemError(f"{key} ({source})", "row has neither an image nor a caption")
    metadata = {k: _clean_value(v) for k, v in record.items() if k not in RESERVED_COLUMNS and k}
    return CatalogItem(key=key, image=image.absolute() if image else None, caption=caption,
                       metadata=metadata, source=source)


def _clip_caption(caption: str | None) -> str | None:
    if caption and len(caption) > MAX_CAPTION_CHARS:
        return caption[:MAX_CAPTION_CHARS]
    return caption or None


def _has_bad_bytes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_scalar(value: str):
    """CSV cells are text; numbers become numbers so that `--where price<50` compares numerically."""
    value = value.strip()
    if value == "":
        return None
    for cast in (int, float):
        try:
            number = cast(value)
        except ValueError:
            continue
        return _clean_value(number)
    return value


def _clean_value(value):
    """NaN and infinities are not JSON; store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
