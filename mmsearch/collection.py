"""One index folder: manifest + SQLite store (source of truth) + FAISS files derived from it.

Commit protocol (crash safety):
1. every ingest batch is one SQLite transaction (rows + vectors) that bumps the store generation;
2. FAISS files are written under new names (temp file, fsync, rename), then `faiss.json` is
   atomically replaced to point at them with the generation they reflect, then old files go;
3. on open, FAISS files whose generation differs from the store's are stale: a reader uses them
   while a writer holds the lock (it sees the last finished snapshot; rows come from SQLite), and
   otherwise (a killed run) the indexes are rebuilt from the stored vectors - never re-encoded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import DB_NAME, LOCK_NAME, MODALITIES, IndexParams, Manifest, ModelRef, write_json_atomic
from .errors import IndexLockedError, IndexNotFoundError, MMSearchError
from .index import DEFAULT_MAX_MEMORY, VectorIndex, choose_index_type
from .store import Store

log = logging.getLogger(__name__)

FAISS_STATE = "faiss.json"


class Collection:
    def __init__(self, index_dir: Path, manifest: Manifest, store: Store):
        self.dir = index_dir
        self.manifest = manifest
        self.store = store
        self._indexes: dict[str, VectorIndex] = {}

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: Path) -> Collection:
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise IndexNotFoundError(f"no index at {index_dir}")
        manifest = Manifest.load(index_dir)
        if not (index_dir / DB_NAME).is_file():
            raise IndexNotFoundError(f"index {index_dir} has no {DB_NAME}")
        return cls(index_dir, manifest, Store(index_dir / DB_NAME))

    @classmethod
    def create(cls, index_dir: Path, model: ModelRef, dim: int) -> Collection:
        try:
            index_dir.mkdir(parents=True, exist_ok=True)
            manifest = Manifest(model=model, dim=dim)
            store = Store(index_dir / DB_NAME)
            manifest.save(index_dir)
        except OSError as exc:
            raise MMSearchError(f"cannot create index at {index_dir}: {exc.strerror or exc}") from exc
        return cls(index_dir, manifest, store)

    def close(self) -> None:
        self.store.close()

    @property
    def dim(self) -> int:
        return self.manifest.dim

    # -- locking ----------------------------------------------------------------------------------
    @contextmanager
    def write_lock(self, wait: bool = False):
        """One writer per index; a second one fails at once (or waits with wait=True)."""
        path = self.dir / LOCK_NAME
        try:
            fh = open(path, "a+")
        except OSError as exc:
            raise MMSearchError(f"cannot write to index {self.dir}: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise IndexLockedError(f"index {self.dir} is being written by {holder}; "
                                       "wait for it to finish") from exc
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            yield
        finally:
            fh.close()

    def writer_active(self) -> bool:
        path = self.dir / LOCK_NAME
        if not path.exists():
            return False
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    # -- FAISS ------------------------------------------------------------------------------------
    def faiss_state(self) -> dict:
        path = self.dir / FAISS_STATE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return {}

    def vector_index(self, modality: str) -> VectorIndex:
        if modality not in self._indexes:
            self._indexes[modality] = self._load_or_rebuild(modality)
        return self._indexes[modality]

    def _load_or_rebuild(self, modality: str) -> VectorIndex:
        state = self.faiss_state()
        fresh = state.get("generation") == self.store.generation()
        filename = state.get("files", {}).get(modality)
        if filename and (fresh or self.writer_active()) and (self.dir / filename).is_file():
            params = state.get("params", {}).get(modality) or asdict(self.manifest.index)
            return VectorIndex.load(self.dir / filename, IndexParams(**params))
        if state or self.store.generation():
            log.warning("FAISS files of %s are stale (an interrupted run?): rebuilding %s vectors from the store",
                        self.dir, modality)
        return self.rebuild(modality, self.manifest.index.index_type)

    def all_vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.store.iter_vectors(modality, self.dim))
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def rebuild(self, modality: str, index_type: str, max_memory: int = DEFAULT_MAX_MEMORY) -> VectorIndex:
        ids, vectors = self.all_vectors(modality)
        if len(ids) == 0:
            index = VectorIndex.empty(self.dim)
        else:
            index = VectorIndex.build(self.dim, ids, vectors, index_type, max_memory)
        self._indexes[modality] = index
        return index

    def save_faiss(self, index_type: str = "auto", max_memory: int = DEFAULT_MAX_MEMORY) -> None:
        """Bring FAISS files up to the store's generation and publish them atomically."""
        generation = self.store.generation()
        counts = self.store.counts()
        wanted = index_type if index_type != "auto" else choose_index_type(counts["items"], self.dim, max_memory)
        files, params = {}, {}
        for modality in MODALITIES:
            index = self._indexes.get(modality)
            if index is None or index.params.index_type != wanted:
                index = self.rebuild(modality, wanted, max_memory)
            filename = f"{modality}-{generation}.faiss"
            index.save(self.dir / filename)
            files[modality] = filename
            index.params.requested = index_type
            params[modality] = asdict(index.params)
        main = "image" if counts["images"] else "text"
        self.manifest.index = IndexParams(**params[main])
        self.manifest.save(self.dir)
        old = self.faiss_state().get("files", {}).values()
        write_json_atomic(self.dir / FAISS_STATE, {"generation": generation, "files": files, "params": params})
        for name in set(old) - set(files.values()):
            (self.dir / name).unlink(missing_ok=True)
