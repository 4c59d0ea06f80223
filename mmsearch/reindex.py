"""Rebuild an index's FAISS files (another index type, new memory budget) from the stored vectors.

Nothing is re-encoded: the SQLite store holds every vector, FAISS files are derived from it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .collection import Collection
from .index import DEFAULT_MAX_MEMORY, INDEX_TYPES


def reindex(index_dir: Path, index_type: str = "auto", max_memory: int = DEFAULT_MAX_MEMORY,
            wait_for_lock: bool = False) -> dict:
    """Rebuild every modality's index under the write lock and publish it atomically; returns the params."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    collection = Collection.open(index_dir)
    try:
        # no repair on locking: it would rebuild with the old type; save_faiss below publishes a fresh
        # index at the store's generation anyway (stale or missing files included)
        with collection.write_lock(wait=wait_for_lock, repair=False):
            collection._indexes.clear()  # force a rebuild even when the type is unchanged
            collection.save_faiss(index_type, max_memory)
            counts = collection.store.counts()
            state = collection.faiss_state()
        return {**counts, "index": asdict(collection.manifest.index), "params": state.get("params", {})}
    finally:
        collection.close()
