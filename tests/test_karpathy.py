"""Karpathy-split reader on a small generated file in the Flickr30k / COCO format."""

import json
import re

import pytest

from mmsearch.errors import CatalogError
from mmsearch.karpathy import KarpathyImage, load_karpathy

SPLITS = ["train", "train", "val", "test", "test", "test"]


def _sample(n_captions: int = 5) -> dict:
    images = []
    for imgid, split in enumerate(SPLITS):
        sentences = [
            {"raw": f"image {imgid} caption {c}.", "tokens": ["image", str(imgid), "caption", str(c)]}
            for c in range(n_captions)
        ]
        images.append(
            {"filename": f"{1000 + imgid}.jpg", "split": split, "imgid": imgid, "sentences": sentences}
        )
    return {"images": images, "dataset": "flickr30k"}


def _write(tmp_path, data, name="dataset_flickr30k.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_loads_the_test_split_with_five_captions(tmp_path):
    images = load_karpathy(_write(tmp_path, _sample()))
    assert [image.imgid for image in images] == [3, 4, 5]
    assert images[0] == KarpathyImage(
        filename="1003.jpg", captions=[f"image 3 caption {c}." for c in range(5)], imgid=3
    )
    assert all(len(image.captions) == 5 for image in images)
    assert images[0].relative_path == "1003.jpg"


def test_other_splits_and_all(tmp_path):
    path = _write(tmp_path, _sample())
    assert [image.filename for image in load_karpathy(path, split="train")] == ["1000.jpg", "1001.jpg"]
    assert len(load_karpathy(path, split=None)) == len(SPLITS)


def test_coco_filepath_and_tokens_fallback(tmp_path):
    data = _sample()
    data["dataset"] = "coco"
    data["images"][3]["filepath"] = "val2014"
    data["images"][3]["sentences"][0] = {"tokens": ["a", "red", "bus"]}  # no "raw"
    image = load_karpathy(_write(tmp_path, data, "dataset_coco.json"))[0]
    assert image.relative_path == "val2014/1003.jpg"
    assert image.captions[0] == "a red bus"


def _without(field):
    data = _sample()
    del data["images"][4][field]
    return data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON file"),
        ({"dataset": "flickr30k"}, '"images" list'),
        ([1, 2], '"images" list'),
        ({"images": ["oops"]}, "images[0]"),
        (_without("filename"), '"filename"'),
        (_without("sentences"), '"sentences"'),
        (_without("split"), '"split"'),
        ({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": ""}]}]}, '"raw"'),
    ],
)
def test_malformed_files_raise_catalog_error(tmp_path, content, message):
    with pytest.raises(CatalogError, match=re.escape(message)):
        load_karpathy(_write(tmp_path, content))


def test_missing_file_and_unknown_split(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        load_karpathy(tmp_path / "absent.json")
    with pytest.raises(CatalogError, match=r"splits present: \['test', 'train', 'val'\]"):
        load_karpathy(_write(tmp_path, _sample()), split="tset")
