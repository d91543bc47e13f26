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
    gen = torch.Generator().manual_seed(0)
    st = StreamState(layers, cursor=4, prompt_cache={"text.k": torch.randn(1, 3, 4)}, rng=gen.get_state())
    st.save(tmp_path / "s.safetensors")
    back = StreamState.load(tmp_path / "s.safetensors")
    assert back.cursor == 4 and len(back.layers) == 3
    for a, b in zip(st.layers, back.layers):
        assert (a.kind, a.frames, a.fingerprint, a.batch) == (b.kind, b.frames, b.fingerprint, b.batch)
        assert all(torch.equal(a[n], b[n]) for n in a.tensors)
    assert torch.equal(back.prompt_cache["text.k"], st.prompt_cache["text.k"])
    assert torch.equal(back.rng, st.rng)
    assert back.nbytes == st.nbytes
    assert set(st.state_dict()) >= {"cursor", "rng", "layers.0.global.M", "prompt.text.k"}
