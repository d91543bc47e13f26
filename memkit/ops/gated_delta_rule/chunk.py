"""Chunked parallel form of the gated delta rule in plain PyTorch.

Within a chunk of C tokens with cumulative log decay G, the state after token t
is ``S_t = e^{G_t} S_0 + sum_{i<=t} e^{G_t - G_i} k_i u_i^T`` where the pseudo
values u solve the unit lower-triangular system
``(I + A) U = beta * (V - e^G * K S_0)``, ``A_ti = beta_t e^{G_t - G_i} k_t.k_i``
for i < t. The system is linear in S_0, so both right-hand sides are solved for
all chunks at once (the WY form) and the sequential loop only does matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .naive import compute_dtype


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    if pad == 0:
        return t
    widths = [0, 0] * (t.dim() - 2) + [0, pad]
    return F.pad(t, widths)


def segment_decays(g: torch.Tensor):
    """For chunked log decays g (..., C): cumulative G, e^{G_t - G_i} masked to i<=t and i<t."""
    G = g.cumsum(-1)
    C = g.shape[-1]
    diff = G[..., :, None] - G[..., None, :]
    incl = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    strict = incl.tril(-1)
    # where() before exp: the upper triangle can overflow.
    decay_incl = torch.where(incl, diff, torch.full_like(diff, -torch.inf)).exp()
    decay_strict = torch.where(strict, diff, torch.full_like(diff, -torch.inf)).exp()
    return G, decay_incl, decay_strict


def chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64):
    """The chunked form; with ``q=None`` only the final state is computed (the outputs' work is skipped) and
    ``(None, final_state)`` is returned."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = compute_dtype(k, initial_state)
    pad = (-T) % chunk_size
    # Padded steps have g = 0 and beta = 0: no decay and no write, the state passes through.
    k, v, g, beta = (_pad_time(t.to(dtype), pad) for t in (k, v, g, beta))
    k, v = (rearrange(t, "b (n c) h d -> b h n c d", c=chunk_size) for t in (k, v))
    g, beta = (rearrange(t, "b (n c) h -> b h n c", c=chunk_size) for t in (g, beta))

    G, decay_incl, decay_strict = segment_decays(g)
    eye = torch.eye(chunk_size, dtype=dtype, device=k.device)
    IA = eye + beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay_strict
    # U = W - Wk @ S_0 for each chunk.
    W = torch.linalg.solve_triangular(IA, beta[..., None] * v, upper=False, unitriangular=True)
    Wk = torch.linalg.solve_triangular(IA, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    tail = (G[..., -1:] - G).exp()  # e^{G_C - G_i}
    if q is not None:
        q = rearrange(_pad_time(q.to(dtype), pad), "b (n c) h d -> b h n c d", c=chunk_size)
        QK = (q @ k.transpose(-1, -2)) * decay_incl

    S = k.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outs = []
    for n in range(k.shape[2]):
        U = W[:, :, n] - Wk[:, :, n] @ S
        if q is not None:
            outs.append(G[:, :, n].exp()[..., None] * (q[:, :, n] @ S) + QK[:, :, n] @ U)
        S = G[:, :, n, -1].exp()[..., None, None] * S + k[:, :, n].transpose(-1, -2) @ (tail[:, :, n, :, None] * U)
    if q is None:
        return None, S
    o = rearrange(torch.stack(outs, dim=2), "b h n c d -> b (n c) h d")[:, :T]
    return o, (S if output_final_state else None)
