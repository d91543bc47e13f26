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
from memkit.ops import Rope3D, naive_attention


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
    """One write: the mean over ``tokens`` of the raw keys, the values and each gate (then divided by
    ``share(name)``, the frame's writes into the same state that share the gate), its key L2-normed after
    averaging."""
    n = len(tokens)
    k_sum, v_sum = torch.zeros_like(k[:, 0]), torch.zeros_like(v[:, 0])
    g_sum = {name: torch.zeros_like(g[:, 0]) for name, g in gates.items()}
    for t in tokens:
        k_sum, v_sum = k_sum + k[:, t], v_sum + v[:, t]
        g_sum = {name: g_sum[name] + gates[name][:, t] for name in gates}
    return l2(k_sum / n), v_sum / n, {name: g / n / share(name) for name, g in g_sum.items()}


def sharing(mem, writes):
    """``share(name)``: by how many writes a frame's gate ``name`` is divided: ``writes`` (the frame's writes into
    one state), except the write strength beta with ``write_strength="token"``, which each write keeps whole."""
    return lambda name: 1 if mem.cfg.write_strength == "token" and name == "beta" else writes


def place_rotate(t, angles):
    """Rotate the channel pairs (2i, 2i+1) of ``t (B, H, D)`` by ``angles (H or 1, D/2)``, written out."""
    a = angles.to(t.dtype)
    out = t.clone()
    out[..., 0::2] = t[..., 0::2] * a.cos() - t[..., 1::2] * a.sin()
    out[..., 1::2] = t[..., 0::2] * a.sin() + t[..., 1::2] * a.cos()
    return out


def addressed(mem):
    """Whether the memory's global keys carry their place: a place code, and writes that have a place."""
    agg = mem.cfg.evict_aggregate
    has_place = agg == "token" or (agg == "block_mean" and mem.kind != "hybrid_blockwise")
    return mem.cfg.global_position != "none" and has_place


def timed(mem):
    """Whether the memory's global keys carry the stream index of their frame."""
    return mem.cfg.global_time != "none"


def key_angles(mem, place, frame):
    """The angles ``(H or 1, D/2)`` a global key (or query) of ``place`` in stream frame ``frame`` is rotated by:
    its place's phases plus ``frame`` times the time code's frequencies, each where the memory has it."""
    angles = torch.zeros(1, mem.head_dim // 2, dtype=torch.float64)
    if addressed(mem):
        angles = angles + mem.global_phase.detach()[place]
    if timed(mem):
        angles = angles + frame * mem.global_time_freq.detach()
    return angles


def write_place(mem, n, block):
    """The place (row of the phase table) of a write of token ``n`` of its frame, or of block ``block``."""
    return block if mem.cfg.evict_aggregate == "block_mean" else n


def read_place(mem, n):
    """The place a token ``n`` of its frame reads with: its own, or its block's for block_mean writes."""
    return block_of(mem, n) if mem.cfg.evict_aggregate == "block_mean" else n


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
            writes = [(b, *mean_write(k, v, gates, ts, sharing(mem, 1)), None) for b, ts in sorted(blocks.items())]
        else:
            writes = [(b, l2(k[:, n]), v[:, n], {name: g[:, n] / sharing(mem, len(ts))(name)
                                                 for name, g in gates.items()}, n - frame * T)
                      for b, ts in sorted(blocks.items()) for n in ts]
    elif agg == "token":
        writes = [(0, l2(k[:, n]), v[:, n], {name: g[:, n] / sharing(mem, T)(name) for name, g in gates.items()},
                   n - frame * T) for n in tokens]
    elif agg == "frame_mean":
        writes = [(0, *mean_write(k, v, gates, tokens, sharing(mem, 1)), None)]
    else:
        writes = [(0, *mean_write(k, v, gates, ts, sharing(mem, len(blocks))), b) for b, ts in sorted(blocks.items())]
    if not addressed(mem) and not timed(mem):
        return [w[:4] for w in writes]
    # the key of a write carries its place (the phases of its token, or block, in the frame) and its frame's time
    return [(state, place_rotate(key, key_angles(mem, place, frame)), value, gate)
            for state, key, value, gate, place in writes]


def reference_hybrid(mem, q, k, v, x, chunk_sizes, rope=None):
    """The outputs of a stream of chunks of ``chunk_sizes`` frames. With ``rope``: local attention rotates q and
    the context at stream positions ("absolute") or at slots of [sink | window | chunk] ("relative"), and the
    global state sees q, k before RoPE when its keys carry places, else as the cache holds them."""
    S, W, T, H, D = mem.sink_frames, mem.window_frames, mem.frame_tokens, mem.num_heads, mem.head_dim
    B = q.shape[0]
    gates_of, step = UPDATES[mem.kind]
    gates = gates_of(mem, x)
    absolute = rope is not None and mem.cfg.rope_mode == "absolute"
    q_abs, k_abs = (rope(q, 0), rope(k, 0)) if absolute else (q, k)
    q_glob, k_glob = (q, k) if addressed(mem) or timed(mem) or not absolute else (q_abs, k_abs)
    if addressed(mem) or timed(mem):
        q_glob = torch.stack([place_rotate(q_glob[:, n], key_angles(mem, read_place(mem, n % T), n // T))
                              for n in range(q.shape[1])], dim=1)
    qn = l2(q_glob)
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
        if rope is not None and not absolute:  # slots 0 .. n-1 of the context, the chunk last
            local = naive_attention(rope(q[:, sl], len(keys) - (c1 - c0)), rope(k[:, idx], 0), v[:, idx])
        else:
            local = naive_attention(q_abs[:, sl], k_abs[:, idx], v[:, idx])
        # global: frames S .. c0 - W - 1 have been written, one frame at a time
        while written < max(0, c0 - W - S):
            for s, key, value, gate in frame_writes(mem, k_glob, v, gates, S + written):
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


@pytest.mark.parametrize("kind,aggregate", [(kind, "frame_mean") for kind in UPDATES] + [
    ("hybrid_gdn", "token"), ("hybrid_ssd", "block_mean"), ("hybrid_blockwise", "token")])  # keys with places
def test_float32_memory_under_bf16_autocast_follows_the_equations_within_bf16_rounding(kind, aggregate):
    """Not only the dtypes: bf16 chunks through a float32 memory under autocast give the float64 equations' values
    (on the same bf16-rounded inputs) within bf16 rounding, far closer than an output without the global read."""
    mem = make_memory(kind, dtype=torch.float32, sink_frames=1, window_frames=1, horizon_frames=6,
                      evict_aggregate=aggregate)
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


@pytest.mark.parametrize("kind,aggregate", CASES)
@pytest.mark.parametrize("position", ["none", "rope", "learned"])
@pytest.mark.parametrize("rope_mode", [None, "absolute", "relative"])
def test_place_codes_follow_the_equations_in_every_rope_mode(kind, aggregate, position, rope_mode):
    """Keys written with their place's phases, queries read with theirs, and (absolute RoPE with ``rope=``) the
    global state fed keys and queries before RoPE: streaming and parallel against the equations."""
    mem = make_memory(kind, frame_tokens=6, frame_shape=(2, 3), sink_frames=1, window_frames=2, horizon_frames=6,
                      evict_aggregate=aggregate, global_position=position, rope_mode=rope_mode or "absolute")
    rope = None if rope_mode is None else Rope3D(mem.head_dim, 2, 3)
    q, k, v, x = make_clip(mem, batch=2, frames=9)
    with torch.no_grad():
        y, _, _ = stream(mem, q, k, v, x, 2, rope)
        parallel = mem.parallel(q, k, v, x, 2, rope=rope)
        ref = reference_hybrid(mem, q, k, v, x, cover([2], 9), rope)
    assert rel_err(y, ref) < 1e-10 and rel_err(parallel, ref) < 1e-10


@pytest.mark.parametrize("kind,aggregate", [c for c in CASES if c[1] != "frame_mean"])
def test_place_codes_are_part_of_the_equations(kind, aggregate):
    """The reference tells keys with and without places apart (a write stripped of its place fails the tests above),
    and a frame's mean has no place: there the option changes nothing."""
    outs = {}
    for position in ("none", "learned"):
        mem = make_memory(kind, frame_tokens=6, frame_shape=(2, 3), sink_frames=1, window_frames=2,
                          horizon_frames=6, evict_aggregate=aggregate, global_position=position)
        assert mem.addressed == (position == "learned")
        q, k, v, x = make_clip(mem, batch=2, frames=9)
        with torch.no_grad():
            outs[position] = reference_hybrid(mem, q, k, v, x, cover([2], 9))
    assert rel_err(outs["learned"], outs["none"]) > 1e-2
    mean = make_memory(kind, frame_tokens=6, frame_shape=(2, 3), evict_aggregate="frame_mean")
    assert not mean.addressed and not hasattr(mean, "global_phase")


def test_rope_place_phases_are_a_3d_ropes_spatial_angles_by_hand():
    """head_dim 12 on a 2 x 3 grid: 4 time channels (not rotated), 4 for rows, 4 for columns, each axis at
    frequencies 1 and 1/100 (theta 10000 over 4 channels)."""
    mem = make_memory("hybrid_gdn", head_dim=12, frame_tokens=6, frame_shape=(2, 3), evict_aggregate="token",
                      global_position="rope", perturb=False)
    expected = torch.tensor([[0, 0, r, r / 100, c, c / 100] for r in range(2) for c in range(3)], dtype=torch.float64)
    torch.testing.assert_close(mem.global_phase[:, 0], expected)
    blocks = make_memory("hybrid_gdn", head_dim=12, frame_tokens=16, frame_shape=(4, 4), evict_aggregate="block_mean",
                         blocks=2, global_position="rope", perturb=False)
    expected = torch.tensor([[0, 0, r, r / 100, c, c / 100] for r in range(2) for c in range(2)], dtype=torch.float64)
    torch.testing.assert_close(blocks.global_phase[:, 0], expected)
    assert "global_phase" not in blocks.state_dict()  # fixed: a function of the config, not a weight
    learned = make_memory("hybrid_gdn", head_dim=12, frame_tokens=6, frame_shape=(2, 3), evict_aggregate="token")
    assert learned.global_phase.shape == (6, 2, 6) and "global_phase" in learned.state_dict()


TIME_CASES = [("hybrid_gdn", "token"), ("hybrid_gdn", "frame_mean"), ("hybrid_gdn", "block_mean"),
              ("hybrid_blockwise", "token"), ("hybrid_blockwise", "frame_mean"), ("hybrid_ssd", "frame_mean")]


@pytest.mark.parametrize("kind,aggregate", TIME_CASES)
@pytest.mark.parametrize("time", ["rope", "learned"])
@pytest.mark.parametrize("rope_mode", [None, "absolute", "relative"])
def test_time_codes_follow_the_equations_in_every_rope_mode(kind, aggregate, time, rope_mode):
    """Keys rotated by their place's phases plus their frame's stream index times the time code's frequencies,
    queries by their own place's and frame's, each write keeping its token's write strength (not for SSD, whose
    step is both), and (absolute RoPE with ``rope=``) the global state fed keys and queries before RoPE."""
    strength = "frame" if kind == "hybrid_ssd" else "token"
    mem = make_memory(kind, frame_tokens=6, frame_shape=(2, 3), sink_frames=1, window_frames=2, horizon_frames=6,
                      evict_aggregate=aggregate, global_time=time, write_strength=strength,
                      rope_mode=rope_mode or "absolute")
    rope = None if rope_mode is None else Rope3D(mem.head_dim, 2, 3)
    q, k, v, x = make_clip(mem, batch=2, frames=10)
    sizes = [1, 3, 2, 3, 1]  # chunks of any length: every write and read must know its own frames
    with torch.no_grad():
        y, _, _ = stream(mem, q, k, v, x, sizes, rope)
        parallel = mem.parallel(q, k, v, x, 2, rope=rope)
        ref = reference_hybrid(mem, q, k, v, x, sizes, rope)
        ref_parallel = reference_hybrid(mem, q, k, v, x, cover([2], 10), rope)
    assert rel_err(y, ref) < 1e-10 and rel_err(parallel, ref_parallel) < 1e-10


@pytest.mark.parametrize("kind,aggregate", [("hybrid_gdn", "token"), ("hybrid_gdn", "frame_mean"),
                                            ("hybrid_blockwise", "token")])
def test_time_codes_and_write_strengths_are_part_of_the_equations(kind, aggregate):
    """The reference tells keys with and without times apart, and a token's whole write strength from a share of
    its frame's (where a frame writes more than once): a memory that drops either fails the test above."""
    outs = {}
    for time, strength in (("none", "frame"), ("learned", "frame"), ("none", "token")):
        mem = make_memory(kind, frame_tokens=6, frame_shape=(2, 3), sink_frames=1, window_frames=2,
                          horizon_frames=6, evict_aggregate=aggregate, global_time=time, write_strength=strength)
        assert mem.timed == (time != "none")
        q, k, v, x = make_clip(mem, batch=2, frames=9)
        with torch.no_grad():
            outs[time, strength] = reference_hybrid(mem, q, k, v, x, cover([2], 9))
    assert rel_err(outs["learned", "frame"], outs["none", "frame"]) > 1e-2
    if aggregate == "token":
        assert rel_err(outs["none", "token"], outs["none", "frame"]) > 1e-2
    else:  # one write per frame: its share is the whole
        assert rel_err(outs["none", "token"], outs["none", "frame"]) < 1e-12


def test_a_time_coded_state_keeps_two_scenes_shown_at_the_same_places_apart():
    """Two frames with the same keys at the same places (a scene, then another at the same places), written with
    full strength and no decay: without a time code the second overwrites the first; with one, a query asking for
    the first by its lag reads the first scene's values back."""
    T, H, D = 4, 1, 64
    reads = {}
    for time in ("none", "rope"):
        mem = make_memory("hybrid_gdn", heads=H, head_dim=D, frame_tokens=T, frame_shape=(2, 2), perturb=False,
                          evict_aggregate="token", global_position="learned", global_time=time,
                          write_strength="token", halflife_frames=(1e6, 1e6), horizon_frames=8)
        with torch.no_grad():
            mem.b_proj.bias.fill_(20.0)  # beta = 1: each write replaces what its key held
        gen = torch.Generator().manual_seed(0)
        keys = torch.randn(1, T, H, D, generator=gen, dtype=torch.float64)
        first, second = (torch.randn(1, T, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
        x = torch.zeros(1, T, mem.dim, dtype=torch.float64)
        M = mem._global_empty(1, "cpu", torch.float64)
        for frame, values in ((5, first), (9, second)):
            written = {"k": keys, "v": values, **mem._token_gates(x)}
            mem._stamp_evicted(written, frame)
            mem._global_write(M, written)
        # a query in frame 20 that asks for frame 5 (lag 15): the key turned back by the lag's angles
        lag = 15
        turned = keys if time == "none" else rotate_back(keys, lag * mem.global_time_freq.detach())
        read = mem._readout(M, turned, torch.tensor([20]) if time != "none" else None)
        reads[time] = [F.cosine_similarity(read, v, dim=-1).mean().item() for v in (first, second)]
    assert reads["none"][1] > 0.9 and abs(reads["none"][0]) < 0.3  # the later scene overwrote the earlier
    assert reads["rope"][0] > 0.9 and abs(reads["rope"][1]) < 0.3   # the time code asks for the earlier one


def rotate_back(t, angles):
    """Channel pairs of ``t (B, N, H, D)`` rotated by ``-angles (H, D/2)``."""
    return torch.stack([place_rotate(t[:, n], -angles) for n in range(t.shape[1])], dim=1)


def test_time_code_frequencies_by_hand_and_what_they_are():
    """head_dim 8: 4 channel pairs at 2, then down log-uniformly to one turn per four router horizons."""
    mem = make_memory("hybrid_gdn", head_dim=8, global_time="rope", horizon_frames=6, perturb=False)
    slowest = 2 * math.pi / 24
    ratio = (slowest / 2) ** (1 / 3)
    expected = torch.tensor([2, 2 * ratio, 2 * ratio**2, slowest], dtype=torch.float64)
    torch.testing.assert_close(mem.global_time_freq, expected.repeat(2, 1))
    assert "global_time_freq" not in mem.state_dict()  # fixed: a function of the config
    learned = make_memory("hybrid_gdn", head_dim=8, global_time="learned")
    assert "global_time_freq" in learned.state_dict()
    with pytest.raises(ConfigError, match="write_strength='token' needs a write strength apart from the decay"):
        make_memory("hybrid_ssd", write_strength="token")
    with pytest.raises(ConfigError, match="global_time must be one of"):
        memkit.MemoryConfig(global_time="yes")
