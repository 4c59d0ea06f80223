"""ViT self-attention as one ONNX Runtime operator in the exported image tower.

torch.onnx writes each nn.MultiheadAttention as a packed in-projection, a Split, a Reshape and a
Transpose per head group, two MatMuls around a Softmax, and a Transpose back. ONNX Runtime's
contrib operator com.microsoft.MultiHeadAttention does the per-head work in one kernel, without the
transposes. In the export, queries, keys and values are three projections (three MatMuls the int8
quantiser turns into integer matmuls, as it does the packed one) feeding that operator; nothing
else changes, so the vectors are the same within float rounding (checked at export: imageonnx.py).

Measured on the AVX2-only EPYC, ViT-B-32-256 int8 with the class-token shortcut, 2 single-thread
streams, 15 alternating runs of 32 images: 26.83 img/s as torch.onnx writes attention, 26.99 with
the operator after a Split of the packed projection, 27.56 with three projections (kept). A
one-thread profile: attention's nodes (Transpose, MatMul, FusedMatMul, Softmax) were 8.9 % of the
tower, the operator 4.9 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPSETS = {"com.microsoft": 1}  # torch.onnx.export's custom_opsets for the operator's domain


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(head dim)) v per head, for (batch, tokens, width) q and (batch, keys,
    width) k, v: torch computes it when tracing, the export writes the one contrib operator."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        def split(x):
            return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(q.shape)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())  # the queries' shape and type: the exporter cannot infer a contrib op's
        return out


def applies(attn) -> bool:
    """Whether attn is a plain nn.MultiheadAttention this rewrite reproduces: batch first, one width
    for queries, keys and values, no extra key/value bias rows, no zero-attention row."""
    return (isinstance(attn, torch.nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
            and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn)


def attend(attn, queries, keys_values):
    """attn(queries, keys_values, keys_values)[0] through the contrib operator (no mask, eval mode)."""
    width, weight, bias = attn.embed_dim, attn.in_proj_weight, attn.in_proj_bias

    def project(x, part):
        rows = slice(part * width, (part + 1) * width)
        return F.linear(x, weight[rows], None if bias is None else bias[rows])

    out = _MultiHeadAttention.apply(project(queries, 0), project(keys_values, 1), project(keys_values, 2),
                                    attn.num_heads)
    return attn.out_proj(out)
