"""HTTP API: FastAPI TestClient against a real index (tiny model, generated product pictures)."""

import csv
import io
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mmsearch import server  # noqa: E402
from mmsearch.ingest import IngestOptions, ingest  # noqa: E402
from mmsearch.server import create_app  # noqa: E402
from mmsearch.textonnx import FastTextEncoder

COLOURS = {"red": (210, 40, 40), "blue": (40, 80, 210), "green": (40, 160, 70), "yellow": (235, 200, 40),
           "black": (30, 30, 30), "purple": (130, 60, 170)}
PRODUCTS = [("boot", "shoes", "red", 89), ("boot", "shoes", "blue", 79), ("sneaker", "shoes", "green", 49),
            ("sneaker", "shoes", "yellow", 39), ("dress", "clothing", "purple", 59), ("dress", "clothing", "red", 69),
            ("bag", "bags", "black", 120), ("bag", "bags", "yellow", 99), ("hat", "clothing", "blue", 19),
            ("hat", "clothing", "green", 25)]
SIZE = (64, 48)  # not square, so thumbnails show that the aspect ratio is kept


def draw_product(kind: str, colour: str, path: Path) -> None:
    """A flat 'product photo': one shape per kind in the item's colour on white."""
    img = Image.new("RGB", SIZE, "white")
    pen = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    shapes = {
        "boot": lambda: pen.polygon([(16, 6), (30, 6), (30, 30), (52, 34), (52, 42), (16, 42)], fill=fill),
        "sneaker": lambda: pen.rounded_rectangle((8, 22, 56, 40), radius=8, fill=fill),
        "dress": lambda: pen.polygon([(26, 4), (38, 4), (52, 44), (12, 44)], fill=fill),
        "bag": lambda: (pen.rectangle((14, 18, 50, 44), fill=fill), pen.arc((22, 6, 42, 30), 180, 360, fill, 3)),
        "hat": lambda: (pen.ellipse((8, 30, 56, 42), fill=fill), pen.rectangle((20, 10, 44, 34), fill=fill)),
    }
    shapes[kind]()
    img.save(path)


def write_catalog(folder: Path, products=PRODUCTS) -> Path:
    """catalog.csv with id, image, caption, category and price beside an images/ folder."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, category, colour, price in products:
        key = f"{kind}-{colour}"
        draw_product(kind, colour, folder / "images" / f"{key}.png")
        rows.append({"id": key, "image": f"images/{key}.png", "caption": f"{colour} {kind}",
                     "category": category, "price": price})
    path = folder / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "caption", "category", "price"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def build_index(folder: Path, encoder) -> Path:
    catalog = write_catalog(folder / "catalog")
    index_dir = folder / "index"
    ingest(catalog, index_dir, IngestOptions(model="mmsearch-tiny", pretrained="random", workers=1), encoder=encoder)
    return index_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_encoder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        root = tmp_path_factory.mktemp("server")
        yield root, build_index(root, tiny_encoder)


@pytest.fixture(scope="module")
def client(built, tiny_encoder):
    with TestClient(create_app(built[1], encoder=tiny_encoder)) as test_client:
        yield test_client


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def image_of(built, key: str) -> Path:
    return built[0] / "catalog" / "images" / f"{key}.png"


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- service endpoints ------------------------------------------------------------------------------

def test_health_info_docs_and_page(client):
    assert ok(client.get("/healthz")) == {"status": "ok"}
    info = ok(client.get("/api/info"))
    assert info["items"] == 10 and info["images"] == 10
    assert info["fields"] == ["category", "price"]
    assert info["limits"]["max_upload_bytes"] == server.MAX_UPLOAD_BYTES
    assert client.get("/docs").status_code == 200
    paths = ok(client.get("/openapi.json"))["paths"]
    assert {"/api/search", "/api/items/{item_id}", "/images/{item_id}", "/api/similar/{item_id}"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "error" in client.get("/api/nothing-here").json()


# -- search -----------------------------------------------------------------------------------------

def test_get_search_contract(client):
    data = ok(client.get("/api/search", params={"q": "red boot", "k": 5}))
    assert data["query"] == {"text": "red boot", "target": "image", "k": 5}
    assert len(data["results"]) == 5
    hit = data["results"][0]
    assert set(hit) == {"id", "score", "caption", "image", "metadata"}
    assert set(hit["metadata"]) == {"category", "price"}
    assert [h["score"] for h in data["results"]] == sorted((h["score"] for h in data["results"]), reverse=True)
    assert data.get("match") is None or "no_good_match" in data["match"]  # calibration may abstain


def test_get_search_filters_target_fusion_explain(client):
    params = [("q", "shoe"), ("where", "category=shoes"), ("where", "price<60"), ("target", "item"),
              ("fusion", "sum"), ("explain", "1"), ("k", "10")]
    data = ok(client.get("/api/search", params=params))
    assert {h["id"] for h in data["results"]} == {"sneaker-green", "sneaker-yellow"}
    assert data["query"]["where"] == ["category=shoes", "price<60"] and data["query"]["fusion"] == "sum"
    parts = data["results"][0]["explain"]["parts"]
    assert parts[0]["part"] == "text:shoe" and set(parts[0]["modality_attention"]) == {"image", "caption"}


def test_post_json_parts(client):
    body = {"parts": [{"text": "yellow", "weight": 1.0}, {"image": "item:bag-yellow", "weight": 2.0}],
            "target": "item", "where": ["price>=50"], "k": 3, "explain": True}
    data = ok(client.post("/api/search", json=body))
    assert data["query"]["parts"] == [{"text": "yellow", "weight": 1.0}, {"image": "item:bag-yellow", "weight": 2.0}]
    assert len(data["results"]) == 3 and all(h["metadata"]["price"] >= 50 for h in data["results"])
    assert len(data["results"][0]["explain"]["parts"]) == 2


def test_post_json_never_reads_server_paths(client, built):
    for value in (str(image_of(built, "boot-red")), "/etc/passwd", "item:no-such-item"):
        assert "image" in error(client.post("/api/search", json={"image": value}), 400)


def test_post_multipart_upload_finds_the_same_picture(client, built):
    files = {"image": ("query.png", png_bytes(image_of(built, "dress-purple")), "image/png")}
    data = ok(client.post("/api/search", files=files, data={"k": "3"}))
    assert data["results"][0]["id"] == "dress-purple"
    assert data["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert data["query"]["image"] == "upload:query.png"  # a label, never a server temp path


def test_post_multipart_image_and_words_with_weights(client, built):
    files = {"image": ("q.png", png_bytes(image_of(built, "hat-blue")), "image/png")}
    form = {"text": "blue hat", "image_weight": "0.7", "text_weight": "0.3", "k": "4", "explain": "1",
            "where": ["category=clothing"]}
    data = ok(client.post("/api/search", files=files, data=form))
    assert data["query"]["parts"] == [{"image": "upload:q.png", "weight": 0.7}, {"text": "blue hat", "weight": 0.3}]
    assert data["query"]["target"] == "item"
    assert all(h["metadata"]["category"] == "clothing" for h in data["results"])
    assert "explain" in data["results"][0]


# -- bad input --------------------------------------------------------------------------------------

def test_bad_uploads(client, built):
    text_file = {"image": ("notes.png", b"just some text, not a picture", "text/plain")}
    assert "not an image" in error(client.post("/api/search", files=text_file), 400)
    truncated = {"image": ("cut.png", png_bytes(image_of(built, "bag-black"))[:60], "image/png")}
    assert "truncated" in error(client.post("/api/search", files=truncated), 400)
    empty = {"image": ("empty.png", b"", "image/png")}
    error(client.post("/api/search", files=empty), 400)
    huge = {"image": ("big.png", b"\x89PNG" + b"0" * (server.MAX_UPLOAD_BYTES + server.FORM_OVERHEAD), "image/png")}
    assert "too large" in error(client.post("/api/search", files=huge), 413)  # refused from Content-Length


def test_upload_pixel_limit(client, built, monkeypatch):
    monkeypatch.setattr(server, "MAX_UPLOAD_PIXELS", 1000)
    files = {"image": ("q.png", png_bytes(image_of(built, "bag-black")), "image/png")}
    assert "64x48" in error(client.post("/api/search", files=files), 413)


def test_upload_size_limit_on_read(client, built, monkeypatch):
    """A body just under the header check (or chunked, without Content-Length) is capped while reading."""
    monkeypatch.setattr(server, "MAX_UPLOAD_BYTES", 100)
    files = {"image": ("q.png", png_bytes(image_of(built, "bag-black")), "image/png")}
    assert "over" in error(client.post("/api/search", files=files), 413)


def test_empty_queries(client):
    assert "empty query" in error(client.get("/api/search", params={"q": "  "}), 400)
    assert "empty query" in error(client.get("/api/search"), 400)
    assert "empty query" in error(client.post("/api/search", json={}), 400)
    assert "empty query" in error(client.post("/api/search", data={"text": ""}, files={"x": ("a", b"")}), 400)


def test_bad_parameters(client):
    assert "unknown filter field" in error(client.get("/api/search", params={"q": "hat", "where": "colour=red"}), 400)
    assert "bad filter" in error(client.get("/api/search", params={"q": "hat", "where": "nonsense"}), 400)
    assert "k" in error(client.get("/api/search", params={"q": "hat", "k": 0}), 400)
    assert "target" in error(client.get("/api/search", params={"q": "hat", "target": "video"}), 400)
    assert "fusion" in error(client.get("/api/search", params={"q": "hat", "fusion": "magic"}), 400)
    not_json = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in error(not_json, 400)
    assert "k must be at most" in error(client.post("/api/search", json={"text": "hat", "k": 10**6}), 400)
    assert "k must be a whole number" in error(client.post("/api/search", data={"text": "hat", "k": "nan"}), 400)
    assert "weight" in error(client.post("/api/search", data={"text": "hat", "text_weight": "lots"}), 400)


# -- items, similar, images ---------------------------------------------------------------------------

def test_item_by_id(client):
    item = ok(client.get("/api/items/boot-red"))
    assert item["id"] == "boot-red" and item["caption"] == "red boot"
    assert item["metadata"] == {"category": "shoes", "price": 89}
    assert item["image_url"] == "/images/boot-red"
    assert "unknown item" in error(client.get("/api/items/no-such-thing"), 404)


def test_similar_excludes_the_item_itself(client):
    data = ok(client.get("/api/similar/sneaker-green", params={"k": 4}))
    ids = [h["id"] for h in data["results"]]
    assert len(ids) == 4 and "sneaker-green" not in ids
    assert data["query"]["image"] == "item:sneaker-green" and data["query"]["k"] == 4
    assert "match" not in data  # it would judge the item's match with itself
    filtered = ok(client.get("/api/similar/sneaker-green", params={"where": "category=bags"}))
    assert {h["id"] for h in filtered["results"]} == {"bag-black", "bag-yellow"}
    error(client.get("/api/similar/nope"), 404)


def test_images_and_thumbnails(client, built):
    original = client.get("/images/boot-red")
    assert original.status_code == 200 and original.headers["content-type"] == "image/png"
    assert original.content == png_bytes(image_of(built, "boot-red"))
    for size, expected in ((32, (32, 24)), (100, (100, 75))):
        thumb = client.get("/images/boot-red", params={"size": size})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == expected
    assert "size" in error(client.get("/images/boot-red", params={"size": 5}), 400)


@pytest.mark.parametrize("path", ["/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd",
                                  "/images/..%2Fcatalog%2Fimages%2Fboot-red.png", "/images/no-such-item"])
def test_images_only_for_indexed_ids(client, path):
    error(client.get(path), 404)


# -- concurrency and live index updates ----------------------------------------------------------------

def test_concurrent_requests_agree(client):
    def one(_):
        response = client.get("/api/search", params={"q": "yellow bag", "k": 5, "explain": 1})
        return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(16)))
    assert {status for status, _ in answers} == {200}
    assert all(body == answers[0][1] for _, body in answers)


def test_index_reopened_after_ingest(built, tiny_encoder, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(built[1], index_dir)
    app = create_app(index_dir)  # no encoder given: loaded from the manifest; words go to the ONNX export
    with TestClient(app) as live:
        before = ok(live.get("/api/search", params={"q": "scarf", "k": 50}))
        assert len(before["results"]) == 10
        words, pictures = app.state.index.current().text_encoder, app.state.index.current().image_encoder
        assert isinstance(words, FastTextEncoder) and app.state.index.current().encoder is not words
        catalog = write_catalog(tmp_path / "catalog", PRODUCTS + [("hat", "clothing", "purple", 30)])
        ingest(catalog, index_dir, IngestOptions(workers=1), encoder=tiny_encoder)
        after = ok(live.get("/api/search", params={"q": "scarf", "k": 50}))
        assert "hat-purple" in {h["id"] for h in after["results"]} and len(after["results"]) == 11
        assert app.state.index.current().text_encoder is words  # the re-opened index shares both encoders
        assert app.state.index.current().image_encoder is pictures
        assert ok(live.get("/api/info"))["items"] == 11
        assert ok(live.get("/api/similar/hat-purple", params={"k": 1}))["results"]


def test_a_server_on_exported_towers_never_builds_the_torch_model(tmp_path, tiny_checkpoint, monkeypatch):
    from mmsearch.imagequery import ImageQueryEncoder

    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    catalog = write_catalog(tmp_path / "catalog")
    ingest(catalog, tmp_path / "index", IngestOptions(model="mmsearch-tiny", pretrained=str(tiny_checkpoint),
                                                      workers=1))  # the default runtime exports both towers
    monkeypatch.setattr("mmsearch.encoders.load_encoder", _refused)
    app = create_app(tmp_path / "index")
    with TestClient(app) as live:
        searcher = app.state.index.current()
        assert isinstance(searcher.image_encoder, ImageQueryEncoder)
        assert isinstance(searcher.text_encoder, FastTextEncoder)
        files = {"image": ("q.png", png_bytes(tmp_path / "catalog" / "images" / "bag-yellow.png"), "image/png")}
        data = ok(live.post("/api/search", files=files, data={"k": "3", "text": "yellow bag"}))
        assert data["results"][0]["id"] == "bag-yellow"


def _refused(*args, **kwargs):
    raise AssertionError("the torch model was loaded")


# -- the serve command ----------------------------------------------------------------------------------

def test_serve_command_binds_localhost_by_default(built, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from mmsearch.cli import cli

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: calls.append((app, host, port)))
    result = CliRunner().invoke(cli, ["serve", "--index", str(built[1])], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    app, host, port = calls[0]
    assert (host, port) == ("127.0.0.1", 8000) and app.state.index.index_dir == built[1]


def test_serve_command_explains_a_missing_extra(built, monkeypatch):
    from click.testing import CliRunner

    from mmsearch.cli import cli

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an absent package looks like
    result = CliRunner().invoke(cli, ["serve", "--index", str(built[1])])
    assert result.exit_code != 0 and "pip install 'mmsearch[server]'" in result.output
