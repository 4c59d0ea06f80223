"""VectorIndex unit tests (small clustered synthetic vectors) and `reindex` from stored vectors."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.collection import Collection
from mmsearch.config import IndexParams, ModelRef
from mmsearch.index import (
    FLAT_MAX_ITEMS,
    RECALL_TARGET,
    IdFilter,
    VectorIndex,
    _exact_top_k,
    _recall,
    choose_index_type,
    estimate_bytes,
    ivf_lists,
    locality_order,
    tuning_queries,
)
from mmsearch.store import ItemRecord

DIM = 64


def clustered(n, dim=DIM, centres=64, spread=0.7, seed=0):
    """A Gaussian mixture on the unit sphere: uniform vectors would make every ANN index look broken."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(6000)
    return np.arange(1, len(x) + 1, dtype=np.int64) * 3, x  # ids need not be positions


def test_auto_choice_rule():
    assert choose_index_type(1000, 512) == "flat"
    assert choose_index_type(FLAT_MAX_ITEMS, 512) == "flat"
    assert choose_index_type(FLAT_MAX_ITEMS + 1, 512) == "hnsw"
    assert choose_index_type(1_000_000, 512, max_memory=4 * 1024**3) == "hnsw"  # ~2.4 GB
    assert choose_index_type(1_000_000, 512, max_memory=1024**3) == "ivfpq"
    assert choose_index_type(10_000, 512, max_memory=1024**2) == "ivfpq"  # flat would not fit either


def test_flat_add_search_remove_selector(data):
    ids, x = data
    index = VectorIndex.build(DIM, ids[:100], x[:100], "flat")
    assert index.params.index_type == "flat" and index.ntotal == 100
    scores, found = index.search(x[5], 3)
    assert found[0, 0] == ids[5] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    index.add(ids[100:120], x[100:120])
    assert index.ntotal == 120
    index.remove(ids[[5, 110]])
    assert index.ntotal == 118
    _, found = index.search(x[5], 118)
    assert ids[5] not in found and ids[110] not in found
    allowed = ids[[7, 8, 9]]
    _, found = index.search(x[5], 10, allowed)
    assert set(found[0][found[0] >= 0]) == set(allowed)
    _, found = index.search(x[:1], 500)  # k larger than the index is clamped
    assert found.shape == (1, 118)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path, data, kind):
    ids, x = data
    built = VectorIndex.build(DIM, ids, x, kind)
    path = tmp_path / f"{kind}.faiss"
    built.save(path)
    assert not list(tmp_path.glob(".*.tmp"))
    for mmap in (True, False):
        loaded = VectorIndex.load(path, IndexParams(**vars(built.params)), mmap=mmap)
        assert loaded.ntotal == len(ids)
        queries = tuning_queries(x, 20, seed=3)
        np.testing.assert_array_equal(loaded.search(queries, 10)[1], built.search(queries, 10)[1])
        if kind != "flat":  # tuned knobs are re-applied on load
            knob = "ef_search" if kind == "hnsw" else "nprobe"
            assert getattr(loaded.params, knob) == getattr(built.params, knob)
        allowed = ids[::50]
        _, found = loaded.search(queries[:3], 5, allowed)
        assert set(found[found >= 0]) <= set(allowed)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_tuned_recall_reaches_target(data, kind):
    ids, x = data
    index = VectorIndex.build(DIM, ids, x, kind)
    assert index.params.measured_recall_at_10 >= RECALL_TARGET
    assert (index.params.ef_search if kind == "hnsw" else index.params.nprobe) is not None
    # held-out check on other queries: the knob generalises (hnsw: its top-10; ivfpq: top-10 in 256 re-ranked)
    queries = tuning_queries(x, 200, seed=7)
    truth = ids[_exact_top_k(x, queries, 10)]
    _, found = index.search(queries, 10 if kind == "hnsw" else 256)
    assert _recall(found, truth) >= RECALL_TARGET - 0.03


def test_locality_order_groups_neighbours(data):
    _, x = data  # 64 clusters in random order
    order = locality_order(x, branching=8, leaf=64)
    assert sorted(order.tolist()) == list(range(len(x)))
    assert _adjacent_cosine(x[order]) > _adjacent_cosine(x) + 0.3  # neighbours in memory are near in space
    np.testing.assert_array_equal(locality_order(x, branching=8, leaf=64), order)  # deterministic
    assert len(locality_order(x[:10])) == 10  # below a leaf: kept as is


def _positions(index: VectorIndex) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) by position inside an IDMap(HNSW,Flat)."""
    import faiss

    inner = faiss.downcast_index(index.index.index)
    return faiss.vector_to_array(index.index.id_map), inner.storage.reconstruct_n(0, index.ntotal)


def _adjacent_cosine(v: np.ndarray) -> float:
    return float(np.mean(np.sum(v[1:] * v[:-1], axis=1)))


def test_hnsw_build_lays_neighbours_out_together(data):
    ids, x = data  # 64 clusters in random order
    laid = VectorIndex.build(DIM, ids, x, "hnsw")
    positions, stored = _positions(laid)
    assert sorted(positions.tolist()) == sorted(ids.tolist())
    by_id = dict(zip(ids.tolist(), x))
    np.testing.assert_array_equal(stored, np.stack([by_id[i] for i in positions.tolist()]))  # ids follow
    assert _adjacent_cosine(stored) > _adjacent_cosine(x) + 0.3
    plain = VectorIndex.build(DIM, ids, x, "hnsw", locality=False)
    np.testing.assert_array_equal(_positions(plain)[0], ids)
    queries = tuning_queries(x, 200, seed=7)  # either layout finds the same neighbours
    truth = ids[_exact_top_k(x, queries, 10)]
    assert _recall(laid.search(queries, 10)[1], truth) >= RECALL_TARGET


def test_permute_moves_positions_not_results(tmp_path, data):
    import faiss

    ids, x = data
    built = VectorIndex.build(DIM, ids, x, "hnsw")
    moved = VectorIndex(faiss.clone_index(built.index), IndexParams(**vars(built.params)))
    moved.permute(np.random.default_rng(0).permutation(moved.ntotal))
    before, after = _positions(built), _positions(moved)
    assert not np.array_equal(before[0], after[0])
    by_id = dict(zip(ids.tolist(), x))
    np.testing.assert_array_equal(after[1], np.stack([by_id[i] for i in after[0].tolist()]))
    queries = tuning_queries(x, 50, seed=5)
    for k in (10, 40):
        got, want = moved.search(queries, k), built.search(queries, k)
        np.testing.assert_array_equal(got[1], want[1])  # same graph: the same results
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    moved.add(ids[:3] + 1, x[:3])  # in-place additions afterwards: appended, found
    top2 = moved.search(x[:3], 2)[1]
    assert all(new in row for new, row in zip((ids[:3] + 1).tolist(), top2.tolist()))
    moved.save(tmp_path / "moved.faiss")
    loaded = VectorIndex.load(tmp_path / "moved.faiss", IndexParams(**vars(moved.params)))
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], moved.search(queries, 10)[1])


def test_recall_bound_is_mean_less_two_standard_errors():
    from mmsearch.index import _recall_bound

    per_query = np.array([1.0] * 95 + [0.0] * 5)
    mean, bound = _recall_bound(per_query)
    assert mean == pytest.approx(0.95)
    assert bound == pytest.approx(0.95 - 2 * per_query.std(ddof=1) / 10)
    assert _recall_bound(np.ones(50)) == (1.0, 1.0)


def test_tuner_needs_the_bound_not_the_mean_to_reach_the_target(monkeypatch, data):
    import mmsearch.index as index_module
    from mmsearch.index import TUNE_QUERIES, TUNE_VALUES, _per_query_recall, _recall_bound

    ids, x = data
    index = VectorIndex.build(DIM, ids, x, "hnsw")
    index.params.ef_search = TUNE_VALUES[0]
    index._apply_search_params()
    queries = tuning_queries(x, TUNE_QUERIES)  # the tuner's own sample
    mean, bound = _recall_bound(_per_query_recall(index.search(queries, 10)[1], ids[_exact_top_k(x, queries, 10)]))
    assert bound < mean < 1.0
    monkeypatch.setattr(index_module, "RECALL_TARGET", (mean + bound) / 2)  # met by the mean, not the bound
    index.tune(ids, x)
    assert index.params.ef_search > TUNE_VALUES[0]
    monkeypatch.setattr(index_module, "RECALL_MARGIN_SE", 0.0)
    index.tune(ids, x)
    assert index.params.ef_search == TUNE_VALUES[0] and index.params.measured_recall_at_10 == round(mean, 4)


def test_exact_top_k_blocks_match_single_pass():
    x = clustered(500, dim=16)
    q = tuning_queries(x, 30)
    full = np.argsort(-(q @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(_exact_top_k(x, q, 5), full)


def test_ivfpq_bytes_per_vector(tmp_path):
    x = clustered(12_000, dim=512, centres=100)
    ids = np.arange(len(x), dtype=np.int64)
    index = VectorIndex.build(512, ids, x, "ivfpq")
    index.save(tmp_path / "pq.faiss")
    size = (tmp_path / "pq.faiss").stat().st_size
    fixed = index.index.nlist * 512 * 4 + 256 * 512 * 4  # coarse centroids + PQ codebooks
    assert (size - fixed) / len(x) <= 80
    # the estimate the budget rule and ivf_lists use is the file's size, fixed costs included
    assert index.index.nlist == ivf_lists(len(x), 512)
    assert abs(size - estimate_bytes("ivfpq", len(x), 512)) / size < 0.03


@pytest.mark.parametrize("n_items", [100_000, 300_000, 1_000_000, 10_000_000])
def test_ivfpq_stays_within_80_bytes_per_vector_from_100k(n_items):
    # at 100k x 512-d, 2.5 sqrt(N) lists made 93 bytes per vector (centroids 16, codebook 5)
    assert estimate_bytes("ivfpq", n_items, 512) / n_items <= 80
    assert ivf_lists(n_items, 512) >= math.sqrt(n_items) / 4  # probes stay short
    assert ivf_lists(1_000_000, 512) == 2500  # where memory does not bind, 2.5 sqrt(N)


def _collection(path, n=3000):
    x = clustered(n, seed=1)
    collection = Collection.create(path, ModelRef("fake", None), DIM)
    collection.store.write_batch([ItemRecord(f"k{i}", None, None, None, None, {}, {"image": x[i]})
                                  for i in range(n)])
    collection.save_faiss("flat")
    collection.close()
    return x


def test_reindex_reuses_stored_vectors(tmp_path, monkeypatch):
    path = tmp_path / "idx"
    x = _collection(path)
    import mmsearch.encoders

    def no_encoder(*_a, **_k):
        raise AssertionError("reindex must not load an encoder")

    monkeypatch.setattr(mmsearch.encoders, "load_encoder", no_encoder)
    result = CliRunner().invoke(cli, ["reindex", "--index", str(path), "--index-type", "hnsw", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["index"]["index_type"] == "hnsw" and out["index"]["measured_recall_at_10"] >= RECALL_TARGET
    collection = Collection.open(path)
    try:
        state = collection.faiss_state()
        assert state["generation"] == collection.store.generation()
        assert state["params"]["image"]["index_type"] == "hnsw"
        assert state["params"]["text"]["index_type"] == "flat"  # no captions: an empty exact index
        assert collection.manifest.index.index_type == "hnsw"
        assert sorted(p.name for p in path.glob("*.faiss")) == sorted(state["files"].values())
        index = collection.vector_index("image")
        assert index.params.index_type == "hnsw" and index.ntotal == len(x)
        _, found = index.search(x[42], 1)
        assert found[0, 0] == collection.store.item_by_key("k42").id
    finally:
        collection.close()
    info = CliRunner().invoke(cli, ["info", "--index", str(path), "--format", "json"])
    shown = json.loads(info.output)
    assert shown["index_type"] == "hnsw" and shown["search_params"]["ef_search"] > 0
    assert shown["measured_recall_at_10"] >= RECALL_TARGET
    table = CliRunner().invoke(cli, ["reindex", "--index", str(path), "--index-type", "flat"])
    assert table.exit_code == 0 and "as flat" in table.output


def test_reindex_refuses_while_locked(tmp_path):
    path = tmp_path / "idx"
    _collection(path, n=50)
    collection = Collection.open(path)
    try:
        with collection.write_lock():
            result = CliRunner().invoke(cli, ["reindex", "--index", str(path), "--index-type", "hnsw"])
        assert result.exit_code != 0 and "being written" in result.output
    finally:
        collection.close()


@pytest.mark.parametrize("model,pretrained", [("mmsearch-tiny", "random"), ("mmsearch-fashion-rn", "random"),
                                              ("mmsearch-fashion", None)])
def test_int8_option_keeps_vectors_close(model, pretrained):
    """`--quantize int8` (image tower Linear layers): vectors move only slightly; text still encodes.
    mmsearch-fashion-rn is a ModifiedResNet, whose attention pool must stay fp32 (it reads raw weights);
    the shipped mmsearch-fashion is a convnet (only its projection is a Linear)."""
    import torch

    from mmsearch.encoders import load_encoder

    fp32 = load_encoder(model, pretrained)
    int8 = load_encoder(model, pretrained, quantize="int8")
    size = fp32.model.visual.image_size
    pixels = torch.rand(4, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))
    cos = (fp32.encode_pixels(pixels) * int8.encode_pixels(pixels)).sum(1)
    assert cos.min() > 0.98
    assert int8.encode_texts(["red dress"]).shape == (1, fp32.dim)


def test_hnsw_search_starts_at_the_entry_sample(data):
    """Searches start at the nearest of the index's entry sample: each sampled vector finds itself first,
    at its own score (a wrong sign on the entry's score drops it), and every score is the exact one."""
    ids, x = data
    index = VectorIndex.build(DIM, ids, x, "hnsw")
    assert index.params.entry_sample == min(1024, len(ids))
    positions, sample = index._entry_sample()
    assert len(positions) == index.params.entry_sample and positions.max() < len(ids)
    scores, found = index.search(sample[:200], 10)
    order = _positions(index)[0]  # ids by position
    np.testing.assert_array_equal(found[:, 0], order[positions[:200]])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    by_id = dict(zip(ids.tolist(), x))
    queries = tuning_queries(x, 100, seed=9)
    scores, found = index.search(queries, 10)
    exact = np.einsum("qd,qkd->qk", queries, np.stack([[by_id[i] for i in row] for row in found.tolist()]))
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_filtered_hnsw_search_starts_at_the_entry_sample(data, monkeypatch):
    """A filtered search also starts at the query's nearest sampled vector, allowed or not, and
    returns allowed ids only: a sampled vector the filter keeps finds itself first, one it drops
    never does; the result is the exact filtered top-10 (scores exact too)."""
    ids, x = data
    index = VectorIndex.build(DIM, ids, x, "hnsw")
    positions, sample = index._entry_sample()
    sampled_ids = _positions(index)[0][positions]
    allowed = np.setdiff1d(ids[::3], sampled_ids[1::2])  # every third id, less every other sampled one
    kept = np.isin(sampled_ids, allowed)
    assert kept.any() and not kept.all()
    calls = []
    real = VectorIndex._search_from_entries
    monkeypatch.setattr(VectorIndex, "_search_from_entries", lambda self, *a: calls.append(a[2]) or real(self, *a))
    scores, found = index.search(sample[kept][:50], 10, allowed)
    assert calls and calls[0] is not None  # the entry path with the filter, not FAISS's own descent
    np.testing.assert_array_equal(found[:, 0], sampled_ids[kept][:50])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    queries = np.concatenate([sample[~kept][:50], tuning_queries(x, 50, seed=6)])
    scores, found = index.search(queries, 10, allowed)
    assert np.isin(found, allowed).all()
    assert not np.isin(found[:50], sampled_ids[~kept][:50]).any()
    subset = np.isin(ids, allowed)
    truth = ids[subset][_exact_top_k(x[subset], queries, 10)]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())]) >= 0.98
    by_id = dict(zip(ids.tolist(), x))
    exact = np.einsum("qd,qkd->qk", queries, np.stack([[by_id[i] for i in row] for row in found.tolist()]))
    np.testing.assert_allclose(scores, exact, atol=1e-5)


def test_filtered_walk_lost_outside_a_region_is_rescanned_exactly(data, monkeypatch):
    """A filter that keeps one region of the space, queries from elsewhere: the graph walk stops at
    the region's edge (recall ~0.9 here, 0.37 at 1M); the queries whose best hit scores below their
    best sampled vector are scanned exactly, and the result is the exact filtered top-10."""
    import mmsearch.index as index_module

    ids, x = data
    index = VectorIndex.build(DIM, ids, x, "hnsw")
    directions = np.random.default_rng(1).standard_normal((16, DIM))
    region = (x @ directions.T).argmax(axis=1) == 0
    queries = clustered(4000, seed=5)
    queries = queries[(queries @ directions.T).argmax(axis=1) != 0][:300]
    truth = ids[region][_exact_top_k(x[region], queries, 10)]

    def recall() -> float:
        scores, found = index.search(queries, 10, ids[region])
        assert np.isin(found, ids[region]).all()
        return _recall(found, truth)

    monkeypatch.setattr(index_module, "FILTER_EXACT_MAX", 0)  # no rescan
    walk_only = recall()
    monkeypatch.undo()
    assert walk_only < 0.95 and recall() >= 0.99


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_id_filter_bitmap_and_hash_set_select_the_same_ids(data, kind, monkeypatch):
    """Filtered searches select by a bitmap over ids; ids past BITMAP_MAX_ID fall back to FAISS's
    hash set. Both return allowed ids only, and the same results."""
    import mmsearch.index as index_module

    ids, x = data
    index = VectorIndex.build(DIM, ids, x, kind)
    allowed = ids[5::7]
    assert IdFilter(allowed).bitmap is not None
    queries = tuning_queries(x, 40, seed=3)
    by_bitmap = index.search(queries, 10, allowed)
    monkeypatch.setattr(index_module, "BITMAP_MAX_ID", int(allowed.max()))  # the largest id no longer fits
    assert IdFilter(allowed).bitmap is None
    by_set = index.search(queries, 10, allowed)
    np.testing.assert_array_equal(by_bitmap[1], by_set[1])
    np.testing.assert_allclose(by_bitmap[0], by_set[0], atol=1e-6)
    hits = by_bitmap[1][by_bitmap[1] >= 0]
    assert len(hits) > 0.9 * by_bitmap[1].size and np.isin(hits, allowed).all()


def test_entry_sample_follows_added_vectors_and_old_params_search_plainly(data):
    ids, x = data
    index = VectorIndex.build(DIM, ids[:4000], x[:4000], "hnsw")
    index.search(x[:1], 5)  # reads the sample
    index.add(ids[4000:], x[4000:])
    positions, _ = index._entry_sample()
    assert positions.max() > 4000  # re-read over the grown index
    assert (index.search(x[4000:4100], 1)[1][:, 0] == ids[4000:4100]).mean() > 0.95
    plain = VectorIndex(index.index, IndexParams(**{**vars(index.params), "entry_sample": None}))
    queries = tuning_queries(x, 50, seed=4)
    np.testing.assert_array_equal(plain.search(queries, 10)[1], index.index.search(queries, 10)[1])


def test_hnsw_search_state_follows_additions_and_a_new_ef_search(data):
    """The objects an hnsw search reuses (the id map view among them) are rebuilt when vectors are
    added (the id map may move) and when efSearch changes: new items are found under their own ids."""
    import dataclasses

    ids, x = data
    index = VectorIndex.build(DIM, ids[:2000], x[:2000], "hnsw")
    index.search(x[:5], 10)
    cached = index._walk_state
    assert cached is not None and cached.key[0] == 2000
    new_ids = ids[2000:] + 1  # 4,000 more: the id map grows past its buffer
    index.add(new_ids, x[2000:])
    top1 = index.search(x[2000:2050], 1)[1][:, 0]
    np.testing.assert_array_equal(top1, new_ids[:50])
    assert index._walk_state is not cached and index._walk_state.key[0] == 6000
    index.params = dataclasses.replace(index.params, ef_search=index.params.ef_search + 7)
    index.search(x[:1], 10)
    assert index._walk_state.params.efSearch == index.params.ef_search
