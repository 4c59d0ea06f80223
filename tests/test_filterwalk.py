"""filterwalk.expand: a filtered HNSW result grown through the graph's allowed nodes only."""

import numpy as np
import pytest

from mmsearch import filterwalk
from mmsearch.index import IdFilter, VectorIndex, _exact_top_k, _recall

DIM = 32


def clustered(n, seed=0, centres=48):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, DIM))
    x = c[rng.integers(0, centres, n)] / np.sqrt(DIM) * 1.6 + rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built():
    x = clustered(5000)
    ids = np.arange(10, 10 + len(x), dtype=np.int64) * 2  # ids are not positions
    index = VectorIndex.build(DIM, ids, x, "hnsw")
    region = (x @ np.random.default_rng(3).standard_normal((8, DIM)).T).argmax(axis=1) == 0
    return index, ids, x, region


def _positions_of(index, wanted_ids):
    graph = filterwalk.Graph.of(index._hnsw(), index.index.id_map)
    where = {int(i): p for p, i in enumerate(graph.ids)}
    return graph, np.array([where[int(i)] for i in wanted_ids], dtype=np.int64)


def test_graph_views_read_the_index_in_place(built):
    index, ids, x, _ = built
    graph = filterwalk.Graph.of(index._hnsw(), index.index.id_map)
    assert graph.degree == 64 and len(graph.ids) == len(ids) == len(graph.offsets) - 1
    assert sorted(graph.ids.tolist()) == sorted(ids.tolist())
    by_id = dict(zip(ids.tolist(), x))
    np.testing.assert_allclose(graph.vectors[7], by_id[int(graph.ids[7])], rtol=1e-6)
    links = graph.neighbors[int(graph.offsets[7]): int(graph.offsets[7]) + graph.degree]
    assert ((links >= -1) & (links < len(ids))).all() and (links >= 0).any()


def test_expand_from_one_hit_finds_the_filtered_top_10(built):
    """Seeded with only the best allowed item, following allowed neighbours recovers the rest of the
    exact filtered top-10; the seed alone holds 1 of 10."""
    index, ids, x, region = built
    kept = ids[region]
    keeps = IdFilter(kept).keeps
    queries = clustered(400, seed=9)
    queries = queries[(queries @ x[region].T).max(axis=1) > 0.5][:60]  # near the region
    truth = kept[_exact_top_k(x[region], queries, 10)]
    graph, seeds = _positions_of(index, truth[:, 0])
    found = np.empty_like(truth)
    for q, (query, seed) in enumerate(zip(queries, seeds)):
        start_pos = np.full(10, -1, dtype=np.int64)
        start_pos[0] = seed
        start_scores = np.full(10, filterwalk.MISSING_SCORE, dtype=np.float32)
        start_scores[0] = float(graph.vectors[seed] @ query)
        scores, positions = filterwalk.expand(graph, keeps, query, start_scores, start_pos, 10)
        assert (positions >= 0).all() and np.all(np.diff(scores) <= 0)  # k items, best first
        np.testing.assert_allclose(scores, graph.vectors[positions] @ query, rtol=1e-5, atol=1e-6)
        found[q] = graph.ids[positions]
    assert np.isin(found, kept).all()
    assert _recall(found, truth) >= 0.9


def test_expand_never_drops_a_hit_nor_returns_a_dropped_item(built):
    index, ids, x, region = built
    kept = ids[region]
    graph, _ = _positions_of(index, [])
    queries = clustered(30, seed=4)
    keeps = IdFilter(kept).keeps
    for query in queries:
        scores, found = index._search_from_entries(query[None], 10, None)  # unfiltered walk: ids
        _, start_pos = _positions_of(index, found[0])
        start_scores = scores[0].copy()
        start_pos[~keeps(found[0])] = -1  # the hits the filter drops are not seeds
        out_scores, out_pos = filterwalk.expand(graph, keeps, query, start_scores, start_pos, 10)
        assert keeps(graph.ids[out_pos[out_pos >= 0]]).all()
        seed_scores = np.sort(start_scores[start_pos >= 0])[::-1]
        assert np.all(out_scores[: len(seed_scores)] >= seed_scores - 1e-6)  # each rank as good or better


def test_id_filter_keeps_matches_membership():
    rng = np.random.default_rng(0)
    allowed = rng.choice(10_000, 700, replace=False).astype(np.int64)
    probe = np.concatenate([rng.integers(-5, 12_000, 3000), allowed[:50], [-1, 0, 10**12]]).astype(np.int64)
    expected = np.isin(probe, allowed)
    by_bitmap = IdFilter(allowed)
    assert by_bitmap.bitmap is not None
    np.testing.assert_array_equal(by_bitmap.keeps(probe), expected)
    huge = IdFilter(np.concatenate([allowed, [2**40]]))  # past BITMAP_MAX_ID: the hash set and a sorted copy
    assert huge.bitmap is None
    np.testing.assert_array_equal(huge.keeps(probe), np.isin(probe, np.concatenate([allowed, [2**40]])))
    assert not IdFilter(np.array([], dtype=np.int64)).keeps(probe).any()


def test_filtered_search_expands_walks_that_were_not_rescanned(built, monkeypatch):
    """Through VectorIndex.search: with the exact rescan off, the expansion alone lifts a region
    filter's recall for queries outside the region above the bare walk's."""
    import mmsearch.index as index_module

    index, ids, x, region = built
    kept = ids[region]
    queries = clustered(3000, seed=11)
    queries = queries[(queries @ np.random.default_rng(3).standard_normal((8, DIM)).T).argmax(axis=1) != 0][:300]
    truth = kept[_exact_top_k(x[region], queries, 10)]
    monkeypatch.setattr(index_module, "FILTER_EXACT_GAP", np.inf)  # no walk counts as lost
    monkeypatch.setattr(filterwalk, "EXPAND_ROUNDS", 0)
    walk_only = _recall(index.search(queries, 10, kept)[1], truth)
    monkeypatch.setattr(filterwalk, "EXPAND_ROUNDS", 8)
    scores, found = index.search(queries, 10, kept)
    assert np.isin(found[found >= 0], kept).all()
    assert _recall(found, truth) > walk_only + 0.02, (walk_only, _recall(found, truth))
