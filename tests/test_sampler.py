"""The few-step sampler (denoise_chunk, commit_chunk) against the flow-matching steps written out by hand."""

import pytest
import torch
from backbones import LATENT, clip, inject, tiny_model
from helpers import perturb_params

import adapters
from memkit.errors import ConfigError
from memkit.rollout import FlowSchedule, StreamingGenerator
from memkit.rollout.generator import chunk_noise_seed
from memkit.rollout.sampler import commit_chunk, denoise_chunk

PROMPT = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
SHAPE = (1, 4, 3, *LATENT)  # one chunk of the tiny backbone: (B, C, chunk_frames, H, W)


@pytest.fixture
def handle():
    """A trained hybrid memory (its global state takes part) beside a frozen backbone."""
    model = tiny_model("wan")
    h = inject(model, "hybrid_gdn", chunk_frames=3, sink_frames=1, window_frames=3, freeze_backbone=True)
    for mem in h.memories:
        perturb_params(mem, seed=2)
    yield h
    adapters.remove(model)


def warped_sigma(t, shift):
    """Wan's sampling shift applied to a timestep on the 0..1000 scale."""
    s = t / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s)


def hand_rollout(h, timesteps, shift, seed, num_chunks, context_noise=0.0):
    """Chunks made step by step, each from a generator seeded by (seed, its first frame): a start noise, one
    fresh noise per re-noising, then one for the context when it is noised. Returns (chunks, committed contexts,
    final state)."""

    def draw():
        return torch.randn(SHAPE, generator=rng, dtype=torch.float32)

    sigmas = [warped_sigma(t, shift) for t in timesteps]
    state = h.init_state(1)
    chunks, contexts = [], []
    with torch.no_grad():
        for c in range(num_chunks):
            rng = torch.Generator().manual_seed(chunk_noise_seed(seed, c * SHAPE[2]))
            x = draw()
            for i, sigma in enumerate(sigmas):
                v = h.read(state, x.to(torch.float64), 1000.0 * sigma, PROMPT)
                x0 = x - sigma * v.float()
                if i + 1 < len(sigmas):
                    x = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * draw()
            context = x0
            if context_noise > 0:
                s = warped_sigma(context_noise, shift)
                context = (1.0 - s) * x0 + s * draw()
                _, state = h.commit(state, context.to(torch.float64), 1000.0 * s, PROMPT)
            else:
                _, state = h.commit(state, context.to(torch.float64), 0.0, PROMPT)
            chunks.append(x0.to(torch.float64))
            contexts.append(context.to(torch.float64))
    return chunks, contexts, state


class Recorder:
    """Wraps a handle's read and commit, recording what reaches them."""

    def __init__(self, h, monkeypatch):
        self.reads, self.commits = [], []
        real_read, real_commit = h.read, h.commit

        def read(state, latents, timestep, prompt, **kw):
            out = real_read(state, latents, timestep, prompt, **kw)
            self.reads.append({"t": timestep, "latents": latents, "grad": torch.is_grad_enabled(),
                               "out_grad": out.requires_grad})
            return out

        def commit(state, latents, timestep, prompt, **kw):
            self.commits.append({"t": timestep, "latents": latents})
            return real_commit(state, latents, timestep, prompt, **kw)

        monkeypatch.setattr(h, "read", read)
        monkeypatch.setattr(h, "commit", commit)


CASES = {
    "self_forcing_default": ((1000.0, 750.0, 500.0, 250.0), 5.0, 0.0, [1000.0, 937.5, 2500 / 3, 625.0]),
    "three_steps_shift3": ((1000.0, 600.0, 300.0), 3.0, 0.0, [1000.0, 9000 / 11, 562.5]),
    "three_steps_shift3_context_noise": ((1000.0, 600.0, 300.0), 3.0, 300.0, [1000.0, 9000 / 11, 562.5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generator_chunks_equal_the_hand_written_flow_steps_bit_for_bit(handle, monkeypatch, case):
    timesteps, shift, context_noise, model_timesteps = CASES[case]
    expected, contexts, hand_state = hand_rollout(handle, timesteps, shift, seed=5, num_chunks=2,
                                                  context_noise=context_noise)
    rec = Recorder(handle, monkeypatch)
    schedule = FlowSchedule(timesteps, shift) if case != "self_forcing_default" else FlowSchedule()
    gen = StreamingGenerator(handle, PROMPT, schedule=schedule, context_noise=context_noise, seed=5, progress=False)
    chunks = list(gen.stream(2))

    # the model is called at 1000 * sigma_i of the warped schedule, never at the raw timesteps
    assert [r["t"] for r in rec.reads] == pytest.approx(model_timesteps * 2, rel=1e-12)
    # the context pass: the clean chunk at t=0, or noised to the warped context level with the next draw
    commit_t = 1000.0 * warped_sigma(context_noise, shift) if context_noise else 0.0
    assert [c["t"] for c in rec.commits] == pytest.approx([commit_t] * 2, rel=1e-12)
    for chunk, ref in zip(chunks, expected):
        assert torch.equal(chunk.latents, ref)
    assert not torch.equal(chunks[0].latents, chunks[1].latents)
    for commit, context, chunk in zip(rec.commits, contexts, chunks):
        assert torch.equal(commit["latents"], context)
        assert torch.equal(commit["latents"], chunk.latents) == (context_noise == 0)
    # and the memory holds what the hand-made commits left
    for a, b in zip(gen.state.layers, hand_state.layers):
        assert all(torch.equal(a[n], b[n]) for n in a.tensors)


def test_context_noise_commits_the_chunk_noised_with_the_next_draw(handle, monkeypatch):
    rec = Recorder(handle, monkeypatch)
    gen = StreamingGenerator(handle, PROMPT, context_noise=300.0, seed=9, progress=False)
    chunk = next(gen.stream(1))
    rng = torch.Generator().manual_seed(9)
    draws = [torch.randn(SHAPE, generator=rng, dtype=torch.float32) for _ in range(5)]
    s = warped_sigma(300.0, 5.0)  # 15/22
    assert s == pytest.approx(15 / 22) and rec.commits[0]["t"] == pytest.approx(1000.0 * s)
    x0 = chunk.latents.float()
    assert torch.allclose(rec.commits[0]["latents"], ((1.0 - s) * x0 + s * draws[4]).double(), rtol=0, atol=1e-6)


def test_chunk_noise_seeds_depend_on_the_seed_and_the_first_frame_only():
    assert chunk_noise_seed(7, 0) == 7  # a stream's first chunk draws from its seed itself
    seeds = {chunk_noise_seed(seed, frame) for seed in range(20) for frame in range(0, 60, 3)}
    assert len(seeds) == 20 * 20 and all(0 <= s < 2**63 for s in seeds)
    assert chunk_noise_seed(3, 9) == chunk_noise_seed(3, 9) != chunk_noise_seed(3, 12)


def chunk_noise(seed):
    rng = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(SHAPE, generator=rng, dtype=torch.float32)


def hand_steps(h, state, prompt, timesteps, shift, seed, exit_step):
    """The x0 of step ``exit_step``, from the same noise draws as denoise_chunk."""
    noise = chunk_noise(seed)
    sigmas = [warped_sigma(t, shift) for t in timesteps]
    x = noise()
    for i in range(exit_step + 1):
        x0 = x - sigmas[i] * h.read(state, x.to(torch.float64), 1000.0 * sigmas[i], prompt).float()
        if i < exit_step:
            x = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise()
    return x0


def committed_state(h):
    """Two committed chunks: with sink 1 and window 3, frames 1 and 2 are in the global state."""
    latents, _ = clip(frames=6, batch=1, seed=4)
    state = h.init_state(1)
    with torch.no_grad():
        for f0 in (0, 3):
            _, state = h.commit(state, latents[:, :, f0: f0 + 3], 0.0, PROMPT)
    assert state.layers[0]["global.M"].abs().sum() > 0
    return state


@pytest.mark.parametrize("exit_step", [0, 1, 2, 3])
def test_exit_step_returns_that_steps_x0(handle, exit_step):
    schedule = FlowSchedule()
    state = committed_state(handle)
    with torch.no_grad():
        out = denoise_chunk(handle, state, PROMPT, schedule, chunk_noise(3), dtype=torch.float64, exit_step=exit_step)
        ref = hand_steps(handle, state, PROMPT, schedule.timesteps, schedule.shift, 3, exit_step)
        full = denoise_chunk(handle, state, PROMPT, schedule, chunk_noise(3), dtype=torch.float64)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.equal(out, full) == (exit_step == 3)


@pytest.mark.parametrize("exit_step", [0, 2])
def test_only_the_exit_pass_runs_with_gradient(handle, monkeypatch, exit_step):
    state = committed_state(handle)
    rec = Recorder(handle, monkeypatch)
    out = denoise_chunk(handle, state, PROMPT, FlowSchedule(), chunk_noise(3), dtype=torch.float64,
                        exit_step=exit_step)
    flags = [(r["grad"], r["out_grad"]) for r in rec.reads]
    assert flags == [(False, False)] * exit_step + [(True, True)]
    assert out.requires_grad
    out_gate = handle.memories[0].out_gate.weight
    (grad,) = torch.autograd.grad(out.square().sum(), out_gate)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        quiet = denoise_chunk(handle, state, PROMPT, FlowSchedule(), chunk_noise(3), dtype=torch.float64,
                              exit_step=exit_step)
    assert not quiet.requires_grad and all(not r["grad"] for r in rec.reads[exit_step + 1:])
    assert torch.equal(quiet, out.detach())


@pytest.mark.parametrize("exit_step", [-1, 4, 1.0, "2"])
def test_bad_exit_step_is_a_config_error(handle, exit_step):
    with pytest.raises(ConfigError, match="exit_step"):
        denoise_chunk(handle, handle.init_state(1), PROMPT, FlowSchedule(), chunk_noise(0), dtype=torch.float64,
                      exit_step=exit_step)


def test_commit_chunk_commits_clean_latents_at_zero_without_drawing_noise(handle, monkeypatch):
    rec = Recorder(handle, monkeypatch)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float32)

    def no_noise():
        raise AssertionError("a clean context pass draws no noise")

    with torch.no_grad():
        state = commit_chunk(handle, handle.init_state(1), x0, PROMPT, FlowSchedule(), no_noise, dtype=torch.float64)
    assert rec.commits[0]["t"] == 0.0 and torch.equal(rec.commits[0]["latents"], x0.double())
    assert state.cursor == 3 and torch.equal(state.context["latents"], x0.double())
