"""States are values: save -> load is bit-identical, and a loaded state resumes a stream exactly."""

import pytest
import torch
from helpers import make_clip, make_memory, stream

import memkit
from memkit.state import MemoryState, StreamState

KINDS = memkit.list_memories()


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_is_bit_identical_and_resumes(kind, tmp_path):
    mem = make_memory(kind, sink_frames=1, window_frames=2)
    q, k, v, x = make_clip(mem, frames=10)
    T = mem.frame_tokens
    y_all, _, states = stream(mem, q, k, v, x, 2)
    path = tmp_path / f"{kind}.safetensors"
    states[1].save(path)
    loaded = MemoryState.load(path, expect_fingerprint=mem.fingerprint)
    assert loaded.frames == 4 and loaded.kind == kind and loaded.batch == 2
    assert set(loaded.tensors) == set(states[1].tensors)
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in states[1].tensors.items())
    rest = slice(4 * T, None)
    y_rest, _, _ = stream(mem, q[:, rest], k[:, rest], v[:, rest], x[:, rest], 2, state=loaded)
    assert torch.equal(y_rest, y_all[:, rest])


def test_state_value_semantics():
    mem = make_memory("hybrid_gdn")
    q, k, v, x = (t.requires_grad_() for t in make_clip(mem, frames=12))
    _, state, _ = stream(mem, q, k, v, x, 3)
    assert state["global.M"].requires_grad
    detached = state.detach()
    assert not any(t.requires_grad for t in detached.tensors.values())
    clone = detached.clone()
    assert all(c.data_ptr() != d.data_ptr() for c, d in zip(clone.tensors.values(), detached.tensors.values()))
    half = detached.to(torch.float32)
    assert half["sink.k"].dtype == torch.float32 and half.nbytes < detached.nbytes
    sd = state.state_dict()
    assert int(sd["frames"]) == 12 and "global.M" in sd
    with pytest.raises(TypeError):
        state.tensors["sink.k"] = None  # read-only view
    expected = sum(t.numel() * t.element_size() for t in state.tensors.values())
    assert state.nbytes == expected


def test_stream_state_round_trip(tmp_path):
    layers = []
    for i, kind in enumerate(["hybrid_gdn", "full", "hybrid_ssd"]):
        mem = make_memory(kind, seed=i)
        _, s, _ = stream(mem, *make_clip(mem, frames=4, seed=i), 2)
        layers.append(s.detach())
    st = StreamState(layers, cursor=4, prompt_cache={"text.k": torch.randn(1, 3, 4)})
    st.save(tmp_path / "s.safetensors")
    back = StreamState.load(tmp_path / "s.safetensors")
    assert back.cursor == 4 and len(back.layers) == 3
    for a, b in zip(st.layers, back.layers):
        assert (a.kind, a.frames, a.fingerprint, a.batch) == (b.kind, b.frames, b.fingerprint, b.batch)
        assert all(torch.equal(a[n], b[n]) for n in a.tensors)
    assert torch.equal(back.prompt_cache["text.k"], st.prompt_cache["text.k"])
    assert back.nbytes == st.nbytes
    assert set(st.state_dict()) >= {"cursor", "layers.0.global.M", "prompt.text.k"}


def test_to_a_dtype_keeps_recurrent_state_precision():
    mem = make_memory("hybrid_gdn", dtype=torch.bfloat16, perturb=False)
    state = mem.init_state(2).to(torch.bfloat16)  # made for float32 activations, then moved
    assert state["win.k"].dtype == torch.bfloat16
    assert state["global.M"].dtype == torch.float32 and state["win.g"].dtype == torch.float32
    q, k, v, x = make_clip(mem, frames=12, dtype=torch.bfloat16)
    _, state, _ = stream(mem, q, k, v, x, 3, state=state)
    assert state.frames == 12 and state["global.M"].abs().sum() > 0
    assert state.to(torch.float64)["global.M"].dtype == torch.float64


def test_float32_block_input_with_bfloat16_heads():
    mem = make_memory("hybrid_gdn", dtype=torch.float32, sink_frames=1, window_frames=1)
    q, k, v, x = make_clip(mem, frames=6, dtype=torch.float32)
    y, state, _ = stream(mem, q.bfloat16(), k.bfloat16(), v.bfloat16(), x, 2)
    assert y.dtype == torch.bfloat16 and state["global.M"].abs().sum() > 0


def test_fingerprint_covers_only_what_shapes_the_state(tmp_path):
    a = make_memory("full", sink_frames=1, window_frames=2, horizon_frames=5)
    b = make_memory("full", sink_frames=3, window_frames=9, evict_aggregate="frame_mean")
    assert a.fingerprint == b.fingerprint  # full uses neither sink nor window
    assert make_memory("window", sink_frames=1).fingerprint == make_memory("window", sink_frames=2).fingerprint
    assert make_memory("window", window_frames=1).fingerprint != make_memory("window", window_frames=2).fingerprint
    h = [make_memory("hybrid_gdn", horizon_frames=n).fingerprint for n in (10, 20)]
    assert h[0] == h[1]  # the router horizon is read-time only
    assert make_memory("hybrid_gdn", evict_aggregate="token").fingerprint != h[0]
    assert make_memory("hybrid_gdn", blocks=1).fingerprint == h[0]  # blocks only shape spatial writes
    assert make_memory("hybrid_gdn", halflife_frames=(2.0, 9.0)).fingerprint == h[0]  # an init, not a shape
    assert make_memory("hybrid_gdn", global_position="none").fingerprint == h[0]  # a frame mean has no place
    places = {p: make_memory("hybrid_gdn", evict_aggregate="token", global_position=p).fingerprint
              for p in ("none", "rope", "learned")}
    assert len(set(places.values())) == 3  # keys with and without place codes read back differently
    times = {t: make_memory("hybrid_gdn", global_time=t).fingerprint for t in ("none", "rope", "learned")}
    assert times["none"] == h[0] and len(set(times.values())) == 3  # ... and with and without time codes
    assert make_memory("hybrid_gdn", write_strength="token").fingerprint == h[0]  # how strongly, not what, it holds
    grids = [make_memory("hybrid_gdn", frame_tokens=16, frame_shape=shape, evict_aggregate="token",
                         global_position="rope").fingerprint for shape in ((4, 4), (2, 8))]
    assert grids[0] != grids[1]  # the same 16 tokens on another grid: other places
    spatial = [make_memory(kind, frame_tokens=16, frame_shape=shape, **cfg).fingerprint
               for kind, cfg in (("hybrid_gdn", {"evict_aggregate": "block_mean"}), ("hybrid_blockwise", {}))
               for shape in ((4, 4), (2, 8))]
    assert len(set(spatial)) == 4  # the token grid shapes what a block holds
    assert make_memory("hybrid_blockwise", blocks=1).fingerprint != make_memory("hybrid_blockwise").fingerprint
    assert make_memory("full", rope_mode="relative").fingerprint != a.fingerprint
    assert make_memory("full").fingerprint != make_memory("full", head_dim=12).fingerprint


def test_only_unbounded_caches_may_change_length():
    from memkit.errors import StateMismatchError

    mem = make_memory("window", window_frames=2)
    q, k, v, x = make_clip(mem, frames=4)
    _, state, _ = stream(mem, q, k, v, x, 2)
    bad = state.replace({**state.tensors, "sink.k": torch.zeros(2, 4, 2, 8, dtype=torch.float64)})
    with pytest.raises(StateMismatchError, match="'sink.k' has shape"):
        mem.read(bad, q[:, :8], k[:, :8], v[:, :8], x[:, :8])


def test_a_recorded_setting_differs_from_a_bool_of_the_same_value():
    """``True == 1`` in Python; a stream recorded with ``sink_frames=1`` does not match ``True``, nor a recorded
    ``check_finite=True`` an expected 1."""
    layer = make_memory("sink_window", sink_frames=1, window_frames=2).init_state(1)
    recorded = {"kind": "sink_window", "sink_frames": 1, "window_frames": 2, "check_finite": True}
    state = StreamState([layer], info={"adapter": {"memory": recorded, "chunk_frames": 1}})
    assert state.settings["sink_frames"] == 1 and state.settings["check_finite"] is True
    assert state.differences({"sink_frames": 1, "check_finite": True}) == []
    assert state.differences({"sink_frames": True}) == [("sink_frames", 1, True)]
    assert state.differences({"check_finite": 1}) == [("check_finite", True, 1)]


def test_a_training_setup_from_before_time_codes_compares_equal_to_its_defaults():
    """A checkpoint's memory config saved before ``global_time`` and ``write_strength`` existed meant "none" and
    "frame": it resumes into today's defaults without a difference, and differs from a time-coded setup."""
    from memkit.memory import MemoryConfig
    from memkit.memory.hybrid_gdn import HybridGDNMemory
    from memkit.train.module import setup_differences

    now = MemoryConfig().to_dict()
    old = {k: v for k, v in now.items() if k not in ("global_time", "write_strength")}
    assert setup_differences({"memory": old}, {"memory": now}, HybridGDNMemory) == []
    timed = {**now, "global_time": "learned", "write_strength": "token"}
    diffs = setup_differences({"memory": old}, {"memory": timed}, HybridGDNMemory)
    assert diffs == ["memory.global_time: checkpoint 'none', now 'learned'",
                     "memory.write_strength: checkpoint 'frame', now 'token'"]
