"""Typed errors. Library code raises these; only cli.py turns them into exit codes."""


class MMSearchError(Exception):
    """Base class of every error mmsearch raises on purpose."""


class ModelLoadError(MMSearchError):
    """A model could not be loaded (unknown name, missing or unsafe weights, offline hub)."""


class IndexNotFoundError(MMSearchError):
    """The named index does not exist."""


class SchemaError(MMSearchError):
    """The index was written by an incompatible (usually newer) mmsearch."""


class CatalogError(MMSearchError):
    """The catalog as a whole cannot be read (missing file, unknown format)."""


class ItemError(MMSearchError):
    """One catalog item is bad; ingest skips and reports it, the run goes on."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason


class QueryError(MMSearchError):
    """A query is malformed: empty, unreadable image, unknown filter field..."""


class IndexLockedError(MMSearchError):
    """Another process is writing this index."""
