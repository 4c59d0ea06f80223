"""ONNX Runtime image encoding (`index --runtime onnx [--quantize int8]`) against the torch path."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from int8_graph import assert_weight_matmuls_int8_per_channel, int8_weight_peak
from PIL import Image

from mmsearch import imageonnx
from mmsearch import ingest as ingest_module
from mmsearch.cli import cli
from mmsearch.collection import Collection
from mmsearch.encoders import load_encoder
from mmsearch.errors import ModelLoadError
from mmsearch.images import load_image, load_pixels
from mmsearch.ingest import IngestOptions, ingest

PRODUCTS = ["boot-red", "boot-blue", "sneaker-green", "sneaker-white", "dress-yellow", "dress-purple",
            "bag-brown", "bag-black"]


@pytest.fixture
def pixels(catalog_dir, tiny_encoder) -> torch.Tensor:
    paths = sorted(p for p in (catalog_dir / "images").iterdir() if p.stem in PRODUCTS)
    return torch.stack([tiny_encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("variant,min_cosine", [("fp32", 0.99999), ("int8", imageonnx.INT8_MIN_COSINE)])
def test_onnx_tower_agrees_with_torch(tiny_encoder, pixels, tmp_path, monkeypatch, variant, min_cosine):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    tower = imageonnx.image_tower(tiny_encoder, variant)
    got, want = tower.encode(pixels.numpy()), tiny_encoder.encode_pixels(pixels)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * want).sum(axis=1).min() >= min_cosine
    if variant == "fp32":
        np.testing.assert_allclose(got, want, atol=imageonnx.FP32_TOLERANCE)
    (folder,) = (tmp_path / "cache" / "image-onnx").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["variant"] == variant and meta["probe_mean_cosine"] >= min_cosine
    assert meta["class_token_shortcut"] is True  # the tiny model is a ViT with class-token pooling
    assert meta["fused_attention"] is True  # ... with plain attention blocks
    mtime = (folder / "image.onnx").stat().st_mtime_ns
    imageonnx.image_tower(tiny_encoder, variant)  # cached: not exported again
    assert (folder / "image.onnx").stat().st_mtime_ns == mtime


def test_int8_keeps_the_patch_conv_in_fp32_and_quantises_every_matmul_per_channel(tiny_encoder, tmp_path,
                                                                                   monkeypatch):
    import onnx

    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    imageonnx.image_tower(tiny_encoder, "int8")
    (folder,) = (tmp_path / "cache" / "image-onnx").iterdir()
    ops = assert_weight_matmuls_int8_per_channel(onnx.load(str(folder / "image.onnx")).graph)
    assert "Conv" in ops and "ConvInteger" not in ops  # onnxruntime's ConvInteger is slower than fp32 Conv
    assert "MultiHeadAttention" in ops  # queries, keys and values: int8 projections into the fused operator


def test_an_onnxruntime_without_the_fused_operator_gets_the_plain_attention(tiny_encoder, pixels, tmp_path,
                                                                          monkeypatch, caplog):
    """An operator the runtime cannot load (standing in for an onnxruntime without the contrib op):
    the export falls back to plain attention, still with the class-token shortcut, still exact."""
    from mmsearch import fusedattention

    def unknown_operator(g, q, k, v, heads):
        return g.op("com.microsoft::NoSuchAttention", q, k, v, num_heads_i=heads)

    monkeypatch.setattr(fusedattention._MultiHeadAttention, "symbolic", staticmethod(unknown_operator))
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    tower = imageonnx.image_tower(tiny_encoder, "fp32")
    np.testing.assert_allclose(tower.encode(pixels.numpy()), tiny_encoder.encode_pixels(pixels),
                               atol=imageonnx.FP32_TOLERANCE)
    (folder,) = (tmp_path / "cache" / "image-onnx").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fused_attention"] is False and meta["class_token_shortcut"] is True
    assert "fused-attention export of mmsearch-tiny" in caplog.text and "NoSuchAttention" in caplog.text


@pytest.mark.parametrize("reduce_range,bits,peak", [(True, 7, 64), (False, 8, 127)])
def test_int8_weights_are_7_bit_where_the_cpu_has_no_int8_dot_product(tiny_encoder, tmp_path, monkeypatch,
                                                                       reduce_range, bits, peak):
    """Without VNNI/AMX onnxruntime's int8 kernel sums pairs of products in int16 and saturates on
    8-bit weights: those machines export 7-bit weights, into a cache folder of their own."""
    import onnx

    from mmsearch import onnxcache

    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnxcache, "int8_reduce_range", lambda: reduce_range)
    imageonnx.image_tower(tiny_encoder, "int8")
    (folder,) = (tmp_path / "cache" / "image-onnx").iterdir()
    assert folder == imageonnx.export_folder(tiny_encoder.ref, "int8")
    assert json.loads((folder / "meta.json").read_text())["int8_weight_bits"] == bits
    graph = onnx.load(str(folder / "image.onnx")).graph
    assert int8_weight_peak(graph) == peak if not reduce_range else int8_weight_peak(graph) <= peak
    monkeypatch.setattr(onnxcache, "int8_reduce_range", lambda: not reduce_range)
    assert imageonnx.export_folder(tiny_encoder.ref, "int8") != folder  # the other width: another export


@pytest.mark.parametrize("machine,flags,reduce", [
    ("x86_64", "fpu sse2 avx2 fma", True),  # AVX2 only
    ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
    ("x86_64", "fpu avx2 avx_vnni", False),
    ("x86_64", "fpu avx2 amx_tile amx_int8", False),
    ("aarch64", "fp asimd", False),  # Arm's dot products accumulate in 32 bits
])
def test_int8_reduce_range_reads_the_cpu_flags(tmp_path, monkeypatch, machine, flags, reduce):
    import platform

    from mmsearch import onnxcache

    cpuinfo = tmp_path / f"cpuinfo-{machine}-{len(flags)}"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert onnxcache.int8_reduce_range(cpuinfo) is reduce
    assert onnxcache.int8_reduce_range(tmp_path / "missing") is (machine == "x86_64")  # unknown x86: 7 bits


def test_int8_that_drifts_too_far_is_refused(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(imageonnx, "INT8_MIN_COSINE", 1.01)  # unreachable: any int8 export fails the check
    with pytest.raises(ModelLoadError, match="drifts too far from fp32"):
        imageonnx.image_tower(tiny_encoder, "int8")
    assert not any((tmp_path / "cache" / "image-onnx").iterdir())  # nothing half-published


def test_unknown_runtime_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="unknown runtime 'tensorrt'; choose from auto, torch, onnx"):
        load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="tensorrt")


def test_auto_runtime_encodes_with_the_checked_onnx_tower(tiny_checkpoint, pixels, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    torch_encoder = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="torch")
    auto = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="auto")
    assert torch_encoder.image_tower is None and auto.image_tower is not None
    np.testing.assert_allclose(auto.encode_pixels(pixels), torch_encoder.encode_pixels(pixels),
                               atol=imageonnx.FP32_TOLERANCE)
    assert [p.name for p in (tmp_path / "cache" / "image-onnx").iterdir()] == [
        imageonnx.export_folder(auto.ref, "fp32").name]


def _failing_export(calls: list):
    def export(encoder, variant, staging):
        calls.append(variant)
        raise ModelLoadError(f"ONNX image tower of {encoder.ref.label()} differs from torch by 0.5")
    return export


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_auto_runtime_falls_back_to_torch_with_a_warning_and_remembers_it(tiny_checkpoint, pixels, tmp_path,
                                                                        monkeypatch, caplog, quantize):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(imageonnx, "_export", _failing_export(calls))
    with caplog.at_level("INFO", logger="mmsearch"):
        encoder = load_encoder("mmsearch-tiny", str(tiny_checkpoint), quantize, runtime="auto")
    assert encoder.image_tower is None and calls == [quantize or "fp32"]
    warning = f"ONNX image tower of mmsearch-tiny:{tiny_checkpoint} differs from torch by 0.5; encoding " \
              "images with torch instead"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [warning]
    quantised = any("quantized" in type(m).__module__ for m in encoder.model.visual.modules())
    assert quantised is (quantize == "int8")  # torch's own int8 tower takes over
    assert ingest_module.image_runtime(encoder) == ("torch int8" if quantize else "torch fp32")
    assert encoder.encode_pixels(pixels).shape == (len(pixels), encoder.dim)
    caplog.clear()
    with caplog.at_level("INFO", logger="mmsearch"):
        again = load_encoder("mmsearch-tiny", str(tiny_checkpoint), quantize, runtime="auto")
    assert again.image_tower is None and len(calls) == 1  # the recorded failure: no second export
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with pytest.raises(ModelLoadError, match="differs from torch by 0.5"):  # asked for explicitly: an error
        load_encoder("mmsearch-tiny", str(tiny_checkpoint), quantize, runtime="onnx")


def test_a_failure_recorded_by_another_onnxruntime_is_tried_again(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(imageonnx, "_export", _failing_export(calls))
    encoder = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="auto")
    marker = imageonnx.unsupported_marker(encoder.ref, "fp32")
    recorded = json.loads(marker.read_text())
    assert recorded["reason"].endswith("differs from torch by 0.5")
    marker.write_text(json.dumps({**recorded, "onnxruntime": "0.0.1"}))
    monkeypatch.undo()
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    assert load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="auto").image_tower is not None


def test_auto_runtime_survives_a_damaged_cached_export_without_recording_it(tiny_checkpoint, tmp_path,
                                                                           monkeypatch, caplog):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    encoder = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="auto")
    (imageonnx.export_folder(encoder.ref, "fp32") / imageonnx.MODEL_FILE).write_bytes(b"not a graph")
    with caplog.at_level("WARNING", logger="mmsearch"):
        damaged = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="auto")
    assert damaged.image_tower is None
    assert "cannot load the cached ONNX image tower of mmsearch-tiny" in caplog.text
    assert not imageonnx.unsupported_marker(encoder.ref, "fp32").exists()


def test_cli_index_runs_the_onnx_tower_by_default_and_torch_when_asked(tmp_path, catalog_dir, tiny_checkpoint,
                                                                         monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    used = []
    real = ingest_module.load_encoder
    monkeypatch.setattr(ingest_module, "load_encoder",
                        lambda *args: used.append(args[3]) or real(*args))
    base = ["index", str(catalog_dir / "catalog.csv"), "--model", "mmsearch-tiny", "--pretrained",
            str(tiny_checkpoint), "-q", "--format", "json"]
    for name, extra, runtime in (("default", [], "onnxruntime fp32"), ("torch", ["--runtime", "torch"], "torch fp32")):
        result = CliRunner().invoke(cli, [*base, "--index", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["added"] == 9 and report["image_runtime"] == runtime
    assert used == ["auto", "torch"]
    exports = list((tmp_path / "cache" / "image-onnx").iterdir())
    assert len(exports) == 1  # the default run exported the image tower; the torch run did not
    vectors = {name: _image_vectors_by_key(tmp_path / name) for name in ("default", "torch")}
    assert len(vectors["default"]) == 8 and vectors["default"].keys() == vectors["torch"].keys()
    for key, vector in vectors["default"].items():
        np.testing.assert_allclose(vector, vectors["torch"][key], atol=imageonnx.FP32_TOLERANCE)


def _image_vectors_by_key(index_dir: Path) -> dict[str, np.ndarray]:
    collection = Collection.open(index_dir)
    try:
        ids = {item_id: key for key, (item_id, *_rest) in collection.store.fingerprints().items()}
        return {ids[i]: v for i, v in collection.store.vectors(list(ids), "image", collection.dim).items()}
    finally:
        collection.close()


@pytest.mark.slow
def test_cli_index_with_onnx_int8_finds_each_image(tmp_path, catalog_dir):
    """On the shipped trained model: the random tiny model puts all eight photos within cosine 0.98-0.99
    of each other, so int8's own drift (~0.986 to fp32) decided their order, and did so differently
    from one library release to the next."""
    path = tmp_path / "idx"
    result = CliRunner().invoke(cli, ["index", str(catalog_dir / "catalog.csv"), "--index", str(path), "--model",
                                      "mmsearch-fashion", "--runtime", "onnx", "--quantize", "int8", "-q",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 9 and json.loads(result.stdout)["image_runtime"] == "onnxruntime int8"
    for key in PRODUCTS:
        image = next((catalog_dir / "images").glob(f"{key}.*"))
        out = CliRunner().invoke(cli, ["search", "--image", str(image), "--index", str(path), "--format", "json"])
        first, second = json.loads(out.stdout)["results"][:2]
        assert first["id"] == key and first["score"] > 0.99
        assert second["id"].split("-")[0] == key.split("-")[0]  # then the other colour of the same product


@pytest.mark.parametrize("cores,layout", [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (16, (4, 4)), (6, (4, 1))])
def test_stream_layout_shares_the_cores_out(cores, layout):
    assert imageonnx.stream_layout(cores) == layout


def test_a_batch_split_across_streams_keeps_its_order(tiny_encoder, pixels, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    tower = imageonnx.image_tower(tiny_encoder, "fp32")
    one = imageonnx.OnnxImageTower(tower.session, "fp32", streams=1).encode(pixels.numpy())
    for streams, slice_images in ((2, 1), (2, 3), (3, 2), (len(pixels) + 2, 1), (2, len(pixels))):
        got = imageonnx.OnnxImageTower(tower.session, "fp32", streams, slice_images).encode(pixels.numpy())
        np.testing.assert_allclose(got, one, atol=1e-6)  # uneven slices, more streams than slices


def test_submitted_batches_queue_behind_each_other_and_keep_their_own_vectors(tiny_encoder, pixels, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    tower = imageonnx.OnnxImageTower(imageonnx.image_tower(tiny_encoder, "fp32").session, "fp32", 2, 3)
    first, second = pixels.numpy(), pixels.numpy()[::-1].copy()
    waiting = [tower.submit(first), tower.submit(second)]  # both queued before either is waited for
    np.testing.assert_allclose(waiting[1](), tower.encode_here(second), atol=1e-6)
    np.testing.assert_allclose(waiting[0](), tower.encode_here(first), atol=1e-6)


def test_run_on_stream_runs_the_job_on_a_stream_thread(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    tower = imageonnx.OnnxImageTower(imageonnx.image_tower(tiny_encoder, "fp32").session, "fp32", streams=2)
    names = {tower.run_on_stream(lambda: threading.current_thread().name).result() for _ in range(8)}
    assert names and all(name.startswith("onnx-stream") for name in names)
    assert threading.current_thread().name not in names


def test_onnx_ingest_decodes_on_the_streams_skips_bad_items_and_stores_the_towers_vectors(
        tmp_path, catalog_dir, tiny_checkpoint, monkeypatch):
    """With the ONNX tower each slice is decoded and encoded by one stream thread; a bad file in a
    slice is reported and skipped, its slice-mates are stored with the vectors the tower gives them."""
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    encoder = load_encoder("mmsearch-tiny", str(tiny_checkpoint), runtime="onnx")
    encoder.image_tower = imageonnx.OnnxImageTower(encoder.image_tower.session, "fp32", streams=2, slice_images=3)
    decoded_on: list[tuple[str, int]] = []  # (thread, torch threads it runs its ops on)

    def recording_loader(*args, **kwargs):
        decoded_on.append((threading.current_thread().name, torch.get_num_threads()))
        return load_pixels(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "load_pixels", recording_loader)
    torch_threads = torch.get_num_threads()
    report = ingest(catalog_dir / "catalog.csv", tmp_path / "idx", IngestOptions(batch_size=4), encoder=encoder)
    assert report.added == 9 and sorted(e.item for e in report.failed) == ["notes", "truncated"]
    assert len(decoded_on) == 10 and all(name.startswith("onnx-stream") for name, _ in decoded_on)
    assert {threads for _, threads in decoded_on} == {1}  # no OpenMP helpers preempting the other stream
    assert torch.get_num_threads() == torch_threads  # this thread's count is back
    collection = Collection.open(tmp_path / "idx")
    try:
        ids, vectors = collection.all_vectors("image")
        items = collection.store.items([int(i) for i in ids])
        text_ids, _ = collection.all_vectors("text")
    finally:
        collection.close()
    by_key = {items[int(i)].key: vec for i, vec in zip(ids, vectors)}
    assert sorted(by_key) == sorted(PRODUCTS) and len(text_ids) == 9  # caption-only has its text vector
    for key, vector in by_key.items():
        path = next((catalog_dir / "images").glob(f"{key}.*"))
        pixels = encoder.preprocess(load_image(path, min_side=encoder.input_side))
        np.testing.assert_allclose(vector, encoder.image_tower.encode_here(pixels[None].numpy())[0], atol=1e-5)


@pytest.mark.parametrize("total", [1, 5, 28, 192, 1000])
def test_guided_slices_are_full_until_the_end_then_shrink(total):
    sizes, left = [], total
    while left:
        sizes.append(ingest_module._guided_slice(left, streams=2, full=8))
        left -= sizes[-1]
    assert sum(sizes) == total and all(1 <= s <= 8 for s in sizes)
    assert sizes == sorted(sizes, reverse=True)  # never a big slice after a small one
    assert all(s == 8 for s in sizes[: max(0, (total - 32) // 8)])  # full slices while 32+ images are left
    assert sizes[-1] <= ingest_module.MIN_TAIL_SLICE


def test_a_failed_onnx_ingest_leaves_no_slices_queued_on_the_streams(tmp_path, tiny_checkpoint, monkeypatch):
    """A commit that fails (disk full, say) stops the run: the slices queued behind it are cancelled,
    not decoded and encoded for nothing on the shared stream threads."""
    from mmsearch.store import Store

    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    folder, encoder = _photo_folder(tmp_path, 60), _one_image_slices(tiny_checkpoint)
    tower = encoder.image_tower
    first_two_batches = 1 + 4  # batch_size 4: a first batch of 1, then 4
    gate, decoded = threading.Event(), []

    def gated_loader(path, *args, **kwargs):  # the streams block on the third batch until the run has failed
        decoded.append(path)
        if len(decoded) > first_two_batches:
            gate.wait(timeout=30)
        return load_pixels(path, *args, **kwargs)

    def full_disk(self, records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest_module, "load_pixels", gated_loader)
    monkeypatch.setattr(Store, "write_batch", full_disk)
    with pytest.raises(OSError, match="No space left"):  # batch 2's write finds batch 1's commit failed
        ingest(folder, tmp_path / "idx", IngestOptions(batch_size=4), encoder=encoder)
    gate.set()
    tower.run_on_stream(lambda: None).result()  # queued behind every slice: the streams are idle now
    # the slices that had started (one per stream) finished; the 16 queued behind them never ran
    assert len(decoded) <= first_two_batches + tower.streams


def test_the_last_slices_are_waited_for_not_cancelled(tmp_path, tiny_checkpoint, monkeypatch):
    """The batch source is done once the last batch is queued; its slices still running or queued on
    the streams then belong to the writes that wait for them."""
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    folder, encoder = _photo_folder(tmp_path, 12), _one_image_slices(tiny_checkpoint)

    def slow_at_the_end(path, *args, **kwargs):  # both streams busy, two slices queued behind them
        if Path(path).stem >= "p08":
            time.sleep(0.2)
        return load_pixels(path, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "load_pixels", slow_at_the_end)
    report = ingest(folder, tmp_path / "idx", IngestOptions(batch_size=4), encoder=encoder)
    assert report.added == 12 and not report.failed


def _photo_folder(tmp_path, count: int) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (40, 30), (4 * i, 255 - 4 * i, 128)).save(folder / f"p{i:02d}.jpg")
    return folder


def _one_image_slices(checkpoint):
    """The tiny model's ONNX tower on 2 streams, one image per slice: many slices queue up."""
    encoder = load_encoder("mmsearch-tiny", str(checkpoint), runtime="onnx")
    encoder.image_tower = imageonnx.OnnxImageTower(encoder.image_tower.session, "fp32", streams=2, slice_images=1)
    return encoder
