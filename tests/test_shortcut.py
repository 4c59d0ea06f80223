"""The class-token shortcut through a ViT image tower (shortcut.py) is exact, and declines what it
does not recognise."""

import open_clip
import pytest
import torch

from mmsearch.encoders import register_packaged_configs
from mmsearch.shortcut import class_token_forward


@pytest.fixture(scope="module")
def vit():
    register_packaged_configs()
    torch.manual_seed(0)
    return open_clip.create_model("mmsearch-tiny").eval()


def pixels(model, n=4):
    return torch.randn(n, 3, model.visual.image_size[0], model.visual.image_size[1])


def test_shortcut_equals_encode_image_on_new_pixels(vit):
    forward = class_token_forward(vit, pixels(vit, 2))
    assert forward is not None
    fresh = pixels(vit, 5)  # not the probe: the shortcut is the same function, not a memorised output
    with torch.inference_mode():
        torch.testing.assert_close(forward(fresh), vit.encode_image(fresh), rtol=1e-5, atol=1e-6)


def test_shortcut_skips_the_last_blocks_other_rows(vit):
    """The last block's MLP runs on one row per image with the shortcut, on every token without it."""
    rows = []
    hook = vit.visual.transformer.resblocks[-1].mlp.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    try:
        batch = pixels(vit, 3)
        forward = class_token_forward(vit, batch)
        rows.clear()
        with torch.inference_mode():
            forward(batch)
            vit.encode_image(batch)
    finally:
        hook.remove()
    tokens = 1 + (vit.visual.image_size[0] // vit.visual.patch_size[0]) ** 2
    assert rows == [1, tokens]


def test_shortcut_declines_other_pooling_and_a_wrong_answer(vit, monkeypatch):
    batch = pixels(vit, 2)
    monkeypatch.setattr(vit.visual, "pool_type", "avg")
    assert class_token_forward(vit, batch) is None
    monkeypatch.setattr(vit.visual, "pool_type", "tok")
    # a block that no longer computes what the shortcut assumes: the probe check catches it
    last = vit.visual.transformer.resblocks[-1]
    monkeypatch.setattr(last, "forward", lambda x, attn_mask=None: x.flip(1))
    assert class_token_forward(vit, batch) is None


def test_shortcut_declines_a_convnet_tower():
    register_packaged_configs()
    model = open_clip.create_model("mmsearch-fashion-cnn").eval()
    assert class_token_forward(model, torch.randn(1, 3, 28, 28)) is None


def test_encoder_uses_the_shortcut_and_checks_it_again_on_a_new_tower(caplog):
    from mmsearch.encoders import load_encoder, quantize_model

    encoder = load_encoder("mmsearch-tiny", "random")
    batch = pixels(encoder.model, 4)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(encoder.model.encode_image(batch), dim=-1).numpy()
    got = encoder.encode_pixels(batch)
    checked_on, forward = encoder._shortcut
    assert checked_on is encoder.model.visual and forward is not None
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-5, atol=1e-6)

    quantize_model(encoder.model, "int8")  # replaces model.visual: a shortcut over the old one would be wrong
    with torch.inference_mode():
        want = torch.nn.functional.normalize(encoder.model.encode_image(batch), dim=-1).numpy()
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = encoder.encode_pixels(batch)
    # a dynamic int8 tower quantises the class tokens alone otherwise: the full tower runs, no warning
    assert encoder._shortcut == (encoder.model.visual, None)
    assert not caplog.records
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-5, atol=1e-6)


def test_fused_attention_forward_equals_encode_image_and_writes_one_operator_per_block(vit, tmp_path):
    import onnx

    from mmsearch import fusedattention
    from mmsearch.onnxcache import export_method

    forward = class_token_forward(vit, pixels(vit, 2), fused_attention=True)
    assert forward is not None
    fresh = pixels(vit, 3)
    with torch.inference_mode():
        torch.testing.assert_close(forward(fresh), vit.encode_image(fresh), rtol=1e-5, atol=1e-6)
    path = tmp_path / "tower.onnx"
    export_method(vit, forward, fresh[:1], path, "pixels", custom_opsets=fusedattention.OPSETS)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("MultiHeadAttention") == len(vit.visual.transformer.resblocks)
    # the per-head work is all inside the operator: the one Transpose left is the patch grid's
    assert "Softmax" not in ops and ops.count("Transpose") == 1


@pytest.mark.parametrize("change", ["add_zero_attn", "bias_k"])
def test_fused_attention_declines_an_attention_it_does_not_reproduce(vit, monkeypatch, change):
    attn = vit.visual.transformer.resblocks[0].attn
    if change == "add_zero_attn":
        monkeypatch.setattr(attn, "add_zero_attn", True)
    else:
        monkeypatch.setattr(attn, "bias_k", torch.nn.Parameter(torch.zeros(1, 1, attn.embed_dim)))
    assert class_token_forward(vit, pixels(vit, 2), fused_attention=True) is None


def test_fused_attention_that_computes_something_else_is_caught_by_the_probe(vit, monkeypatch):
    from mmsearch import fusedattention

    monkeypatch.setattr(fusedattention, "attend", lambda attn, q, kv: attn.out_proj(q))  # no attention at all
    assert class_token_forward(vit, pixels(vit, 2), fused_attention=True) is None
    assert class_token_forward(vit, pixels(vit, 2)) is not None  # the plain shortcut is unaffected
