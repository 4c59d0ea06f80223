"""`mmsearch tune`: fitted fusion values are saved in the manifest and never score below the defaults."""

import json

from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.config import Manifest


def build(tmp_path, catalog_dir, tiny_checkpoint):
    path = tmp_path / "idx"
    result = CliRunner().invoke(cli, ["index", str(catalog_dir / "catalog.csv"), "--index", str(path), "--model",
                                      "mmsearch-tiny", "--pretrained", str(tiny_checkpoint), "-q"])
    assert result.exit_code == 0, result.output
    queries = tmp_path / "labelled.jsonl"
    rows = [
        {"parts": [{"image": "catalog/images/boot-red.jpg"}, {"text": "blue"}], "relevant": ["boot-blue"]},
        {"parts": [{"image": "catalog/images/sneaker-green.png"}, {"text": "white"}], "relevant": ["sneaker-white"]},
        {"parts": [{"image": "catalog/images/bag-black.png"}, {"text": "brown"}], "relevant": ["bag-brown"], "k": 3},
        {"text": "a purple evening dress", "target": "item", "relevant": ["dress-purple"]},
    ]
    queries.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, queries


def test_tune_saves_fitted_values(tmp_path, catalog_dir, tiny_checkpoint):
    path, queries = build(tmp_path, catalog_dir, tiny_checkpoint)
    result = CliRunner().invoke(cli, ["tune", "--index", str(path), "--queries", str(queries), "-k", "2",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["queries"] == 4
    assert report["attention"]["R@2"] >= report["before"]["R@2"]
    fitted = Manifest.load(path).fusion
    params = report["attention"]["params"]
    assert (fitted.modality_tau, fitted.part_tau, fitted.image_weight) == (
        params["modality_tau"], params["part_tau"], params["image_weight"])
    assert fitted.strategy == report["chosen"]


def test_tune_dry_run_leaves_manifest(tmp_path, catalog_dir, tiny_checkpoint):
    path, queries = build(tmp_path, catalog_dir, tiny_checkpoint)
    before = (path / "manifest.json").read_text()
    result = CliRunner().invoke(cli, ["tune", "--index", str(path), "--queries", str(queries), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "(not saved)" in result.output
    assert (path / "manifest.json").read_text() == before


def test_tune_rejects_unlabelled_lines(tmp_path, catalog_dir, tiny_checkpoint):
    path, queries = build(tmp_path, catalog_dir, tiny_checkpoint)
    queries.write_text(json.dumps({"text": "a red ankle boot"}) + "\n")
    result = CliRunner().invoke(cli, ["tune", "--index", str(path), "--queries", str(queries)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: labelled.jsonl line 1: needs a JSON object with 'relevant' ids")
