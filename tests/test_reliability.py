"""Crash safety, disk-full and read-only folders, and security of what is loaded and executed.

"Consistent" (tests/crash_harness.check_consistent): opening the collection as a reader gives, per
modality, FAISS ids == SQLite vector ids (each once), published files of the current generation hold
exactly those ids, and a reader search succeeds.
"""

import ast
import errno
import hashlib
import json
import os
import pickle
import re
import sqlite3
import tokenize
from contextlib import contextmanager
from pathlib import Path

import faiss
import pytest
from click.testing import CliRunner
from crash_harness import Harness, check_consistent, run_cli_subprocess

import mmsearch
from mmsearch import collection as collection_module
from mmsearch import ingest as ingest_module
from mmsearch import store as store_module
from mmsearch.cli import cli
from mmsearch.collection import Collection
from mmsearch.config import DB_NAME
from mmsearch.errors import IndexNotFoundError, MMSearchError, SchemaError
from mmsearch.ingest import IngestOptions, ingest
from mmsearch.search import Searcher, build_query
from mmsearch.store import Store

PACKAGE = Path(mmsearch.__file__).parent
MARKER = "mmsearch-pwned"


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def index_cmd(catalog, index, *extra, ok=True):
    return run("index", catalog, "--index", index, "-q", "--format", "json", *extra, ok=ok)


def search_ids(index, text="a red ankle boot", target="item"):
    out = run("search", text, "--index", index, "--target", target, "-k", "20", "--format", "json").stdout
    return [r["id"] for r in json.loads(out)["results"]]


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def folder_is_clean(index: Path) -> None:
    """No temp files; the only FAISS files are the two that faiss.json names."""
    state = json.loads((index / "faiss.json").read_text())
    names = {p.name for p in index.iterdir()}
    assert not [n for n in names if n.endswith(".tmp")], names
    assert {n for n in names if n.endswith(".faiss")} == set(state["files"].values()), names


def published_is_fresh(index: Path) -> bool:
    with _opened(index) as collection:
        return collection.faiss_state().get("generation") == collection.store.generation()


@contextmanager
def _opened(index: Path):
    collection = Collection.open(index)
    try:
        yield collection
    finally:
        collection.close()


@pytest.fixture
def indexed(tmp_path, catalog_dir, tiny_checkpoint):
    """The committed catalog indexed through the CLI: (catalog csv, index folder)."""
    index = tmp_path / "idx"
    run("index", catalog_dir / "catalog.csv", "--index", index, "--model", "mmsearch-tiny", "--pretrained",
        tiny_checkpoint, "-q")
    return catalog_dir / "catalog.csv", index


def add_row(csv: Path, row: str = "sock-2,,a pair of cotton socks,Socks,4,white") -> None:
    csv.write_text(csv.read_text() + row + "\n")


# -- the fault-injection harness ---------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_seeded_points_loses_nothing(tmp_path, tiny_checkpoint, tiny_encoder, capsys):
    summary = Harness(tmp_path, tiny_checkpoint, tiny_encoder, n_items=300, seed=0).run(kills=20, timed=4)
    with capsys.disabled():
        print("\n" + summary.line())
    assert summary.kills >= 20 and summary.hook_kills >= 20 and summary.re_encoded == 0
    assert {"store-created", "manifest-written", "batch-committed"} <= set(summary.by_point)
    assert len(summary.by_point) >= 4  # also kills inside FAISS publishing


# -- every window of the commit protocol, in process -----------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no `except Exception` cleanup runs on the way out."""


def kill_at(monkeypatch, point: str, nth: int = 1) -> None:
    seen = {"n": 0}

    def fault_point(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == nth:
                raise Killed(name)

    monkeypatch.setattr(store_module, "fault_point", fault_point)
    monkeypatch.setattr(collection_module, "fault_point", fault_point)


WINDOWS = [("store-created", 1), ("manifest-written", 1), ("batch-committed", 2), ("faiss-file-written", 1),
           ("faiss-file-written", 2), ("faiss-json-written", 1), ("index-published", 1)]


@pytest.mark.parametrize("point,nth", WINDOWS)
def test_killed_in_each_window_then_resumed(tmp_path, catalog_dir, tiny_encoder, monkeypatch, point, nth):
    """nth counts from the first run of a new index (its lock-time repair publishes nothing: no item yet)."""
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    options = IngestOptions(batch_size=4, workers=1)
    kill_at(monkeypatch, point, nth)
    with pytest.raises(Killed):
        ingest(csv, index, options, encoder=tiny_encoder)
    monkeypatch.undo()
    if (index / "manifest.json").exists():
        check_consistent(index, tiny_encoder)
    else:
        with pytest.raises(IndexNotFoundError):
            Searcher(index, encoder=tiny_encoder)
    committed = _item_count(index)
    report = ingest(csv, index, options, encoder=tiny_encoder)
    assert (report.unchanged, report.added, report.updated) == (committed, 9 - committed, 0)
    assert check_consistent(index, tiny_encoder)["fresh"]
    folder_is_clean(index)


def _item_count(index: Path) -> int:
    if not (index / DB_NAME).exists():
        return 0
    with sqlite3.connect(index / DB_NAME) as conn:
        return conn.execute("SELECT count(*) FROM items").fetchone()[0]


def test_resume_counts_committed_batches_unchanged(tmp_path, catalog_dir, tiny_encoder, monkeypatch):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    kill_at(monkeypatch, "batch-committed", 2)
    with pytest.raises(Killed):
        ingest(csv, index, IngestOptions(batch_size=3), encoder=tiny_encoder)
    monkeypatch.undo()
    report = ingest(csv, index, IngestOptions(batch_size=3), encoder=tiny_encoder)
    committed = max(1, 3 // ingest_module.FIRST_BATCH_DIVISOR) + 3  # a short first batch, then a full one
    assert (report.unchanged, report.added) == (committed, 9 - committed)


def test_new_items_are_fingerprinted_as_they_decode_and_read_once(tmp_path, catalog_dir, tiny_encoder, monkeypatch):
    """A new item's image hash comes from the decode job's single read; it must equal the whole-file
    hash the next run compares against, or every re-run would re-encode the catalog."""
    opened: list[str] = []
    real_open = ingest_module.open_image_file

    def counting_open(path, label):
        opened.append(Path(path).name)
        return real_open(path, label)

    monkeypatch.setattr(ingest_module, "open_image_file", counting_open)
    monkeypatch.setattr("mmsearch.images.open_image_file", counting_open)
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    report = ingest(csv, index, IngestOptions(batch_size=3), encoder=tiny_encoder)
    assert report.added == 9 and len(report.failed) == 2  # the non-image and the truncated JPEG
    assert sorted(opened) == sorted(set(opened)) and len(opened) == 10  # every image file read once
    collection = Collection.open(index)
    try:
        stored = collection.store.fingerprints()
    finally:
        collection.close()
    images = [key for key, (_, image_hash, _, _) in stored.items() if image_hash]
    for key in images:
        path = next((catalog_dir / "images").glob(f"{key}.*"))
        assert stored[key][1] == hashlib.sha256(path.read_bytes()).hexdigest(), key
    assert len(images) == 8
    again = ingest(csv, index, IngestOptions(batch_size=3), encoder=tiny_encoder)
    assert (again.unchanged, again.added, again.updated) == (9, 0, 0)


def test_half_created_index_is_recovered(tmp_path, catalog_dir, tiny_encoder):
    """A folder with a store but no manifest is 'no index' to readers and is created again."""
    index = tmp_path / "idx"
    index.mkdir()
    Store(index / DB_NAME).close()
    with pytest.raises(IndexNotFoundError):
        Collection.open(index)
    Collection.create(index, tiny_encoder.ref, tiny_encoder.dim).close()  # killed right after the manifest
    with Searcher(index, encoder=tiny_encoder) as searcher:
        assert searcher.search(build_query(texts=["boot"])).results == []
    report = ingest(catalog_dir / "catalog.csv", index, encoder=tiny_encoder)
    assert report.added == 9
    check_consistent(index, tiny_encoder)


def test_a_store_with_items_but_no_manifest_is_not_overwritten(tmp_path, tiny_encoder, indexed):
    _, index = indexed
    (index / "manifest.json").unlink()
    with pytest.raises(MMSearchError, match="holds indexed items but no manifest"):
        Collection.create(index, tiny_encoder.ref, tiny_encoder.dim)


def test_orphans_of_killed_writers_are_swept(indexed):
    csv, index = indexed
    orphans = [".image-7.faiss.4242.tmp", ".faiss.json.k3j2.tmp", ".manifest.json.x1.tmp", "text-77.faiss"]
    for name in orphans:
        (index / name).write_bytes(b"half a file")
    assert "boot-red" in search_ids(index)  # readers ignore them
    report = json.loads(index_cmd(csv, index).stdout)
    assert report["unchanged"] == 9
    assert not [n for n in orphans if (index / n).exists()]
    folder_is_clean(index)


def commit_text_item(collection: Collection, encoder, key: str, caption: str) -> None:
    """One committed batch of one caption-only item, without publishing FAISS files (as a killed run leaves it)."""
    vec = encoder.encode_texts([caption])[0]
    collection.store.write_batch([store_module.ItemRecord(key, None, caption, None, "h", {}, {"text": vec})])


def test_stale_faiss_files_are_repaired_when_the_writer_starts(indexed, tiny_encoder):
    """A killed run committed a batch but never published FAISS: the next writer republishes at once,
    so readers during its run already see everything that was committed."""
    csv, index = indexed
    with _opened(index) as collection:
        commit_text_item(collection, tiny_encoder, "ghost", "a committed but unpublished item")
    assert not published_is_fresh(index)
    check_consistent(index, tiny_encoder)  # a reader rebuilds in memory: ghost is findable
    assert search_ids(index, "a committed but unpublished item", "text")[0] == "ghost"
    with _opened(index) as collection, collection.write_lock():
        assert published_is_fresh(index)  # repaired before the writer does anything else
    folder_is_clean(index)


def test_a_new_index_publishes_its_faiss_files_once_it_holds_items(tmp_path, tiny_encoder):
    """The writer's lock-time repair leaves a brand-new, empty index alone (nothing to publish: the
    encoder starts sooner); readers see it empty, and the first committed batch makes the next
    writer republish."""
    index = tmp_path / "idx"
    collection = Collection.create(index, tiny_encoder.ref, tiny_encoder.dim)
    try:
        with collection.write_lock():
            assert not (index / "faiss.json").exists()
        assert collection.vector_index("image").ntotal == 0
        commit_text_item(collection, tiny_encoder, "first", "the first committed item")
        with collection.write_lock():
            assert (index / "faiss.json").exists() and published_is_fresh(index)
    finally:
        collection.close()
    check_consistent(index, tiny_encoder)
    folder_is_clean(index)


def test_a_reader_during_a_new_index_first_run_sees_its_committed_batches(tmp_path, tiny_encoder, caplog):
    """Before the first publish a reader builds the committed vectors from the store, quietly: the files
    are missing because a writer is still on its first run, not because one was killed."""
    index = tmp_path / "idx"
    writer = Collection.create(index, tiny_encoder.ref, tiny_encoder.dim)
    try:
        with writer.write_lock():
            commit_text_item(writer, tiny_encoder, "early", "a batch committed during the first run")
            with caplog.at_level("WARNING", logger=collection_module.log.name), _opened(index) as reader:
                assert reader.vector_index("text").ntotal == 1
            assert "stale or unreadable" not in caplog.text
        with caplog.at_level("WARNING", logger=collection_module.log.name), _opened(index) as reader:
            assert reader.vector_index("text").ntotal == 1  # no writer now: a killed first run, said so
        assert "stale or unreadable" in caplog.text
    finally:
        writer.close()


def test_corrupt_published_faiss_file_falls_back_to_the_store(indexed, tiny_encoder):
    csv, index = indexed
    state = json.loads((index / "faiss.json").read_text())
    (index / state["files"]["image"]).write_bytes(b"\0garbage" * 100)
    check_consistent_ids_only(index)
    assert search_ids(index)[:1]


def check_consistent_ids_only(index: Path) -> None:
    with _opened(index) as collection:
        for modality in ("image", "text"):
            got = faiss.vector_to_array(faiss.downcast_index(collection.vector_index(modality).index).id_map)
            with sqlite3.connect(index / DB_NAME) as conn:
                want = [r[0] for r in conn.execute("SELECT item_id FROM vectors WHERE modality = ?", (modality,))]
            assert sorted(got.tolist()) == sorted(want)


# -- disk full, read-only folders: one clear line, no damage ---------------------------------------------
def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_faiss_files(indexed, monkeypatch):
    csv, index = indexed
    before = (index / "faiss.json").read_text()
    add_row(csv)

    def write_half(_index, path):
        Path(path).write_bytes(b"partial")  # what a full disk leaves behind
        enospc()

    monkeypatch.setattr(faiss, "write_index", write_half)
    one_line_error(index_cmd(csv, index, ok=False), "cannot write index files", "No space left on device")
    monkeypatch.undo()
    assert (index / "faiss.json").read_text() == before  # the previous FAISS files stay published
    folder_is_clean(index)
    check_consistent_ids_only(index)
    assert "boot-red" in search_ids(index)
    report = json.loads(index_cmd(csv, index).stdout)  # space freed: nothing to re-encode
    assert (report["added"], report["unchanged"]) == (0, 10)
    assert published_is_fresh(index)


def test_disk_full_while_replacing_faiss_json(indexed, monkeypatch):
    csv, index = indexed
    before = (index / "faiss.json").read_text()
    add_row(csv)
    monkeypatch.setattr(collection_module, "write_json_atomic", enospc)
    one_line_error(index_cmd(csv, index, ok=False), "No space left on device")
    monkeypatch.undo()
    assert (index / "faiss.json").read_text() == before
    folder_is_clean(index)
    check_consistent_ids_only(index)
    assert "boot-red" in search_ids(index)


def test_disk_full_in_sqlite(indexed, monkeypatch):
    """SQLite's own SQLITE_FULL (max_page_count caps the file at its size): the batch rolls back."""
    csv, index = indexed
    with sqlite3.connect(index / DB_NAME) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    configure = store_module._configure_connection

    def capped(dbapi_conn, record):
        configure(dbapi_conn, record)
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    monkeypatch.setattr(store_module, "_configure_connection", capped)
    for i in range(40):
        add_row(csv, f"new-{i},,{'a long caption to fill pages ' * 40},Socks,4,white")
    one_line_error(index_cmd(csv, index, ok=False), "cannot write to index", "full")
    monkeypatch.undo()
    assert _item_count(index) == 9 and published_is_fresh(index)
    check_consistent_ids_only(index)
    assert "boot-red" in search_ids(index)


def test_read_only_database(indexed, monkeypatch):
    """SQLite refusing writes (a read-only file or mount), simulated with query_only."""
    csv, index = indexed
    configure = store_module._configure_connection

    def read_only(dbapi_conn, record):
        configure(dbapi_conn, record)
        dbapi_conn.execute("PRAGMA query_only = ON")

    monkeypatch.setattr(store_module, "_configure_connection", read_only)
    add_row(csv)
    one_line_error(index_cmd(csv, index, ok=False), "cannot write to index", "readonly")
    monkeypatch.undo()
    assert _item_count(index) == 9
    assert "boot-red" in search_ids(index)


def test_read_only_index_folder_simulated(indexed, monkeypatch):
    """Root ignores chmod, so refuse the lock file's open the way a read-only folder would."""
    csv, index = indexed
    real_open = open

    def deny_writes(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(index)) and any(c in mode for c in "wa+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny_writes)
    add_row(csv)
    one_line_error(index_cmd(csv, index, ok=False), f"cannot write to index {index}", "Permission denied")
    monkeypatch.undo()
    assert "boot-red" in search_ids(index)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into mode-555 folders; see the simulated test")
def test_read_only_index_folder(indexed):
    csv, index = indexed
    add_row(csv)
    os.chmod(index, 0o555)
    try:
        one_line_error(index_cmd(csv, index, ok=False), "cannot write to index")
        assert "boot-red" in search_ids(index)
    finally:
        os.chmod(index, 0o755)


# -- security: nothing unpickled, no string-built SQL, paths never executed --------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def package_sources():
    return sorted(PACKAGE.rglob("*.py"))


def _unsafe_loading(path: Path) -> list[str]:
    """Imports of pickling modules, eval/exec, yaml.load, np.load(allow_pickle=True), torch.load without
    weights_only=True."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            out += [f"{path.name}:{node.lineno}: imports {n}" for n in names if n and n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        owner = getattr(getattr(node.func, "value", None), "id", None)
        keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        if (isinstance(node.func, ast.Name) and name in ("eval", "exec")) or (owner, name) == ("yaml", "load"):
            out.append(f"{path.name}:{node.lineno}: {name}()")
        if name == "load" and owner in ("np", "numpy") and keywords.get("allow_pickle") is True:
            out.append(f"{path.name}:{node.lineno}: np.load(allow_pickle=True)")
        if name == "load" and owner == "torch" and keywords.get("weights_only") is not True:
            out.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
    return out


def test_nothing_is_unpickled():
    problems = [p for path in package_sources() for p in _unsafe_loading(path)]
    assert not problems, "\n".join(problems)


def test_the_unpickling_check_catches_loaders(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nimport numpy as np\n"
                   "def f(p):\n    torch.load(p)\n    np.load(p, allow_pickle=True)\n    eval(p)\n")
    assert len(_unsafe_loading(bad)) == 4


def test_faiss_read_index_is_the_only_index_loader():
    users = {p.name for p in package_sources() if "read_index" in p.read_text(encoding="utf-8")}
    assert users == {"index.py"}


def test_manifest_and_faiss_state_are_json(indexed):
    _, index = indexed
    assert json.loads((index / "manifest.json").read_text())["schema_version"] >= 1
    assert set(json.loads((index / "faiss.json").read_text())) == {"generation", "files", "params"}


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch /tmp/{MARKER}",))


@pytest.mark.parametrize("target", ["manifest.json", "faiss.json", "faiss-file"])
def test_pickles_planted_in_an_index_are_never_executed(indexed, target):
    _, index = indexed
    Path(f"/tmp/{MARKER}").unlink(missing_ok=True)
    name = json.loads((index / "faiss.json").read_text())["files"]["image"] if target == "faiss-file" else target
    (index / name).write_bytes(pickle.dumps(_Payload()))
    if target == "manifest.json":
        with pytest.raises(SchemaError, match="unreadable manifest"):
            Collection.open(index)
        one_line_error(run("search", "boot", "--index", index, ok=False), "unreadable manifest")
    else:
        assert "boot-red" in search_ids(index)  # rebuilt from the store instead
    assert not Path(f"/tmp/{MARKER}").exists()


SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|DROP|PRAGMA)\b")
EXEC_METHODS = {"execute", "executescript", "executemany", "exec_driver_sql"}
UPGRADE_LADDER = ("store.py", "_check_schema")  # runs the fixed statements of store.UPGRADES


def test_no_string_built_sql():
    problems = []
    for path in package_sources():
        source = path.read_text(encoding="utf-8")
        problems += _sql_text_imports(path, source)
        problems += _dynamic_sql_strings(path)
        problems += _exec_calls(path, ast.parse(source))
    assert not problems, "\n".join(problems)


def _sql_text_imports(path: Path, source: str) -> list[str]:
    hits = re.findall(r"from sqlalchemy[\w.]* import [^\n]*\btext\b|\bsa\.text\(|sqlalchemy\.text\(", source)
    return [f"{path.name}: sqlalchemy text(): {h}" for h in hits]


def _dynamic_sql_strings(path: Path) -> list[str]:
    """f-strings, %-formatting and .format() whose literal text contains SQL keywords."""
    out = []
    with open(path, "rb") as fh:
        tokens = list(tokenize.tokenize(fh.readline))
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.STRING or not SQL_WORDS.search(tok.string):
            continue
        prefix = tok.string[: tok.string.index(tok.string.lstrip("rRbBuUfF")[0])].lower()
        following = tokens[i + 1].string if i + 1 < len(tokens) else ""
        after = tokens[i + 2].string if i + 2 < len(tokens) else ""
        if "f" in prefix or following == "%" or (following == "." and after == "format"):
            out.append(f"{path.name}:{tok.start[0]}: SQL built from a string: {tok.string[:60]}")
    return out


def _exec_calls(path: Path, tree: ast.AST) -> list[str]:
    """Raw execute calls: only constant strings (PRAGMAs), and exec_driver_sql only in the upgrade ladder."""
    out = []
    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for call in [n for n in ast.walk(func) if isinstance(n, ast.Call)]:
            name = getattr(call.func, "attr", None)
            if name not in EXEC_METHODS or not call.args:
                continue
            arg = call.args[0]
            if name == "exec_driver_sql" and (path.name, func.name) != UPGRADE_LADDER:
                out.append(f"{path.name}:{call.lineno}: exec_driver_sql outside the schema-upgrade ladder")
            elif isinstance(arg, (ast.JoinedStr, ast.BinOp)) or (
                    isinstance(arg, ast.Call) and getattr(arg.func, "attr", None) == "format"):
                out.append(f"{path.name}:{call.lineno}: {name}() of a built string")
    return out


def test_the_sql_check_catches_string_built_sql(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(conn, k):\n    conn.execute(f"SELECT * FROM items WHERE key = \'{k}\'")\n'
                   '    conn.execute("DELETE FROM items WHERE id = %s" % k)\n'
                   '    conn.exec_driver_sql("DROP TABLE items")\n')
    found = _dynamic_sql_strings(bad) + _exec_calls(bad, ast.parse(bad.read_text()))
    assert len(found) >= 4, found


HOSTILE_IDS = ["x'; DROP TABLE items; --", '" OR 1=1 --', "robert'); DELETE FROM vectors; --"]


def test_filter_and_id_injection(indexed, tiny_encoder):
    csv, index = indexed
    for i, key in enumerate(HOSTILE_IDS):
        add_row(csv, '"' + key.replace('"', '""') + f'",,injected caption {i},Shoes,1,red')
    assert json.loads(index_cmd(csv, index).stdout)["added"] == 3
    with Searcher(index, encoder=tiny_encoder) as searcher:
        hits = searcher.search(build_query(texts=["injected caption 0"], target="text", k=3)).results
        assert hits[0].id == HOSTILE_IDS[0]
        for where in (["category=Shoes' OR '1'='1"], ["category~%"], ["category~_"], ["color=red' --"]):
            assert searcher.search(build_query(texts=["boot"], where=where)).results == []
        shoes = searcher.search(build_query(texts=["boot"], target="text", where=["category=Shoes"], k=50))
        assert len(shoes.results) == 7
    result = run("search", "boot", "--index", index, "--where", 'x"); DROP TABLE items; --=1', ok=False)
    one_line_error(result, "unknown filter field")
    assert _item_count(index) == 12


@pytest.mark.slow
def test_paths_are_never_executed_and_nothing_is_written_outside_the_index(tmp_path, catalog_dir, tiny_checkpoint):
    """A real `python -m mmsearch index` run with cwd, HOME and TMPDIR in fresh folders: afterwards only
    the index folder is new; shell syntax in image paths is a missing file, never a command."""
    csv = catalog_dir / "catalog.csv"
    add_row(csv, "subst,$(touch pwned-subst).jpg,a,Hats,1,red")
    add_row(csv, 'chain,"x.jpg; touch pwned-chain; #",a,Hats,1,red')
    add_row(csv, "backtick,`touch pwned-tick`.jpg,a,Hats,1,red")
    places = {name: tmp_path / name for name in ("cwd", "home", "tmp", "out")}
    for folder in places.values():
        folder.mkdir()
    before = {name: _listing(folder) for name, folder in [*places.items(), ("catalog", catalog_dir)]}
    env = {"HOME": str(places["home"]), "TMPDIR": str(places["tmp"])}
    index = places["out"] / "idx"
    done = run_cli_subprocess(["index", str(csv), "--index", str(index), "--model", "mmsearch-tiny",
                               "--pretrained", str(tiny_checkpoint), "-q", "--format", "json"],
                              cwd=places["cwd"], env=env)
    assert done.returncode == 0, done.stderr
    reasons = {f["item"]: f["reason"] for f in json.loads(done.stdout)["failed"]}
    assert {"subst", "chain", "backtick"} <= set(reasons)
    assert all("image file not found" in reasons[k] for k in ("subst", "chain", "backtick"))
    after = {name: _listing(folder) for name, folder in [*places.items(), ("catalog", catalog_dir)]}
    assert after["out"] - before["out"] and all(p.startswith("idx") for p in after["out"] - before["out"])
    for name in ("cwd", "home", "tmp", "catalog"):
        assert after[name] == before[name], f"{name} changed: {after[name] ^ before[name]}"
    assert not list(tmp_path.rglob("pwned*"))


def _listing(folder: Path) -> set[str]:
    """Relative paths with size and mtime: any file created, changed or removed shows."""
    out = set()
    for path in folder.rglob("*"):
        st = path.lstat()
        out.add(f"{path.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}")
    return out


def test_ingest_vectors_equal_the_pillow_decode_path(tmp_path, catalog_dir, tiny_encoder):
    """Ingest decodes JPEGs with libjpeg-turbo into arrays (images.load_pixels); the stored vectors must
    be those of Pillow's decode (load_image), the path queries and older indexes used."""
    import numpy as np
    import torch

    from mmsearch.images import load_image

    index = tmp_path / "idx"
    ingest(catalog_dir / "catalog.csv", index, IngestOptions(batch_size=4), encoder=tiny_encoder)
    collection = Collection.open(index)
    try:
        ids, vectors = collection.all_vectors("image")
        items = collection.store.items([int(i) for i in ids])
    finally:
        collection.close()
    by_key = {items[int(i)].key: vec for i, vec in zip(ids, vectors)}
    for key in ("boot-red", "boot-blue", "bag-black"):  # two JPEGs, a PNG
        path = next((catalog_dir / "images").glob(f"{key}.*"))
        pixels = tiny_encoder.preprocess(load_image(path, min_side=tiny_encoder.input_side))
        want = tiny_encoder.encode_pixels(torch.stack([pixels]))[0]
        np.testing.assert_allclose(by_key[key], want, atol=1e-5)


def test_ingest_keeps_the_gc_off_objects_made_before_it(tmp_path, catalog_dir, tiny_encoder):
    import gc

    before = gc.get_freeze_count()
    frozen_during: list[int] = []
    ingest(catalog_dir / "catalog.csv", tmp_path / "idx", IngestOptions(batch_size=4), encoder=tiny_encoder,
           progress=lambda stage, done, total: frozen_during.append(gc.get_freeze_count()))
    assert frozen_during and min(frozen_during) > before  # the model and everything before the run
    assert gc.get_freeze_count() == before  # handed back to the collector afterwards
