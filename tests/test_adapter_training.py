"""What training needs from the adapter: teacher forcing in one pass, activation checkpointing, float32 memories
beside a half-precision backbone, autocast-aware states and caches."""

import pytest
import torch
from backbones import LATENT, clip, inject, rel_err, tiny_model

import adapters
import memkit
from memkit.errors import DTypeError, ShapeError


def trained_hybrid(model, **cfg):
    h = inject(model, "hybrid_gdn", chunk_frames=2, sink_frames=1, window_frames=2, **cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mem in h.memories:
            for p in mem.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return h


def stream_reference(h, state, noisy, t, prompt, context, t_ctx):
    """Chunk by chunk: read the noisy chunk, then commit the clean one (what generation does)."""
    F, outs = h.chunk_frames, []
    for f0 in range(0, noisy.shape[2], F):
        piece = t[:, f0: f0 + F] if t.dim() == 2 else t
        outs.append(h.read(state, noisy[:, :, f0: f0 + F], piece, prompt))
        _, state = h.commit(state, context[:, :, f0: f0 + F], t_ctx, prompt)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("backbone", ["wan", "skyreels_v2"])
@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
def test_teacher_force_equals_reading_each_chunk_after_committing_the_clean_ones(backbone, rope_mode):
    model = tiny_model(backbone)
    h = trained_hybrid(model, rope_mode=rope_mode)
    context, prompt = clip(frames=8)
    noisy = torch.randn(context.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = 1000 * torch.rand(2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref, ref_state = stream_reference(h, h.init_state(2), noisy, t, prompt, context, 50.0)
    pred, state = h.teacher_force(h.init_state(2), noisy, t, prompt, context=context, context_timestep=50.0)
    assert rel_err(pred, ref) < 1e-12
    assert state.cursor == ref_state.cursor == 8
    for a, b in zip(state.layers, ref_state.layers):
        for name in a.tensors:
            assert torch.allclose(a[name], b[name], atol=1e-12), name
    assert torch.equal(state.context["frames"], ref_state.context["frames"])
    # carried across segments: two halves from the carried state equal the whole
    first, mid = h.teacher_force(h.init_state(2), noisy[:, :, :4], t[:, :4], prompt, context=context[:, :, :4],
                                 context_timestep=50.0)
    second, _ = h.teacher_force(mid, noisy[:, :, 4:], t[:, 4:], prompt, context=context[:, :, 4:],
                                context_timestep=50.0)
    assert rel_err(torch.cat([first, second], dim=2), ref) < 1e-12
    adapters.remove(model)


def test_teacher_force_gradients_flow_through_the_state_into_the_write_gates():
    model = tiny_model("wan")
    h = trained_hybrid(model, freeze_backbone=True)
    context, prompt = clip(frames=8)
    noisy = torch.randn_like(context)
    pred, _ = h.teacher_force(h.init_state(2), noisy, 500.0, prompt, context=context)
    pred[:, :, -2:].pow(2).mean().backward()  # the last chunk only: it reads frames evicted long before
    for mem in h.memories:
        assert mem.a_proj.weight.grad.abs().sum() > 0 and mem.b_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".memory." not in n)
    adapters.remove(model)


def test_teacher_force_refuses_a_context_of_another_shape_or_partial_chunks():
    model = tiny_model("wan")
    h = trained_hybrid(model)
    context, prompt = clip(frames=4)
    state = h.init_state(2)
    with pytest.raises(ShapeError, match="context must have the shape"):
        h.teacher_force(state, context, 500.0, prompt, context=context[:, :, :2])
    with pytest.raises(ShapeError, match="whole chunks"):
        h.teacher_force(state, context[:, :, :3], 500.0, prompt, context=context[:, :, :3])
    adapters.remove(model)


@pytest.mark.parametrize("mode", ["teacher", "parallel"])
def test_activation_checkpointing_gives_the_same_gradients_and_is_undone_by_remove(mode):
    model = tiny_model("wan")
    h = trained_hybrid(model, freeze_backbone=True)
    context, prompt = clip(frames=8)
    noisy = torch.randn_like(context)
    params = list(h.memory_parameters())

    def grads():
        for p in params:
            p.grad = None
        if mode == "teacher":
            out, _ = h.teacher_force(h.init_state(2), noisy, 500.0, prompt, context=context)
        else:
            out = h.parallel(noisy, 500.0, prompt)
        out.pow(2).mean().backward()
        return [p.grad.clone() for p in params]

    plain = grads()
    h.set_activation_checkpointing(True)
    assert model.gradient_checkpointing
    recomputed = grads()
    for a, b in zip(plain, recomputed):
        assert torch.allclose(a, b, atol=1e-12)
    assert sum(g.abs().sum() for g in plain) > 0
    adapters.remove(model)
    assert not model.gradient_checkpointing and model._gradient_checkpointing_func is None


def test_memory_dtype_keeps_float32_memories_beside_a_bf16_backbone_under_autocast():
    model = tiny_model("wan", dtype=torch.bfloat16)
    cfg = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=2)
    h = adapters.inject(model, cfg, chunk_frames=2, latent_size=LATENT, memory_dtype=torch.float32)
    assert {p.dtype for p in h.memory_parameters()} == {torch.float32}
    latents, prompt = clip(frames=2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = h.init_state(2)
        assert state.layers[0]["sink.k"].dtype == torch.bfloat16  # what autocast's projections make
        pred, state = h.commit(state, latents, 500.0, prompt)
    # without autocast, float32 parameters and bf16 activations are refused by name
    with pytest.raises(DTypeError, match="autocast"):
        h.commit(h.init_state(2), latents.bfloat16(), 500.0, prompt.bfloat16())
    with pytest.raises(DTypeError, match="memory_dtype"):
        adapters.remove(model)
        adapters.inject(model, cfg, latent_size=LATENT, memory_dtype=torch.int32)


def test_cross_attention_cache_is_keyed_by_autocast():
    model = tiny_model("wan", dtype=torch.float32)
    h = inject(model, "full", chunk_frames=2)
    latents, prompt = clip(frames=2, dtype=torch.float32)
    plain = h.read(h.init_state(2), latents, 500.0, prompt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h.read(h.init_state(2), latents, 500.0, prompt)  # caches bf16 K/V for this prompt
    again = h.read(h.init_state(2), latents, 500.0, prompt)
    assert again.dtype == torch.float32 and torch.equal(again, plain)
    adapters.remove(model)


def test_remove_restores_requires_grad_after_peft_wraps_the_layers():
    from memkit.train.trainable import LoraOptions, add_lora

    model = tiny_model("wan")
    flags = [p.requires_grad for p in model.parameters()]
    inject(model, "hybrid_gdn", freeze_backbone=True)
    lora = add_lora(model, LoraOptions(rank=2))
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".memory." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".memory." not in n and "lora_" not in n)
    adapters.remove(model)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert [p.requires_grad for p in base] == flags


def test_passes_under_inference_mode_take_inference_tensors_and_cache_nothing_for_them():
    model = tiny_model("wan")
    h = trained_hybrid(model)
    latents, prompt = clip(frames=2)
    expected = h.read(h.init_state(2), latents, 500.0, prompt)
    with torch.inference_mode():  # what Lightning's validation loop does; the batch is made inside
        inner_latents, inner_prompt = latents.clone(), prompt.clone()
        first = h.read(h.init_state(2), inner_latents, 500.0, inner_prompt)
        inner_prompt.add_(1.0)  # no version counter: the cache must not be trusted for it
        second = h.read(h.init_state(2), inner_latents, 500.0, inner_prompt)
    assert torch.equal(first, expected)
    assert torch.equal(second, h.read(h.init_state(2), latents, 500.0, prompt + 1.0))
    adapters.remove(model)
