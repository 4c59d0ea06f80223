"""SQLite metadata and vector store (SQLAlchemy 2 typed models). The source of truth of an index.

Vectors live here as float32 blobs beside the rows, so FAISS files are a derived cache that can be
rebuilt at any time (crash recovery, `reindex` to another index type) without re-encoding.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sqlalchemy import (
    JSON,
    ForeignKey,
    String,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .config import SCHEMA_VERSION, now_iso
from .errors import MMSearchError, SchemaError

log = logging.getLogger(__name__)

FAULT_ENV = "MMSEARCH_FAULT_AT"
_fault_calls = 0


def fault_point(name: str) -> None:
    """Crash-test hook (tests/crash_harness.py): with MMSEARCH_FAULT_AT=N set, the Nth named point this
    process reaches kills it with SIGKILL, exactly like `kill -9` at that step of the commit protocol.

    Points: store-created, manifest-written (Collection.create), batch-committed, items-deleted (here),
    faiss-file-written (per modality), faiss-json-written, index-published (Collection.save_faiss).
    Unset - always, outside the harness - it costs one environment lookup per call."""
    global _fault_calls
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    _fault_calls += 1
    if _fault_calls == int(target):
        sys.stderr.write(f"mmsearch: fault injected at {name} (point {_fault_calls})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def db_errors(path: Path, action: str):
    """SQLite failures (disk full, read-only folder, corrupt file) as one clear MMSearchError line.

    The transaction that failed is rolled back by SQLite, so the store keeps its previous content."""
    try:
        yield
    except DBAPIError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise MMSearchError(f"cannot {action} index {path.parent}: {reason}") from exc


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)  # also the FAISS id
    key: Mapped[str] = mapped_column(String, unique=True, index=True)  # the catalog's id
    image: Mapped[str | None]  # absolute image path as ingested
    caption: Mapped[str | None]
    image_hash: Mapped[str | None]  # sha256 of the image bytes: re-encode only on change
    caption_hash: Mapped[str | None]
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    updated: Mapped[str] = mapped_column(String, default=now_iso)


class Vector(Base):
    __tablename__ = "vectors"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    modality: Mapped[str] = mapped_column(String, primary_key=True)  # 'image' or 'text'
    data: Mapped[bytes]  # float32, L2-normalised


class MetaField(Base):
    """Names of metadata fields seen in the catalog, so filters can reject unknown ones."""

    __tablename__ = "fields"

    name: Mapped[str] = mapped_column(primary_key=True)


class State(Base):
    __tablename__ = "state"

    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]


@dataclass
class ItemRecord:
    """What an ingest writes for one item: row values and freshly encoded vectors."""

    key: str
    image: str | None
    caption: str | None
    image_hash: str | None
    caption_hash: str | None
    meta: dict
    vectors: dict[str, np.ndarray | None]  # modality -> vector; a missing key keeps the stored one


# Schema upgrades: version N -> N+1 as a list of SQL statements (rclip-style ladder).
UPGRADES: dict[int, list[str]] = {}


class Store:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        self.engine = create_engine(f"sqlite:///{path}", future=True)
        event.listen(self.engine, "connect", _configure_connection)
        self._reader: sqlite3.Connection | None = None  # for _read, opened on first use
        self._reader_lock = threading.Lock()
        with db_errors(path, "open"):
            if not readonly:
                Base.metadata.create_all(self.engine)
            self._check_schema(readonly)

    def close(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        self.engine.dispose()

    # -- schema and state -------------------------------------------------------------------------
    def _check_schema(self, readonly: bool) -> None:
        version = self.get_state("schema_version")
        if version is None:
            if not readonly:
                self.set_state("schema_version", str(SCHEMA_VERSION))
            return
        version = int(version)
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{self.path}: store schema {version} is newer than supported ({SCHEMA_VERSION})")
        while version < SCHEMA_VERSION and not readonly:
            with self.engine.begin() as conn:
                for statement in UPGRADES[version]:
                    conn.exec_driver_sql(statement)
            version += 1
            self.set_state("schema_version", str(version))

    def get_state(self, key: str) -> str | None:
        with Session(self.engine) as session:
            row = session.get(State, key)
            return row.value if row else None

    def set_state(self, key: str, value: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.merge(State(key=key, value=value))

    def generation(self) -> int:
        """Bumped by every committed write; FAISS files record the generation they reflect."""
        return int(self.get_state("generation") or 0)

    # -- reads --------------------------------------------------------------------------------
    def fingerprints(self) -> dict[str, tuple[int, str | None, str | None, frozenset[str]]]:
        """key -> (id, image_hash, caption_hash, modalities with a vector) for incremental ingest.

        One statement on the driver (each run reads every row: at 1M items 10.6 s through the ORM)."""
        return {key: (item_id, image_hash, caption_hash, _HELD[has_image, has_text])
                for item_id, key, image_hash, caption_hash, has_image, has_text in self._read(_FINGERPRINTS, {})}

    def items(self, ids: Sequence[int]) -> dict[int, ItemRow]:
        """id -> the item's row (what a hit shows) for the ids that exist."""
        ids = [int(i) for i in ids]
        if 0 < len(ids) <= FEW_IDS:  # a page of hits: one parameter per id
            rows = self._read(_items_by_few_ids(len(ids)), {f"id{n}": i for n, i in enumerate(ids)})
        else:
            rows = self._read(_ITEMS_BY_ID, {"ids": _id_list(ids)})
        return {row[0]: ItemRow(*row[:6], json.loads(row[6] or "null") or {}, row[7]) for row in rows}

    def item_by_key(self, key: str) -> Item | None:
        with Session(self.engine, expire_on_commit=False) as session:
            item = session.scalars(select(Item).where(Item.key == key)).first()
            if item is not None:
                session.expunge(item)
            return item

    def vectors(self, ids: Sequence[int], modality: str, dim: int) -> dict[int, np.ndarray]:
        rows = self._read(_VECTORS_BY_ID, {"modality": modality, "ids": _id_list(ids)})
        return {item_id: np.frombuffer(data, dtype=np.float32, count=dim) for item_id, data in rows}

    def _read(self, statement: _Compiled, params: dict) -> list[tuple]:
        """Run a read compiled once (below) on a sqlite3 connection of its own, kept open.

        A query reads its hits' rows (and, on the general path, its candidates' vectors) this way:
        SQLAlchemy's execution and result layers were most of that read (10 rows of 1M: 150 us
        against 30 us), and right after the text encoder has run, its code is cold in the caches too;
        the pool's check-out and reset-on-return then took 0.14 ms of a 0.43 ms read. The connection
        is in autocommit mode, so each read is its own transaction and sees every committed write."""
        with self._reader_lock:
            try:
                if self._reader is None:
                    self._reader = _open_reader(self.path)
                return self._reader.execute(statement.sql, statement.args(params)).fetchall()
            except sqlite3.Error as exc:  # the raw driver's errors, as db_errors words SQLAlchemy's
                raise MMSearchError(f"cannot read index {self.path.parent}: {str(exc).splitlines()[0]}") from exc

    def iter_vectors(self, modality: str, dim: int, batch: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All vectors of one modality in id order, in batches: (ids int64, vectors float32)."""
        last = -1
        with Session(self.engine) as session:
            while True:
                stmt = (select(Vector.item_id, Vector.data)
                        .where(Vector.modality == modality, Vector.item_id > last)
                        .order_by(Vector.item_id).limit(batch))
                rows = session.execute(stmt).all()
                if not rows:
                    return
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                last = int(ids[-1])
                yield ids, vecs

    def counts(self) -> dict[str, int]:
        with Session(self.engine) as session:
            items = session.scalar(select(func.count()).select_from(Item)) or 0
            per_modality = dict(session.execute(
                select(Vector.modality, func.count()).group_by(Vector.modality)).all())
        return {"items": items, "images": per_modality.get("image", 0), "captions": per_modality.get("text", 0)}

    def field_names(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(MetaField.name)))

    def random_ids(self, n: int, seed: int = 0) -> list[int]:
        """A deterministic sample of up to n item ids (score calibration, recall checks).

        Ids are nearly dense (SQLite rowids), so candidates are drawn from [min, max] and the
        existing ones kept: O(n) rows read instead of every id (this runs on cold queries)."""
        with Session(self.engine) as session:
            low, high, count = session.execute(select(func.min(Item.id), func.max(Item.id), func.count())).one()
            if not count:
                return []
            if count <= n:
                return list(session.scalars(select(Item.id).order_by(Item.id)))
            rng = np.random.default_rng(seed)
            span = high - low + 1
            found: list[int] = []
            for _ in range(8):  # a few rounds suffice unless deletions left the id range very sparse
                draws = rng.choice(span, size=min(span, 4 * n), replace=False) + low
                for chunk in _chunks(sorted(set(draws.tolist()) - set(found)), 900):
                    found.extend(session.scalars(select(Item.id).where(Item.id.in_(chunk))))
                if len(found) >= n:
                    break
            return sorted(found[:n]) if len(found) >= n else self._all_sample(session, n, rng)

    @staticmethod
    def _all_sample(session: Session, n: int, rng) -> list[int]:
        ids = list(session.scalars(select(Item.id)))
        return sorted(int(i) for i in rng.choice(ids, size=n, replace=False))

    # -- writes -------------------------------------------------------------------------------
    def write_batch(self, records: Iterable[ItemRecord]) -> dict[str, int]:
        """Insert or update items and their vectors in ONE transaction; returns key -> id.

        Bulk statements (one INSERT and one SELECT of the new ids, one UPDATE by id, one DELETE per
        modality, one INSERT of vectors) rather than ORM objects per row: the ingest writer thread
        holds the GIL for a fraction of the time, which the decode threads need."""
        by_key = {rec.key: rec for rec in records}  # a key twice in one batch: the last one wins
        stamp = now_iso()
        with db_errors(self.path, "write to"), Session(self.engine) as session, session.begin():
            ids = self._ids_of(session, list(by_key))
            rows = [{"key": rec.key, "image": rec.image, "caption": rec.caption, "meta": rec.meta,
                     "image_hash": rec.image_hash, "caption_hash": rec.caption_hash, "updated": stamp}
                    for rec in by_key.values()]
            if old := [dict(row, id=ids[row["key"]]) for row in rows if row["key"] in ids]:
                session.execute(update(Item), old)
            if new := [row for row in rows if row["key"] not in ids]:
                # executemany, then the ids by key: SQLite cannot batch an ordered INSERT ... RETURNING,
                # so SQLAlchemy would run one statement per row (32 per batch instead of 2)
                session.execute(insert(_ITEMS), new)  # Core: no ORM bulk-insert bookkeeping per row
                ids.update(self._ids_of(session, [row["key"] for row in new]))
            self._replace_vectors(session, by_key.values(), ids)
            fields = set(session.scalars(select(MetaField.name)))
            if added := sorted({name for rec in by_key.values() for name in rec.meta} - fields):
                session.execute(insert(MetaField), [{"name": name} for name in added])
            _bump_generation(session)
        fault_point("batch-committed")
        return ids

    @staticmethod
    def _ids_of(session: Session, keys: list[str]) -> dict[str, int]:
        ids: dict[str, int] = {}
        for chunk in _chunks(keys, 900):
            rows = session.execute(_IDS_BY_KEY, {"keys": chunk})
            ids.update({key: item_id for key, item_id in rows})
        return ids

    @staticmethod
    def _replace_vectors(session: Session, records: Iterable[ItemRecord], ids: dict[str, int]) -> None:
        """Each record's listed modalities are replaced (None: removed); unlisted ones are kept."""
        records = list(records)
        for modality in sorted({m for rec in records for m in rec.vectors}):
            touched = [ids[rec.key] for rec in records if modality in rec.vectors]
            for chunk in _chunks(touched, 900):
                session.execute(_DELETE_VECTORS, {"modality": modality, "ids": chunk})
        rows = [{"item_id": ids[rec.key], "modality": modality, "data": np.asarray(vec, dtype=np.float32).tobytes()}
                for rec in records for modality, vec in rec.vectors.items() if vec is not None]
        if rows:
            session.execute(insert(_VECTORS), rows)

    def delete_items(self, ids: Sequence[int]) -> None:
        with db_errors(self.path, "write to"), Session(self.engine) as session, session.begin():
            for chunk in _chunks(list(ids), 900):
                session.execute(delete(Vector).where(Vector.item_id.in_(chunk)))
                session.execute(delete(Item).where(Item.id.in_(chunk)))
            _bump_generation(session)
        fault_point("items-deleted")


class ItemRow(NamedTuple):
    """An item's row as Store.items reads it: Item's columns, in the table's order."""

    id: int
    key: str
    image: str | None
    caption: str | None
    image_hash: str | None
    caption_hash: str | None
    meta: dict
    updated: str


@dataclass(frozen=True)
class _Compiled:
    """A Core statement compiled once to SQLite's SQL with positional parameters."""

    sql: str
    names: tuple[str, ...]
    defaults: dict  # the values bound in the statement itself

    @classmethod
    def of(cls, statement) -> _Compiled:
        compiled = statement.compile(dialect=sqlite_dialect.dialect())
        return cls(str(compiled), tuple(compiled.positiontup), dict(compiled.params))

    def args(self, params: dict) -> tuple:
        return tuple(params[name] if name in params else self.defaults[name] for name in self.names)


def _id_list(ids: Iterable[int]) -> str:
    """Ids as one JSON array parameter: `IN (SELECT value FROM json_each(?))` keeps the SQL constant
    for any number of ids (an expanding IN renders the statement again on every call)."""
    return json.dumps([int(i) for i in ids])


# The statements run per ingest batch (the writer) and per query (hits' rows, candidates' vectors),
# built once: an IN over a list literal is coerced value by value and compiled again on every call;
# an expanding parameter is not. Core tables: no ORM bookkeeping per row. The two query reads are
# compiled to SQL once and run on the driver itself (Store._read).
_ITEMS, _VECTORS = Item.__table__, Vector.__table__
_ID_SET = select(func.json_each(bindparam("ids")).table_valued("value").c.value)
_ITEMS_BY_ID = _Compiled.of(select(_ITEMS).where(_ITEMS.c.id.in_(_ID_SET)))
assert ItemRow._fields == tuple(_ITEMS.c.keys()), "ItemRow must follow the items table's columns"
# Up to this many ids (a query's page of hits) are bound one parameter each, `id IN (?, ?, ...)`: a
# warm query reads its hits right after the text encoder has flushed the CPU caches, and there the
# json_each table of _ID_SET cost 0.31 against 0.22 ms for 10 rows of 1M (one statement per count,
# each compiled once).
FEW_IDS = 32


@functools.lru_cache(maxsize=FEW_IDS)
def _items_by_few_ids(count: int) -> _Compiled:
    return _Compiled.of(select(_ITEMS).where(_ITEMS.c.id.in_([bindparam(f"id{n}") for n in range(count)])))


_VECTORS_BY_ID = _Compiled.of(select(_VECTORS.c.item_id, _VECTORS.c.data).where(
    _VECTORS.c.modality == bindparam("modality"), _VECTORS.c.item_id.in_(_ID_SET)))


def _has_vector(modality: str):
    return exists().where(_VECTORS.c.item_id == _ITEMS.c.id, _VECTORS.c.modality == bindparam(modality, modality))


_FINGERPRINTS = _Compiled.of(select(_ITEMS.c.id, _ITEMS.c.key, _ITEMS.c.image_hash, _ITEMS.c.caption_hash,
                                    _has_vector("image"), _has_vector("text")))
_HELD = {(i, t): frozenset(m for m, has in (("image", i), ("text", t)) if has) for i in (0, 1) for t in (0, 1)}
_IDS_BY_KEY = select(_ITEMS.c.key, _ITEMS.c.id).where(_ITEMS.c.key.in_(bindparam("keys", expanding=True)))
_DELETE_VECTORS = delete(_VECTORS).where(_VECTORS.c.modality == bindparam("modality"),
                                         _VECTORS.c.item_id.in_(bindparam("ids", expanding=True)))


def _bump_generation(session: Session) -> None:
    row = session.get(State, "generation")
    value = int(row.value) + 1 if row else 1
    session.merge(State(key="generation", value=str(value)))


def _configure_connection(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block on the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _open_reader(path: Path) -> sqlite3.Connection:
    """A connection for Store._read: any thread (reads hold the store's lock), autocommit."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        _configure_connection(conn, None)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _chunks(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _condition_clause(cond):
    """SQL expression for one filter; the JSON path and the value are both bound parameters."""
    from sqlalchemy import String as Str
    from sqlalchemy import cast

    column = func.json_extract(Item.meta, "$." + _json_key(cond.field))
    if cond.op == "~":
        return func.instr(func.lower(cast(column, Str)), cond.value.lower()) > 0
    if cond.op in ("=", "!="):
        # a metadata value may be stored as text ("42") or number (42): match either form
        variants = {cond.value, str(cond.value)}
        clause = column.in_(sorted(variants, key=str))
        return clause if cond.op == "=" else (~clause | column.is_(None))
    ops = {"<": column.__lt__, ">": column.__gt__, "<=": column.__le__, ">=": column.__ge__}
    return ops[cond.op](cond.value) & (func.json_type(Item.meta, "$." + _json_key(cond.field)).in_(["integer", "real"]))


def _json_key(field: str) -> str:
    return '"' + field.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filter_ids(store: Store, conditions) -> np.ndarray:
    """Ids of items matching every condition (AND); unknown fields are a QueryError."""
    from .errors import QueryError

    known = store.field_names()
    for cond in conditions:
        if cond.field not in known:
            raise QueryError(f"unknown filter field {cond.field!r}; known fields: {', '.join(sorted(known)) or 'none'}")
    stmt = select(Item.id)
    for cond in conditions:
        stmt = stmt.where(_condition_clause(cond))
    with Session(store.engine) as session:
        return np.fromiter(session.scalars(stmt), dtype=np.int64)
