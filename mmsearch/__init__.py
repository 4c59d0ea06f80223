"""mmsearch: multimodal semantic search for product catalogs (open_clip + FAISS + SQLite).

The public API is imported lazily so that `mmsearch --help` and cold CLI queries stay fast.
"""

import os
from importlib import import_module

# onnxruntime (1.2x and later) writes a device id and an event database under ~/.cache/Microsoft
# whenever it loads a model, unless this is set before it is imported: mmsearch writes nothing outside
# its index and its cache. A user who wants onnxruntime's telemetry sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "ingest": "mmsearch.ingest",
    "IngestOptions": "mmsearch.ingest",
    "IngestReport": "mmsearch.ingest",
    "Searcher": "mmsearch.search",
    "Query": "mmsearch.search",
    "QueryPart": "mmsearch.search",
    "SearchResult": "mmsearch.search",
    "build_query": "mmsearch.search",
    "load_encoder": "mmsearch.encoders",
    "Encoder": "mmsearch.encoders",
    "index_info": "mmsearch.info",
    "read_catalog": "mmsearch.catalog",
    "MMSearchError": "mmsearch.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmsearch' has no attribute {name!r}")
