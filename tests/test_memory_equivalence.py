"""Every memory variant: streaming (commit chunk by chunk) == parallel, and the relations between variants."""

import pytest
import torch
from helpers import TOL, chunk_starts, make_clip, make_memory, perturb_params, rel_err, rope_for, stream
from hypothesis import given
from hypothesis import strategies as st

import memkit
from memkit.ops import naive_attention

KINDS = memkit.list_memories()

case = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "batch": st.integers(1, 2), "heads": st.integers(1, 3), "head_dim": st.sampled_from([6, 8, 12]),
    "height": st.integers(1, 2), "width": st.integers(1, 3),
    "frames": st.integers(1, 12), "chunk_frames": st.integers(1, 4),
    "sink_frames": st.integers(0, 3), "window_frames": st.integers(1, 4),
    "evict_aggregate": st.sampled_from(["token", "frame_mean", "block_mean"]),
    "global_position": st.sampled_from(["none", "rope", "learned"]),
    "global_time": st.sampled_from(["none", "rope", "learned"]),
    "write_strength": st.sampled_from(["frame", "token"]),
    "rope": st.sampled_from([None, "absolute", "relative"]),
    "dtype": st.sampled_from([torch.float64, torch.float32]),
    "gate_scale": st.floats(0.1, 3.0), "seed": st.integers(0, 2**16),
})


def build(c):
    aggregate = c["evict_aggregate"]
    if c["kind"] == "hybrid_blockwise" and aggregate == "block_mean":
        aggregate = "frame_mean"  # its states are per block already
    mem = make_memory(
        c["kind"], heads=c["heads"], head_dim=c["head_dim"], dim=5, frame_tokens=c["height"] * c["width"],
        frame_shape=(c["height"], c["width"]), blocks=min(c["height"], c["width"]),
        dtype=c["dtype"], seed=c["seed"], sink_frames=c["sink_frames"], window_frames=c["window_frames"],
        evict_aggregate=aggregate, rope_mode=c["rope"] or "absolute", horizon_frames=8,
        global_position=c["global_position"], global_time=c["global_time"],
        write_strength=c["write_strength"] if c["kind"] in ("hybrid_gdn", "hybrid_blockwise") else "frame",
    )
    rope = None if c["rope"] is None else rope_for(mem, c["height"])
    q, k, v, x = make_clip(mem, c["batch"], c["frames"], c["dtype"], c["seed"])
    return mem, rope, q, k, v, x * c["gate_scale"]


@given(case)
def test_streaming_equals_parallel(c):
    mem, rope, q, k, v, x = build(c)
    y_stream, _, _ = stream(mem, q, k, v, x, c["chunk_frames"], rope)
    y_par = mem.parallel(q, k, v, x, chunk_frames=c["chunk_frames"], rope=rope)
    assert rel_err(y_stream, y_par) < TOL[c["dtype"]]


@given(case)
def test_read_is_pure_and_equals_commit(c):
    mem, rope, q, k, v, x = build(c)
    T, F = mem.frame_tokens, c["chunk_frames"]
    frames = c["frames"]
    state = mem.init_state(c["batch"], dtype=c["dtype"])
    if frames > F:  # some history first, so the window (and the global state) hold something
        _, state, _ = stream(mem, q, k, v, x, F, rope)
    before = {n: t.clone() for n, t in state.tensors.items()}
    sl = slice(0, min(frames, F) * T)
    y_read = mem.read(state, q[:, sl], k[:, sl], v[:, sl], x[:, sl], rope=rope)
    assert all(torch.equal(before[n], t) for n, t in state.tensors.items())
    y_commit, after = mem.commit(state, q[:, sl], k[:, sl], v[:, sl], x[:, sl], rope=rope)
    assert torch.equal(y_read, y_commit)
    assert after.frames == state.frames + min(frames, F)
    assert all(torch.equal(before[n], t) for n, t in state.tensors.items())  # commit made a new state


@pytest.mark.parametrize("chunk_frames", [1, 2, 3])
def test_window_covering_clip_equals_full_equals_block_causal(chunk_frames):
    frames = 7
    full = make_memory("full")
    window = make_memory("window", window_frames=frames)
    q, k, v, x = make_clip(full, frames=frames)
    y_full, _, _ = stream(full, q, k, v, x, chunk_frames)
    y_win, _, _ = stream(window, q, k, v, x, chunk_frames)
    T = full.frame_tokens
    chunk_of = torch.arange(frames * T) // T // chunk_frames
    mask = chunk_of[:, None] >= chunk_of[None, :]  # block-causal: own chunk and every earlier one
    y_ref = naive_attention(q, k, v, mask)
    assert rel_err(y_full, y_ref) < 1e-12
    assert rel_err(y_win, y_full) < 1e-12


def local_mask(kind, S, W, sizes, T):
    """Explicit token mask of a local memory: sink frames, the last W frames before the chunk, the chunk."""
    if kind == "full":
        S, W = 0, 10**9
    elif kind == "window":
        S = 0
    rows = []
    for c0, c1 in chunk_starts(sizes):
        keys = [f < min(S, c0) or max(S, c0 - W) <= f < c0 or c0 <= f < c1 for f in range(sum(sizes))]
        rows += [keys] * (c1 - c0)
    frame_mask = torch.tensor(rows)
    return frame_mask.repeat_interleave(T, 0).repeat_interleave(T, 1)


@given(st.sampled_from(["full", "window", "sink_window"]), st.integers(0, 3), st.integers(1, 4),
       st.lists(st.integers(1, 4), min_size=1, max_size=6), st.integers(0, 999))
def test_local_memories_follow_their_mask_for_any_chunking(kind, S, W, sizes, seed):
    mem = make_memory(kind, sink_frames=S, window_frames=W, seed=seed)
    q, k, v, x = make_clip(mem, frames=sum(sizes), seed=seed)
    y, _, _ = stream(mem, q, k, v, x, sizes)
    assert rel_err(y, naive_attention(q, k, v, local_mask(kind, S, W, sizes, mem.frame_tokens))) < 1e-12


@pytest.mark.parametrize("kind", ["hybrid_gdn", "hybrid_ssd", "hybrid_blockwise"])
@pytest.mark.parametrize("agg", ["token", "frame_mean"])
@pytest.mark.parametrize("position,rope_mode", [("none", None), ("learned", None), ("learned", "absolute"),
                                                ("learned", "relative"), ("rope", "absolute")])
def test_hybrid_at_init_equals_sink_window_and_differs_once_trained(kind, agg, position, rope_mode):
    cfg = dict(sink_frames=1, window_frames=2, evict_aggregate=agg, rope_mode=rope_mode or "absolute")
    hybrid = make_memory(kind, perturb=False, global_position=position, **cfg)
    base = make_memory("sink_window", perturb=False, **cfg)
    rope = None if rope_mode is None else rope_for(hybrid)
    q, k, v, x = make_clip(hybrid, frames=9)
    y_h, _, _ = stream(hybrid, q, k, v, x, 2, rope)
    y_b, _, _ = stream(base, q, k, v, x, 2, rope)
    assert torch.equal(y_h, y_b)
    perturb_params(hybrid)
    y_h2, _, _ = stream(hybrid, q, k, v, x, 2, rope)
    early = slice(0, 4 * hybrid.frame_tokens)  # chunks starting at frames 0 and 2 come before any eviction
    assert torch.equal(y_h2[:, early], y_b[:, early])
    assert rel_err(y_h2, y_b) > 1e-3


def test_hybrid_global_memory_carries_information_past_the_window():
    """A token evicted long ago still changes the output through the global state, not through attention."""
    mem = make_memory("hybrid_gdn", sink_frames=0, window_frames=1)
    q, k, v, x = make_clip(mem, batch=1, frames=8)
    v2 = v.clone()
    v2[:, : mem.frame_tokens] += 1.0  # change frame 0 only
    y1, _, _ = stream(mem, q, k, v, x, 1)
    y2, _, _ = stream(mem, q, k, v2, x, 1)
    late = slice(5 * mem.frame_tokens, None)
    assert rel_err(y2[:, late], y1[:, late]) > 1e-6
    sw = make_memory("sink_window", sink_frames=0, window_frames=1)
    z1, _, _ = stream(sw, q, k, v, x, 1)
    z2, _, _ = stream(sw, q, k, v2, x, 1)
    assert torch.equal(z1[:, late], z2[:, late])


@pytest.mark.parametrize("kind", KINDS)
def test_state_size_is_constant_except_full(kind):
    mem = make_memory(kind, sink_frames=2, window_frames=3)
    q, k, v, x = make_clip(mem, frames=24)
    _, _, states = stream(mem, q, k, v, x, 3)
    sizes = [s.nbytes for s in states]
    if kind == "full":
        assert sizes == sorted(sizes) and sizes[-1] == 8 * sizes[0]
    else:
        assert len(set(sizes)) == 1


def test_router_position_is_clamped_for_unbounded_streams():
    mem = make_memory("hybrid_gdn", horizon_frames=10)
    assert torch.equal(mem.router(9), mem.router(10_000_000))
    assert not torch.equal(mem.router(0), mem.router(9))


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_is_differentiable(kind):
    mem = make_memory(kind, sink_frames=1, window_frames=2)
    # 8 frames: the last chunk reads 3 evicted frames (with one frame per write, decay needs two of them)
    q, k, v, x = (t.requires_grad_() for t in make_clip(mem, frames=8))
    mem.parallel(q, k, v, x, chunk_frames=2).square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    if kind.startswith("hybrid"):
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mem.parameters())


def test_float32_memory_runs_bfloat16_chunks_under_autocast():
    mem = make_memory("hybrid_gdn", dtype=torch.float32, sink_frames=1, window_frames=1)
    q, k, v, x = (t.bfloat16() for t in make_clip(mem, frames=6, dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state, _ = stream(mem, q, k, v, x, 2)
    assert y.dtype == torch.bfloat16 and state["global.M"].dtype == torch.float32
    assert state["global.M"].abs().sum() > 0
