"""Query engine on synthetic clustered vectors (no encoder): candidates + re-scoring vs brute force, filters."""

import numpy as np
import pytest

from mmsearch import fusion
from mmsearch.collection import Collection
from mmsearch.config import ModelRef
from mmsearch.errors import QueryError
from mmsearch.filters import parse_condition
from mmsearch.search import Query, QueryPart, Searcher, fusion_params
from mmsearch.store import ItemRecord

DIM = 32
N_ITEMS = 3000
USED_DIMS = 24


def clustered(rng, n, centers):
    """Items around cluster centres that span only the first dims: like real embeddings, the catalog
    occupies part of the space, so a query pointing elsewhere has nothing relevant."""
    labels = rng.integers(0, len(centers), n)
    vecs = centers[labels] + 0.1 * rng.standard_normal((n, DIM))
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, DIM))
    centers[:, USED_DIMS:] = 0
    image_vecs, labels = clustered(rng, N_ITEMS, centers)
    text_vecs = image_vecs + 0.3 * rng.standard_normal(image_vecs.shape)
    text_vecs = (text_vecs / np.linalg.norm(text_vecs, axis=1, keepdims=True)).astype(np.float32)
    path = tmp_path_factory.mktemp("synthetic")
    collection = Collection.create(path, ModelRef("fake", None), DIM)
    records = []
    for i in range(N_ITEMS):
        vectors = {"image": image_vecs[i]}
        if i % 7:  # some items have no caption
            vectors["text"] = text_vecs[i]
        meta = {"category": f"c{labels[i] % 5}", "price": float(i % 100), "name": f"item number {i}"}
        if i % 11 == 0:
            meta["price"] = "n/a"  # mixed types must not break numeric filters
        records.append(ItemRecord(f"k{i}", None, f"caption {i}" if i % 7 else None, None, None, meta, vectors))
    collection.store.write_batch(records)
    collection.save_faiss()
    collection.close()
    return path, centers


def query_vectors(centers, parts=2, seed=1):
    rng = np.random.default_rng(seed)
    vecs = centers[rng.integers(0, len(centers), parts)] + 0.2 * rng.standard_normal((parts, DIM))
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def exhaustive(searcher, vectors, weights, modalities, strategy):
    ids = np.array(sorted(searcher.collection.store.items(range(1, N_ITEMS + 1))), dtype=np.int64)
    scored = searcher._score(ids, vectors, weights, modalities, strategy)
    order = np.argsort(-scored.scores, kind="stable")[:10]
    return {searcher.collection.store.items([int(ids[i])])[int(ids[i])].key for i in order}


@pytest.mark.parametrize("strategy", ["attention", "sum"])
@pytest.mark.parametrize("target", ["item", "image", "text"])
@pytest.mark.parametrize("weights", [(1.0, 0.7), (1.0,), (2.5,)])  # one part: the direct FAISS-order path
def test_fused_top10_equals_exhaustive(synthetic_index, strategy, target, weights):
    path, centers = synthetic_index
    modalities = ["image", "text"] if target == "item" else [target]
    recalls = []
    with Searcher(path) as searcher:
        for seed in range(20):
            vectors = query_vectors(centers, parts=len(weights), seed=seed)
            parts = [QueryPart("text", f"part{i}", w) for i, w in enumerate(weights)]
            query = Query(parts=parts, target=target, fusion=strategy, k=10)
            got = {h.id for h in searcher.search_vectors(query, vectors, np.array(weights)).results}
            want = exhaustive(searcher, vectors, np.array(weights), modalities, strategy)
            recalls.append(len(got & want) / 10)
    assert np.mean(recalls) >= 0.99, str(recalls)


@pytest.mark.parametrize("strategy", ["attention", "sum"])
@pytest.mark.parametrize("target", ["image", "text"])
def test_direct_path_scores_and_explain_match_the_stored_vectors(synthetic_index, strategy, target):
    """One part against one modality is scored from FAISS's inner products, not the store's vectors:
    the scores and explanations must be the ones the stored vectors give."""
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        vectors, weights = query_vectors(centers, parts=1, seed=4), np.array([1.5])
        query = Query(parts=[QueryPart("text", "a", 1.5)], target=target, fusion=strategy, k=10, explain=True)
        hits = searcher.search_vectors(query, vectors, weights).results
        ids = np.array([searcher.collection.store.item_by_key(h.id).id for h in hits])
        stored = searcher._score(ids, vectors, weights, [target], strategy)
        assert [h.score for h in hits] == pytest.approx(list(stored.scores), abs=1e-6)
        for row, hit in enumerate(hits):
            want = fusion.explain(stored, row, ["a"])["parts"][0]
            got = hit.explain["parts"][0]
            assert got["similarity"] == pytest.approx(want["similarity"], abs=1e-6)
            assert got["modality_attention"] == want["modality_attention"]


def test_explain_contributions_sum_to_score(synthetic_index):
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        for strategy in ("attention", "sum"):
            query = Query(parts=[QueryPart("text", "a"), QueryPart("image", "b", -0.5)], target="item",
                          fusion=strategy, explain=True)
            result = searcher.search_vectors(query, query_vectors(centers, 2, 3), np.array([1.0, -0.5]))
            for hit in result.results:
                total = sum(p["contribution"] for p in hit.explain["parts"])
                assert total == pytest.approx(hit.score, abs=1e-5)
                assert hit.explain["parts"][1]["contribution"] <= 0 or hit.explain["parts"][1]["similarity"] < 0


def test_filters_apply_before_ranking(synthetic_index):
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        where = [parse_condition("category=c3"), parse_condition("price<20")]
        query = Query(parts=[QueryPart("text", "a")], where=where, k=15)
        result = searcher.search_vectors(query, query_vectors(centers, 1, 5), np.array([1.0]))
        assert len(result.results) == 15
        for hit in result.results:
            assert hit.metadata["category"] == "c3" and isinstance(hit.metadata["price"], float)
            assert hit.metadata["price"] < 20


@pytest.mark.parametrize("text,check", [
    ("price>=90", lambda m: isinstance(m["price"], float) and m["price"] >= 90),
    ("price<=5", lambda m: isinstance(m["price"], float) and m["price"] <= 5),
    ("price>98", lambda m: isinstance(m["price"], float) and m["price"] > 98),
    ("category!=c0", lambda m: m["category"] != "c0"),
    ("name~NUMBER 12", lambda m: "number 12" in m["name"]),
    ("price=n/a", lambda m: m["price"] == "n/a"),
])
def test_every_filter_operator(synthetic_index, text, check):
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        query = Query(parts=[QueryPart("text", "a")], where=[parse_condition(text)], k=50)
        hits = searcher.search_vectors(query, query_vectors(centers, 1, 6), np.array([1.0])).results
        assert hits and all(check(h.metadata) for h in hits)


def test_injection_looking_values_stay_values(synthetic_index):
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        for text in ["category=c1' OR '1'='1", 'category=c1") OR 1=1 --', "name~%'; DROP TABLE items; --"]:
            query = Query(parts=[QueryPart("text", "a")], where=[parse_condition(text)])
            assert searcher.search_vectors(query, query_vectors(centers, 1, 7), np.array([1.0])).results == []
        assert searcher.collection.store.counts()["items"] == N_ITEMS
        with pytest.raises(QueryError, match="unknown filter field"):
            searcher.search_vectors(Query(parts=[QueryPart("text", "a")], where=[parse_condition("x'--=1")]),
                                    query_vectors(centers, 1, 7), np.array([1.0]))


def test_unknown_field_and_bad_filters_are_clear_errors(synthetic_index):
    path, centers = synthetic_index
    with pytest.raises(QueryError, match="needs a number"):
        parse_condition("price<cheap")
    with pytest.raises(QueryError, match="bad filter"):
        parse_condition("just words")
    with Searcher(path) as searcher, pytest.raises(QueryError, match="unknown filter field 'colour'"):
        searcher.search_vectors(Query(parts=[QueryPart("text", "a")], where=[parse_condition("colour=red")]),
                                query_vectors(centers, 1, 1), np.array([1.0]))


def test_no_good_match_signal(synthetic_index):
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        near = searcher.search_vectors(Query(parts=[QueryPart("text", "a")]), query_vectors(centers, 1, 2),
                                       np.array([1.0]))
        assert near.match["no_good_match"] is False
        # a direction orthogonal to every cluster centre: nothing in the catalog is really like it
        q = np.zeros((1, DIM), dtype=np.float32)
        q[0, USED_DIMS:] = np.random.default_rng(3).standard_normal(DIM - USED_DIMS)
        q /= np.linalg.norm(q)
        far = searcher.search_vectors(Query(parts=[QueryPart("text", "a")]), q, np.array([1.0]))
        assert far.match["no_good_match"] is True
        assert near.match["z"] > far.match["z"]


def test_min_score_cuts_weak_hits(synthetic_index):
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        q = query_vectors(centers, 1, 4)
        full = searcher.search_vectors(Query(parts=[QueryPart("text", "a")], k=20), q, np.array([1.0])).results
        cut = full[5].score
        kept = searcher.search_vectors(Query(parts=[QueryPart("text", "a")], k=20, min_score=cut), q,
                                       np.array([1.0])).results
        assert [h.id for h in kept] == [h.id for h in full if h.score >= cut]


def test_attention_matches_fusion_module(synthetic_index):
    """The engine's attention scores are exactly fusion.attention_fuse on the stored vectors."""
    path, centers = synthetic_index
    with Searcher(path) as searcher:
        vectors, weights = query_vectors(centers, 2, 9), np.array([1.0, 1.0])
        hits = searcher.search_vectors(Query(parts=[QueryPart("text", "a"), QueryPart("text", "b")], k=5),
                                       vectors, weights).results
        ids = [searcher.collection.store.item_by_key(h.id).id for h in hits]
        item_vecs, mask = searcher.item_vectors(np.array(ids), ["image", "text"])
        expected = fusion.attention_fuse(vectors, weights, item_vecs, mask, fusion_params(searcher.manifest.fusion))
        assert np.allclose([h.score for h in hits], expected.scores, atol=1e-6)
