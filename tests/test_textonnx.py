"""The torch-free text path: BPE tokenizer parity, ONNX export parity, and a cold CLI query without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from click.testing import CliRunner

from mmsearch import textonnx
from mmsearch.cli import cli
from mmsearch.encoders import Encoder, load_encoder
from mmsearch.search import Searcher, build_query

TEXTS = [
    "a red ankle boot", "Ankle boots in RED!", "  spaced\tout\nwords  ", "it's what they'll've done",
    "café crème brûlée", "Ünïcödé ÄÖÜ ß", "日本語のテキスト", "emoji 👗👠 test", "&amp;amp; html &lt;b&gt;",
    "numbers 1234567 and 3.14", "punctuation!!! ??? ...", "", "x" * 300, "a long caption " * 30,
    "<start_of_text> literal specials <end_of_text>", "hyphen-ated words_with_underscores",
]


@pytest.mark.parametrize("context_length", [16, 77])
def test_tokenizer_matches_open_clip(context_length):
    ours = textonnx.ClipTokenizer(context_length)(TEXTS)
    theirs = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(TEXTS).numpy()
    assert ours.dtype == np.int64 and ours.shape == (len(TEXTS), context_length)
    np.testing.assert_array_equal(ours, theirs)


def test_tokenizer_truncates_with_end_token():
    tokens = textonnx.ClipTokenizer(8)(["one two three four five six seven eight nine"])[0]
    assert tokens[0] == 49406 and tokens[-1] == 49407 and (tokens != 0).all()


@pytest.fixture
def exported(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    folder = textonnx.export_text_encoder(tiny_encoder)
    assert folder is not None
    return folder


def test_export_matches_torch_and_is_reused(exported, tiny_encoder):
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["dim"] == tiny_encoder.dim and meta["max_abs_diff"] <= textonnx.EXPORT_TOLERANCE
    fast = textonnx.load_fast_text_encoder(tiny_encoder.ref, tiny_encoder.dim)
    got, want = fast.encode_texts(TEXTS), tiny_encoder.encode_texts(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-4)
    mtime = (exported / "text.ort").stat().st_mtime_ns
    assert textonnx.export_text_encoder(tiny_encoder) == exported  # second call: nothing re-exported
    assert (exported / "text.ort").stat().st_mtime_ns == mtime


def test_query_session_stops_its_threads_spinning_after_each_run(exported, tiny_encoder):
    # a warm query's index search and row read run right after the encoder, on the same cores
    session = textonnx.load_fast_text_encoder(tiny_encoder.ref, tiny_encoder.dim).session
    options = session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == (os.cpu_count() or 1)


def test_export_takes_any_length_and_queries_run_only_their_prefix(exported, tiny_encoder):
    assert json.loads((exported / "meta.json").read_text())["trim"] is True
    fast = textonnx.load_fast_text_encoder(tiny_encoder.ref, tiny_encoder.dim)
    tokens = fast.tokenizer(["a red boot", "striped summer dress with two deep pockets"])
    prefix = int(tokens.argmax(axis=1).max()) + 1
    assert fast._tokens(["a red boot", "striped summer dress with two deep pockets"]).shape == (2, prefix)
    whole = fast.session.run(None, {"tokens": tokens})[0]
    for length in (prefix, prefix + 3, tokens.shape[1]):
        np.testing.assert_allclose(fast.session.run(None, {"tokens": tokens[:, :length]})[0], whole, atol=1e-5)
    assert not any("attention" in vars(block) for block in tiny_encoder.model.transformer.resblocks)


def test_an_export_of_the_previous_format_still_serves_queries(exported, tiny_encoder):
    """An index built before the dynamic-length export keeps torch-free queries (whole context)."""
    from mmsearch.onnxcache import cache_root, model_key

    old = cache_root("text-onnx") / model_key(tiny_encoder.ref, "text", textonnx.FULL_CONTEXT_FORMAT)
    exported.rename(old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({k: v for k, v in {**meta, "format": 2}.items() if k != "trim"}))
    fast = textonnx.load_fast_text_encoder(tiny_encoder.ref, tiny_encoder.dim)
    assert fast is not None and fast.trim is False
    np.testing.assert_allclose(fast.encode_texts(TEXTS), tiny_encoder.encode_texts(TEXTS), atol=1e-4)
    assert textonnx.exported_folder(tiny_encoder.ref, tiny_encoder.dim) is None  # ingest re-exports format 3


def test_key_changes_when_the_weights_file_changes(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"one")
    ref = textonnx.ModelRef("mmsearch-tiny", str(weights))
    before = textonnx.export_folder(ref)
    weights.write_bytes(b"other bytes")
    assert textonnx.export_folder(ref) != before


def test_damaged_export_falls_back_to_none(exported, tiny_encoder, caplog):
    (exported / "text.ort").write_bytes(b"not an onnx file")
    assert textonnx.load_fast_text_encoder(tiny_encoder.ref, tiny_encoder.dim) is None
    assert "unusable" in caplog.text


def test_disabled_by_environment(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMSEARCH_FAST_TEXT", "0")
    assert textonnx.export_text_encoder(tiny_encoder) is None
    assert not (tmp_path / "cache").exists()


def test_other_tokenizers_are_not_exported(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny_encoder, "tokenizer", lambda texts: np.zeros((len(texts), 77), dtype=np.int64))
    assert textonnx.export_text_encoder(tiny_encoder) is None


def _index(tmp_path, catalog_dir, tiny_checkpoint) -> Path:
    path = tmp_path / "idx"
    result = CliRunner().invoke(cli, ["index", str(catalog_dir / "catalog.csv"), "--index", str(path), "--model",
                                      "mmsearch-tiny", "--pretrained", str(tiny_checkpoint), "-q"])
    assert result.exit_code == 0, result.output
    return path


def test_fast_search_equals_torch_search(tmp_path, catalog_dir, tiny_checkpoint):
    path = _index(tmp_path, catalog_dir, tiny_checkpoint)
    for words in (["a red ankle boot"], ["a dress", "-0.5:yellow"]):
        query = build_query(texts=words, k=5)
        with Searcher(path) as fast_searcher:
            fast = fast_searcher.search(query)
            assert isinstance(fast_searcher.text_encoder, textonnx.FastTextEncoder)
        with Searcher(path) as torch_searcher:
            slow = torch_searcher.search_vectors(query, *_torch_vectors(torch_searcher, query))
        assert [h.id for h in fast.results] == [h.id for h in slow.results]
        np.testing.assert_allclose([h.score for h in fast.results], [h.score for h in slow.results], atol=1e-4)


def test_words_use_the_onnx_export_unless_the_caller_gives_an_encoder(tmp_path, catalog_dir, tiny_checkpoint):
    path = _index(tmp_path, catalog_dir, tiny_checkpoint)
    with Searcher(path) as searcher:
        searcher.search(build_query(images=[str(catalog_dir / "images" / "boot-red.jpg")], k=3))  # loads torch
        assert isinstance(searcher.encoder, Encoder)
        assert isinstance(searcher.text_encoder, textonnx.FastTextEncoder)
    own = load_encoder("mmsearch-tiny", str(tiny_checkpoint))
    with Searcher(path, encoder=own) as searcher:
        assert searcher.text_encoder is own


def _torch_vectors(searcher, query):
    vectors = searcher.encoder.encode_texts([p.value for p in query.parts])
    return vectors, np.array([p.weight for p in query.parts])


@pytest.mark.slow
def test_cold_cli_text_query_never_imports_torch(tmp_path, catalog_dir, tiny_checkpoint):
    path = _index(tmp_path, catalog_dir, tiny_checkpoint)
    script = ("import sys, json\nfrom mmsearch.cli import cli\n"
              "args = ['search', 'a red ankle boot', '--target', 'text', '--index', sys.argv[1], '--format', 'json']\n"
              "try:\n    cli(args)\n"
              "except SystemExit:\n    pass\n"
              "print(json.dumps({'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    *lines, last = out.stdout.strip().splitlines()
    results = json.loads("\n".join(lines))
    assert results["results"][0]["id"] == "boot-red"
    assert json.loads(last) == {"torch": False, "open_clip": False}
