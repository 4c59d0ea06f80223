"""Store.write_batch: bulk insert/update semantics that ingest relies on."""

import numpy as np
import pytest

from mmsearch.store import ItemRecord, Store

DIM = 4


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def record(key, caption="c", meta=None, **vectors) -> ItemRecord:
    return ItemRecord(key, f"/img/{key}.png", caption, f"ih-{key}", f"ch-{caption}", meta or {}, vectors)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "items.sqlite")
    yield s
    s.close()


def test_new_items_get_ids_and_vectors(store):
    ids = store.write_batch([record("a", image=vec(1), text=vec(2)), record("b", meta={"price": 3}, image=vec(3))])
    assert sorted(ids) == ["a", "b"] and len(set(ids.values())) == 2
    items = store.items(list(ids.values()))
    assert items[ids["b"]].meta == {"price": 3} and items[ids["a"]].caption == "c"
    np.testing.assert_array_equal(store.vectors([ids["a"]], "text", DIM)[ids["a"]], vec(2))
    assert store.counts() == {"items": 2, "images": 2, "captions": 1}
    assert store.field_names() == {"price"}


def test_update_keeps_the_id_replaces_listed_vectors_and_keeps_the_others(store):
    first = store.write_batch([record("a", image=vec(1), text=vec(2)), record("b", image=vec(3))])
    generation = store.generation()
    again = store.write_batch([record("a", caption="new", meta={"color": "red"}, image=vec(9)),
                               record("b", text=None, image=None), record("c", text=vec(5))])
    assert again["a"] == first["a"] and again["b"] == first["b"] and again["c"] not in first.values()
    assert store.generation() == generation + 1
    a = store.items([again["a"]])[again["a"]]
    assert a.caption == "new" and a.meta == {"color": "red"} and a.caption_hash == "ch-new"
    np.testing.assert_array_equal(store.vectors([again["a"]], "image", DIM)[again["a"]], vec(9))
    np.testing.assert_array_equal(store.vectors([again["a"]], "text", DIM)[again["a"]], vec(2))  # not listed: kept
    assert store.vectors([again["b"]], "image", DIM) == {}  # None: removed
    assert store.field_names() == {"color"}
    assert store.fingerprints()["b"] == (again["b"], "ih-b", "ch-c", frozenset())


def test_a_key_twice_in_one_batch_keeps_the_last(store):
    ids = store.write_batch([record("a", caption="old", image=vec(1)), record("a", caption="late", image=vec(2))])
    assert store.counts()["items"] == 1
    assert store.items([ids["a"]])[ids["a"]].caption == "late"
    np.testing.assert_array_equal(store.vectors([ids["a"]], "image", DIM)[ids["a"]], vec(2))


def test_items_reads_the_same_rows_for_a_page_of_ids_and_for_many(store):
    """A page of hits binds one parameter per id, more ids go through json_each: the same rows,
    duplicates once, missing ids left out, numpy ids taken."""
    from mmsearch.store import FEW_IDS

    ids = store.write_batch([record(f"k{n}", caption=f"c{n}", meta={"n": n}, image=vec(n))
                             for n in range(FEW_IDS + 8)])
    by_key = {key: store.items([i])[i] for key, i in ids.items()}  # one id at a time
    assert {key: row.caption for key, row in by_key.items()} == {f"k{n}": f"c{n}" for n in range(FEW_IDS + 8)}
    page = [ids["k3"], ids["k1"], ids["k3"], 10**9]  # a duplicate and an id that does not exist
    assert store.items(page) == {ids["k3"]: by_key["k3"], ids["k1"]: by_key["k1"]}
    page = np.array(list(ids.values())[:FEW_IDS], dtype=np.int64)  # exactly FEW_IDS: the bound path
    key_of = {i: key for key, i in ids.items()}
    assert store.items(page) == {int(i): by_key[key_of[int(i)]] for i in page}
    assert store.items(list(ids.values()) + [10**9]) == {ids[k]: row for k, row in by_key.items()}
    assert store.items([]) == {}


def test_a_batch_larger_than_sqlite_variable_limit(store):
    n = 2100  # more than the 900-key chunks and SQLite's old 999-variable limit
    ids = store.write_batch([record(f"k{i}", image=vec(i)) for i in range(n)])
    again = store.write_batch([record(f"k{i}", image=vec(i + 1)) for i in range(n)])
    assert again == ids and store.counts()["images"] == n
    np.testing.assert_array_equal(store.vectors([ids["k7"]], "image", DIM)[ids["k7"]], vec(8))


def test_reads_see_other_writers_commits_from_any_thread(tmp_path, store):
    """Store._read keeps one sqlite3 connection open: each read must still see what was committed
    since (by this store or another one on the same file), from whichever thread reads."""
    import threading

    first = store.write_batch([record("a", image=vec(1))])
    assert set(store.items(list(first.values()))) == set(first.values())  # opens the read connection
    other = Store(tmp_path / "items.sqlite")  # e.g. an ingest in another process
    second = other.write_batch([record("b", caption="new", image=vec(2))])
    other.close()
    seen = {}
    reader = threading.Thread(target=lambda: seen.update(store.items(list(second.values()))))
    reader.start()
    reader.join()
    assert seen[second["b"]].caption == "new"
    np.testing.assert_array_equal(store.vectors([second["b"]], "image", DIM)[second["b"]], vec(2))
    store.close()  # closes the read connection; a later read opens another
    assert store.items(list(first.values()))[first["a"]].key == "a"
