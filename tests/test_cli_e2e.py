"""End-to-end: the real CLI, real open_clip (tiny model), real SQLite and FAISS, committed fixtures."""

import json
import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from mmsearch.cli import cli

PRODUCTS = ["boot-red", "boot-blue", "sneaker-green", "sneaker-white", "dress-yellow", "dress-purple",
            "bag-brown", "bag-black"]


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def index(tmp_path, catalog_dir, tiny_checkpoint):
    path = tmp_path / "idx"
    result = run("index", catalog_dir / "catalog.csv", "--index", path, "--model", "mmsearch-tiny",
                 "--pretrained", tiny_checkpoint, "-q", "--format", "json")
    return path, json.loads(result.stdout)


def faiss_ids(index_dir: Path, modality: str) -> set[int]:
    state = json.loads((index_dir / "faiss.json").read_text())
    idx = faiss.read_index(str(index_dir / state["files"][modality]))
    return set(faiss.vector_to_array(faiss.downcast_index(idx).id_map).tolist())


def sqlite_ids(index_dir: Path, modality: str) -> set[int]:
    with sqlite3.connect(index_dir / "items.sqlite") as conn:
        return {r[0] for r in conn.execute("SELECT item_id FROM vectors WHERE modality = ?", (modality,))}


def test_index_reports_counts_and_bad_items(index):
    _, report = index
    assert report["added"] == 9  # 8 products + 1 caption-only row
    assert report["updated"] == report["removed"] == report["unchanged"] == 0
    assert report["images_encoded"] == 8 and report["image_runtime"] == "onnxruntime fp32"  # the default runtime
    reasons = {f["item"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == {"notes", "truncated"}
    assert "not an image" in reasons["notes"]
    assert "truncated" in reasons["truncated"]


def test_faiss_ids_match_sqlite_rows(index):
    path, _ = index
    for modality in ("image", "text"):
        assert faiss_ids(path, modality) == sqlite_ids(path, modality)
    assert len(sqlite_ids(path, "image")) == 8 and len(sqlite_ids(path, "text")) == 9


@pytest.mark.parametrize("key", PRODUCTS)
def test_image_query_returns_itself_first(index, catalog_dir, key):
    path, _ = index
    image = next((catalog_dir / "images").glob(f"{key}.*"))
    out = json.loads(run("search", "--image", image, "--index", path, "--format", "json").stdout)
    assert out["results"][0]["id"] == key
    assert out["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("caption,key", [("a red ankle boot", "boot-red"), ("a pair of wool socks", "caption-only"),
                                         ("a black shoulder bag", "bag-black")])
def test_caption_query_with_text_target_returns_its_item(index, caption, key):
    path, _ = index
    out = json.loads(run("search", caption, "--target", "text", "--index", path, "--format", "json").stdout)
    assert out["results"][0]["id"] == key
    assert out["results"][0]["caption"] == caption


def test_image_to_text_ranks_captions(index, catalog_dir):
    path, _ = index
    out = json.loads(run("search", "--image", catalog_dir / "images/bag-brown.png", "--target", "text",
                         "--index", path, "-k", "20", "--format", "json").stdout)
    assert {r["id"] for r in out["results"]} == set(PRODUCTS) | {"caption-only"}
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_json_contract(index):
    path, _ = index
    out = json.loads(run("search", "a red ankle boot", "--index", path, "-k", "3", "--format", "json").stdout)
    assert out["query"] == {"text": "a red ankle boot", "target": "image", "k": 3}
    assert len(out["results"]) == 3
    for hit in out["results"]:
        assert set(hit) >= {"id", "score", "caption", "image", "metadata"}
        assert isinstance(hit["id"], str) and isinstance(hit["score"], float)
        assert Path(hit["image"]).is_file()
        assert set(hit["metadata"]) == {"category", "price", "color"}
    first = out["results"][0]
    assert isinstance(first["metadata"]["price"], float)


def test_info_json_contract(index):
    path, _ = index
    info = json.loads(run("info", "--index", path, "--format", "json").stdout)
    assert {k: info[k] for k in ("items", "images", "captions", "dim", "index_type")} == {
        "items": 9, "images": 8, "captions": 9, "dim": 32, "index_type": "flat"}
    assert info["model"].startswith("mmsearch-tiny:") and info["model"].endswith("tiny.safetensors")


def test_table_output(index):
    path, _ = index
    out = run("search", "a blue ankle boot", "--index", path, "-k", "2").stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].lstrip().startswith("1 ")


def test_incremental_reindex(index, catalog_dir):
    path, _ = index
    csv = catalog_dir / "catalog.csv"
    again = json.loads(run("index", csv, "--index", path, "-q", "--format", "json").stdout)
    assert (again["added"], again["updated"], again["removed"], again["unchanged"]) == (0, 0, 0, 9)

    lines = csv.read_text().splitlines()
    lines = [ln for ln in lines if not ln.startswith("bag-black,")]  # removed
    lines = [ln.replace("a green sneaker", "a bright green sneaker") for ln in lines]  # caption changed
    lines.append("sock-2,,a pair of cotton socks,Socks,4,white")  # added
    csv.write_text("\n".join(lines) + "\n")
    # image bytes changed: the red boot becomes the blue boot's picture
    (catalog_dir / "images/boot-red.jpg").write_bytes((catalog_dir / "images/boot-blue.jpg").read_bytes())

    report = json.loads(run("index", csv, "--index", path, "-q", "--format", "json").stdout)
    assert (report["added"], report["updated"], report["removed"], report["unchanged"]) == (1, 2, 1, 6)
    assert report["index_updated_in_place"] == ["image", "text"]  # flat: removals and additions in place
    for modality in ("image", "text"):
        assert faiss_ids(path, modality) == sqlite_ids(path, modality)
    out = json.loads(run("search", "--image", catalog_dir / "images/boot-blue.jpg", "--index", path, "-k", "2",
                         "--format", "json").stdout)
    assert {r["id"] for r in out["results"]} == {"boot-red", "boot-blue"}
    assert all(r["score"] == pytest.approx(1.0, abs=1e-4) for r in out["results"])


def test_index_says_when_it_updated_the_faiss_files_in_place(index, catalog_dir):
    path, _ = index
    csv = catalog_dir / "catalog.csv"
    csv.write_text(csv.read_text() + "sock-2,,a pair of cotton socks,Socks,4,white\n")
    lines = run("index", csv, "--index", path, "-q").stdout.splitlines()
    assert lines == ["added 1, updated 0, removed 0, unchanged 9, failed 2",  # a caption: no image line
                     "FAISS files updated in place, not rebuilt: image, text"]
    (catalog_dir / "images/boot-red.jpg").write_bytes((catalog_dir / "images/boot-blue.jpg").read_bytes())
    lines = run("index", csv, "--index", path, "-q").stdout.splitlines()
    assert lines[0] == "added 0, updated 1, removed 0, unchanged 9, failed 2"
    assert lines[-1] == "images encoded: 1 (onnxruntime fp32)"
    assert len(run("index", csv, "--index", path, "-q").stdout.splitlines()) == 1  # nothing written


def test_no_delete_keeps_items(index, catalog_dir):
    path, _ = index
    csv = catalog_dir / "catalog.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:3]) + "\n")
    report = json.loads(run("index", csv, "--index", path, "-q", "--no-delete", "--format", "json").stdout)
    assert report["removed"] == 0 and report["unchanged"] == 2
    info = json.loads(run("info", "--index", path, "--format", "json").stdout)
    assert info["items"] == 9


def test_failed_run_keeps_indexed_items(index, catalog_dir):
    """An item whose image breaks on a later run is reported, and its indexed version is kept."""
    path, _ = index
    (catalog_dir / "images/bag-brown.png").write_text("oops")
    report = json.loads(run("index", catalog_dir / "catalog.csv", "--index", path, "-q", "--format", "json").stdout)
    assert "bag-brown" in {f["item"] for f in report["failed"]}
    assert report["removed"] == 0
    out = json.loads(run("search", "a brown leather bag", "--target", "text", "--index", path, "--format",
                         "json").stdout)
    assert out["results"][0]["id"] == "bag-brown"


def test_batch_queries(index, catalog_dir, tmp_path):
    path, _ = index
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join([
        json.dumps({"text": "a yellow summer dress", "target": "text", "k": 1}),
        json.dumps({"image": str(catalog_dir / "images/dress-purple.png"), "k": 2}),
        json.dumps({"image": str(catalog_dir / "images/notes.jpg")}),
    ]) + "\n")
    lines = run("search", "--queries", queries, "--index", path).stdout.strip().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(x) for x in lines)
    assert first["results"][0]["id"] == "dress-yellow" and len(first["results"]) == 1
    assert second["results"][0]["id"] == "dress-purple" and len(second["results"]) == 2
    assert third["line"] == 3 and "not an image" in third["error"]


def test_errors_are_one_clear_line(tmp_path, index, catalog_dir):
    path, _ = index
    missing = run("search", "x", "--index", tmp_path / "nope", ok=False)
    assert missing.exit_code == 1
    assert missing.output.strip() == f"Error: no index at {tmp_path / 'nope'}"
    no_catalog = run("index", tmp_path / "none.csv", "--index", path, ok=False)
    assert no_catalog.exit_code == 2 and "does not exist" in no_catalog.output
    bad_model = run("index", catalog_dir / "catalog.csv", "--index", tmp_path / "new", "--model", "no-such-model",
                    "--pretrained", "x.safetensors", ok=False)
    assert bad_model.exit_code == 1
    assert bad_model.output.strip().startswith("Error: unknown model 'no-such-model'")
    bad_image = run("search", "--image", catalog_dir / "images/notes.jpg", "--index", path, ok=False)
    assert bad_image.exit_code == 1 and "not an image file" in bad_image.output
    assert "Traceback" not in bad_image.output + bad_model.output + missing.output


def test_other_model_on_existing_index_is_an_error(index, catalog_dir):
    path, _ = index
    result = run("index", catalog_dir / "catalog.csv", "--index", path, "--model", "mmsearch-tiny",
                 "--pretrained", "random", ok=False)
    assert result.exit_code == 1 and "was built with model" in result.output


def test_index_name_resolves_under_mmsearch_home(tmp_path, catalog_dir, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("MMSEARCH_HOME", str(tmp_path / "home"))
    run("index", catalog_dir / "catalog.csv", "--index", "shop", "--model", "mmsearch-tiny", "--pretrained",
        tiny_checkpoint, "-q")
    assert (tmp_path / "home/shop/manifest.json").is_file()
    monkeypatch.delenv("MMSEARCH_HOME")
    monkeypatch.chdir(tmp_path)
    run("index", catalog_dir / "catalog.csv", "--index", "shop2", "--model", "mmsearch-tiny", "--pretrained",
        tiny_checkpoint, "-q")
    assert (tmp_path / "indexes/shop2/manifest.json").is_file()


def test_newer_schema_is_refused(index):
    path, _ = index
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    result = run("info", "--index", path, ok=False)
    assert result.exit_code == 1 and "newer than this mmsearch supports" in result.output


def test_folder_catalog_with_sidecar_captions(tmp_path, catalog_dir, tiny_checkpoint):
    folder = catalog_dir / "images"
    (folder / "boot-red.txt").write_text("a red ankle boot\n")
    report = json.loads(run("index", folder, "--index", tmp_path / "f", "--model", "mmsearch-tiny",
                            "--pretrained", tiny_checkpoint, "-q", "--format", "json").stdout)
    assert report["added"] == 8 and len(report["failed"]) == 2
    out = json.loads(run("search", "a red ankle boot", "--target", "text", "--index", tmp_path / "f",
                         "--format", "json").stdout)
    assert out["results"][0]["id"] == "boot-red.jpg" and len(out["results"]) == 1


def test_python_module_entry_point(index):
    import subprocess
    import sys

    path, _ = index
    out = subprocess.run([sys.executable, "-m", "mmsearch", "info", "--index", str(path), "--format", "json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["items"] == 9


def test_vectors_are_normalised(index):
    path, _ = index
    with sqlite3.connect(path / "items.sqlite") as conn:
        blobs = [r[0] for r in conn.execute("SELECT data FROM vectors")]
    norms = np.linalg.norm(np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_python_api(index, catalog_dir):
    import mmsearch

    path, _ = index
    with mmsearch.Searcher(path) as searcher:
        result = searcher.search(mmsearch.build_query(images=[catalog_dir / "images/dress-yellow.png"], k=3))
        assert result.results[0].id == "dress-yellow"
        purple = catalog_dir / "images/dress-purple.png"
        composed = searcher.search(mmsearch.build_query(texts=["yellow"], images=[purple], explain=True,
                                                        where=["category=Dresses"]))
        assert {h.id for h in composed.results} == {"dress-yellow", "dress-purple"}
        assert all(h.explain is not None for h in composed.results)
    assert mmsearch.index_info(path)["items"] == 9


def test_train_then_index_with_the_trained_model(tmp_path, catalog_dir):
    out = tmp_path / "model"
    result = run("train", catalog_dir / "catalog.csv", "--model", "mmsearch-tiny", "--out", out, "--epochs", "1",
                 "--batch-size", "4", "--warmup-steps", "1", "-q", "--format", "json")
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and (out / "model_card.json").is_file()
    index = tmp_path / "idx"
    run("index", catalog_dir / "catalog.csv", "--index", index, "--model", out, "-q")
    info = json.loads(run("info", "--index", index, "--format", "json").stdout)
    assert info["model"] == str(out.resolve()) and info["items"] == 9


def test_train_needs_a_stopping_rule(tmp_path, catalog_dir):
    result = run("train", catalog_dir / "catalog.csv", "--out", tmp_path / "m", ok=False)
    assert result.exit_code == 2 and "give --epochs or --minutes" in result.output
