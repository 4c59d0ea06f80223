"""Readers during a write never fail or see half-written state; two writers: the second fails or waits."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from crash_harness import _pythonpath, check_consistent, make_catalog

from mmsearch.cli import cli
from mmsearch.collection import Collection
from mmsearch.errors import IndexLockedError
from mmsearch.ingest import IngestOptions, ingest
from mmsearch.search import Searcher, build_query


def index_cmd(catalog, index, *extra):
    return CliRunner().invoke(cli, ["index", str(catalog), "--index", str(index), "-q", "--format", "json", *extra])


@pytest.fixture
def small(tmp_path, catalog_dir, tiny_encoder):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    ingest(csv, index, encoder=tiny_encoder)
    return csv, index


def test_second_writer_fails_clearly(small):
    csv, index = small
    holder = Collection.open(index)
    try:
        with holder.write_lock():
            result = index_cmd(csv, index)
            with pytest.raises(IndexLockedError):
                ingest(csv, index)
    finally:
        holder.close()
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: index {index} is being written by pid {os.getpid()}; "
                                     "wait for it to finish (or use --wait)")


def test_second_writer_is_refused_before_it_loads_a_model(small, monkeypatch):
    """The lock is tried first: loading the index's model takes seconds, in which the first writer
    may finish, and a refused writer must not spend them."""
    import mmsearch.ingest as ingest_module

    csv, index = small
    loads = []
    real_load = ingest_module.load_encoder
    monkeypatch.setattr(ingest_module, "load_encoder", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    holder = Collection.open(index)
    try:
        with holder.write_lock():
            with pytest.raises(IndexLockedError):
                ingest(csv, index)
    finally:
        holder.close()
    assert loads == []
    ingest(csv, index)  # the lock released: this writer loads the index's model and runs
    assert len(loads) == 1


def test_second_writer_waits_with_wait(small):
    csv, index = small
    holder = Collection.open(index)
    locked, release = threading.Event(), threading.Event()

    def hold():
        with holder.write_lock():
            locked.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    locked.wait(30)
    threading.Timer(1.0, release.set).start()
    start = time.monotonic()
    result = index_cmd(csv, index, "--wait")
    thread.join()
    holder.close()
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start >= 0.9
    assert json.loads(result.stdout)["unchanged"] == 9


@pytest.mark.slow
def test_searches_during_an_ingest_never_fail(tmp_path, tiny_encoder):
    """A real ingest subprocess adds 120 items, re-encodes 30 changed ones and deletes 20 while this
    process searches in a loop: with a Searcher opened before the run (its FAISS snapshot goes stale
    and some of its ids get deleted) and with fresh ones (opened mid-run, mid-publish)."""
    csv = make_catalog(tmp_path / "catalog", n=160)
    header, *rows = csv.read_text().splitlines()
    first = tmp_path / "catalog/first.csv"
    gone = [f"gone-{i},images/p{i:03d}.png,an item that leaves the catalog,1" for i in range(20)]
    changed = [r.replace(",,", ",an old caption,") for r in rows[:40]]  # 30 of them had no caption
    first.write_text("\n".join([header, *changed, *gone]) + "\n")
    index = tmp_path / "idx"
    ingest(first, index, IngestOptions(batch_size=16), encoder=tiny_encoder)
    keys = {r.split(",")[0] for r in rows + gone}

    old = Searcher(index, encoder=tiny_encoder)
    writer = subprocess.Popen([sys.executable, "-m", "mmsearch", "index", str(csv), "--index", str(index),
                               "--batch-size", "2", "-q", "--format", "json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    searches, seen_writer, refused = 0, False, False
    try:
        while writer.poll() is None:
            seen_writer |= old.collection.writer_active()
            if seen_writer and not refused:  # first, while the writer surely still runs (small batches)
                refused = _second_writer_is_refused(csv, index, writer.pid)
            searches += _search_all(old, keys)
            with Searcher(index, encoder=tiny_encoder) as fresh:
                searches += _search_all(fresh, keys)
        out, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
        old.close()
    assert writer.returncode == 0, err
    report = json.loads(out)
    assert (report["added"], report["updated"], report["removed"], report["unchanged"]) == (120, 30, 20, 10), report
    assert seen_writer and refused and searches >= 20, searches
    check_consistent(index, tiny_encoder)


QUERIES = [("product number 12", "text"), ("an old caption", "item"), ("product", "image")]


def _search_all(searcher: Searcher, keys: set[str]) -> int:
    for text, target in QUERIES:
        for hit in searcher.search(build_query(texts=[text], target=target, k=10)).results:
            assert hit.id in keys, hit.id
            assert hit.image is None or os.path.isfile(hit.image)
    return len(QUERIES)


def _second_writer_is_refused(csv, index, pid: int) -> bool:
    result = index_cmd(csv, index)
    if result.exit_code == 0:  # the first writer finished in between
        return False
    assert result.output.strip().startswith(f"Error: index {index} is being written by pid {pid}"), result.output
    return True
