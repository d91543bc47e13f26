"""Teacher-forced flow matching on clips (stage 1 of VideoSSM's training).

Each chunk of a clip gets its own noise level (Diffusion Forcing); the loss is the flow-matching error of
every chunk's prediction. What a chunk reads from the memory:

* ``context="clean"`` (default): the memory of the clean clip before it, optionally noised to
  ``context_noise``, exactly as generation commits its context passes. One forward over
  ``[context | noisy]`` (:meth:`AdapterHandle.teacher_force`).
* ``context="noisy"``: the noisy chunks before it, each at its own level, in one block-causal pass of the
  memory's ``parallel`` form over the clip (half the tokens; what Diffusion Forcing trains on).
"""

from __future__ import annotations

import torch

from memkit.errors import ConfigError
from memkit.rollout.schedule import FlowSchedule
from memkit.state import StreamState

from ..flow import NoiseLevels, add_noise, flow_target, frame_mse, per_frame
from .base import TrainingLoss

CONTEXTS = ("clean", "noisy")


def chunk_losses(module, x0: torch.Tensor, prompt: torch.Tensor, generator: torch.Generator, noise: NoiseLevels, *,
                 context: str = "clean", context_noise: float = 0.0,
                 state: StreamState | None = None) -> tuple[torch.Tensor, StreamState | None]:
    """Flow-matching loss per sample and chunk ``(B, chunks)`` of the clean clip ``x0 (B, C, F, H, W)``, and the
    stream state after committing its context (``context="clean"``; from ``state`` or an empty stream).

    prompt: ``(B, L, D)`` for the clip, or ``(B, chunks, L, D)`` one per chunk (then the chunks run one by one,
    each committing its context before the next reads: the same equations, as streaming equals parallel).
    """
    h = module.handle
    B, F = x0.shape[0], x0.shape[2]
    chunks = F // h.chunk_frames
    per_chunk_prompts = prompt.dim() == 4
    if per_chunk_prompts and (context == "noisy" or prompt.shape[1] < chunks):
        raise ConfigError("per-chunk prompts (B, chunks, L, D) need context='clean' and one prompt per chunk; got "
                          f"{prompt.shape[1]} prompts for {chunks} chunks, context={context!r}")
    sigma = per_frame(noise.sample((B, chunks), generator, x0.device), h.chunk_frames)
    eps = module.randn(x0.shape, generator)
    noisy = add_noise(x0, sigma, eps)
    dtype = module.model_dtype
    if context == "noisy":
        pred = h.parallel(noisy.to(dtype), 1000.0 * sigma, prompt)
    else:
        ctx, s = x0, 0.0
        if context_noise > 0:
            s = FlowSchedule(shift=noise.shift).sigma(context_noise)
            ctx = add_noise(x0, torch.full((B,), s, device=x0.device), module.randn(x0.shape, generator))
        if state is None:
            state = h.init_state(B)
        pieces = [(0, F, prompt)] if not per_chunk_prompts else [
            (c * h.chunk_frames, (c + 1) * h.chunk_frames, prompt[:, c]) for c in range(chunks)]
        preds = []
        for f0, f1, p in pieces:
            pred, state = h.teacher_force(state, noisy[:, :, f0:f1].to(dtype), 1000.0 * sigma[:, f0:f1], p,
                                          context=ctx[:, :, f0:f1].to(dtype), context_timestep=1000.0 * s)
            preds.append(pred)
        pred = torch.cat(preds, dim=2)
    per_frame_loss = frame_mse(pred, flow_target(x0, eps))
    return per_frame_loss.unflatten(1, (chunks, h.chunk_frames)).mean(dim=2), state


class TeacherForcing(TrainingLoss):
    """Teacher-forced flow matching (see the module docstring).

    context: "clean" or "noisy". context_noise: the context's noise level on the 0..1000 scale (warped by
    the noise shift, like the generator's ``context_noise``). noise: how chunk noise levels are drawn.
    """

    def __init__(self, context: str = "clean", context_noise: float = 0.0, noise: NoiseLevels | None = None):
        super().__init__()
        if context not in CONTEXTS:
            raise ConfigError(f"loss.context must be one of {CONTEXTS}, got {context!r}")
        if not 0 <= context_noise < 1000:
            raise ConfigError(f"loss.context_noise must lie in [0, 1000), got {context_noise}")
        if context == "noisy" and context_noise:
            raise ConfigError("loss.context_noise applies to context='clean' (a noisy context is the noisy chunks)")
        self.context, self.context_noise = context, float(context_noise)
        self.noise = noise or NoiseLevels()

    def _losses(self, module, batch, generator):
        x0, prompt = module.prepare(batch)
        per_chunk, _ = chunk_losses(module, x0, prompt, generator, self.noise, context=self.context,
                                    context_noise=self.context_noise)
        return per_chunk

    def training_step(self, module, batch):
        per_chunk = self._losses(module, batch, module.noise_generator())
        loss = per_chunk.mean()
        module.backward_term(loss)
        module.step_optimizer()
        module.log_losses("train", loss, per_chunk.detach().mean(dim=0))

    @torch.no_grad()
    def evaluate(self, module, batch, generator):
        per_chunk = self._losses(module, batch, generator)
        return {"loss": per_chunk.mean(), "per_chunk": per_chunk.mean(dim=0)}


__all__ = ["TeacherForcing", "chunk_losses"]
