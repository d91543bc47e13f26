"""Flow matching as the generator uses it: noise levels, noising, targets.

A clean latent ``x0`` at noise level ``sigma`` is ``x = (1 - sigma) x0 + sigma eps``; the model, called at
timestep ``1000 * sigma``, predicts the flow ``v = eps - x0``, so that ``x0 = x - sigma v`` (what
:mod:`memkit.rollout.sampler` does at inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memkit.errors import ConfigError
from memkit.rollout.schedule import FlowSchedule

DISTRIBUTIONS = ("uniform", "logit_normal", "schedule")


@dataclass(frozen=True)
class NoiseLevels:
    """How training draws noise levels.

    distribution: "uniform" (``s ~ U(0, 1)``), "logit_normal" (``s = sigmoid(N(mean, std))``), both then
        warped by ``shift`` as at sampling (``sigma = shift s / (1 + (shift - 1) s)``); or "schedule": one of
        the few-step sampler's own levels (``FlowSchedule(timesteps, shift).sigmas``), uniformly, which is what
        a distilled few-step generator sees at inference.
    """

    distribution: str = "uniform"
    shift: float = 5.0
    mean: float = 0.0
    std: float = 1.0
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)

    def __post_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"noise distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if not self.shift > 0 or not self.std > 0:
            raise ConfigError(f"noise shift and std must be positive, got shift={self.shift}, std={self.std}")
        FlowSchedule(tuple(self.timesteps), self.shift)  # validates the levels

    def sample(self, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
        """Noise levels ``sigma`` in (0, 1], float32, of ``shape`` (e.g. ``(batch, chunks)``)."""
        if self.distribution == "schedule":
            levels = torch.tensor(FlowSchedule(tuple(self.timesteps), self.shift).sigmas)
            pick = torch.randint(len(levels), shape, generator=generator, device=generator.device)
            return levels.to(pick.device)[pick].to(device)
        if self.distribution == "uniform":
            s = torch.rand(shape, generator=generator, device=generator.device)
        else:
            s = torch.sigmoid(self.mean + self.std * torch.randn(shape, generator=generator, device=generator.device))
        s = s.clamp(1e-4, 1.0)
        return FlowSchedule(shift=self.shift).warp(s).to(device)


def per_frame(levels: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """``(B, chunks)`` levels to ``(B, chunks * chunk_frames)``, one per latent frame."""
    return levels.repeat_interleave(chunk_frames, dim=1)


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma eps`` with ``sigma`` ``(B,)`` or per frame ``(B, F)`` for ``x0 (B, C, F, H, W)``."""
    s = sigma.to(x0.dtype).view(sigma.shape[0], 1, -1, 1, 1) if sigma.dim() == 2 else sigma.view(-1, 1, 1, 1, 1)
    return (1.0 - s) * x0 + s * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def frame_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample and frame, ``(B, F)``, in float32."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))


__all__ = ["NoiseLevels", "per_frame", "add_noise", "flow_target", "frame_mse"]
