"""`evaluate`: metrics of a real tiny index equal a brute-force computation from an independent encoder."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmsearch.cli import cli
from mmsearch.collection import Collection
from mmsearch.encoders import load_encoder
from mmsearch.errors import MMSearchError
from mmsearch.evaluate import evaluate_index, format_table
from mmsearch.images import load_image
from mmsearch.ingest import IngestOptions, ingest
from mmsearch.metrics import summarize

KS = (1, 5, 10)
TINY = IngestOptions(model="mmsearch-tiny", pretrained="random", workers=1)
BASE_COLOURS = {"shoes": (200, 40, 40), "bags": (40, 60, 200), "hats": (40, 170, 60)}

# (id, caption, category, has image). "gift idea" spans two categories (its relevant set is their
# union); p11 has no category (never a query, never relevant); p12 has a caption but no image.
ROWS = [
    ("p0", "red leather shoe", "shoes", True), ("p1", "running sneaker", "shoes", True),
    ("p2", "ankle boot", "shoes", True), ("p3", "gift idea", "shoes", True),
    ("p4", "blue handbag", "bags", True), ("p5", "canvas tote", "bags", True),
    ("p6", "travel backpack", "bags", True), ("p7", "gift idea", "bags", True),
    ("p8", "straw hat", "hats", True), ("p9", "wool beanie", "hats", True),
    ("p10", "baseball cap", "hats", True), ("p11", "mystery object", "", True),
    ("p12", "felt fedora", "hats", False),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _picture(path, colour, seed: int) -> None:
    """A tinted noisy square with a stripe, so that random-model embeddings differ clearly."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 35, (32, 32, 3)), 0, 255)
    pixels[:, (seed * 5) % 28 : (seed * 5) % 28 + 4] = 255 - np.array(colour)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_encoder("mmsearch-tiny", "random")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A 13-item catalog (12 PNGs) indexed with the real ingest and the seeded tiny random model."""
    root = tmp_path_factory.mktemp("shop")
    with open(root / "catalog.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "caption", "category"])
        for n, (key, caption, category, has_image) in enumerate(ROWS):
            image = f"img/{key}.png" if has_image else ""
            if has_image:
                (root / "img").mkdir(exist_ok=True)
                _picture(root / image, BASE_COLOURS.get(category, (128, 128, 128)), n)
            writer.writerow([key, image, caption, category])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        report = ingest(root / "catalog.csv", root / "index", TINY)
    assert report.added == len(ROWS) and not report.failed
    return root


def _brute_force(query_vectors, corpus_vectors, corpus_keys, relevant, excluded=None) -> dict:
    """Score every corpus vector in float64, rank (stable: catalog order on ties), summarize."""
    runs = []
    for n, query in enumerate(query_vectors):
        scores = corpus_vectors.astype(np.float64) @ query.astype(np.float64)
        ranked = [corpus_keys[i] for i in np.argsort(-scores, kind="stable")]
        if excluded and excluded[n] in ranked:
            ranked.remove(excluded[n])
        runs.append((ranked, relevant[n]))
    return summarize(runs, KS)


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual["queries"] == expected["queries"]
    for metric, value in expected.items():
        if metric == "curve":
            assert actual["curve"] == pytest.approx(value, abs=1e-9)
        else:
            assert actual[metric] == pytest.approx(value, abs=1e-9), metric


def _shop_vectors(shop, encoder):
    with_image = [row for row in ROWS if row[3]]
    image_vectors = encoder.encode_images([load_image(shop / f"img/{row[0]}.png") for row in with_image])
    caption_vectors = encoder.encode_texts([row[1] for row in ROWS])
    return with_image, image_vectors, caption_vectors


def test_independent_encoder_reproduces_the_stored_vectors(shop, encoder):
    _, image_vectors, caption_vectors = _shop_vectors(shop, encoder)
    collection = Collection.open(shop / "index")
    try:
        np.testing.assert_allclose(collection.all_vectors("image")[1], image_vectors, atol=1e-5)
        np.testing.assert_allclose(collection.all_vectors("text")[1], caption_vectors, atol=1e-5)
    finally:
        collection.close()


def test_relevant_by_equals_brute_force(shop, encoder):
    with_image, image_vectors, caption_vectors = _shop_vectors(shop, encoder)
    category = {key: cat for key, _, cat, _ in ROWS}
    image_keys = [row[0] for row in with_image]

    # text->image: one query per distinct caption; relevant = images sharing any of its categories
    queries, relevant = [], []
    for caption in dict.fromkeys(row[1] for row in ROWS):
        labels = {cat for _, c, cat, _ in ROWS if c == caption and cat}
        wanted = {key for key in image_keys if category[key] in labels}
        if wanted:
            queries.append(caption_vectors[[row[1] for row in ROWS].index(caption)])
            relevant.append(wanted)
    expected_t2i = _brute_force(np.array(queries), image_vectors, image_keys, relevant)

    # image->text: each labelled image ranks the other items' captions
    caption_keys = [row[0] for row in ROWS]
    queries, relevant, excluded = [], [], []
    for vector, key in zip(image_vectors, image_keys):
        wanted = {other for other in caption_keys if category[other] == category[key] and other != key}
        if category[key] and wanted:
            queries.append(vector)
            relevant.append(wanted)
            excluded.append(key)
    expected_i2t = _brute_force(np.array(queries), caption_vectors, caption_keys, relevant, excluded)

    result = evaluate_index(shop / "index", relevant_by="category")
    assert expected_t2i["queries"] == 11 and expected_i2t["queries"] == 11
    _assert_same(result["text->image"], expected_t2i)
    _assert_same(result["image->text"], expected_i2t)
    assert result["protocol"].startswith("relevant-by category")
    assert 0 < result["image->text"]["MRR"] < 1  # a meaningful check, not a degenerate ranking


def test_max_queries_keeps_the_first_queries(shop):
    full = evaluate_index(shop / "index", relevant_by="category", ks=(1, 3))
    head = evaluate_index(shop / "index", relevant_by="category", ks=(3, 1), max_queries=4,
                          directions=("image->text",))
    assert list(head) == ["image->text", "protocol", "index"]
    assert head["image->text"]["queries"] == 4
    assert set(head["image->text"]) == {"R@1", "R@3", "P@3", "mAP@3", "nDCG@3", "MRR", "curve", "queries"}
    assert full["image->text"]["queries"] == 11


def test_qrels_equals_brute_force(shop, encoder, tmp_path):
    lines = [
        {"query": "red shoe", "relevant": ["p0", "p1"]},
        {"text": "blue bag", "relevant": ["p4", "not-in-index"]},  # an unknown id is never found
        {"image": str(shop / "img/p2.png"), "relevant": ["p2", "p3"]},
        {"query": "p5.png", "relevant": ["p5", "p6"]},  # an existing image path, relative to the file
        {"text": "green hat", "target": "text", "relevant": ["p8", "p12"]},
    ]
    (tmp_path / "p5.png").write_bytes((shop / "img/p5.png").read_bytes())
    qrels = tmp_path / "qrels.jsonl"
    qrels.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")

    with_image, image_vectors, caption_vectors = _shop_vectors(shop, encoder)
    image_keys, caption_keys = [row[0] for row in with_image], [row[0] for row in ROWS]
    text_queries = encoder.encode_texts(["red shoe", "blue bag", "green hat"])
    image_queries = encoder.encode_images([load_image(shop / "img/p2.png"), load_image(shop / "img/p5.png")])

    result = evaluate_index(shop / "index", qrels=qrels)
    assert set(result) == {"text->image", "image->text", "text->text", "protocol", "index"}
    _assert_same(result["text->image"], _brute_force(text_queries[:2], image_vectors, image_keys,
                                                     [{"p0", "p1"}, {"p4", "not-in-index"}]))
    _assert_same(result["image->text"], _brute_force(image_queries, caption_vectors, caption_keys,
                                                     [{"p2", "p3"}, {"p5", "p6"}]))
    _assert_same(result["text->text"], _brute_force(text_queries[2:], caption_vectors, caption_keys,
                                                    [{"p8", "p12"}]))


def test_qrels_errors_name_the_line(shop, tmp_path):
    qrels = tmp_path / "bad.jsonl"
    qrels.write_text('{"query": "hat", "relevant": ["p8"]}\n{"query": "missing.jpg", "relevant": ["p1"]}\n')
    with pytest.raises(MMSearchError, match=r"bad.jsonl line 2: query image not found: .*missing.jpg"):
        evaluate_index(shop / "index", qrels=qrels)
    qrels.write_text('{"query": "hat", "relevant": []}\n')
    with pytest.raises(MMSearchError, match="line 1: 'relevant' must be a non-empty list of catalog ids"):
        evaluate_index(shop / "index", qrels=qrels)


# -- Karpathy split -----------------------------------------------------------------------------
KARPATHY_COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 200, 20), (128, 0, 128)]


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    """Four test images with 5 captions each, a train image, and an indexed image not in the split."""
    root = tmp_path_factory.mktemp("flickr")
    images = root / "flickr30k-images"
    images.mkdir()
    entries = []
    for n, colour in enumerate(KARPATHY_COLOURS):
        _picture(images / f"{1000 + n}.jpg", colour, 20 + n)
        sentences = [{"raw": f"picture {n} seen in way {c}", "tokens": []} for c in range(5)]
        split = "test" if n < 4 else "train"
        entries.append({"filename": f"{1000 + n}.jpg", "imgid": n, "split": split, "sentences": sentences})
    _picture(images / "unrelated.png", (90, 90, 90), 30)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        ingest(images, root / "index", TINY)
    return root


def test_karpathy_protocol_equals_brute_force(flickr, encoder):
    names = [f"{1000 + n}.jpg" for n in range(4)]  # only the test split, only its images are ranked
    image_vectors = encoder.encode_images([load_image(flickr / "flickr30k-images" / name) for name in names])
    captions = [f"picture {n} seen in way {c}" for n in range(4) for c in range(5)]
    caption_vectors = encoder.encode_texts(captions)
    owner = [names[n] for n in range(4) for _ in range(5)]

    result = evaluate_index(flickr / "index", karpathy=flickr / "dataset_flickr30k.json",
                            karpathy_images=flickr / "flickr30k-images")
    _assert_same(result["text->image"], _brute_force(caption_vectors, image_vectors, names, [{o} for o in owner]))
    expected_i2t = _brute_force(image_vectors, caption_vectors, list(range(20)),
                                [set(range(5 * n, 5 * n + 5)) for n in range(4)])
    _assert_same(result["image->text"], expected_i2t)
    assert result["text->image"]["queries"] == 20 and result["image->text"]["queries"] == 4
    assert result["text->image"]["R@5"] == 1.0  # 4 candidate images: any K >= 4 finds it


def test_karpathy_needs_the_test_images_in_the_index(flickr, tmp_path):
    data = json.loads((flickr / "dataset_flickr30k.json").read_text())
    data["images"][0]["filename"] = "999.jpg"
    split = tmp_path / "split.json"
    split.write_text(json.dumps(data))
    with pytest.raises(MMSearchError, match=r"^the index lacks 1 of the 4 Karpathy test images \(matched by "
                                            r"file name\), e.g. 999.jpg; index them first$"):
        evaluate_index(flickr / "index", karpathy=split)


# -- CLI ----------------------------------------------------------------------------------------
def _invoke(*args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)])


def test_cli_table(shop):
    outcome = _invoke("--index", shop / "index", "--relevant-by", "category", "-q")
    assert outcome.exit_code == 0, outcome.output
    expected = format_table(evaluate_index(shop / "index", relevant_by="category"))
    assert outcome.stdout == expected + "\n"
    header = outcome.stdout.splitlines()[0].split()
    assert header == ["direction", "R@1", "R@5", "R@10", "P@10", "mAP@10", "nDCG@10", "MRR", "queries"]
    assert outcome.stdout.splitlines()[1].split()[0] == "text->image"


def test_cli_json_and_plot(flickr, tmp_path):
    plot = tmp_path / "recall.png"
    outcome = _invoke("--index", flickr / "index", "--karpathy", flickr / "dataset_flickr30k.json",
                      "--images", flickr / "flickr30k-images", "-k", "1,3", "--format", "json",
                      "--plot", plot, "-q")
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert set(result["image->text"]) == {"R@1", "R@3", "P@3", "mAP@3", "nDCG@3", "MRR", "curve", "queries"}
    assert list(result["text->image"]["curve"]) == ["1", "2", "3"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("extra", "message"), [
    ((), "Error: no labels to evaluate with: give one of --relevant-by FIELD, --qrels FILE or --karpathy FILE"),
    (("--relevant-by", "category", "--karpathy", "SPLIT"), "Error: give only one label source, not "
                                                          "--relevant-by and --karpathy"),
    (("--relevant-by", "colour"), "Error: unknown field 'colour' for --relevant-by; known fields: category"),
    (("--relevant-by", "category", "-k", "0,5"), "Error: Invalid value for '-k' / '--ks': expected positive "
                                                 "ranks separated by commas, like 1,5,10; got '0,5'"),
])
def test_cli_errors(shop, flickr, extra, message):
    extra = [str(flickr / "dataset_flickr30k.json") if arg == "SPLIT" else arg for arg in extra]
    outcome = _invoke("--index", shop / "index", *extra, "-q")
    assert outcome.exit_code != 0
    assert message in outcome.output.splitlines()
