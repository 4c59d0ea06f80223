"""What an index holds: the `info` command and the API's /api/info."""

from __future__ import annotations

from pathlib import Path

from .collection import Collection


def index_info(index_dir: Path) -> dict:
    collection = Collection.open(index_dir)
    try:
        manifest = collection.manifest
        counts = collection.store.counts()
        return {
            **counts,
            "model": manifest.model.label(),
            "dim": manifest.dim,
            "index_type": manifest.index.index_type,
            "search_params": {k: v for k, v in (("ef_search", manifest.index.ef_search),
                                                ("entry_sample", manifest.index.entry_sample),
                                                ("nprobe", manifest.index.nprobe)) if v},
            "measured_recall_at_10": manifest.index.measured_recall_at_10,
            "fusion": manifest.fusion.strategy,
            "fields": sorted(collection.store.field_names()),
            "schema_version": manifest.schema_version,
            "created": manifest.created,
            "updated": manifest.updated,
            "path": str(index_dir),
        }
    finally:
        collection.close()
