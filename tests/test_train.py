"""memkit.train on CPU with tiny random backbones: the three losses learn, gradients reach the global memory's write
path through the state, frozen weights stay frozen, master weights stay float32, checkpoints resume exactly."""

import warnings

import lightning as L
import pytest
import torch

import adapters
import memkit
from adapters.loading import BackboneSpec
from memkit.errors import CheckpointError, ConfigError
from memkit.train import LoraOptions, MemoryFinetune, RollingMemory, SelfRolloutDMD, TeacherForcing
from memkit.train.losses.rolling import global_read_frames
from memkit.train.trainable import parameter_groups

PIXEL = {"in_channels": 3, "out_channels": 3}
SPEC = BackboneSpec(size="tiny", overrides=PIXEL)
MEMORY = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=3)
LATENT = (8, 8)

warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


def fixed_batch(frames=12, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, 3, frames, *LATENT, generator=gen),
            "prompt_embeds": torch.randn(batch, 4, 32, generator=gen)}


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def trainer(steps, **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def fit(module, batch, steps, **kw):
    t = trainer(steps, **kw)
    t.fit(module, torch.utils.data.DataLoader(Repeat(batch), batch_size=None))
    return t


def module_for(loss, spec=SPEC, memory=MEMORY, **kw):
    return MemoryFinetune(backbone=spec, memory=memory, loss=loss, latent_size=LATENT, **kw)


def teacher_spec(seed=1, dtype="float32"):
    return BackboneSpec(size="tiny", seed=seed, overrides=PIXEL, dtype=dtype)


def fixed_noise(module):
    module.noise_generator = lambda: torch.Generator().manual_seed(0)
    return module


@pytest.mark.parametrize("loss", [TeacherForcing(), TeacherForcing(context="noisy"), RollingMemory(tbptt_chunks=4)],
                         ids=["teacher_forcing", "diffusion_forcing", "rolling"])
def test_a_few_steps_lower_the_flow_loss_on_a_fixed_batch(loss):
    module = fixed_noise(module_for(loss, lr=3e-2))
    batch = fixed_batch()
    before = loss.evaluate(module, batch, torch.Generator().manual_seed(0))["loss"]
    fit(module, batch, steps=16)
    after = loss.evaluate(module, batch, torch.Generator().manual_seed(0))["loss"]
    assert after < 0.98 * before, (before, after)


def test_self_rollout_steps_move_the_generator_towards_the_dmd_target_and_the_critic_learns():
    loss = SelfRolloutDMD(teacher=teacher_spec(), rollout_chunks=3, window_chunks=2, generator_every=1,
                          critic_lr=1e-3)
    module = fixed_noise(module_for(loss, lr=3e-2, trainable="lora", lora=LoraOptions(rank=4)))
    fit(module, fixed_batch(), steps=2)  # one generator + one critic step: the read-out gates move off zero
    prompt = module.prepare_prompt(fixed_batch())

    def window():
        return loss.rollout(module, prompt, torch.Generator().manual_seed(5), train_generator=True)

    x0 = window()
    dmd, target = loss.generator_loss(module, x0, prompt, torch.Generator().manual_seed(6))
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad and p not in
                            set(loss.critic.parameters())], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (0.5 * (window() - target).pow(2).mean()).backward()
        opt.step()
    with torch.no_grad():
        assert 0.5 * (window() - target).pow(2).mean() < 0.9 * dmd

    samples = x0.detach()
    critic_opt = loss.extra_optimizers(module)[0]
    first = None
    for _ in range(8):
        critic_opt.zero_grad()
        c = loss.critic_loss(module, samples, prompt, torch.Generator().manual_seed(7))
        first = c.item() if first is None else first
        c.backward()
        critic_opt.step()
    assert loss.critic_loss(module, samples, prompt, torch.Generator().manual_seed(7)) < 0.95 * first


def test_self_rollout_alternates_its_optimisers_and_never_moves_the_teacher():
    loss = SelfRolloutDMD(teacher=teacher_spec(), rollout_chunks=3, window_chunks=1, generator_every=3,
                          critic_lr=1e-3)
    module = module_for(loss, lr=1e-2)
    teacher = {k: v.clone() for k, v in loss.teacher.state_dict().items()}
    critic = {k: v.clone() for k, v in loss.critic.state_dict().items()}
    steps = []
    original = module.step_optimizer

    def record(optimizer=0):
        stepped = original(optimizer)
        steps.append(optimizer)
        return stepped

    module.step_optimizer = record
    fit(module, fixed_batch(), steps=8)  # global_step counts both optimisers' steps
    assert steps[:8] == [0, 1, 1, 1, 0, 1, 1, 1]
    assert all(torch.equal(loss.teacher.state_dict()[k], v) for k, v in teacher.items())
    assert any(not torch.equal(loss.critic.state_dict()[k], v) for k, v in critic.items())
    assert all(p.dtype == torch.float32 for p in loss.critic.parameters())


def test_self_rollout_refuses_a_teacher_of_another_latent_space():
    with pytest.raises(ConfigError, match="loss.teacher takes 16 latent channels"):
        module_for(SelfRolloutDMD(teacher=BackboneSpec(size="tiny")))
    with pytest.raises(ConfigError, match="needs a teacher"):
        module_for(SelfRolloutDMD())
    with pytest.raises(ConfigError, match="negative_prompt_embeds"):
        SelfRolloutDMD(teacher=teacher_spec(), guidance_scale=3.0)


@pytest.mark.parametrize("kind", ["hybrid_gdn", "hybrid_ssd", "hybrid_blockwise"])
def test_rolling_training_gives_the_write_path_gradient_only_through_the_carried_state(kind):
    memory = memkit.MemoryConfig(kind=kind, sink_frames=1, window_frames=3)
    batch = fixed_batch(frames=15)

    def write_grads(tbptt):
        module = fixed_noise(module_for(RollingMemory(tbptt_chunks=tbptt), memory=memory, lr=3e-2))
        fit(module, batch, steps=3)  # the read-out gate moves off zero first
        module.zero_grad()
        module.step_optimizer = lambda optimizer=0: False  # keep the gradient of the next step
        module.log = lambda *args, **kwargs: None  # outside the Trainer's loop
        module.training_step(batch, 0)
        return {n: p.grad for n, p in parameter_groups(module.model)["memory_write"]}

    through = write_grads(5)
    gdn = ("a_proj.weight", "b_proj.weight", "A_log")
    expected = {"hybrid_gdn": gdn, "hybrid_blockwise": gdn, "hybrid_ssd": ("dt_proj.weight", "A_log")}
    assert {n.split("memory.")[1] for n in through} >= set(expected[kind])
    assert all(g is not None and g.abs().sum() > 0 for g in through.values())
    detached = write_grads(1)  # detached after every chunk: what enters the window never reaches a read
    assert all(g is None or g.abs().sum() == 0 for g in detached.values())


def test_clips_too_short_for_the_global_memory_are_warned_and_really_never_read_it(caplog):
    memory = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=3)
    assert global_read_frames(1, 3, 3) == 9  # frame 1 leaves the window in the commit of frames 3-5, read by 6-8

    def read_grads(frames):
        module = fixed_noise(module_for(RollingMemory(tbptt_chunks=frames // 3), memory=memory))
        fit(module, fixed_batch(frames=frames), steps=1)
        module.zero_grad()
        module.step_optimizer = lambda optimizer=0: False  # keep the gradient of the next step
        module.log = lambda *args, **kwargs: None
        module.training_step(fixed_batch(frames=frames), 0)
        return [p.grad for _, p in parameter_groups(module.model)["memory_read"]]

    with caplog.at_level("WARNING", logger="memkit.train"):
        short = read_grads(6)
    assert "never takes part in training" in caplog.text
    assert all(g is None or g.abs().sum() == 0 for g in short)  # zero-init read-out gate: no gradient at all
    caplog.clear()
    with caplog.at_level("WARNING", logger="memkit.train"):
        enough = read_grads(9)
    assert "never takes part" not in caplog.text
    assert any(g is not None and g.abs().sum() > 0 for g in enough)


def test_progress_lines_report_steps_and_the_mean_loss_since_the_last_line():
    from memkit.train.callbacks import ProgressLines

    lines = []
    module = fixed_noise(module_for(TeacherForcing(), memory=memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1,
                                                                                  window_frames=3)))
    fit(module, fixed_batch(frames=6), steps=4, callbacks=[ProgressLines(lines.append, lines=2)])
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("loss " in line and " s/step" in line and "nan" not in line for line in lines)


def test_sink_window_has_nothing_to_train_and_the_error_says_so():
    with pytest.raises(ConfigError, match="no parameters to train.*hybrid_gdn"):
        module_for(TeacherForcing(), memory=memkit.MemoryConfig(kind="sink_window"))
    lora = module_for(TeacherForcing(), memory=memkit.MemoryConfig(kind="sink_window"), trainable="lora")
    assert any("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_unknown_memory_kind_is_named_with_its_field():
    with pytest.raises(ConfigError, match="model.memory.kind.*'hybrid_xyz'"):
        module_for(TeacherForcing(), memory=memkit.MemoryConfig(kind="hybrid_xyz"))


@pytest.mark.parametrize("loss", [TeacherForcing(), RollingMemory(tbptt_chunks=2),
                                  SelfRolloutDMD(teacher=teacher_spec(), rollout_chunks=3, window_chunks=3,
                                                 generator_every=1)], ids=["tf", "rolling", "dmd"])
def test_frozen_backbone_weights_stay_bit_identical(loss):
    module = module_for(loss, lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    assert frozen and trained and all(".memory." in n for n in trained)
    fit(module, fixed_batch(), steps=4)
    params = dict(module.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in trained.items())


def test_memory_master_weights_stay_float32_on_a_bf16_backbone_and_tiny_updates_survive():
    module = module_for(TeacherForcing(), spec=BackboneSpec(size="tiny", overrides=PIXEL, dtype="bfloat16"), lr=1e-5)
    mem = module.handle.memories[0]
    assert {p.dtype for p in module.handle.memory_parameters()} == {torch.float32}
    assert module.model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    before = mem.norm_weight.detach().clone()
    fit(module, fixed_batch(), steps=2, precision="bf16-mixed")
    delta = (mem.norm_weight.detach() - before).abs().max().item()
    assert mem.norm_weight.dtype == torch.float32 and 0 < delta < 1e-4
    # the same update on a bf16 weight of 1.0 would have been rounded away
    assert torch.equal(before.bfloat16() + delta, before.bfloat16())


def test_a_bf16_backbone_needs_mixed_precision_and_full_training_needs_float32_weights():
    module = module_for(TeacherForcing(), spec=BackboneSpec(size="tiny", overrides=PIXEL, dtype="bfloat16"))
    with pytest.raises(ConfigError, match="bf16-mixed"):
        fit(module, fixed_batch(), steps=1)
    with pytest.raises(ConfigError, match="trainable='all'.*float32"):
        module_for(TeacherForcing(), spec=BackboneSpec(size="tiny", overrides=PIXEL, dtype="bfloat16"),
                   trainable="all")


def test_lora_trains_adapters_and_memories_and_leaves_base_weights():
    module = module_for(TeacherForcing(), trainable="lora", lora=LoraOptions(rank=2), lr=1e-2)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_B" in n}
    fit(module, fixed_batch(), steps=3)
    params = dict(module.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base.items())
    assert all(not torch.equal(params[n], v) for n, v in lora.items())  # lora_B starts at zero


def test_activation_checkpointing_and_accumulation_train_the_same_parameters():
    batch = fixed_batch()

    def trained(**kw):
        module = fixed_noise(module_for(TeacherForcing(), lr=1e-2, **kw))
        fit(module, batch, steps=2)
        return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    plain, checkpointed = trained(), trained(activation_checkpointing=True)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    # two backward passes per step: the same batch twice gives the one-batch gradient, so the same parameters
    module = fixed_noise(module_for(TeacherForcing(), lr=1e-2, accumulate_grad_batches=2))
    t = fit(module, batch, steps=2)
    assert t.global_step == 2 and module.batches_seen == 4
    accumulated = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert all(torch.allclose(plain[n], accumulated[n], atol=1e-5) for n in plain)


def test_logs_losses_per_chunk_and_gradient_norms_of_the_memory():
    module = module_for(TeacherForcing(), lr=1e-2)
    t = fit(module, fixed_batch(), steps=2)
    logged = t.logged_metrics
    for name in ("train/loss", "train/loss_chunk_00", "train/loss_chunk_03", "train/loss_after_eviction",
                 "grad_norm/memory_read"):
        assert name in logged, sorted(logged)
    assert logged["grad_norm/memory_read"] > 0


def test_checkpoints_hold_only_trained_tensors_and_refuse_another_setup(tmp_path):
    module = module_for(TeacherForcing(), lr=1e-2)
    t = fit(module, fixed_batch(), steps=2)
    path = tmp_path / "c.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["state_dict"]) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert ckpt["memkit"]["memory"]["kind"] == "hybrid_gdn" and ckpt["memkit"]["batches_seen"] == 2
    other = module_for(TeacherForcing(), memory=memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=2,
                                                                     window_frames=3))
    with pytest.raises(CheckpointError, match="sink_frames"):
        trainer(3).fit(other, torch.utils.data.DataLoader(Repeat(fixed_batch()), batch_size=None), ckpt_path=path,
                       weights_only=True)


def test_a_model_given_in_python_is_injected_in_place_and_removable():
    model = adapters.random_wan("tiny", overrides=PIXEL)
    module = MemoryFinetune(backbone=model, memory=MEMORY, latent_size=LATENT)
    assert module.model is model and adapters.get_handle(model) is module.handle
    fit(module, fixed_batch(), steps=1)
    adapters.remove(model)
    assert not any(".memory." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("trainable", ["memory", "lora"])
def test_a_failed_setup_leaves_a_model_given_in_python_as_it_was(trainable):
    model = adapters.random_wan("tiny", overrides=PIXEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="needs a teacher"):
        MemoryFinetune(backbone=model, memory=MEMORY, loss=SelfRolloutDMD(), latent_size=LATENT, trainable=trainable)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], v) for n, v in before.items())
    assert {n: p.requires_grad for n, p in after.items()} == flags
    MemoryFinetune(backbone=model, memory=MEMORY, latent_size=LATENT, trainable=trainable)  # injectable again


def test_flow_matching_targets_invert_the_samplers_step_and_noise_levels_follow_their_law():
    from memkit.rollout.schedule import FlowSchedule
    from memkit.train.flow import NoiseLevels, add_noise, flow_target, per_frame

    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 6, 4, 4, generator=gen), torch.randn(2, 3, 6, 4, 4, generator=gen)
    sigma = per_frame(torch.tensor([[0.2, 0.9], [0.5, 1.0]]), 3)
    assert sigma.shape == (2, 6) and sigma[0, :3].eq(0.2).all() and sigma[0, 3:].eq(0.9).all()
    x = add_noise(x0, sigma, eps)
    s = sigma[:, None, :, None, None]
    assert torch.allclose(x, (1 - s) * x0 + s * eps)
    assert torch.allclose(x - s * flow_target(x0, eps), x0, atol=1e-6)  # the sampler's x0 = x - sigma v
    levels = NoiseLevels(distribution="schedule").sample((4000,), torch.Generator().manual_seed(1), "cpu")
    assert set(levels.unique().tolist()) == pytest.approx(sorted(FlowSchedule().sigmas), abs=1e-6)
    uniform = NoiseLevels(shift=1.0).sample((20000,), torch.Generator().manual_seed(2), "cpu")
    assert 0 < uniform.min() and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    shifted = NoiseLevels(shift=5.0).sample((20000,), torch.Generator().manual_seed(2), "cpu")
    assert torch.allclose(shifted, 5 * uniform / (1 + 4 * uniform), atol=1e-6)  # the same draws, warped
    with pytest.raises(ConfigError, match="distribution"):
        NoiseLevels(distribution="gaussian")


def test_the_dmd_gradient_on_generated_frames_is_the_normalised_score_difference():
    """Independent of the loss code: redraw the level and noise in the same order, call teacher and critic by hand."""
    loss = SelfRolloutDMD(teacher=teacher_spec(), critic=teacher_spec(seed=2))
    module = module_for(loss)
    prompt = fixed_batch()["prompt_embeds"]
    x0 = torch.randn(2, 3, 6, *LATENT, generator=torch.Generator().manual_seed(3), requires_grad=True)
    value, _ = loss.generator_loss(module, x0, prompt, torch.Generator().manual_seed(4))
    value.backward()
    gen = torch.Generator().manual_seed(4)
    u = torch.rand((2,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    t = (20 + 960 * u) / 1000
    s = (5 * t / (1 + 4 * t)).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        x_t = (1 - s) * x0 + s * eps
        call = lambda m: m(x_t, 1000 * s.flatten(), prompt, return_dict=False)[0]  # noqa: E731
        real, fake = x_t - s * call(loss.teacher), x_t - s * call(loss.critic)
        g = (fake - real) / (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(x0.grad, g / x0.numel(), rtol=1e-4, atol=1e-9)
    assert torch.allclose(value, 0.5 * g.pow(2).mean(), rtol=1e-4)


def test_teacher_forcing_commits_the_context_at_its_warped_noise_level(monkeypatch):
    loss = TeacherForcing(context_noise=200.0)
    module = module_for(loss)
    seen = {}
    real = module.handle.teacher_force

    def spy(state, latents, timestep, prompt, *, context, context_timestep):
        seen.update(noisy=latents, timestep=timestep, context=context, context_timestep=context_timestep)
        return real(state, latents, timestep, prompt, context=context, context_timestep=context_timestep)

    monkeypatch.setattr(module.handle, "teacher_force", spy)
    batch = fixed_batch()
    loss.evaluate(module, batch, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    x0 = batch["latents"]
    u = torch.rand((2, 4), generator=gen)
    sigma = (5 * u / (1 + 4 * u)).repeat_interleave(3, dim=1)
    eps, eps_ctx = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    s = 5 * 0.2 / (1 + 4 * 0.2)
    assert torch.allclose(seen["timestep"], 1000 * sigma)
    assert torch.allclose(seen["noisy"], (1 - sigma[:, None, :, None, None]) * x0 + sigma[:, None, :, None, None] * eps,
                          atol=1e-6)
    assert seen["context_timestep"] == pytest.approx(1000 * s)
    assert torch.allclose(seen["context"], (1 - s) * x0 + s * eps_ctx, atol=1e-6)


def test_export_writes_memory_and_lora_weights_and_never_replaces_a_file(tmp_path):
    from safetensors import safe_open

    from memkit.train import ExportMemoryWeights

    module = module_for(TeacherForcing(), trainable="lora", lora=LoraOptions(rank=2), lr=1e-2)
    (tmp_path / "memory.lora.safetensors").write_bytes(b"keep")
    export = ExportMemoryWeights(str(tmp_path / "memory.safetensors"))
    fit(module, fixed_batch(), steps=1, callbacks=[export])
    memory_file, lora_file = export.written["memory"], export.written["lora"]
    assert memory_file == tmp_path / "memory.safetensors"
    assert lora_file == tmp_path / "memory.lora.step1.safetensors"  # the existing file is kept
    assert (tmp_path / "memory.lora.safetensors").read_bytes() == b"keep"
    with safe_open(str(lora_file), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)
    fresh = module_for(TeacherForcing())
    memkit.load_memory(fresh.model, memory_file)
    trained = dict(module.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.model.named_parameters() if ".memory." in n)


def test_the_teacher_forced_loss_is_the_flow_error_by_hand(monkeypatch):
    """Per sample and chunk, the mean of ``(prediction - (eps - x0))^2``: the level and noise redrawn in the same
    order, the prediction taken from the model's call."""
    from memkit.train.flow import NoiseLevels
    from memkit.train.losses.teacher_forcing import chunk_losses

    module = module_for(TeacherForcing())
    seen = {}
    real = module.handle.teacher_force

    def spy(*args, **kwargs):
        pred, state = real(*args, **kwargs)
        seen["pred"] = pred.detach()
        return pred, state

    monkeypatch.setattr(module.handle, "teacher_force", spy)
    batch = fixed_batch()
    x0 = batch["latents"]
    with torch.no_grad():
        losses, _ = chunk_losses(module, x0, batch["prompt_embeds"], torch.Generator().manual_seed(9), NoiseLevels())
    gen = torch.Generator().manual_seed(9)
    torch.rand((2, 4), generator=gen)  # the chunks' levels
    eps = torch.randn(x0.shape, generator=gen)
    error = (seen["pred"] - (eps - x0)).pow(2)  # (B, C, F, H, W)
    want = error.mean(dim=(1, 3, 4)).view(2, 4, 3).mean(dim=2)
    assert losses.shape == (2, 4) and torch.allclose(losses, want, rtol=1e-5)


def test_rolling_segments_of_unequal_length_accumulate_the_whole_clip_mean_gradient(monkeypatch):
    """Five chunks in segments of 2, 2 and 1, one optimiser step: the gradient of the mean loss over all chunks
    (each chunk counts once, whatever its segment's length), with the state detached between segments."""
    from memkit.train.losses.teacher_forcing import chunk_losses

    loss = RollingMemory(tbptt_chunks=2, step_every_segment=False)
    module = module_for(loss)
    batch = fixed_batch(frames=15)
    monkeypatch.setattr(module, "backward_term", lambda value, optimizer=0: value.backward())
    monkeypatch.setattr(module, "step_optimizer", lambda optimizer=0: False)
    params = [p for p in module.parameters() if p.requires_grad]
    loss._run(module, batch, torch.Generator().manual_seed(5), train=True)
    got = [p.grad.clone() for p in params]
    module.zero_grad()
    x0, prompt = module.prepare(batch)
    gen, state, per_chunk = torch.Generator().manual_seed(5), None, []
    for c0, c1 in [(0, 2), (2, 4), (4, 5)]:
        chunk, state = chunk_losses(module, x0[:, :, 3 * c0: 3 * c1], prompt, gen, loss.noise, state=state)
        per_chunk.append(chunk)
        state = state.detach()
    torch.cat(per_chunk, dim=1).mean().backward()
    assert any(g.abs().sum() > 0 for g in got)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-9)


def test_self_rollout_commits_its_samples_detached(monkeypatch):
    """The context passes commit the generated chunk as data: no gradient flows back into the sample through
    the memory (only the memory's own write path learns from them)."""
    import memkit.train.losses.self_rollout as self_rollout

    loss = SelfRolloutDMD(teacher=teacher_spec(), critic=teacher_spec(seed=2), rollout_chunks=3, window_chunks=2)
    module = module_for(loss)
    committed = []
    real = self_rollout.commit_chunk

    def spy(handle, stream, x0, *args, **kwargs):
        committed.append(x0.requires_grad)
        return real(handle, stream, x0, *args, **kwargs)

    monkeypatch.setattr(self_rollout, "commit_chunk", spy)
    window = loss.rollout(module, fixed_batch()["prompt_embeds"], torch.Generator().manual_seed(0),
                          train_generator=True)
    assert window.requires_grad  # the samples themselves carry the generator's gradient
    assert len(committed) >= 2 and not any(committed)
