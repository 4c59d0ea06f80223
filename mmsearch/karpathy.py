"""Reader for the Karpathy-split caption files (dataset_flickr30k.json, dataset_coco.json).

Format: {"dataset": "flickr30k", "images": [{"filename": "1000092795.jpg", "split": "test",
"imgid": 0, "sentences": [{"raw": "Two young guys ...", "tokens": [...]}, ...],
"filepath": "val2014"}]}. "filepath" exists for COCO only (the image sits in filepath/filename).
Flickr30k and COCO have 5 captions per image; the 1k/5k test splits are the CLIP-paper protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CatalogError


@dataclass(frozen=True)
class KarpathyImage:
    filename: str
    captions: list[str]
    imgid: int | str
    filepath: str | None = None  # COCO's sub-folder ("train2014" / "val2014"); None for Flickr30k

    @property
    def relative_path(self) -> str:
        """Image path relative to the dataset's image root."""
        return f"{self.filepath}/{self.filename}" if self.filepath else self.filename


def load_karpathy(path: str | Path, split: str | None = "test") -> list[KarpathyImage]:
    """Images of one split ("train", "val", "test", COCO's "restval"), or every image when split is None.

    Raises CatalogError naming the file and the problem when the file is missing, is not JSON, does
    not follow the format, or holds no image of the requested split (usually a typo in `split`).
    """
    path = Path(path)
    entries = _read_image_entries(path)
    images = [
        _parse_image(entry, position, path)
        for position, entry in enumerate(entries)
        if split is None or _entry_split(entry, position, path) == split
    ]
    if not images:
        found = sorted({_entry_split(entry, i, path) for i, entry in enumerate(entries)})
        raise CatalogError(f"{path}: no image in split {split!r}; splits present: {found}")
    return images


def _read_image_entries(path: Path) -> list[Any]:
    if not path.is_file():
        raise CatalogError(f"Karpathy split file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogError(f"{path}: not a JSON file: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CatalogError(f'{path}: not a Karpathy split file (expected an object with an "images" list)')
    return data["images"]


def _entry_split(entry: Any, position: int, path: Path) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
        raise CatalogError(f'{path}: images[{position}] has no "split" string')
    return entry["split"]


def _parse_image(entry: dict, position: int, path: Path) -> KarpathyImage:
    where = f"{path}: images[{position}]"
    if not isinstance(entry, dict):
        raise CatalogError(f"{where} is not an object")
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise CatalogError(f'{where} has no "filename" string')
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise CatalogError(f'{where} ({filename}) has no "sentences" list')
    where = f"{where} ({filename})"
    captions = [_caption(sentence, f"{where} sentences[{i}]") for i, sentence in enumerate(sentences)]
    filepath = entry.get("filepath")
    return KarpathyImage(
        filename=filename,
        captions=captions,
        # Older files lack imgid: the position in the list is what Karpathy's own code used.
        imgid=entry.get("imgid", position),
        filepath=filepath if isinstance(filepath, str) and filepath else None,
    )


def _caption(sentence: Any, where: str) -> str:
    """The "raw" caption; the joined "tokens" when a file kept only those."""
    if isinstance(sentence, dict):
        raw = sentence.get("raw")
        if isinstance(raw, str) and raw.strip():
            return raw.strip()
        tokens = sentence.get("tokens")
        if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
            return " ".join(tokens)
    raise CatalogError(f'{where} has no "raw" caption')
