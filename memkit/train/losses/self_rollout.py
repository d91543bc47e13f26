"""Self-rollout training with distribution matching distillation (Self-Forcing's DMD; VideoSSM stage 2).

The model generates a video chunk by chunk from its own outputs, exactly as at inference (the few-step
sampler of :mod:`memkit.rollout.sampler`), with a random exit step shared by all chunks. A window of
``window_chunks`` chunks at a random place of a rollout of up to ``rollout_chunks`` chunks carries the loss:
only its passes keep gradients, and the rollout stops at its end. The generated window ``x0`` is noised to a
random level and judged by two score models:

* the teacher (real score, frozen, user-supplied; optionally with classifier-free guidance), and
* the critic (fake score, trained alongside to denoise the generator's own samples).

Generator update (every ``generator_every`` batches)::

    x_t = (1 - s) x0 + s eps;   x0_real = x_t - s v_teacher(x_t);   x0_fake = x_t - s v_critic(x_t)
    g = (x0_fake - x0_real) / mean|x0 - x0_real|;   loss = 0.5 * || x0 - sg(x0 - g) ||^2

whose gradient with respect to ``x0`` is ``g`` (the KL gradient between generated and real distributions).
Critic update (every batch): flow matching on the detached samples, ``|| v_critic(x_t) - (eps - x0) ||^2``.
The two use separate optimisers (Lightning manual optimisation). With ``memory_gradient`` the window's
context passes commit with gradient (of the clean chunk, detached), so the global memory's write path learns
from later chunks' losses.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from memkit.errors import ConfigError
from memkit.rollout.sampler import commit_chunk, denoise_chunk
from memkit.rollout.schedule import FlowSchedule

from ..flow import add_noise
from .base import TrainingLoss


class SelfRolloutDMD(TrainingLoss):
    """DMD on the model's own rollouts (see the module docstring).

    teacher: the real score, a ``BackboneSpec`` (a diffusers folder or Wan-format file: e.g. Wan2.1-T2V) or a
        model called as ``model(latents, timestep, encoder_hidden_states, return_dict=False)[0]`` -> flow.
    critic: the fake score to train, likewise; default: a copy of the teacher.
    rollout_chunks / window_chunks: the longest rollout, and the chunks that carry the loss.
    timesteps, shift: the few-step sampler (as ``FlowSchedule``). context_noise: as the generator's.
    guidance_scale, negative_prompt_embeds: classifier-free guidance of the teacher (a safetensors file of
        the negative prompt's embeddings; needed when the scale is not 1).
    generator_every: critic updates per generator update. critic_lr, critic_betas: the critic's AdamW.
    min_timestep / max_timestep: range (0..1000, before the shift) of the level the DMD loss noises to.
    """

    optimizer_names = ("generator", "critic")
    leaves_parameters_unused = True

    def __init__(self, teacher=None, critic=None, rollout_chunks: int = 8, window_chunks: int = 3,
                 timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0), shift: float = 5.0,
                 context_noise: float = 0.0, guidance_scale: float = 1.0, negative_prompt_embeds: str | None = None,
                 generator_every: int = 5, critic_lr: float = 4e-7, critic_betas: tuple[float, float] = (0.0, 0.999),
                 min_timestep: float = 20.0, max_timestep: float = 980.0, memory_gradient: bool = True):
        super().__init__()
        for name, value in (("rollout_chunks", rollout_chunks), ("window_chunks", window_chunks),
                            ("generator_every", generator_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"loss.{name} must be a positive int, got {value!r}")
        if window_chunks > rollout_chunks:
            raise ConfigError(f"loss.window_chunks={window_chunks} exceeds loss.rollout_chunks={rollout_chunks}")
        if not 0 <= min_timestep < max_timestep <= 1000:
            raise ConfigError(f"need 0 <= loss.min_timestep < loss.max_timestep <= 1000, got {min_timestep}, "
                              f"{max_timestep}")
        if guidance_scale != 1.0 and negative_prompt_embeds is None:
            raise ConfigError("loss.guidance_scale != 1 needs loss.negative_prompt_embeds (a safetensors file)")
        self.schedule = FlowSchedule(tuple(timesteps), shift)
        self.rollout_chunks, self.window_chunks = rollout_chunks, window_chunks
        self.context_noise, self.guidance_scale = float(context_noise), float(guidance_scale)
        self.negative_path = negative_prompt_embeds
        self.generator_every = generator_every
        self.critic_lr, self.critic_betas = critic_lr, tuple(critic_betas)
        self.min_timestep, self.max_timestep = float(min_timestep), float(max_timestep)
        self.memory_gradient = memory_gradient
        self._scores = {"teacher": teacher, "critic": critic}  # a plain dict: built into submodules by attach
        self.negative: torch.Tensor | None = None

    # -- setup -------------------------------------------------------------------------------------
    def attach(self, module):
        if self._scores["teacher"] is None:
            raise ConfigError("SelfRolloutDMD needs a teacher: loss.teacher (a BackboneSpec or a model)")
        teacher = _build(self._scores["teacher"], "loss.teacher")
        critic = _build(self._scores["critic"], "loss.critic") if self._scores["critic"] is not None else \
            copy.deepcopy(teacher)
        dims = module.handle.dims
        for name, score in (("teacher", teacher), ("critic", critic)):
            config = getattr(score, "config", None)
            if config is not None and (config.in_channels != dims.in_channels or config.text_dim != dims.text_dim):
                raise ConfigError(
                    f"loss.{name} takes {config.in_channels} latent channels and text width {config.text_dim}; the "
                    f"model being trained takes {dims.in_channels} and {dims.text_dim}"
                )
        self.teacher = teacher.eval().requires_grad_(False)
        self.critic = critic.float().train().requires_grad_(True)  # float32 master weights of the critic
        if self.negative_path is not None:
            from memkit.rollout.prompts import load_prompt_embeds

            self.negative = next(iter(load_prompt_embeds(self.negative_path).values())).float()

    def extra_optimizers(self, module):
        return [torch.optim.AdamW(self.critic.parameters(), lr=self.critic_lr, betas=self.critic_betas,
                                  weight_decay=0.0)]

    # -- the pieces ----------------------------------------------------------------------------------
    def rollout(self, module, prompt: torch.Tensor, generator: torch.Generator, *, train_generator: bool):
        """The loss window of a fresh rollout, ``(B, C, window_chunks * chunk_frames, H, W)`` float32."""
        if prompt.dim() == 4:
            raise ConfigError("self_rollout takes one prompt per clip; per-chunk prompts (action-conditioned "
                              "clips) train with teacher_forcing or rolling")
        h = module.handle
        B = prompt.shape[0]
        shape = (B, h.dims.in_channels, h.chunk_frames, *h.latent_size)
        shared = module.shared_generator()  # the same exit step and window on every rank, as Self-Forcing does
        exit_step = int(torch.randint(len(self.schedule.timesteps), (), generator=shared))
        start = int(torch.randint(self.rollout_chunks - self.window_chunks + 1, (), generator=shared))
        stream = h.init_state(B)
        dtype = module.model_dtype

        def noise():
            return module.randn(shape, generator)

        window = []
        for c in range(start + self.window_chunks):
            grad = train_generator and c >= start
            with torch.set_grad_enabled(grad):
                x0 = denoise_chunk(h, stream, prompt, self.schedule, noise, dtype=dtype, exit_step=exit_step)
            with torch.set_grad_enabled(grad and self.memory_gradient):
                stream = commit_chunk(h, stream, x0.detach(), prompt, self.schedule, noise, dtype=dtype,
                                      context_noise=self.context_noise)
            if c >= start:
                window.append(x0)
        return torch.cat(window, dim=2)

    def _levels(self, B: int, generator: torch.Generator, device) -> torch.Tensor:
        u = torch.rand((B,), generator=generator, device=generator.device).to(device)
        return self.schedule.sigma(self.min_timestep + (self.max_timestep - self.min_timestep) * u)

    def _flow(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        out = model(x.to(dtype), 1000.0 * sigma, prompt.to(dtype), return_dict=False)[0]
        return out.float()

    def _teacher_flow(self, x, sigma, prompt):
        cond = self._flow(self.teacher, x, sigma, prompt)
        if self.guidance_scale == 1.0:
            return cond
        negative = self.negative.to(prompt.device).expand(prompt.shape[0], -1, -1)
        uncond = self._flow(self.teacher, x, sigma, negative)
        return uncond + self.guidance_scale * (cond - uncond)

    def generator_loss(self, module, x0: torch.Tensor, prompt: torch.Tensor, generator: torch.Generator):
        """The DMD loss of generated ``x0`` and its regression target ``x0 - g`` (detached)."""
        sigma = self._levels(x0.shape[0], generator, x0.device)
        eps = module.randn(x0.shape, generator)
        with torch.no_grad():
            x_t = add_noise(x0.detach(), sigma, eps)
            s = sigma.view(-1, 1, 1, 1, 1)
            x0_fake = x_t - s * self._flow(self.critic, x_t, sigma, prompt)
            x0_real = x_t - s * self._teacher_flow(x_t, sigma, prompt)
            scale = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-8)
            grad = torch.nan_to_num((x0_fake - x0_real) / scale)
            target = x0.detach() - grad
        return 0.5 * F.mse_loss(x0.float(), target), target

    def critic_loss(self, module, x0: torch.Tensor, prompt: torch.Tensor, generator: torch.Generator):
        x0 = x0.detach()
        sigma = self._levels(x0.shape[0], generator, x0.device)
        eps = module.randn(x0.shape, generator)
        x_t = add_noise(x0, sigma, eps)
        return F.mse_loss(self._flow(self.critic, x_t, sigma, prompt), eps - x0)

    # -- steps ---------------------------------------------------------------------------------------
    def training_step(self, module, batch):
        prompt = module.prepare_prompt(batch)
        generator = module.noise_generator()
        train_generator = module.batches_seen % self.generator_every == 0
        x0 = self.rollout(module, prompt, generator, train_generator=train_generator)
        if train_generator:
            loss, _ = self.generator_loss(module, x0, prompt, generator)
            module.backward_term(loss, optimizer=0)
            module.step_optimizer(optimizer=0)
            module.log("train/dmd_loss", loss.detach(), prog_bar=True)
        critic = self.critic_loss(module, x0, prompt, generator)
        module.backward_term(critic, optimizer=1)
        module.step_optimizer(optimizer=1)
        module.log("train/critic_loss", critic.detach(), prog_bar=True)

    @torch.no_grad()
    def evaluate(self, module, batch, generator):
        prompt = module.prepare_prompt(batch)
        x0 = self.rollout(module, prompt, generator, train_generator=False)
        loss, _ = self.generator_loss(module, x0, prompt, generator)
        return {"loss": loss, "critic_loss": self.critic_loss(module, x0, prompt, generator)}


def _build(arg, field: str) -> nn.Module:
    if isinstance(arg, nn.Module):
        return arg
    from adapters.loading import BackboneSpec, load_backbone

    if isinstance(arg, dict):
        arg = BackboneSpec(**arg)
    if not isinstance(arg, BackboneSpec):
        raise ConfigError(f"{field} must be a BackboneSpec or a model, got {type(arg).__name__}")
    return load_backbone(arg).model


__all__ = ["SelfRolloutDMD"]
