"""Chunked form of the SSD scan in plain PyTorch (a scalar-decay linear attention per chunk)."""

from __future__ import annotations

import torch
from einops import rearrange

from memkit.ops.gated_delta_rule.chunk import _pad_time, segment_decays
from memkit.ops.gated_delta_rule.naive import compute_dtype


def chunk_ssd_torch(x, dt, A, B, C, initial_state=None, output_final_state=False, chunk_size=64):
    b, T, H, P = x.shape
    dtype = compute_dtype(x, initial_state)
    pad = (-T) % chunk_size
    # Padded steps have dt = 0: no decay and no write.
    x, dt, B, C = (_pad_time(t.to(dtype), pad) for t in (x, dt, B, C))
    xs = x * dt[..., None]
    g = rearrange(dt * A.to(dtype), "b (n c) h -> b h n c", c=chunk_size)
    xs, B, C = (rearrange(t, "b (n c) h d -> b h n c d", c=chunk_size) for t in (xs, B, C))

    G, decay_incl, _ = segment_decays(g)
    CB = (C @ B.transpose(-1, -2)) * decay_incl
    intra = CB @ xs
    tail = (G[..., -1:] - G).exp()

    h = x.new_zeros(b, H, B.shape[-1], P) if initial_state is None else initial_state.to(dtype)
    ys = []
    for n in range(C.shape[2]):
        ys.append(G[:, :, n].exp()[..., None] * (C[:, :, n] @ h) + intra[:, :, n])
        write = B[:, :, n].transpose(-1, -2) @ (tail[:, :, n, :, None] * xs[:, :, n])
        h = G[:, :, n, -1].exp()[..., None, None] * h + write
    y = rearrange(torch.stack(ys, dim=2), "b h n c d -> b (n c) h d")[:, :T]
    return y, (h if output_final_state else None)
