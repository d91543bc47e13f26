"""Softmax attention of a chunk's queries over its context keys ([sink | window | chunk]).

Layout ``(B, N, H, D)`` for q and ``(B, M, H, D)`` for k, v (the fla / xformers
layout; the memories never transpose). ``attn_mask`` is boolean, True where a
query may attend, broadcastable to ``(B, H, N, M)``.
"""

from __future__ import annotations

import torch

from memkit.errors import ConfigError, DTypeError, ShapeError
from memkit.ops import backends
from memkit.ops._checks import check_same_device, check_same_dtype, check_shape

from .kernels import sdpa_attention, xformers_attention
from .naive import naive_attention

__all__ = ["attention", "naive_attention"]


def attention(q, k, v, attn_mask=None, scale=None, backend="auto"):
    """backend: "auto" or "torch" (PyTorch SDPA), "naive" (explicit softmax), "xformers" (CUDA)."""
    check_shape("q", q, (None, None, None, None), "(B, N, H, D)")
    B, _, H, D = q.shape
    check_shape("k", k, (B, None, H, D), "(B, M, H, D)")
    check_shape("v", v, (B, k.shape[1], H, None), "(B, M, H, Dv)")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v, attn_mask=attn_mask)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise DTypeError(f"attn_mask must be boolean (True = may attend), got {attn_mask.dtype}")
        target = (B, H, q.shape[1], k.shape[1])
        try:
            fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            shape = tuple(attn_mask.shape)
            raise ShapeError(f"attn_mask of shape {shape} does not broadcast to (B, H, N, M) = {target}")
    if backend == "naive":
        return naive_attention(q, k, v, attn_mask, scale)
    # SDPA already reaches cuDNN / flash kernels, so "auto" prefers it over xformers.
    if backend == "auto":
        return sdpa_attention(q, k, v, attn_mask, scale)
    chosen = backends.resolve("attention", backend, ("xformers",), q.device, q.dtype)
    if chosen == "xformers":
        return xformers_attention(q, k, v, attn_mask, scale)
    if chosen != "torch":
        raise ConfigError(f"attention: unknown backend {backend!r}")
    return sdpa_attention(q, k, v, attn_mask, scale)
