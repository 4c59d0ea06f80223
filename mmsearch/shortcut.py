"""An exact shortcut through a ViT image tower: the last block for the class token alone.

The embedding of an open_clip ViT with class-token pooling is the class token's output of the last
block. That block's other rows feed nothing: they are keys and values to the class token's
attention, and the rest of their work (query rows, attention output projection, MLP) is thrown away.
Computing the class token's row alone (keys and values still from every token) gives the same
vector and skips ~7% of ViT-B-32's matmul work (at 256 px: 65 tokens, the block costs 12 d^2 per
token; with the shortcut 2 d^2 per token plus 10 d^2 once).

It follows open_clip's VisionTransformer forward (_embeds, resblocks, _pool), so it applies only
where that structure is recognised, and `class_token_forward` checks it against `encode_image` on a probe
batch before anyone uses it: a mismatch (another open_clip version, say) means the plain forward.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max |shortcut - encode_image| over a probe batch's unnormalised vectors, relative


def class_token_forward(model, probe, fused_attention: bool = False):
    """A function pixels -> unnormalised image vectors equal to model.encode_image's, through the
    class-token shortcut; None where it does not apply to this model or disagrees on `probe`.
    fused_attention: every block's attention through fusedattention.attend (for an ONNX export);
    None where a block's attention is not one it reproduces."""
    import torch

    if not _applies(model):
        return None
    if _dynamically_quantized(model.visual):
        # torch int8 quantises each linear's input per call: the last block's rows, class tokens alone,
        # get other scales than with every token, so the vectors differ by int8 noise (0.4 % on
        # ViT-B-32), not a bug worth a warning; the full tower runs
        log.debug("dynamic int8 image tower: class-token shortcut not used")
        return None
    attend = _torch_attend
    if fused_attention:
        from open_clip.transformer import ResidualAttentionBlock

        from . import fusedattention

        if not all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                   and fusedattention.applies(b.attn) for b in model.visual.transformer.resblocks):
            return None
        attend = fusedattention.attend
    forward = _class_token_forward(model.visual, attend)
    with torch.inference_mode():
        want, got = model.encode_image(probe), forward(probe)
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if error > TOLERANCE:
        log.warning("class-token shortcut disagrees with encode_image (%.2g); using the full tower", error)
        return None
    return forward


def _dynamically_quantized(visual) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in visual.modules())


def _applies(model) -> bool:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    from torch import nn

    visual = getattr(model, "visual", None)
    if type(visual) is not VisionTransformer or not all(hasattr(visual, a) for a in ("_embeds", "_pool")):
        return False
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.output_tokens:
        return False
    transformer = visual.transformer
    last = transformer.resblocks[-1] if len(transformer.resblocks) else None
    return (getattr(transformer, "batch_first", False) and type(last) is ResidualAttentionBlock
            and not hasattr(last, "ln_1_kv") and isinstance(last.attn, nn.MultiheadAttention)
            and last.attn.batch_first)


def _class_token_forward(visual, attend):
    blocks = visual.transformer.resblocks

    def forward(pixels):
        x = visual._embeds(pixels)
        for block in blocks[:-1]:
            x = block(x) if attend is _torch_attend else _block(block, x, attend)
        pooled, _ = visual._pool(_class_token_block(blocks[-1], x, attend))
        return pooled @ visual.proj if visual.proj is not None else pooled

    return forward


def _torch_attend(attn, queries, keys_values):
    return attn(queries, keys_values, keys_values, need_weights=False)[0]


def _block(block, x, attend):
    """block(x), open_clip's ResidualAttentionBlock.forward without a mask, attention by `attend`."""
    normed = block.ln_1(x)
    x = x + block.ls_1(attend(block.attn, normed, normed))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _class_token_block(block, x, attend):
    """block(x)[:, :1]: the class token's row of a residual attention block, attending to every row."""
    normed = block.ln_1(x)
    row = x[:, :1] + block.ls_1(attend(block.attn, normed[:, :1], normed))
    return row + block.ls_2(block.mlp(block.ln_2(row)))
