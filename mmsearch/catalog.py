"""Read a catalog (CSV, JSONL or a folder of images) into items; bad rows become ItemErrors."""

from __future__ import annotations

import csv
import io
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
    # newline="" keeps newlines inside quoted fields; strict turns bad quoting into per-row errors
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = _csv_header(path, reader)
    while True:
        first_line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # an oversized field or an unterminated quote: report, read on
            lines = f"row {first_line}" if reader.line_num <= first_line else f"rows {first_line}-{reader.line_num}"
            yield ItemError(f"{path.name} {lines}", f"bad CSV: {exc}")
            continue
        yield from _csv_row(path, header, values, first_line)


def _csv_header(path: Path, reader) -> list[str]:
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise CatalogError(f"{path}: bad CSV header: {exc}") from exc
    if not header:
        raise CatalogError(f"{path}: empty CSV (no header row)")
    header = [h.strip() for h in header]
    if any(_has_bad_bytes(h) for h in header):
        raise CatalogError(f"{path}: the header row is not valid UTF-8")
    _check_header(path, header)
    return header


def _csv_row(path: Path, header: list[str], values: list[str], line_no: int) -> Iterator[CatalogItem | ItemError]:
    source = f"{path.name} row {line_no}"
    if not any(v.strip() for v in values):
        return
    if len(values) != len(header):
        yield ItemError(source, f"row has {len(values)} fields, header has {len(header)}")
    elif any(_has_bad_bytes(v) for v in values):
        yield ItemError(source, "not valid UTF-8 (bad encoding)")
    else:
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
        except RecursionError:
            yield ItemError(source, "invalid JSON: nested too deeply")
            continue
        if not isinstance(record, dict):
            yield ItemError(source, "a JSONL line must be an object")
            continue
        if _has_surrogates(record):  # "\ud800" escapes decode to text SQLite cannot store
            yield ItemError(source, "not valid Unicode (a lone surrogate escape)")
            continue
        yield _make_item(record, path.parent, line_no, source)


def _read_folder(root: Path) -> Iterator[CatalogItem | ItemError]:
    for image in _walk_images(root):
        key = image.relative_to(root).as_posix()
        if _has_bad_bytes(key):  # a file name in another encoding: the key could not be stored as text
            yield ItemError(ascii(key), "file name is not valid UTF-8")
            continue
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
    problem = _bad_reserved_value(record)
    if problem:
        return ItemError(source, problem)
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


def _bad_reserved_value(record: dict) -> str | None:
    """Why the id or image value cannot be used, or None."""
    raw_key = record.get("id")
    if isinstance(raw_key, (dict, list)):
        return "id must be text or a number"
    image_value = record.get("image")
    if isinstance(image_value, (dict, list, bool)):
        return "image must be a path"
    if image_value is not None and "\0" in str(image_value):
        return "image path contains a NUL character"
    return None


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
    """NaN and infinities are not JSON (SQLite's JSON functions reject them); store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    return value


def _has_surrogates(value) -> bool:
    if isinstance(value, str):
        return _has_bad_bytes(value)
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False
