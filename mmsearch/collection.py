"""One index folder: manifest + SQLite store (source of truth) + FAISS files derived from it.

Commit protocol (crash safety; tests/crash_harness.py kills real runs at every step of it):
0. `create` makes the store first and writes manifest.json last: a folder without a manifest is
   "no index" to readers and is simply created again by the next run;
1. every ingest batch is one SQLite transaction (rows + vectors) that bumps the store generation;
2. FAISS files are written under new names (temp file, fsync, rename), then `faiss.json` is
   atomically replaced to point at them with the generation they reflect, then the manifest, then
   old files go. A writer makes them from the files published at the generation it started from plus
   the vectors it committed (update_published), where that gives what a rebuild gives, else from the
   store; after a run that wrote nothing, the published files stay as they are;
3. on open, FAISS files whose generation differs from the store's are stale: a reader uses them
   while a writer holds the lock (it sees the last finished snapshot; rows come from SQLite), and
   otherwise (a killed run) the indexes are rebuilt in memory from the stored vectors - never
   re-encoded. A file that is missing or unreadable is rebuilt the same way (before a new index's
   first publish, its readers build what its writer has committed so far);
4. a writer, on taking the lock, repairs what a killed writer left: it deletes temp files and FAISS
   files that faiss.json does not name, and republishes stale FAISS files from the store. Readers
   during the new run therefore see every batch the killed run had committed. A new index with
   nothing committed has nothing to publish yet.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .config import DB_NAME, LOCK_NAME, MODALITIES, IndexParams, Manifest, ModelRef, write_json_atomic
from .errors import IndexLockedError, IndexNotFoundError, MMSearchError
from .index import DEFAULT_MAX_MEMORY, VectorIndex, choose_index_type
from .store import Store, fault_point

log = logging.getLogger(__name__)

FAISS_STATE = "faiss.json"
FAISS_SUFFIX = ".faiss"
# An hnsw / ivfpq index grown by more than this share since it was built is rebuilt rather than
# updated: its IVF training and its tuned efSearch / nprobe were measured at the smaller size.
UPDATE_MAX_GROWTH = 0.25


@dataclass
class VectorChanges:
    """Which items an ingest run gave a new vector and which lost theirs, per modality, against the
    published FAISS files it started from: what `Collection.update_published` applies to them instead
    of a rebuild. Ids only: the vectors are read back from the store, the source of truth."""

    stored: dict[str, set[int]]  # ids with a vector of that modality when the run started
    added: dict[str, set[int]] = field(default_factory=lambda: {m: set() for m in MODALITIES})
    removed: dict[str, set[int]] = field(default_factory=lambda: {m: set() for m in MODALITIES})

    def replace(self, item_id: int, modality: str, present: bool) -> None:
        """The item's vector of `modality` was written anew (present) or deleted (not present)."""
        if item_id in self.added[modality]:
            self.added[modality].discard(item_id)  # added earlier in this run: not in the published file
        elif item_id in self.stored[modality]:
            self.removed[modality].add(item_id)  # the published file holds the old one
        if present:
            self.added[modality].add(item_id)

    def delete(self, item_ids) -> None:
        for item_id in item_ids:
            for modality in MODALITIES:
                self.replace(item_id, modality, False)


class Collection:
    def __init__(self, index_dir: Path, manifest: Manifest, store: Store):
        self.dir = index_dir
        self.manifest = manifest
        self.store = store
        self._indexes: dict[str, VectorIndex] = {}
        self._index_generation: dict[str, int] = {}  # the store generation each in-memory index reflects
        self._locked = False  # this object holds the write lock
        self._counted: tuple[int, dict[str, int]] | None = None  # (store generation, store.counts() at it)

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
        """Store first, manifest last (step 0): a run killed in between leaves a folder that the next
        run creates again, because the store it finds is still empty."""
        try:
            index_dir.mkdir(parents=True, exist_ok=True)
            store = Store(index_dir / DB_NAME)
            fault_point("store-created")
            if store.generation():
                store.close()
                raise MMSearchError(f"{index_dir} holds indexed items but no manifest.json; restore the "
                                    "manifest or use a new --index")
            manifest = Manifest(model=model, dim=dim)
            manifest.save(index_dir)
            fault_point("manifest-written")
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
    def write_lock(self, wait: bool = False, repair: bool = True):
        """One writer per index; a second one fails at once (or waits with wait=True).

        Holding the lock, the writer first repairs what a killed writer may have left (step 4)."""
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
                                       "wait for it to finish (or use --wait)") from exc
            _write_holder(fh, self.dir)
            self._locked = True
            if repair:
                self.repair()
            yield
        finally:
            self._locked = False
            fh.close()

    def writer_active(self) -> bool:
        """Another process (or another Collection object) holds the write lock."""
        path = self.dir / LOCK_NAME
        try:
            fh = open(path)
        except OSError:
            return False
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def _other_writer(self) -> bool:
        # flock conflicts between two open files of one process too: our own lock is not "a writer"
        return not self._locked and self.writer_active()

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
        # Twice: a writer may publish and delete the files named by the faiss.json we just read.
        for _ in range(2):
            state = self.faiss_state()
            generation = self.store.generation()
            filename = state.get("files", {}).get(modality)
            fresh = state.get("generation") == generation
            if not filename or not (fresh or self._other_writer()):
                break
            index = self._try_load(filename, modality, state, check_count=fresh)
            if index is not None:
                self._index_generation[modality] = state["generation"]
                return index
        if self._other_writer():  # e.g. a new index's first run: nothing published yet, batches committed
            log.info("%s is being written and has no usable FAISS files yet: %s vectors from the store",
                     self.dir, modality)
        elif state or self.store.generation():
            log.warning("FAISS files of %s are stale or unreadable (an interrupted run?): rebuilding %s "
                        "vectors from the store", self.dir, modality)
        return self.rebuild(modality, self.manifest.index.index_type)

    def _try_load(self, filename: str, modality: str, state: dict, check_count: bool) -> VectorIndex | None:
        """The published file, or None when it is gone, unreadable or does not match the store."""
        try:
            index = VectorIndex.load(self.dir / filename, _params(state.get("params", {}).get(modality),
                                                                  self.manifest.index))
        except (RuntimeError, OSError) as exc:  # faiss reports a missing or corrupt file as RuntimeError
            log.info("cannot load %s: %s", filename, str(exc).splitlines()[0] if str(exc) else exc)
            return None
        if index.index.d != self.dim:
            return None
        if check_count and index.ntotal != self._counts()[_COUNT_KEY[modality]]:
            return None
        return index

    def _counts(self) -> dict[str, int]:
        """store.counts() at the store's current generation, counted once per generation (every write
        bumps it): a run checks it for each FAISS file, and at 1M items one count takes 0.2-0.8 s.
        The generation is read first, so a commit in between makes the next call count again."""
        generation = self.store.generation()
        if self._counted is None or self._counted[0] != generation:
            self._counted = (generation, self.store.counts())
        return self._counted[1]

    def _wanted_type(self, index_type: str, counts: dict[str, int], max_memory: int) -> str:
        """The index type to publish: the one asked for, or auto's choice for the store's item count."""
        return index_type if index_type != "auto" else choose_index_type(counts["items"], self.dim, max_memory)

    def all_vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.store.iter_vectors(modality, self.dim))
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def rebuild(self, modality: str, index_type: str, max_memory: int = DEFAULT_MAX_MEMORY) -> VectorIndex:
        generation = self.store.generation()
        ids, vectors = self.all_vectors(modality)
        if len(ids) == 0:
            index = VectorIndex.empty(self.dim)
        else:
            index = VectorIndex.build(self.dim, ids, vectors, index_type, max_memory)
        self.adopt(modality, index, generation)
        return index

    def adopt(self, modality: str, index: VectorIndex, generation: int) -> None:
        """Use `index` as this modality's FAISS index, holding exactly the store's vectors of `generation`.

        An updater that adds a batch's vectors in memory calls this after the batch's commit, so that
        save_faiss publishes the index instead of rebuilding it; an index whose generation lags the
        store is never published (it would lack committed vectors)."""
        self._indexes[modality] = index
        self._index_generation[modality] = generation

    def update_published(self, changes: VectorChanges, since: int, index_type: str = "auto",
                         max_memory: int = DEFAULT_MAX_MEMORY) -> list[str]:
        """Bring the FAISS files published at store generation `since` up to the store by applying
        `changes` (removals, then the new vectors read from the store), so save_faiss publishes them
        instead of rebuilding every index from all stored vectors (at 1M items an hnsw build takes
        minutes).

        Returns the modalities updated. The others are left to save_faiss's rebuild: files of another
        generation or type, a removal from hnsw (it has none), an hnsw / ivfpq index that would take
        new vectors for more than UPDATE_MAX_GROWTH of what it held, or any FAISS error."""
        state = self.faiss_state()
        if state.get("generation") != since:
            return []
        counts = self._counts()
        wanted = self._wanted_type(index_type, counts, max_memory)
        generation, updated = self.store.generation(), []
        for modality in MODALITIES:
            index = self._updatable(modality, state, wanted, changes, counts[_COUNT_KEY[modality]])
            if index is not None and self._apply(index, modality, changes, counts[_COUNT_KEY[modality]]):
                self.adopt(modality, index, generation)
                updated.append(modality)
        return updated

    def _updatable(self, modality: str, state: dict, wanted: str, changes: VectorChanges,
                   count: int) -> VectorIndex | None:
        """The published index of `modality`, loaded into memory (a memory-mapped one cannot grow), if
        applying `changes` to it gives what a rebuild would; else None."""
        params = _params(state.get("params", {}).get(modality), self.manifest.index)
        filename = state.get("files", {}).get(modality)
        if not filename or params.index_type != wanted:
            return None
        if changes.removed[modality] and params.index_type == "hnsw":
            return None
        held = count - len(changes.added[modality]) + len(changes.removed[modality])  # before this run
        if params.index_type != "flat" and len(changes.added[modality]) > UPDATE_MAX_GROWTH * held:
            return None  # tuned (and for ivfpq trained) on what it held: rebuild and tune again
        try:
            return VectorIndex.load(self.dir / filename, params, mmap=False)
        except (RuntimeError, OSError) as exc:
            log.info("cannot load %s for an update: %s", filename, exc)
            return None

    def _apply(self, index: VectorIndex, modality: str, changes: VectorChanges, count: int) -> bool:
        """Remove, then add the changed vectors; False (rebuild it) when FAISS or the store disagrees."""
        ids = np.array(sorted(changes.added[modality]), dtype=np.int64)
        stored = self.store.vectors(ids.tolist(), modality, self.dim)
        if len(stored) != len(ids):
            return False  # cannot happen under the write lock; a rebuild is right whatever happened
        try:
            index.remove(np.array(sorted(changes.removed[modality]), dtype=np.int64))
            index.add(ids, np.stack([stored[i] for i in ids.tolist()]) if len(ids) else np.zeros((0, self.dim)))
        except RuntimeError as exc:
            log.info("cannot update the %s index in place (%s): rebuilding it", modality, exc)
            return False
        if index.ntotal != count:
            log.warning("the updated %s index holds %d vectors, the store %d: rebuilding it", modality,
                        index.ntotal, count)
            return False
        return True

    def repair(self) -> bool:
        """Writer only: delete leftovers of killed writers and republish stale FAISS files (step 4).

        Returns whether FAISS files were republished."""
        self._sweep()
        state = self.faiss_state()
        if not state and not self.store.generation():
            return False  # a new index: nothing committed yet, so nothing to publish (readers see it empty)
        files = state.get("files", {})
        intact = all(files.get(m) and (self.dir / files[m]).is_file() for m in MODALITIES)
        if intact and state.get("generation") == self.store.generation():
            return False
        if state or self.store.generation():  # not merely a new index
            log.warning("repairing %s: FAISS files do not reflect the store (an interrupted run?)", self.dir)
        self.save_faiss(self.manifest.index.requested)
        return True

    def save_faiss(self, index_type: str = "auto", max_memory: int = DEFAULT_MAX_MEMORY) -> None:
        """Bring FAISS files up to the store's generation and publish them atomically (step 2).

        A failure to write (disk full, read-only folder) is one MMSearchError; faiss.json keeps naming
        the previous files, which stay intact, and SQLite keeps every committed batch."""
        generation = self.store.generation()
        counts = self._counts()
        wanted = self._wanted_type(index_type, counts, max_memory)
        old = set(self.faiss_state().get("files", {}).values())
        try:
            files, params = self._write_files(generation, wanted, index_type, max_memory)
            write_json_atomic(self.dir / FAISS_STATE, {"generation": generation, "files": files, "params": params})
            fault_point("faiss-json-written")
            main = "image" if counts["images"] else "text"
            self.manifest.index = IndexParams(**params[main])
            self.manifest.save(self.dir)
        except (OSError, RuntimeError) as exc:
            self._discard_unpublished()
            raise MMSearchError(f"cannot write index files in {self.dir}: {_reason(exc)}; the index keeps "
                                "its previous FAISS files and every committed item") from exc
        fault_point("index-published")
        for name in old - set(files.values()):
            (self.dir / name).unlink(missing_ok=True)

    def _write_files(self, generation: int, wanted: str, index_type: str, max_memory: int):
        files, params = {}, {}
        state = self.faiss_state()
        for modality in MODALITIES:
            index = self._indexes.get(modality)
            current = self._index_generation.get(modality) == generation
            if index is None or not current or index.params.index_type != wanted:
                if kept := self._fresh_file(state, modality, generation, wanted):
                    files[modality] = kept  # published at this generation already: nothing to write
                    params[modality] = dict(state["params"][modality], requested=index_type)
                    continue
                index = self.rebuild(modality, wanted, max_memory)
            filename = f"{modality}-{generation}{FAISS_SUFFIX}"
            index.save(self.dir / filename)
            fault_point("faiss-file-written")
            files[modality] = filename
            index.params.requested = index_type
            params[modality] = asdict(index.params)
        return files, params

    def _fresh_file(self, state: dict, modality: str, generation: int, wanted: str) -> str | None:
        """The published file of `modality` if it already reflects `generation` with the wanted type
        (after a run that wrote nothing) and still loads with the store's count: republishing it as it
        is avoids a rebuild from the store. (A memory-mapped load reads the structure, not the vectors.)"""
        filename = state.get("files", {}).get(modality)
        stored = state.get("params", {}).get(modality) or {}
        if state.get("generation") != generation or not filename or stored.get("index_type") != wanted:
            return None
        return filename if self._try_load(filename, modality, state, check_count=True) is not None else None

    def _sweep(self) -> None:
        """Delete temp files and FAISS files that faiss.json does not name (left by killed writers)."""
        keep = set(self.faiss_state().get("files", {}).values())
        for path in self.dir.iterdir():
            name = path.name
            if (name.startswith(".") and name.endswith(".tmp")) or (name.endswith(FAISS_SUFFIX) and name not in keep):
                try:
                    path.unlink()
                except OSError as exc:  # a read-only folder: the write that follows reports it
                    log.info("cannot remove %s: %s", path, exc)

    def _discard_unpublished(self) -> None:
        try:
            self._sweep()
        except OSError:
            pass


_COUNT_KEY = {"image": "images", "text": "captions"}


def _write_holder(fh, index_dir: Path) -> None:
    """Name this process in the lock file, for the message a second writer gets."""
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
    except OSError as exc:  # a full disk: one clear line like every other write failure
        raise MMSearchError(f"cannot write to index {index_dir}: {exc.strerror or exc}") from exc


def _params(stored: dict | None, fallback: IndexParams) -> IndexParams:
    """IndexParams from faiss.json, ignoring keys another mmsearch version may have added."""
    if not stored:
        return IndexParams(**asdict(fallback))
    known = {f.name for f in fields(IndexParams)}
    return IndexParams(**{k: v for k, v in stored.items() if k in known})


def _reason(exc: BaseException) -> str:
    """One line: OSError's strerror, or the last line of faiss's multi-line C++ message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
