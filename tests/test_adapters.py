"""Adapters reproduce the stock diffusers models, retrofit safely, remove cleanly and save memory weights only."""

import pytest
import torch
from backbones import (
    FRAME_TOKENS,
    LATENT,
    TINY,
    chunk_causal_reference,
    clip,
    inject,
    rel_err,
    stream_commits,
    tiny_model,
)
from helpers import perturb_params

import adapters
import memkit

BACKBONES = ["wan", "skyreels_v2"]
T_SHARED = torch.tensor([700.0, 300.0])


def per_frame(frames, seed=1):
    return torch.rand(2, frames, generator=torch.Generator().manual_seed(seed)) * 1000


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_full_memory_one_chunk_equals_stock_forward(backbone, rope_mode):
    model = tiny_model(backbone)
    latents, prompt = clip(frames=5)
    for t in (T_SHARED, per_frame(5)):
        reference = chunk_causal_reference(model, latents, t, prompt, chunk_frames=5)
        h = inject(model, "full", chunk_frames=5, rope_mode=rope_mode)
        with torch.no_grad():
            state = h.init_state(2)
            read = h.read(state, latents, t, prompt)
            committed, _ = h.commit(state, latents, t, prompt)
        adapters.remove(model)
        assert rel_err(read, reference) < 1e-8
        assert torch.equal(read, committed)
    with torch.no_grad():  # and the plain stock forward, with no mask at all
        stock = model(latents, T_SHARED, prompt, return_dict=False)[0]
    assert torch.equal(stock, chunk_causal_reference(model, latents, T_SHARED, prompt, chunk_frames=5))


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_streamed_full_memory_equals_chunk_causal_stock(backbone, rope_mode):
    model = tiny_model(backbone)
    latents, prompt = clip(frames=9)
    for t in (T_SHARED, per_frame(9)):
        reference = chunk_causal_reference(model, latents, t, prompt, chunk_frames=3)
        h = inject(model, "full", chunk_frames=3, rope_mode=rope_mode)
        with torch.no_grad():
            streamed, state = stream_commits(h, latents, t, prompt)
            parallel = h.parallel(latents, t, prompt)
        adapters.remove(model)
        assert rel_err(streamed, reference) < 1e-8
        assert rel_err(parallel, reference) < 1e-8
        assert state.cursor == 9 and all(layer.frames == 9 for layer in state.layers)


def test_i2v_cross_attention_with_image_context_equals_stock():
    model = tiny_model("wan", image_dim=8, added_kv_proj_dim=24)
    latents, _ = clip(frames=3)
    text = torch.randn(2, 512, 16, dtype=torch.float64)  # the stock I2V processor takes the last 512 tokens as text
    image = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        stock = model(latents, T_SHARED, text, encoder_hidden_states_image=image, return_dict=False)[0]
        h = inject(model, "full", chunk_frames=3)
        ours = h.read(h.init_state(2), latents, T_SHARED, text, encoder_hidden_states_image=image)
    assert rel_err(ours, stock) < 1e-8


@pytest.mark.parametrize("kind", ["hybrid_gdn", "hybrid_ssd", "hybrid_blockwise"])
def test_hybrid_injection_changes_no_output_before_training(kind):
    model = tiny_model("wan")
    latents, prompt = clip(frames=12)
    outs = {}
    for k in ("sink_window", kind):
        h = inject(model, k, chunk_frames=3, sink_frames=1, window_frames=3)
        with torch.no_grad():
            reads = [h.read(h.init_state(2), latents[:, :, :3], T_SHARED, prompt)]
            outs[k] = (stream_commits(h, latents, T_SHARED, prompt)[0], reads[0])
        adapters.remove(model)
    assert torch.equal(outs[kind][0], outs["sink_window"][0])  # through evictions into the global state
    assert torch.equal(outs[kind][1], outs["sink_window"][1])
    # while nothing has been evicted, a sink + window memory is the chunk-causal stock model
    h = inject(model, kind, chunk_frames=3, sink_frames=3, window_frames=6)
    with torch.no_grad():
        first = stream_commits(h, latents[:, :, :9], T_SHARED, prompt)[0]
    adapters.remove(model)
    assert rel_err(first, chunk_causal_reference(model, latents[:, :, :9], T_SHARED, prompt, 3)) < 1e-8


def test_trained_hybrid_streaming_equals_parallel_and_differs_from_sink_window():
    model = tiny_model("wan")
    latents, prompt = clip(frames=12)
    h = inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    for mem in h.memories:
        perturb_params(mem)
    with torch.no_grad():
        streamed, _ = stream_commits(h, latents, T_SHARED, prompt)
        parallel = model(latents, T_SHARED, prompt, return_dict=False)[0]  # the injected model called directly
        assert rel_err(streamed, h.parallel(latents, T_SHARED, prompt)) < 1e-10
    assert rel_err(streamed, parallel) < 1e-10
    adapters.remove(model)
    h = inject(model, "sink_window", chunk_frames=3, sink_frames=1, window_frames=3)
    with torch.no_grad():
        local_only, _ = stream_commits(h, latents, T_SHARED, prompt)
    assert torch.equal(local_only[:, :, :6], streamed[:, :, :6])  # nothing evicted yet
    assert rel_err(streamed[:, :, 6:], local_only[:, :, 6:]) > 1e-3


@pytest.mark.parametrize("backbone", BACKBONES)
def test_remove_restores_the_stock_model_bit_identically(backbone):
    model = tiny_model(backbone)
    latents, prompt = clip(frames=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {name: p for name, p in model.attn_processors.items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        stock = model(latents, T_SHARED, prompt, return_dict=False)[0]
    h = inject(model, "hybrid_gdn", chunk_frames=3, freeze_backbone=True)
    names = {k for k in model.state_dict() if ".memory." in k}
    assert names and all(k.startswith("blocks.") for k in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".memory." not in n)
    assert all(p.requires_grad for p in h.memory_parameters())
    for mem in h.memories:
        perturb_params(mem)
    with torch.no_grad():
        stream_commits(h, latents, T_SHARED, prompt)
    adapters.remove(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(model.attn_processors[name] is p for name, p in processors.items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(latents, T_SHARED, prompt, return_dict=False)[0], stock)
    with pytest.raises(memkit.errors.AdapterError, match="removed"):
        h.init_state(1)
    with pytest.raises(memkit.errors.AdapterError, match="no memkit adapter"):
        adapters.remove(model)
    inject(model, "full")  # and it can be injected again
    adapters.remove(model)


def test_save_memory_holds_memory_parameters_only(tmp_path):
    from safetensors import safe_open

    model = tiny_model("wan")
    h = inject(model, "hybrid_gdn", chunk_frames=3)
    for mem in h.memories:
        perturb_params(mem, seed=3)
    memkit.save_memory(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    expected = {k for k in model.state_dict() if ".memory." in k}
    assert keys == expected and len(keys) == TINY["num_layers"] * len(h.memories[0].state_dict())
    trained = {k: v.clone() for k, v in model.state_dict().items() if ".memory." in k}
    adapters.remove(model)

    fresh = tiny_model("wan", seed=5)
    inject(fresh, "hybrid_gdn", chunk_frames=3)
    memkit.load_memory(fresh, tmp_path / "m.safetensors")
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())


def test_cross_attention_kv_is_computed_once_per_prompt():
    model = tiny_model("wan")
    latents, prompt = clip(frames=3)
    other = prompt + 1
    h = inject(model, "full", chunk_frames=3)
    calls = []
    handle = model.blocks[0].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        state = h.init_state(2)
        first = h.read(state, latents, T_SHARED, prompt)
        again = [h.read(state, latents, T_SHARED, prompt) for _ in range(3)]
        assert len(calls) == 1
        switched = h.read(state, latents, T_SHARED, other)
        assert len(calls) == 2
        uncached = model(latents, T_SHARED, prompt, return_dict=False)[0]  # direct call: no cache
        assert len(calls) == 3
        model.blocks[0].attn2.to_k.weight.add_(0.1)  # new weights: the cached K/V are stale
        changed = h.read(state, latents, T_SHARED, prompt)
        assert len(calls) == 4
    handle.remove()
    assert all(torch.equal(first, a) for a in again)
    assert not torch.equal(first, switched) and not torch.equal(first, changed)
    assert rel_err(first, uncached) < 1e-8


def test_absolute_rope_past_the_table_is_an_error_and_relative_streams_on():
    model = tiny_model("wan", rope_max_seq_len=6)
    latents, prompt = clip(frames=12)
    h = inject(model, "sink_window", chunk_frames=3, sink_frames=1, window_frames=2)
    with torch.no_grad(), pytest.raises(memkit.errors.ConfigError, match="rope_mode='relative'"):
        stream_commits(h, latents, T_SHARED, prompt)
    adapters.remove(model)
    h = inject(model, "sink_window", chunk_frames=3, sink_frames=1, window_frames=2, rope_mode="relative")
    with torch.no_grad():
        out, state = stream_commits(h, latents, T_SHARED, prompt)
    assert state.cursor == 12 and torch.isfinite(out).all()


def test_recache_reencodes_held_frames_under_the_new_prompt_and_keeps_the_global_state():
    model = tiny_model("wan")
    latents, prompt = clip(frames=9)
    other = torch.randn_like(prompt)
    h = inject(model, "full", chunk_frames=3)
    with torch.no_grad():
        _, state = stream_commits(h, latents, T_SHARED, prompt)
        same = h.recache(state, prompt)
        switched = h.recache(state, other)
        _, fresh = stream_commits(h, latents, T_SHARED, other)  # these latents committed under the new prompt
    for a, b, c, d in zip(state.layers, same.layers, switched.layers, fresh.layers):
        for name in a.tensors:
            assert rel_err(b[name], a[name]) < 1e-12  # same prompt: the same cache
            assert rel_err(c[name], d[name]) < 1e-12  # new prompt: what committing under it gives
    assert not torch.equal(switched.layers[1]["win.k"], state.layers[1]["win.k"])
    adapters.remove(model)

    h = inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3)
    for mem in h.memories:
        perturb_params(mem)
    with torch.no_grad():
        _, state = stream_commits(h, latents, T_SHARED, prompt)
        switched = h.recache(state, other)
    assert switched.cursor == state.cursor and torch.equal(switched.context["latents"], state.context["latents"])
    assert state.context["frames"].tolist() == [0, 6, 7, 8]  # sink + window: what the local memory holds
    for i, (a, b) in enumerate(zip(state.layers, switched.layers)):
        assert torch.equal(a["global.M"], b["global.M"]) and a["global.M"].abs().sum() > 0
        # block 0's input has not met the prompt yet (cross-attention comes after self-attention)
        prompt_free = i == 0
        assert torch.equal(a["win.k"], b["win.k"]) == prompt_free
        assert torch.equal(a["win.g"], b["win.g"]) == prompt_free


def test_prefill_commits_any_length_aligned_to_the_chunk_grid():
    model = tiny_model("wan")
    latents, prompt = clip(frames=7)
    h = inject(model, "full", chunk_frames=3)
    with torch.no_grad():
        state = h.prefill(h.init_state(2), latents, prompt, timestep=0.0)
        ref = h.init_state(2)
        for f0, f1 in ((0, 1), (1, 4), (4, 7)):
            _, ref = h._commit(ref, latents[:, :, f0:f1], torch.zeros(2), prompt)
    assert state.cursor == 7
    assert state.context["chunks"].tolist() == [0, 1, 1, 1, 2, 2, 2]
    for a, b in zip(state.layers, ref.layers):
        assert all(torch.equal(a[n], b[n]) for n in a.tensors)


def test_latent_grid_and_handle_basics():
    model = tiny_model("wan")
    h = inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=2, window_frames=4)
    assert h.num_layers == TINY["num_layers"] and h.latent_size == LATENT and h.grid == (2, 3)
    assert h.memories[0].frame_tokens == FRAME_TOKENS
    assert h.held_frames(10) == [0, 1, 6, 7, 8, 9]
    assert "hybrid_gdn" in repr(h) and "wan" in adapters.list_backbones()
    assert adapters.get_handle(model) is h


def test_image_context_is_part_of_the_cross_attention_cache_key():
    model = tiny_model("wan", image_dim=8, added_kv_proj_dim=24)
    latents, _ = clip(frames=3)
    text = torch.randn(2, 512, 16, dtype=torch.float64)
    images = [torch.randn(2, 4, 8, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        stock = [model(latents, T_SHARED, text, encoder_hidden_states_image=im, return_dict=False)[0] for im in images]
        h = inject(model, "full", chunk_frames=3)
        state = h.init_state(2)
        ours = [h.read(state, latents, T_SHARED, text, encoder_hidden_states_image=im) for im in images]
    assert all(rel_err(a, b) < 1e-8 for a, b in zip(ours, stock))


def test_generating_in_inference_mode_then_training_works():
    model = tiny_model("wan")
    latents, prompt = clip(frames=9)
    h = inject(model, "hybrid_gdn", chunk_frames=3, freeze_backbone=True, sink_frames=1, window_frames=2,
               rope_mode="relative")
    for mem in h.memories:  # off the zero-initialised read-out, so every parameter gets a gradient
        perturb_params(mem)
    with torch.inference_mode():  # fills the RoPE and cross-attention caches with inference tensors
        stream_commits(h, latents, T_SHARED, prompt)
    streamed, _ = stream_commits(h, latents, T_SHARED, prompt)
    (h.parallel(latents, T_SHARED, prompt).square().mean() + streamed.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for mem in h.memories for p in mem.parameters())


def test_a_state_shares_no_tensor_with_the_caller():
    model = tiny_model("wan")
    latents, prompt = clip(frames=3)
    t = torch.tensor([500.0, 500.0])
    h = inject(model, "sink_window", chunk_frames=3, sink_frames=1, window_frames=3)
    with torch.no_grad():
        _, state = h.commit(h.init_state(2), latents, t, prompt)
    kept = state.context["latents"].clone()
    latents.add_(1.0)
    t.add_(1.0)
    assert torch.equal(state.context["latents"], kept) and torch.equal(state.context["timestep"], torch.full((2, 3),
                                                                                                             500.0))


def test_a_failed_injection_leaves_the_model_as_it_was():
    model = tiny_model("wan")
    processors = dict(model.attn_processors)

    attn = model.blocks[1].attn1

    def fails_once(processor):
        del attn.set_processor  # back to the class's method for the rollback
        raise RuntimeError("this processor cannot be set")

    attn.set_processor = fails_once
    with pytest.raises(RuntimeError, match="cannot be set"):
        inject(model, "hybrid_gdn", chunk_frames=3, freeze_backbone=True)
    assert all(model.attn_processors[name] is p for name, p in processors.items())
    assert not any(".memory." in k for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(memkit.errors.AdapterError, match="no memkit adapter"):
        adapters.get_handle(model)
    inject(model, "full")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_prompt_edited_in_place_after_a_read_is_attended_with_its_new_values(mode):
    model = tiny_model("wan")
    h = inject(model, "full", chunk_frames=3)
    with getattr(torch, mode)():
        latents, prompt = clip(frames=3)  # under inference mode: inference tensors, which keep no version counter
        state = h.init_state(2)
        first = h.read(state, latents, T_SHARED, prompt)
        prompt.add_(1.0)  # the same tensor object, new values: its cached K/V are stale
        edited = h.read(state, latents, T_SHARED, prompt)
        fresh = h.read(state, latents, T_SHARED, prompt.clone())
        _, committed = h.commit(state, latents, T_SHARED, prompt)
        _, committed_fresh = h.commit(state, latents, T_SHARED, prompt.clone())
    assert torch.equal(edited, fresh) and rel_err(edited, first) > 1e-3
    for a, b in zip(committed.layers, committed_fresh.layers):
        assert all(torch.equal(a[n], b[n]) for n in a.tensors)
    adapters.remove(model)


def test_an_image_context_edited_in_place_is_attended_with_its_new_values():
    model = tiny_model("wan", image_dim=8, added_kv_proj_dim=24)
    latents, _ = clip(frames=3)
    text = torch.randn(2, 512, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    image = torch.randn(2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = inject(model, "full", chunk_frames=3)
    with torch.no_grad():
        state = h.init_state(2)
        first = h.read(state, latents, T_SHARED, text, encoder_hidden_states_image=image)
        image.mul_(-1.0)
        edited = h.read(state, latents, T_SHARED, text, encoder_hidden_states_image=image)
        fresh = h.read(state, latents, T_SHARED, text, encoder_hidden_states_image=image.clone())
    assert torch.equal(edited, fresh) and rel_err(edited, first) > 1e-3
    adapters.remove(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(float("nan")),
                                 torch.tensor(float("nan"), dtype=torch.float64), torch.tensor([500.0, float("nan")])],
                         ids=["float_nan", "float_inf", "tensor0d_nan", "tensor0d_nan_f64", "tensor1d_nan"])
def test_a_non_finite_timestep_is_refused_even_with_check_finite_off(bad):
    model = tiny_model("wan")
    latents, prompt = clip(frames=3)
    h = inject(model, "sink_window", chunk_frames=3, sink_frames=1, window_frames=3, check_finite=False)
    with torch.no_grad():
        state = h.init_state(2)
        for call in (h.read, h.commit):
            with pytest.raises(memkit.errors.ConfigError, match="finite|NaN"):
                call(state, latents, bad, prompt)
        with pytest.raises(memkit.errors.ConfigError, match="finite|NaN"):
            h.prefill(state, latents, prompt, timestep=bad)
        # the same inputs with a finite timestep run: the refusal is the timestep's alone
        assert torch.isfinite(h.read(state, latents, 500.0, prompt)).all()
    adapters.remove(model)


def test_bf16_backbone_with_float32_memories_under_autocast_tracks_the_float32_model():
    """Not only the dtypes: values under autocast are the float32 model's within bf16 rounding, and that tolerance
    is far below what dropping the global memory changes."""
    import copy

    torch.manual_seed(0)  # the memories' initial weights come from the global generator
    model = tiny_model("wan", dtype=torch.bfloat16)
    reference_model = torch.nn.Module.to(copy.deepcopy(model), torch.float32)  # the same (bf16) weights, in float32
    cfg = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=2)
    h = adapters.inject(model, cfg, chunk_frames=2, latent_size=LATENT, memory_dtype=torch.float32)
    ref = adapters.inject(reference_model, cfg, chunk_frames=2, latent_size=LATENT)
    for mem, ref_mem in zip(h.memories, ref.memories):
        perturb_params(mem, seed=1)
        ref_mem.load_state_dict(mem.state_dict())
    latents, prompt = clip(frames=10, dtype=torch.float32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, state = stream_commits(h, latents, T_SHARED, prompt)
        expected, expected_state = stream_commits(ref, latents, T_SHARED, prompt)
        adapters.remove(reference_model)
        local_only = inject(reference_model, "sink_window", chunk_frames=2, sink_frames=1, window_frames=2)
        wrong, _ = stream_commits(local_only, latents, T_SHARED, prompt)
    assert out.dtype == torch.bfloat16 and state.layers[0]["global.M"].dtype == torch.float32
    assert rel_err(out.float(), expected) < 5e-2
    assert all(rel_err(a["global.M"], b["global.M"]) < 5e-2 for a, b in zip(state.layers, expected_state.layers))
    assert rel_err(wrong[:, :, 4:], expected[:, :, 4:]) > 0.1  # the global read matters from the third chunk on
    adapters.remove(model)
