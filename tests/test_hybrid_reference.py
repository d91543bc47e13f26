"""The hybrid memories against the VideoSSM equations written out token by token (independent of the memory's code)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import chunk_starts, make_clip, make_memory, perturb_params, rel_err, stream
from hypothesis import given
from hypothesis import strategies as st

import memkit
from memkit.errors import ConfigError
from memkit.memory.hybrid import block_grid
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


UPDATES = {"hybrid_gdn": (gdn_gates, gdn_step), "hybrid_ssd": (ssd_gates, ssd_step),
           "hybrid_blockwise": (gdn_gates, gdn_step)}


def l2(t):
    return t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)  # L2 norm with the memory's epsilon


def block_of(mem, n):
    """The block of token ``n`` (raster order in the frame) in the ``blocks x blocks`` grid over its token grid."""
    rows, cols = mem.frame_shape
    b = mem.cfg.blocks
    return (n // cols) * b // rows * b + (n % cols) * b // cols


def mean_write(k, v, gates, tokens, share):
    """One write: the mean over ``tokens`` of the raw keys, the values and each gate (then divided by ``share``,
    the frame's writes into the same state), its key L2-normed after averaging."""
    n = len(tokens)
    k_sum, v_sum = torch.zeros_like(k[:, 0]), torch.zeros_like(v[:, 0])
    g_sum = {name: torch.zeros_like(g[:, 0]) for name, g in gates.items()}
    for t in tokens:
        k_sum, v_sum = k_sum + k[:, t], v_sum + v[:, t]
        g_sum = {name: g_sum[name] + gates[name][:, t] for name in gates}
    return l2(k_sum / n), v_sum / n, {name: g / n / share for name, g in g_sum.items()}


def frame_writes(mem, k, v, gates, frame):
    """What one evicted frame writes into the global state(s): a list of (state, key, value, gates), keys and
    values ``(B, H, D)``, gates ``(B, H)``; ``state`` is the block for hybrid_blockwise, else 0.

    Gates are per frame, shared by the frame's writes into one state. "token": each token in order, key L2-normed,
    each gate divided by the tokens per frame (per block for hybrid_blockwise). "frame_mean": one mean write
    (per block for hybrid_blockwise). "block_mean": one mean write per block, gates divided by the blocks.
    """
    T, agg = mem.frame_tokens, mem.cfg.evict_aggregate
    tokens = list(range(frame * T, (frame + 1) * T))
    blocks = {}
    for n in tokens:
        blocks.setdefault(block_of(mem, n - frame * T), []).append(n)
    if mem.kind == "hybrid_blockwise":
        if agg == "frame_mean":
            return [(b, *mean_write(k, v, gates, ts, 1)) for b, ts in sorted(blocks.items())]
        return [(b, l2(k[:, n]), v[:, n], {name: g[:, n] / len(ts) for name, g in gates.items()})
                for b, ts in sorted(blocks.items()) for n in ts]
    if agg == "token":
        return [(0, l2(k[:, n]), v[:, n], {name: g[:, n] / T for name, g in gates.items()}) for n in tokens]
    if agg == "frame_mean":
        return [(0, *mean_write(k, v, gates, tokens, 1))]
    return [(0, *mean_write(k, v, gates, ts, len(blocks))) for _, ts in sorted(blocks.items())]


def reference_hybrid(mem, q, k, v, x, chunk_sizes):
    S, W, T, H, D = mem.sink_frames, mem.window_frames, mem.frame_tokens, mem.num_heads, mem.head_dim
    B = q.shape[0]
    gates_of, step = UPDATES[mem.kind]
    gates = gates_of(mem, x)
    qn = l2(q)
    out = torch.zeros_like(q)
    states = mem.cfg.blocks**2 if mem.kind == "hybrid_blockwise" else 1
    M = torch.zeros(states, B, H, D, D, dtype=q.dtype)
    reads_from = [block_of(mem, n) if states > 1 else 0 for n in range(T)]  # the state each token reads
    written = 0  # frames folded into M so far, in stream order from the first non-sink frame
    for c0, c1 in chunk_starts(chunk_sizes):
        # local: sink frames, the last W frames before the chunk, the chunk
        keys = sorted(set(range(min(S, c0))) | set(range(max(S, c0 - W), c0)) | set(range(c0, c1)))
        idx = torch.tensor([f * T + i for f in keys for i in range(T)])
        sl = slice(c0 * T, c1 * T)
        local = naive_attention(q[:, sl], k[:, idx], v[:, idx])
        # global: frames S .. c0 - W - 1 have been written, one frame at a time
        while written < max(0, c0 - W - S):
            for s, key, value, gate in frame_writes(mem, k, v, gates, S + written):
                for b in range(B):
                    for h in range(H):
                        M[s, b, h] = step(mem, M[s, b, h], key[b, h], value[b, h],
                                          {n: g[b, h] for n, g in gate.items()}, h)
            written += 1
        r = torch.stack([torch.einsum("bhk,bhkv->bhv", qn[:, n], M[reads_from[n % T]])
                         for n in range(c0 * T, c1 * T)], dim=1)
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


AGGREGATES = ["token", "frame_mean", "block_mean"]


def aggregates(kind):
    return [a for a in AGGREGATES if not (kind == "hybrid_blockwise" and a == "block_mean")]


CASES = [(kind, a) for kind in UPDATES for a in aggregates(kind)]


@pytest.mark.parametrize("kind,aggregate", CASES)
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
def test_write_granularities_are_different_equations(kind):
    """The aggregations are different equations: the reference must tell them apart on this clip."""
    outs = {}
    for aggregate in aggregates(kind):
        mem = make_memory(kind, frame_tokens=16, sink_frames=1, window_frames=2, horizon_frames=6,
                          evict_aggregate=aggregate)
        q, k, v, x = make_clip(mem, batch=2, frames=9)
        with torch.no_grad():
            outs[aggregate] = reference_hybrid(mem, q, k, v, x, cover([3], 9))
    first = outs.pop("token")
    for other in outs.values():
        assert torch.equal(first[:, : 6 * 16], other[:, : 6 * 16])  # nothing evicted before frame 6
        assert rel_err(other, first) > 1e-2
    if len(outs) == 2:
        assert rel_err(outs["block_mean"], outs["frame_mean"]) > 1e-2


@pytest.mark.parametrize("kind,aggregate", [c for c in CASES if c[0] == "hybrid_blockwise" or c[1] == "block_mean"])
@pytest.mark.parametrize("frame_shape,blocks", [((2, 6), 2), ((3, 5), 3), ((4, 4), 1), ((4, 4), 2), ((4, 6), 3)])
def test_spatial_writes_follow_the_equations_on_any_token_grid(kind, aggregate, frame_shape, blocks):
    """Non-square grids, blocks of unequal sizes (5 columns in 3 blocks: 2, 2, 1 wide) and blocks spanning several
    rows (their tokens are not contiguous in raster order)."""
    torch.manual_seed(0)
    mem = memkit.build_memory(
        memkit.MemoryConfig(kind=kind, sink_frames=1, window_frames=2, horizon_frames=6, evict_aggregate=aggregate,
                            blocks=blocks),
        num_heads=2, head_dim=8, dim=12, frame_tokens=frame_shape[0] * frame_shape[1], frame_shape=frame_shape,
    ).double()
    perturb_params(mem)
    q, k, v, x = make_clip(mem, batch=2, frames=10)
    with torch.no_grad():
        y, _, _ = stream(mem, q, k, v, x, 3)
        ref = reference_hybrid(mem, q, k, v, x, cover([3], 10))
        parallel = mem.parallel(q, k, v, x, 3)
    assert rel_err(y, ref) < 1e-10 and rel_err(parallel, ref) < 1e-10


@given(st.sampled_from(CASES), st.integers(0, 3), st.integers(1, 4), partitions(10), st.integers(0, 999))
def test_hybrid_matches_the_equations_for_any_chunking(case, sink, window, sizes, seed):
    """Chunks of any lengths in one stream (an image prefix, then chunks): the bookkeeping of sink, window,
    eviction and gate cache must follow the frames, not a fixed chunk size."""
    kind, aggregate = case
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


@pytest.mark.parametrize("shape, blocks, expected", [
    ((4, 4), 2, [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]),
    ((3, 5), 2, [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [2, 2, 2, 3, 3]]),
    ((4, 6), 3, [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [6, 6, 7, 7, 8, 8]]),
    ((2, 2), 1, [[0, 0], [0, 0]]),
])
def test_block_grid_assigns_each_token_its_block_by_hand(shape, blocks, expected):
    assert block_grid(shape, blocks, "hybrid_blockwise").tolist() == expected
    with pytest.raises(ConfigError, match="needs a token grid of at least"):
        block_grid((1, 8), 2, "hybrid_blockwise")
