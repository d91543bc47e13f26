"""Explicit softmax attention: the reference every attention backend is tested against."""

from __future__ import annotations

import torch

from memkit.ops.gated_delta_rule.naive import compute_dtype


def naive_attention(q, k, v, attn_mask=None, scale=None):
    """q (B, N, H, D), k/v (B, M, H, D); attn_mask broadcastable to (B, H, N, M), True = may attend."""
    dtype = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bnhd,bmhd->bhnm", q.to(dtype), k.to(dtype)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -torch.inf)
    p = s.softmax(dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", p, v.to(dtype)).to(v.dtype)
