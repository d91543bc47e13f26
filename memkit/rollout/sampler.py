"""The few-step sampler of one chunk, shared by :class:`StreamingGenerator` and self-rollout training.

A chunk starts from noise at ``sigma_0``. Step ``i`` calls the model once, reading the memory as it
was before the chunk, at timestep ``1000 * sigma_i``; it predicts the clean chunk
``x0 = x - sigma_i * v`` from the flow ``v`` and re-noises it to the next level with fresh noise,
``x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps``. The last step's ``x0`` is the chunk. The context pass
then commits the clean chunk (noised to the context level, if any) into the memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memkit.errors import ConfigError
from memkit.state import StreamState

from .schedule import FlowSchedule

NoiseFn = Callable[[], torch.Tensor]


def denoise_chunk(handle, stream: StreamState, prompt: torch.Tensor, schedule: FlowSchedule, noise: NoiseFn, *,
                  dtype: torch.dtype, exit_step: int | None = None, model_kwargs: dict | None = None) -> torch.Tensor:
    """The clean chunk (float32) that the schedule's denoising passes make from ``noise()``.

    noise: draws one chunk of standard normal noise (float32); called once to start and once per re-noising.
    dtype: the dtype the model is fed. exit_step: stop after this step and return its ``x0`` (Self-Forcing's
    random exit); the passes before it run without gradient, the exit pass with gradient if it is enabled.
    """
    sigmas = schedule.sigmas
    last = len(sigmas) - 1 if exit_step is None else exit_step
    if not isinstance(last, int) or isinstance(last, bool) or not 0 <= last < len(sigmas):
        raise ConfigError(f"exit_step must be an int in [0, {len(sigmas) - 1}], got {exit_step!r}")
    kwargs = model_kwargs or {}
    x = noise()
    for i in range(last + 1):
        sigma = sigmas[i]
        with torch.set_grad_enabled(torch.is_grad_enabled() and i == last):
            flow = handle.read(stream, x.to(dtype), 1000.0 * sigma, prompt, **kwargs)
            x0 = x - sigma * flow.float()
        if i < last:
            x = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise()
    return x0


def commit_chunk(handle, stream: StreamState, x0: torch.Tensor, prompt: torch.Tensor, schedule: FlowSchedule,
                 noise: NoiseFn, *, dtype: torch.dtype, context_noise: float = 0.0,
                 model_kwargs: dict | None = None) -> StreamState:
    """The context pass: commit the clean chunk ``x0``, first noised to ``context_noise`` (0..1000, warped by
    the schedule's shift) when that is positive. Returns the advanced stream."""
    context, sigma = x0, 0.0
    if context_noise > 0:
        sigma = schedule.sigma(context_noise)
        context = (1.0 - sigma) * x0 + sigma * noise()
    _, stream = handle.commit(stream, context.to(dtype), 1000.0 * sigma, prompt, **(model_kwargs or {}))
    return stream


__all__ = ["denoise_chunk", "commit_chunk"]
