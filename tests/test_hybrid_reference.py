"""The hybrid memories against the VideoSSM equations written out token by token (independent of the memory's code)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import chunk_starts, make_clip, make_memory, rel_err, stream
from hypothesis import given
from hypothesis import strategies as st

from memkit.ops import naive_attention


def gdn_update(mem, x):
    """M <- e^g M + beta k (v - (e^g M)^T k)^T with gates from the token's block input."""
    g = -mem.A_log.exp() * F.softplus(mem.a_proj(x))        # (B, N, H)
    beta = torch.sigmoid(mem.b_proj(x))

    def update(M, k, v, b, n, h):
        Mg = g[b, n, h].exp() * M
        return Mg + beta[b, n, h] * torch.outer(k, v - Mg.T @ k)

    return update


def ssd_update(mem, x):
    """M <- e^{dt A} M + dt k v^T with dt = softplus(W_dt x + b)."""
    dt = F.softplus(mem.dt_proj(x))
    A = -mem.A_log.exp()

    def update(M, k, v, b, n, h):
        return (dt[b, n, h] * A[h]).exp() * M + dt[b, n, h] * torch.outer(k, v)

    return update


UPDATES = {"hybrid_gdn": gdn_update, "hybrid_ssd": ssd_update}


def reference_hybrid(mem, q, k, v, x, chunk_sizes):
    S, W, T, H, D = mem.sink_frames, mem.window_frames, mem.frame_tokens, mem.num_heads, mem.head_dim
    B = q.shape[0]
    update = UPDATES[mem.kind](mem, x)
    kn = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)  # L2 norm with the memory's epsilon
    qn = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
    out = torch.zeros_like(q)
    M = torch.zeros(B, H, D, D, dtype=q.dtype)
    written = 0  # tokens folded into M so far, in stream order from the first non-sink frame
    for c0, c1 in chunk_starts(chunk_sizes):
        # local: sink frames, the last W frames before the chunk, the chunk
        keys = sorted(set(range(min(S, c0))) | set(range(max(S, c0 - W), c0)) | set(range(c0, c1)))
        idx = torch.tensor([f * T + i for f in keys for i in range(T)])
        sl = slice(c0 * T, c1 * T)
        local = naive_attention(q[:, sl], k[:, idx], v[:, idx])
        # global: every token of frames S .. c0 - W - 1 has been written, one at a time
        target = max(0, c0 - W - S) * T
        while written < target:
            n = S * T + written
            for b in range(B):
                for h in range(H):
                    M[b, h] = update(M[b, h], kn[b, n, h], v[b, n, h], b, n, h)
            written += 1
        r = torch.einsum("bnhk,bhkv->bnhv", qn[:, sl], M)
        r = r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6) * mem.norm_weight
        gate = F.silu(mem.out_gate(x[:, sl])).view(B, -1, H, D)
        gamma = torch.sigmoid(mem.router_w * math.log(min((c0 + 1) / mem.cfg.horizon_frames, 1.0)) + mem.router_b)
        out[:, sl] = local + gamma[:, None] * gate * r
    return out


def partitions(frames):
    """Chunk sizes covering ``frames``: e.g. a 1-frame image prefix, then 3-frame chunks, then a tail."""
    return st.lists(st.integers(1, 4), min_size=1, max_size=frames).map(lambda sizes: cover(sizes, frames))


def cover(sizes, frames):
    out, total = [], 0
    for s in sizes * frames:
        if total >= frames:
            break
        out.append(min(s, frames - total))
        total += out[-1]
    return out


@pytest.mark.parametrize("kind", list(UPDATES))
@pytest.mark.parametrize("sink,window,chunk", [(0, 1, 1), (1, 2, 2), (2, 3, 3), (3, 1, 2)])
def test_hybrid_matches_the_equations(kind, sink, window, chunk):
    mem = make_memory(kind, sink_frames=sink, window_frames=window, horizon_frames=6)
    q, k, v, x = make_clip(mem, batch=2, frames=11)
    sizes = cover([chunk], 11)
    with torch.no_grad():
        y, _, _ = stream(mem, q, k, v, x, sizes)
        ref = reference_hybrid(mem, q, k, v, x, sizes)
    assert rel_err(y, ref) < 1e-10


@given(st.sampled_from(list(UPDATES)), st.integers(0, 3), st.integers(1, 4), partitions(10), st.integers(0, 999))
def test_hybrid_matches_the_equations_for_any_chunking(kind, sink, window, sizes, seed):
    """Chunks of any lengths in one stream (an image prefix, then chunks): the bookkeeping of sink, window,
    eviction and gate cache must follow the frames, not a fixed chunk size."""
    mem = make_memory(kind, heads=1, sink_frames=sink, window_frames=window, horizon_frames=6, seed=seed)
    q, k, v, x = make_clip(mem, batch=1, frames=10, seed=seed)
    with torch.no_grad():
        y, state, _ = stream(mem, q, k, v, x, sizes)
        ref = reference_hybrid(mem, q, k, v, x, sizes)
    assert rel_err(y, ref) < 1e-10 and state.frames == 10
