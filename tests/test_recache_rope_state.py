"""Memory.recache, held_frames, the backbone-table RoPE, and the new StreamState fields."""

import pytest
import torch
from helpers import make_clip, make_memory, rel_err, rope_for, stream

import memkit
from memkit.errors import ConfigError, ShapeError, StateMismatchError
from memkit.ops import Rope3D, TabulatedRope3D, naive_attention
from memkit.state import StreamState

SIZES = [1, 3, 2, 3]  # chunk lengths: frame f belongs to chunk CHUNK_OF[f]
CHUNK_OF = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3, 3])
KINDS = memkit.list_memories()


def held_tokens(mem, frames):
    T = mem.frame_tokens
    return (torch.tensor(frames)[:, None] * T + torch.arange(T)).flatten()


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
@pytest.mark.parametrize("kind", KINDS)
def test_recache_with_the_committed_inputs_reproduces_the_state(kind, rope_mode):
    mem = make_memory(kind, sink_frames=1, window_frames=3, rope_mode=rope_mode)
    rope = rope_for(mem)
    q, k, v, x = make_clip(mem, frames=9)
    y, state, _ = stream(mem, q, k, v, x, SIZES, rope=rope)
    held = mem.held_frames(state.frames)
    idx = held_tokens(mem, held)
    y_re, again = mem.recache(state, q[:, idx], k[:, idx], v[:, idx], x[:, idx], rope=rope,
                              chunk_ids=CHUNK_OF[held])
    assert again.frames == state.frames
    assert all(torch.equal(state[n], again[n]) for n in state.tensors)
    if kind == "full":  # every frame sees what it saw when committed
        assert rel_err(y_re, y) < 1e-12


@pytest.mark.parametrize("kind", ["sink_window", "hybrid_gdn"])
def test_recache_output_is_chunk_causal_attention_over_the_held_frames(kind):
    mem = make_memory(kind, sink_frames=1, window_frames=3)
    q, k, v, x = make_clip(mem, frames=9)
    _, state, _ = stream(mem, q, k, v, x, SIZES)
    held = mem.held_frames(9)
    assert held == [0, 6, 7, 8]
    idx = held_tokens(mem, held)
    q2, k2, v2, x2 = (torch.randn_like(t[:, idx]) for t in (q, k, v, x))  # "under a new prompt"
    y, new = mem.recache(state, q2, k2, v2, x2, chunk_ids=CHUNK_OF[held])
    token_chunk = CHUNK_OF[held].repeat_interleave(mem.frame_tokens)
    local = naive_attention(q2, k2, v2, token_chunk[None, :] <= token_chunk[:, None])
    T = mem.frame_tokens
    glob = mem._global_read(state.tensors, q2[:, T:], x2[:, T:], 9)  # window frames only: the sink came earlier
    if glob is not None:
        local = torch.cat([local[:, :T], local[:, T:] + glob], dim=1)
        assert glob.abs().max() > 1e-3
    assert rel_err(y, local) < 1e-12
    assert torch.equal(new["sink.k"], k2[:, :T]) and torch.equal(new["win.v"], v2[:, T:])
    if kind == "hybrid_gdn":
        assert torch.equal(new["global.M"], state["global.M"])
        assert torch.equal(new["win.g"], mem._token_gates(x2[:, T:])["g"])
    # a default chunk_ids makes every frame its own chunk
    y_frames, _ = mem.recache(state, q2, k2, v2, x2)
    assert not torch.equal(y_frames, y)


def test_recache_refuses_what_the_memory_does_not_hold():
    mem = make_memory("sink_window", sink_frames=1, window_frames=3)
    q, k, v, x = make_clip(mem, frames=9)
    _, state, _ = stream(mem, q, k, v, x, SIZES)
    idx = held_tokens(mem, [0, 6, 7, 8])
    chunk = (q[:, idx], k[:, idx], v[:, idx], x[:, idx])
    with pytest.raises(ShapeError, match=r"the 4 frames the memory holds \(stream frames 0, 6-8\), got 3"):
        mem.recache(state, *(t[:, : 3 * mem.frame_tokens] for t in chunk))
    with pytest.raises(ConfigError, match="must not decrease"):
        mem.recache(state, *chunk, chunk_ids=torch.tensor([0, 3, 2, 3]))
    with pytest.raises(ShapeError, match="one per held frame"):
        mem.recache(state, *chunk, chunk_ids=torch.tensor([0, 1]))
    with pytest.raises(StateMismatchError, match="holds no frames"):
        mem.recache(mem.init_state(2, dtype=torch.float64), *(t[:, : mem.frame_tokens] for t in chunk))


def test_tabulated_rope_reads_the_backbone_tables_exactly():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=8, ffn_dim=32,
                                  num_layers=1, rope_max_seq_len=16)
    cos, sin = model.rope(torch.zeros(1, 4, 7, 6, 8))  # the stock tables for frames 0..6 of 3x4 tokens
    x = torch.randn(1, 7 * 12, 2, 12)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    stock = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    rope = TabulatedRope3D(model.rope.freqs_cos, model.rope.freqs_sin, 3, 4)
    assert torch.equal(rope(x, 0), stock)
    assert torch.equal(rope(x[:, 36:], 3), stock[:, 36:])  # a frame offset picks the table rows
    assert torch.equal(rope(x[:, 36:], torch.tensor([3, 4, 5, 6])), stock[:, 36:])
    assert rel_err(Rope3D(12, 3, 4)(x, 0), stock) < 1e-6  # the formula agrees to float32 rounding
    with pytest.raises(ConfigError, match="past the backbone's RoPE table \\(16 positions\\)"):
        rope(x[:, :12], 16)
    assert rope != TabulatedRope3D(model.rope.freqs_cos, model.rope.freqs_sin, 3, 4)  # identity, not fields


def test_stream_state_round_trips_context_decoder_and_info(tmp_path):
    mem = make_memory("hybrid_gdn", sink_frames=1, window_frames=2)
    q, k, v, x = make_clip(mem, frames=4)
    _, layer, _ = stream(mem, q, k, v, x, 2)
    st = StreamState([layer, layer], cursor=4, prompt_cache={"embeds": torch.randn(1, 3, 8)},
                     context={"latents": torch.randn(1, 4, 3, 2, 2), "frames": torch.tensor([0, 2, 3])},
                     decoder={"cache.3": torch.randn(1, 8, 2, 4, 4)}, info={"chunk": 2, "decoder": {"slots": [1]}})
    st.save(tmp_path / "s.safetensors")
    back = StreamState.load(tmp_path / "s.safetensors")
    assert back.cursor == 4 and dict(back.info) == {"chunk": 2, "decoder": {"slots": [1]}}
    for group in ("prompt_cache", "context", "decoder"):
        a, b = getattr(st, group), getattr(back, group)
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert back.nbytes == st.nbytes
    half = st.to(torch.float32)
    assert half.context["frames"].dtype == torch.int64 and half.context["latents"].dtype == torch.float32
    assert half.prompt_cache["embeds"].dtype == torch.float32 and half.layers[0]["win.k"].dtype == torch.float32
    bf = st.to(torch.bfloat16)
    assert bf.context["latents"].dtype == bf.layers[0]["win.k"].dtype == torch.bfloat16
    assert bf.prompt_cache["embeds"].dtype == torch.float32  # the prompt keeps its dtype: still recognised
    assert bf.layers[0]["global.M"].dtype == torch.float32
    assert "context.frames" in st.state_dict() and "decoder.cache.3" in st.state_dict()
    with pytest.raises(TypeError, match="JSON-able"):
        StreamState([layer], info={"bad": torch.zeros(1)})
    with pytest.raises(TypeError, match="no fields"):
        st.replace(cursr=3)


def test_memkit_exports_the_generation_layer_lazily():
    import subprocess
    import sys

    code = "import sys, memkit; assert 'diffusers' not in sys.modules; memkit.StreamingGenerator; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
