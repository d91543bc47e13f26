"""The hybrid memories against the VideoSSM equations written out token by token (independent of the memory's code)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import chunk_starts, make_clip, make_memory, rel_err, stream
from hypothesis import given
from hypothesis import strategies as st

from memkit.ops import naive_attention


def gdn_gates(mem, x):
    """Per token (B, N, H): the log-decay g = -exp(A) softplus(W_a x + b) and the write strength beta."""
    return {"g": -mem.A_log.exp() * F.softplus(mem.a_proj(x)), "beta": torch.sigmoid(mem.b_proj(x))}


def gdn_step(mem, M, k, v, gate, h):
    """M <- e^g M + beta k (v - (e^g M)^T k)^T"""
    Mg = gate["g"].exp() * M
    return Mg + gate["beta"] * torch.outer(k, v - Mg.T @ k)


def ssd_gates(mem, x):
    """Per token (B, N, H): dt = softplus(W_dt x + b)."""
    return {"dt": F.softplus(mem.dt_proj(x))}


def ssd_step(mem, M, k, v, gate, h):
    """M <- e^{dt A} M + dt k v^T with A = -exp(A_log)"""
    A = -mem.A_log[h].exp()
    return (gate["dt"] * A).exp() * M + gate["dt"] * torch.outer(k, v)


UPDATES = {"hybrid_gdn": (gdn_gates, gdn_step), "hybrid_ssd": (ssd_gates, ssd_step)}


def l2(t):
    return t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)  # L2 norm with the memory's epsilon


def frame_writes(mem, k, v, gates, frame):
    """What one evicted frame writes into the global state: a list of (key, value, gates), keys and values
    ``(B, H, D)``, gates ``(B, H)``.

    "token": each of its tokens in order, key L2-normed. "frame_mean": a single token, the mean over the frame's
    tokens of the raw keys, the values and each gate, its key L2-normed after averaging.
    """
    T = mem.frame_tokens
    tokens = range(frame * T, (frame + 1) * T)
    if mem.cfg.evict_aggregate == "token":
        return [(l2(k[:, n]), v[:, n], {name: g[:, n] for name, g in gates.items()}) for n in tokens]
    k_sum, v_sum = torch.zeros_like(k[:, 0]), torch.zeros_like(v[:, 0])
    g_sum = {name: torch.zeros_like(g[:, 0]) for name, g in gates.items()}
    for n in tokens:
        k_sum, v_sum = k_sum + k[:, n], v_sum + v[:, n]
        g_sum = {name: g_sum[name] + gates[name][:, n] for name in gates}
    return [(l2(k_sum / T), v_sum / T, {name: g / T for name, g in g_sum.items()})]


def reference_hybrid(mem, q, k, v, x, chunk_sizes):
    S, W, T, H, D = mem.sink_frames, mem.window_frames, mem.frame_tokens, mem.num_heads, mem.head_dim
    B = q.shape[0]
    gates_of, step = UPDATES[mem.kind]
    gates = gates_of(mem, x)
    qn = l2(q)
    out = torch.zeros_like(q)
    M = torch.zeros(B, H, D, D, dtype=q.dtype)
    written = 0  # frames folded into M so far, in stream order from the first non-sink frame
    for c0, c1 in chunk_starts(chunk_sizes):
        # local: sink frames, the last W frames before the chunk, the chunk
        keys = sorted(set(range(min(S, c0))) | set(range(max(S, c0 - W), c0)) | set(range(c0, c1)))
        idx = torch.tensor([f * T + i for f in keys for i in range(T)])
        sl = slice(c0 * T, c1 * T)
        local = naive_attention(q[:, sl], k[:, idx], v[:, idx])
        # global: frames S .. c0 - W - 1 have been written, one frame at a time (token by token, or its mean)
        while written < max(0, c0 - W - S):
            for key, value, gate in frame_writes(mem, k, v, gates, S + written):
                for b in range(B):
                    for h in range(H):
                        M[b, h] = step(mem, M[b, h], key[b, h], value[b, h], {n: g[b, h] for n, g in gate.items()}, h)
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


AGGREGATES = ["token", "frame_mean"]


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("kind", list(UPDATES))
@pytest.mark.parametrize("sink,window,chunk", [(0, 1, 1), (1, 2, 2), (2, 3, 3), (3, 1, 2)])
def test_hybrid_matches_the_equations(kind, sink, window, chunk, aggregate):
    mem = make_memory(kind, sink_frames=sink, window_frames=window, horizon_frames=6, evict_aggregate=aggregate)
    q, k, v, x = make_clip(mem, batch=2, frames=11)
    sizes = cover([chunk], 11)
    with torch.no_grad():
        y, _, _ = stream(mem, q, k, v, x, sizes)
        parallel = mem.parallel(q, k, v, x, chunk)
        ref = reference_hybrid(mem, q, k, v, x, sizes)
    assert rel_err(y, ref) < 1e-10 and rel_err(parallel, ref) < 1e-10


@pytest.mark.parametrize("kind", list(UPDATES))
def test_frame_mean_writes_differ_from_token_writes(kind):
    """The two aggregations are different equations: the reference must tell them apart on this clip."""
    outs = {}
    for aggregate in AGGREGATES:
        mem = make_memory(kind, sink_frames=1, window_frames=2, horizon_frames=6, evict_aggregate=aggregate)
        q, k, v, x = make_clip(mem, batch=2, frames=9)
        with torch.no_grad():
            outs[aggregate] = reference_hybrid(mem, q, k, v, x, cover([3], 9))
    assert torch.equal(outs["token"][:, : 6 * 4], outs["frame_mean"][:, : 6 * 4])  # nothing evicted before frame 6
    assert rel_err(outs["frame_mean"], outs["token"]) > 1e-2


@given(st.sampled_from(list(UPDATES)), st.integers(0, 3), st.integers(1, 4), partitions(10), st.integers(0, 999),
       st.sampled_from(AGGREGATES))
def test_hybrid_matches_the_equations_for_any_chunking(kind, sink, window, sizes, seed, aggregate):
    """Chunks of any lengths in one stream (an image prefix, then chunks): the bookkeeping of sink, window,
    eviction and gate cache must follow the frames, not a fixed chunk size."""
    mem = make_memory(kind, heads=1, sink_frames=sink, window_frames=window, horizon_frames=6, seed=seed,
                      evict_aggregate=aggregate)
    q, k, v, x = make_clip(mem, batch=1, frames=10, seed=seed)
    with torch.no_grad():
        y, state, _ = stream(mem, q, k, v, x, sizes)
        ref = reference_hybrid(mem, q, k, v, x, sizes)
    assert rel_err(y, ref) < 1e-10 and state.frames == 10


@pytest.mark.parametrize("kind", list(UPDATES))
def test_float32_memory_under_bf16_autocast_follows_the_equations_within_bf16_rounding(kind):
    """Not only the dtypes: bf16 chunks through a float32 memory under autocast give the float64 equations' values
    (on the same bf16-rounded inputs) within bf16 rounding, far closer than an output without the global read."""
    mem = make_memory(kind, dtype=torch.float32, sink_frames=1, window_frames=1, horizon_frames=6)
    q, k, v, x = (t.bfloat16() for t in make_clip(mem, frames=7, dtype=torch.float32))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state, _ = stream(mem, q, k, v, x, 2)
        exact = copy.deepcopy(mem).double()
        inputs = [t.double() for t in (q, k, v, x)]
        ref = reference_hybrid(exact, *inputs, cover([2], 7))
        exact.out_gate.weight.zero_()  # the wrong path: no global read
        local_only = reference_hybrid(exact, *inputs, cover([2], 7))
    assert y.dtype == torch.bfloat16 and state["global.M"].dtype == torch.float32
    assert rel_err(y, ref) < 2e-2
    assert rel_err(local_only, ref) > 0.2
