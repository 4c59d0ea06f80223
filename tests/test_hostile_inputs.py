"""Hostile and broken catalog input: every kind below has a fixture (committed under
tests/fixtures/hostile/ or generated here) and a test. Good kinds must be INDEXED correctly; bad kinds
are reported per item with a clear reason while the rest of the run completes. Image queries with the
bad files fail with one clear line (CLI exit 1, no traceback).

| kind                                          | fixture                 | expected outcome                          |
|-----------------------------------------------|-------------------------|-------------------------------------------|
| truncated JPEG                                | committed catalog       | failed: "truncated"                       |
| truncated PNG                                 | truncated.png           | failed: "truncated"                       |
| zero-byte file                                | generated               | failed: "empty image file"                |
| text file named .jpg                          | generated               | failed: "not an image file"               |
| decompression bomb, 20000x20000 PNG header    | bomb.png (69 bytes)     | failed: "decompression bomb"              |
| decompression bomb, just over the 64 MP limit | generated header        | failed: "decompression bomb"              |
| huge dimensions under the limit (6000x6000)   | generated               | indexed                                   |
| extreme aspect ratio (60000x2)                | generated               | indexed, centre-cropped to 20:1           |
| CMYK JPEG                                     | cmyk.jpg                | indexed, RGB colours right                |
| 16-bit greyscale PNG                          | sixteen-bit.png         | indexed, values scaled to 8 bits          |
| palette PNG with transparency                 | palette-transparent.png | indexed, transparent -> white             |
| EXIF-rotated photo (orientation 6)            | exif-rotated.jpg        | indexed, upright (size and pixels)        |
| animated GIF                                  | animated.gif            | indexed, first frame                      |
| WebP and BMP                                  | image.webp, image.bmp   | indexed                                   |
| PNG bytes named .jpg                          | generated               | indexed (content decides, not the name)   |
| grey+alpha PNG                                | generated               | indexed                                   |
| unicode and space-laden paths                 | generated               | indexed, path stored as given             |
| missing file                                  | CSV row                 | failed: "not found"                       |
| dangling symlink                              | generated               | failed: "not found"                       |
| symlink to itself (file loop)                 | generated               | failed: "symbolic links"                  |
| symlink loop of folders in a folder catalog   | generated               | walk ends, every image once               |
| directory named like an image                 | folder + CSV row        | folder: walked, not an item; CSV: failed  |
| FIFO named .jpg                               | generated               | failed: "not a regular file" (no hang)    |
| /dev/zero as an image path                    | CSV row                 | failed: "not a regular file" (no hang)    |
| sparse 1 TB file named .jpg                   | generated               | failed: "file too large" (not read)       |
| unreadable file (mode 000)                    | generated               | failed: "permission denied"               |
| NUL byte in an image path                     | CSV row                 | failed: "NUL"                             |
| duplicate ids                                 | CSV rows                | first indexed, second failed: "duplicate" |
| Latin-1 bytes in a UTF-8 CSV                  | CSV row                 | only that row failed: "not valid UTF-8"   |
| ragged CSV row                                | CSV row                 | failed: "fields"                          |
| 200,000-character CSV field                   | CSV row                 | only that row failed: "field larger"      |
| unterminated quote                            | CSV (own file)          | rows reported: "unexpected end of data"   |
| empty caption                                 | CSV rows                | image-only item indexed; no image: failed |
| 10,000-character caption                      | CSV row                 | indexed (clipped to 2,000 characters)     |
| NaN / Infinity / mixed-type metadata          | JSONL                   | indexed, NaN -> null, filters work        |
| invalid JSON line / non-object line           | JSONL                   | failed: "invalid JSON" / "object"         |
| JSON nested 100,000 deep                      | JSONL                   | failed: "nested too deeply"               |
| lone surrogate escape (\\ud800)               | JSONL                   | failed: "lone surrogate"                  |
| file name with non-UTF-8 bytes                | folder catalog          | failed: "not valid UTF-8"                 |
| shell metacharacters in a path                | CSV rows                | failed: "not found", nothing runs         |
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmsearch.catalog import MAX_CAPTION_CHARS, read_catalog
from mmsearch.cli import cli
from mmsearch.errors import ItemError
from mmsearch.images import MAX_ASPECT, load_image
from mmsearch.ingest import IngestOptions, ingest
from mmsearch.search import Searcher, build_query

HOSTILE = Path(__file__).parent / "fixtures" / "hostile"
COMMITTED = Path(__file__).parent / "fixtures" / "catalog" / "images"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
KINDS_COVERED = 40  # rows of the table above


# -- fixtures ---------------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    spec = importlib.util.spec_from_file_location("make_fixtures", HOSTILE / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.png_header_only(width, height)


def _write_images(folder: Path) -> None:
    """The image files of the CSV catalog: committed fixtures plus generated ones."""
    folder.mkdir(parents=True)
    for name in ("cmyk.jpg", "exif-rotated.jpg", "sixteen-bit.png", "palette-transparent.png", "animated.gif",
                 "image.webp", "image.bmp", "truncated.png", "bomb.png"):
        shutil.copy(HOSTILE / name, folder / name)
    shutil.copy(COMMITTED / "truncated.jpg", folder / "truncated.jpg")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "bomb-70mp.png").write_bytes(_png_header(10000, 7000))
    Image.new("1", (6000, 6000), 1).save(folder / "huge.png")
    Image.new("L", (60000, 2), 90).save(folder / "strip.png")
    Image.new("RGB", (20, 20), (10, 20, 200)).save(folder / "really-png.jpg", format="PNG")
    Image.new("LA", (20, 20), (100, 128)).save(folder / "grey-alpha.png")
    unicode_dir = folder / "été 2024" / "  spaced  "
    unicode_dir.mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 0, 0)).save(unicode_dir / "robe rouge ☀ (1).png")
    (folder / "dangling.jpg").symlink_to(folder / "no-such-target.jpg")
    (folder / "self-loop.jpg").symlink_to("self-loop.jpg")
    (folder / "folder.jpg").mkdir()
    os.mkfifo(folder / "pipe.jpg")
    with open(folder / "sparse.jpg", "wb") as fh:
        fh.truncate(1 << 40)
    Image.new("RGB", (20, 20), (0, 90, 0)).save(folder / "locked.png")
    os.chmod(folder / "locked.png", 0)
    Image.new("RGB", (20, 20), (5, 5, 5)).save(folder / "plain.png")


# (key, image, caption) rows; expectations live in INDEXED / FAILED below
ROWS = [
    ("truncated-jpeg", "images/truncated.jpg", "a"), ("truncated-png", "images/truncated.png", "a"),
    ("zero-byte", "images/zero.jpg", "a"), ("text-as-jpg", "images/text.jpg", "a"),
    ("bomb", "images/bomb.png", "a"), ("bomb-70mp", "images/bomb-70mp.png", "a"),
    ("huge", "images/huge.png", "a white square"), ("strip", "images/strip.png", "a grey strip"),
    ("cmyk", "images/cmyk.jpg", "cyan"), ("sixteen-bit", "images/sixteen-bit.png", "ramp"),
    ("palette", "images/palette-transparent.png", "blue"), ("exif", "images/exif-rotated.jpg", "photo"),
    ("gif", "images/animated.gif", "red frame"), ("webp", "images/image.webp", "green"),
    ("bmp", "images/image.bmp", "pink"), ("png-named-jpg", "images/really-png.jpg", "blue"),
    ("grey-alpha", "images/grey-alpha.png", "grey"),
    ("unicode", "images/été 2024/  spaced  /robe rouge ☀ (1).png", "une robe rouge"),
    ("missing", "images/never-there.jpg", "a"), ("dangling", "images/dangling.jpg", "a"),
    ("self-loop", "images/self-loop.jpg", "a"), ("dir-like-image", "images/folder.jpg", "a"),
    ("fifo", "images/pipe.jpg", "a"), ("dev-zero", "/dev/zero", "a"), ("sparse", "images/sparse.jpg", "a"),
    ("unreadable", "images/locked.png", "a"),
    ("dup", "images/plain.png", "the first one"), ("dup", "images/plain.png", "the second one"),
    ("empty-caption", "images/plain.png", ""), ("long-caption", "images/plain.png", "x" * 10_000),
    ("shell-subst", "$(touch pwned-subst).jpg", "a"), ("shell-chain", "x.jpg; touch pwned-chain #", "a"),
]

INDEXED = ["huge", "strip", "cmyk", "sixteen-bit", "palette", "exif", "gif", "webp", "bmp", "png-named-jpg",
           "grey-alpha", "unicode", "empty-caption", "long-caption", "caption-only", "after-huge-field"]
# besides these, 6 CSV rows fail: the second "dup", no image and no caption, Latin-1, ragged, NUL, huge field
FAILED = {
    "truncated-jpeg": "truncated", "truncated-png": "truncated", "zero-byte": "empty image file",
    "text-as-jpg": "not an image file", "bomb": "decompression bomb", "bomb-70mp": "decompression bomb",
    "missing": "not found", "dangling": "not found", "self-loop": "symbolic links",
    "dir-like-image": "is a directory", "fifo": "not a regular file", "dev-zero": "not a regular file",
    "sparse": "file too large", "unreadable": "permission denied", "shell-subst": "not found",
    "shell-chain": "not found",
}


def _csv_bytes() -> bytes:
    lines = [b"id,image,caption,price"]
    for key, image, caption in ROWS:
        lines.append(f'{key},"{image}","{caption}",1'.encode())
    lines.append(b"caption-only,,a caption without a picture,2")
    lines.append(b"no-image-no-caption,,,3")
    lines.append(b"latin1,images/plain.png,caf\xe9 cr\xe8me,4")  # Latin-1 bytes in a UTF-8 file
    lines.append(b"ragged,images/plain.png,too,many,fields,here")
    lines.append(b'nul-path,"images/pl\x00ain.png",a,5')
    lines.append(b"huge-field,images/plain.png," + b"y" * 200_000 + b",6")
    lines.append(b"after-huge-field,images/plain.png,still read,7")
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_encoder):
    """The hostile CSV catalog, ingested once: (catalog folder, index folder, report)."""
    root = tmp_path_factory.mktemp("hostile")
    _write_images(root / "images")
    (root / "catalog.csv").write_bytes(_csv_bytes())
    report = ingest(root / "catalog.csv", root / "index", IngestOptions(batch_size=8, workers=2),
                    encoder=tiny_encoder)
    return root, root / "index", report


def _reasons(report) -> dict[str, str]:
    return {e.item: e.reason for e in report.failed}


def _indexed(index: Path) -> dict[str, dict]:
    with Searcher(index) as searcher:
        ids = searcher.collection.store.random_ids(10_000)
        return {item.key: {"image": item.image, "caption": item.caption, "meta": item.meta}
                for item in searcher.collection.store.items(ids).values()}


# -- the CSV catalog: one run, every kind reported or indexed --------------------------------------------
def test_the_run_completes_and_accounts_for_every_row(hostile):
    _, index, report = hostile
    readable_locked = {"unreadable"} if IS_ROOT else set()  # root reads mode-000 files
    assert set(_indexed(index)) == set(INDEXED) | readable_locked | {"dup"}
    assert report.added == len(INDEXED) + len(readable_locked) + 1
    assert len(report.failed) == len(set(FAILED) - readable_locked) + 6, _reasons(report)
    assert all(e.reason and e.item for e in report.failed)


@pytest.mark.parametrize("key", INDEXED)
def test_good_kinds_are_indexed(hostile, key):
    _, index, report = hostile
    assert key not in _reasons(report), _reasons(report).get(key)
    assert key in _indexed(index)


@pytest.mark.parametrize("key,reason", sorted(FAILED.items()))
def test_bad_kinds_are_reported_with_a_reason(hostile, key, reason):
    _, _, report = hostile
    if key == "unreadable" and IS_ROOT:
        pytest.skip("root reads mode-000 files; see test_unreadable_file_simulated")
    reasons = _reasons(report)
    assert key in reasons, f"{key} not reported; failures: {reasons}"
    assert reason in reasons[key]
    assert "\n" not in reasons[key]


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(path)
    os.chmod(path, 0)
    if IS_ROOT:
        pytest.skip("running as root: mode 000 does not stop reads")
    with pytest.raises(ItemError, match="permission denied"):
        load_image(path)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """As root a mode-000 file is readable, so make the open itself fail as it would for a user."""
    path = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(path)
    real_open = os.open

    def deny(p, *args, **kwargs):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ItemError, match="permission denied"):
        load_image(path)


def test_duplicate_ids_keep_the_first(hostile):
    _, index, report = hostile
    assert "duplicate id" in _reasons(report)["dup"]
    assert _indexed(index)["dup"]["caption"] == "the first one"


def test_only_the_latin1_row_fails(hostile):
    _, index, report = hostile
    sources = {e.item: e.reason for e in report.failed if "row" in e.item}
    latin = [r for item, r in sources.items() if "UTF-8" in r]
    assert len(latin) == 1
    assert "after-huge-field" in _indexed(index)  # rows after the bad ones are read


def test_ragged_nul_and_oversized_rows(hostile):
    _, _, report = hostile
    reasons = " | ".join(e.reason for e in report.failed)
    assert "row has 6 fields, header has 4" in reasons
    assert "NUL" in reasons
    assert "field larger than field limit" in reasons


def test_captions_empty_and_long(hostile):
    _, index, report = hostile
    items = _indexed(index)
    assert items["empty-caption"]["caption"] is None
    assert len(items["long-caption"]["caption"]) == MAX_CAPTION_CHARS
    assert items["caption-only"]["image"] is None
    assert "neither an image nor a caption" in " ".join(e.reason for e in report.failed)


def test_shell_metacharacters_are_just_missing_files(hostile):
    root, _, report = hostile
    reasons = _reasons(report)
    assert str(root / "$(touch pwned-subst).jpg") in reasons["shell-subst"]
    assert not list(root.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def test_unicode_path_is_stored_as_given(hostile):
    root, index, _ = hostile
    stored = _indexed(index)["unicode"]["image"]
    assert stored == str(root / "images/été 2024/  spaced  /robe rouge ☀ (1).png")
    assert Path(stored).is_file()


def test_unterminated_quote_is_reported_and_rows_before_it_read(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "c.csv").write_text('id,image,caption\nok,a.png,fine\nbad,a.png,"never closed\nlost,a.png,x\n')
    catalog = read_catalog(tmp_path / "c.csv")
    assert [i.key for i in catalog.items] == ["ok"]
    assert len(catalog.failed) == 1
    assert "rows 3-4" in catalog.failed[0].item and "unexpected end of data" in catalog.failed[0].reason


# -- decoded pixels of the good kinds --------------------------------------------------------------------
def test_exif_orientation_is_honoured():
    img = load_image(HOSTILE / "exif-rotated.jpg")
    assert img.size == (20, 40)  # stored 40x20, shown rotated
    top, bottom = np.asarray(img)[2, 10], np.asarray(img)[37, 10]
    assert top[0] > 180 and top[2] < 60  # the stored left half (red) is now on top
    assert bottom[2] > 180 and bottom[0] < 60


def test_cmyk_decodes_to_rgb():
    pixel = np.asarray(load_image(HOSTILE / "cmyk.jpg"))[16, 16].astype(int)
    assert np.abs(pixel - [0, 255, 255]).max() <= 8


def test_sixteen_bit_is_scaled_not_clipped():
    img = load_image(HOSTILE / "sixteen-bit.png")
    row = np.asarray(img)[0, :, 0].astype(int)
    assert img.mode == "RGB" and row[0] == 0 and row[-1] == 255
    assert 120 <= row[32] <= 136 and np.all(np.diff(row) >= 0)  # a ramp, not 0/255


def test_palette_transparency_becomes_white():
    pixels = np.asarray(load_image(HOSTILE / "palette-transparent.png"))
    assert tuple(pixels[4, 2]) == (255, 255, 255) and tuple(pixels[4, 12]) == (0, 0, 255)


def test_animated_gif_uses_its_first_frame():
    assert np.asarray(load_image(HOSTILE / "animated.gif"))[5, 5].tolist() == [255, 0, 0]


def test_extreme_aspect_ratio_is_cropped_to_the_centre(tmp_path, tiny_encoder):
    Image.new("L", (60000, 2), 90).save(tmp_path / "strip.png")
    img = load_image(tmp_path / "strip.png")
    assert img.size == (2 * MAX_ASPECT, 2)
    assert tuple(tiny_encoder.preprocess(img).shape) == (3, 32, 32)


def test_non_regular_files_do_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    for path in (tmp_path / "pipe.jpg", Path("/dev/zero")):
        with pytest.raises(ItemError, match="not a regular file"):
            load_image(path)


# -- JSONL catalog -----------------------------------------------------------------------------------------
def test_jsonl_nan_mixed_types_and_bad_lines(tmp_path, tiny_encoder):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    lines = [
        '{"id": "nan", "image": "a.png", "price": NaN, "size": Infinity, "dims": [1, NaN], "tags": {"x": NaN}}',
        '{"id": "cheap", "caption": "a", "price": 12}',
        '{"id": "words", "caption": "b", "price": "twelve"}',
        '{"id": "listy", "caption": "c", "price": [1, 2]}',
        '{"id": "truthy", "caption": "d", "price": true}',
        "{not json",
        "[1, 2, 3]",
        "[" * 100_000 + "]" * 100_000,
        '{"id": "surrogate", "caption": "\\ud800"}',
        '{"id": {"nested": "id"}, "caption": "e"}',
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    report = ingest(tmp_path / "c.jsonl", tmp_path / "idx", encoder=tiny_encoder)
    reasons = " | ".join(e.reason for e in report.failed)
    assert report.added == 5 and len(report.failed) == 5, reasons
    for needle in ("invalid JSON", "must be an object", "nested too deeply", "lone surrogate", "id must be text"):
        assert needle in reasons
    items = _indexed(tmp_path / "idx")
    assert items["nan"]["meta"] == {"price": None, "size": None, "dims": [1, None], "tags": {"x": None}}
    with Searcher(tmp_path / "idx", encoder=tiny_encoder) as searcher:
        hits = searcher.search(build_query(texts=["a"], target="text", where=["price<50"], k=10)).results
        assert {h.id for h in hits} == {"cheap"}
        assert searcher.search(build_query(texts=["a"], target="text", where=["price=twelve"])).results[0].id == "words"


# -- folder catalog ----------------------------------------------------------------------------------------
def test_folder_catalog_with_loops_dirs_and_odd_names(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "a.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "sub/b.png")
    (root / "sub/loop").symlink_to(root)  # sub/loop/sub/loop/... forever, if followed naively
    (root / "photo.jpg").mkdir()  # a directory named like an image
    Image.new("RGB", (8, 8), (0, 0, 200)).save(root / "photo.jpg/inside.png")
    os.mkfifo(root / "pipe.jpg")
    (root / "self.jpg").symlink_to("self.jpg")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as fh:  # a Latin-1 file name
        Image.new("RGB", (8, 8)).save(fh, format="PNG")
    report = ingest(root, tmp_path / "idx", encoder=tiny_encoder)
    reasons = _reasons(report)
    assert sorted(_indexed(tmp_path / "idx")) == ["a.png", "photo.jpg/inside.png", "sub/b.png"]
    assert "not a regular file" in reasons["pipe.jpg"]
    assert "symbolic links" in reasons["self.jpg"]
    assert any("not valid UTF-8" in r for r in reasons.values())
    assert len(report.failed) == 3


# -- image queries with bad files: one clear line --------------------------------------------------------
QUERY_FILES = {"truncated.jpg": "truncated", "truncated.png": "truncated", "zero.jpg": "empty image file",
               "text.jpg": "not an image file", "bomb.png": "decompression bomb", "folder.jpg": "is a directory",
               "never-there.jpg": "not found", "pipe.jpg": "not a regular file", "sparse.jpg": "too large"}


@pytest.fixture(scope="module")
def cli_index(hostile):
    """The hostile index, re-run through the CLI: exit 0, the summary line, one line per skipped item."""
    root, index, _ = hostile
    result = CliRunner().invoke(cli, ["index", str(root / "catalog.csv"), "--index", str(index), "-q"])
    assert result.exit_code == 0, result.output
    assert f"added 0, updated 0, removed 0, unchanged {len(_indexed(index))}" in result.output
    assert "skipped truncated-jpeg: " in result.output and "Traceback" not in result.output
    return index


@pytest.mark.parametrize("name,reason", sorted(QUERY_FILES.items()))
def test_image_query_with_a_bad_file_is_one_clear_line(hostile, cli_index, name, reason):
    root, _, _ = hostile
    result = CliRunner().invoke(cli, ["search", "--image", str(root / "images" / name), "--index", str(cli_index)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and reason in lines[0], result.output
    assert "Traceback" not in result.output


def test_good_query_images_work(hostile, cli_index):
    root, _, _ = hostile
    for name in ("exif-rotated.jpg", "cmyk.jpg", "animated.gif", "sixteen-bit.png", "strip.png"):
        result = CliRunner().invoke(cli, ["search", "--image", str(root / "images" / name), "--index",
                                          str(cli_index), "--format", "json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["results"]


def test_the_table_counts_the_kinds():
    rows = [ln for ln in __doc__.splitlines() if ln.startswith("| ") and not ln.startswith("| kind")]
    assert len(rows) == KINDS_COVERED
