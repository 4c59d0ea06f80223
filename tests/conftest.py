"""Shared fixtures. Everything runs offline: the Hugging Face hub is never contacted."""

import os
import shutil
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub (it reads these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_CACHE", tempfile.mkdtemp(prefix="mmsearch-hf-cache-"))
# ONNX text-encoder exports go to a private cache, not the user's ~/.cache/mmsearch.
os.environ["MMSEARCH_CACHE"] = tempfile.mkdtemp(prefix="mmsearch-cache-")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TINY = "mmsearch-tiny"


@pytest.fixture
def catalog_dir(tmp_path) -> Path:
    """A private copy of the committed fixture catalog (8 products, a non-image, a truncated JPEG)."""
    target = tmp_path / "catalog"
    shutil.copytree(FIXTURES / "catalog", target)
    return target


@pytest.fixture(scope="session")
def tiny_encoder():
    from mmsearch.encoders import load_encoder

    return load_encoder(TINY, "random")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_encoder) -> Path:
    """The tiny model's (seeded random) weights as a local .safetensors checkpoint."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}, str(path))
    return path
