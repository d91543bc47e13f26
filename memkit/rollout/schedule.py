"""What a stream is conditioned on and how each chunk is denoised: the prompt schedule and the
few-step flow-matching schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from memkit.errors import ConfigError, ShapeError
from memkit.ops._checks import check_finite


@dataclass(frozen=True)
class FlowSchedule:
    """Few-step flow matching as in Self-Forcing / CausVid.

    ``timesteps`` are on the 0..1000 scale; each is warped by ``shift`` (Wan's sampling shift) into a
    noise level ``sigma = shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000``, and the model is
    called with ``1000 * sigma``. A step predicts the clean chunk ``x0 = x - sigma * v`` from the flow
    ``v``, then re-noises it to the next level with fresh noise: ``x = (1 - sigma') x0 + sigma' eps``.
    """

    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        if not self.timesteps:
            raise ConfigError("FlowSchedule needs at least one timestep")
        if any(not 0 < t <= 1000 for t in self.timesteps):
            raise ConfigError(f"FlowSchedule timesteps must lie in (0, 1000], got {self.timesteps}")
        if any(b >= a for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ConfigError(f"FlowSchedule timesteps must decrease, got {self.timesteps}")
        if not self.shift > 0:
            raise ConfigError(f"FlowSchedule shift must be positive, got {self.shift}")

    def sigma(self, t: float) -> float:
        return self.warp(t / 1000.0)

    def warp(self, s):
        """The shift's warp of a level ``s`` in [0, 1] (a float or a tensor)."""
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    @property
    def sigmas(self) -> tuple[float, ...]:
        return tuple(self.sigma(t) for t in self.timesteps)

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "shift": self.shift}


class PromptSchedule:
    """Which prompt conditions each generated chunk.

    ``prompts``: one embedding tensor, a sequence, or a name -> tensor mapping, each ``(L, D)`` or
    ``(1, L, D)``; ``switches``: the chunk indices at which the next prompt takes over (one fewer than
    the prompts, strictly increasing, positive). ``PromptSchedule([a, b, c], switches=[10, 20])``:
    ``a`` for chunks 0-9, ``b`` for 10-19, ``c`` from 20 on.
    """

    def __init__(self, prompts, switches: Sequence[int] = ()):
        if isinstance(prompts, torch.Tensor):
            prompts = [prompts]
        items = list(prompts.items()) if isinstance(prompts, Mapping) else [(str(i), p) for i, p in enumerate(prompts)]
        if not items:
            raise ConfigError("PromptSchedule needs at least one prompt")
        self.names = [name for name, _ in items]
        self.embeds = [self._check(name, p) for name, p in items]
        self.switches = [self._check_switch(s) for s in switches]
        if len(self.switches) != len(self.embeds) - 1:
            raise ConfigError(
                f"{len(self.embeds)} prompts need {len(self.embeds) - 1} switch chunks, got {len(self.switches)}"
            )
        if any(b <= a for a, b in zip(self.switches, self.switches[1:])):
            raise ConfigError(f"prompt switches must be strictly increasing chunk indices, got {self.switches}")

    @staticmethod
    def _check(name: str, p) -> torch.Tensor:
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise ShapeError(f"prompt {name!r} must be a floating tensor (L, D) or (1, L, D)")
        if p.dim() == 2:
            p = p[None]
        if p.dim() != 3 or p.shape[0] != 1:
            raise ShapeError(f"prompt {name!r} must be (L, D) or (1, L, D), got {tuple(p.shape)}")
        check_finite(**{f"prompt {name!r}": p})
        return p

    @staticmethod
    def _check_switch(s) -> int:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ConfigError(f"a prompt switch is a chunk index >= 1, got {s!r}")
        return s

    def index_at(self, chunk: int) -> int:
        """Index of the prompt that conditions chunk ``chunk``."""
        return sum(1 for s in self.switches if s <= chunk)

    def check_range(self, num_chunks: int) -> None:
        """Every switch must fall inside a video of ``num_chunks`` chunks."""
        late = [s for s in self.switches if s >= num_chunks]
        if late:
            raise ConfigError(
                f"prompt switch at chunk {late[0]} is out of range: the video has {num_chunks} chunks "
                f"(0-{num_chunks - 1})"
            )

    def __len__(self) -> int:
        return len(self.embeds)

    def __repr__(self) -> str:
        spans = ", ".join(f"{n}@{s}" for n, s in zip(self.names, [0, *self.switches]))
        return f"PromptSchedule({spans})"
