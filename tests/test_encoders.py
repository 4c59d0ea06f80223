"""Model loading: local checkpoints, model directories, hf-hub offline cache, clear errors, no pickles."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsearch.encoders import (
    MODEL_CONFIG_FILE,
    MODEL_WEIGHTS_FILE,
    encode_text_trimmed,
    load_encoder,
    save_model_dir,
)
from mmsearch.errors import ModelLoadError

TEXTS = ["a red ankle boot", "a blue dress"]


def same_embeddings(a, b) -> bool:
    return np.allclose(a.encode_texts(TEXTS), b.encode_texts(TEXTS), atol=1e-6)


def test_embeddings_are_normalised_float32(tiny_encoder):
    from PIL import Image

    texts = tiny_encoder.encode_texts(TEXTS)
    images = tiny_encoder.encode_images([Image.new("RGB", (40, 30), (200, 10, 10))])
    for out in (texts, images):
        assert out.dtype == np.float32
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert texts.shape == (2, 32) and images.shape == (1, 32)


def test_load_from_safetensors_checkpoint(tiny_encoder, tiny_checkpoint):
    loaded = load_encoder("mmsearch-tiny", str(tiny_checkpoint))
    assert same_embeddings(loaded, tiny_encoder)
    assert loaded.ref.pretrained == str(tiny_checkpoint.resolve())


def test_load_from_pt_checkpoint_with_weights_only(tmp_path, tiny_encoder):
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": tiny_encoder.model.state_dict()}, path)
    assert same_embeddings(load_encoder("mmsearch-tiny", str(path)), tiny_encoder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mmsearch-pwned",))


def test_pickle_payload_in_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Payload()}, fh)
    Path("/tmp/mmsearch-pwned").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_encoder("mmsearch-tiny", str(path))
    assert not Path("/tmp/mmsearch-pwned").exists()


def test_model_directory_round_trip(tmp_path, tiny_encoder):
    out = save_model_dir(tiny_encoder.model, "mmsearch-tiny", tmp_path / "model", card={"base": "test"})
    assert (out / MODEL_CONFIG_FILE).is_file() and (out / MODEL_WEIGHTS_FILE).is_file()
    assert same_embeddings(load_encoder(str(out)), tiny_encoder)


def test_hf_hub_offline_cache(tiny_encoder):
    """An 'hf-hub:' id loads from the local Hugging Face cache with HF_HUB_OFFLINE=1 (set by conftest)."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    repo = Path(constants.HF_HUB_CACHE) / "models--acme--tiny-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    save_model_dir(tiny_encoder.model, "mmsearch-tiny", snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    assert same_embeddings(load_encoder("hf-hub:acme/tiny-clip"), tiny_encoder)


def test_hf_hub_missing_from_cache_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="hf-hub:acme/absent"):
        load_encoder("hf-hub:acme/absent")


def test_unknown_model_and_missing_weights_are_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        load_encoder("nope", "x")
    with pytest.raises(ModelLoadError, match="needs pretrained weights"):
        load_encoder("mmsearch-tiny")
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_encoder("mmsearch-tiny", str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no open_clip_config.json"):
        load_encoder(str(tmp_path / "empty"))


def test_model_directory_without_weights_is_refused(tmp_path, tiny_encoder):
    out = save_model_dir(tiny_encoder.model, "mmsearch-tiny", tmp_path / "m")
    (out / MODEL_WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError):
        load_encoder(str(out))


def test_wrong_shape_checkpoint_is_refused(tmp_path, tiny_encoder):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}
    state["text_projection"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_encoder("mmsearch-tiny", str(path))


def test_model_config_json_is_plain_data(tmp_path, tiny_encoder):
    out = save_model_dir(tiny_encoder.model, "mmsearch-tiny", tmp_path / "m")
    config = json.loads((out / MODEL_CONFIG_FILE).read_text())
    assert config["model_cfg"]["embed_dim"] == 32


def test_trimmed_text_encoding_equals_the_full_context_and_runs_fewer_positions(tiny_encoder):
    model, tokenizer = tiny_encoder.model, tiny_encoder.tokenizer
    short = tokenizer(["a red ankle boot", "a bag", "crimson ankle boots in soft leather"])
    lengths: list[int] = []
    hook = model.transformer.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            full, trimmed = model.encode_text(short), encode_text_trimmed(model, short)
            too_long = tokenizer(["red " * 100])  # fills the whole context: nothing to trim
            assert torch.equal(encode_text_trimmed(model, too_long), model.encode_text(too_long))
    finally:
        hook.remove()
    assert torch.allclose(full, trimmed, atol=1e-5)
    longest = int(short.argmax(dim=1).max()) + 1  # the end token is the highest id
    assert lengths[:2] == [short.shape[1], longest] and longest < short.shape[1]
    assert np.allclose(tiny_encoder.encode_texts(["a bag"]), tiny_encoder.encode_texts(["a bag", "red " * 100])[:1],
                       atol=1e-5)  # batched with a long text or alone: the same vector
