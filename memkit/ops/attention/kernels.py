"""Attention backends: PyTorch SDPA (cuDNN / flash / math dispatch) and xformers (optional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(q, k, v, attn_mask=None, scale=None):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


def xformers_attention(q, k, v, attn_mask=None, scale=None):
    import xformers.ops as xops

    bias = None
    if attn_mask is not None:
        B, N, H, _ = q.shape
        M = k.shape[1]
        # xformers wants an additive bias whose last dim is stored 8-aligned: slice a padded buffer.
        bias = torch.zeros(B, H, N, (M + 7) // 8 * 8, dtype=q.dtype, device=q.device)[..., :M]
        bias.masked_fill_(~attn_mask.expand(B, H, N, M), -torch.inf)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
