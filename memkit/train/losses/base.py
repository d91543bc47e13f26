"""What every training loss of :class:`memkit.train.MemoryFinetune` implements."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from memkit.errors import ConfigError


class MemoryFinetune(Protocol):
    """What a loss uses of the Lightning module that runs it (:class:`memkit.train.MemoryFinetune`), named here
    so that the losses need not import the module that imports them."""

    handle: Any  # the adapters.AdapterHandle of the trained model
    batches_seen: int

    @property
    def model_dtype(self) -> torch.dtype: ...

    def prepare(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]: ...

    def prepare_prompt(self, batch: dict) -> torch.Tensor: ...

    def noise_generator(self) -> torch.Generator: ...

    def shared_generator(self) -> torch.Generator: ...

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor: ...

    def backward_term(self, loss: torch.Tensor, optimizer: int = 0) -> None: ...

    def step_optimizer(self, optimizer: int = 0) -> bool: ...

    def log_losses(self, stage: str, loss: torch.Tensor, per_chunk: torch.Tensor) -> None: ...

    def log(self, name: str, value, **kwargs) -> None: ...


class TrainingLoss(nn.Module):
    """A training objective. It is an ``nn.Module`` so that what it trains besides the memory (a critic)
    moves, saves and syncs with the Lightning module.

    ``training_step`` runs the forward and backward passes itself and steps through ``module.backward_term`` /
    ``module.step_optimizer`` (manual optimisation: truncated BPTT and alternating critics need several backward
    passes or optimisers per batch). ``evaluate`` computes the loss on a batch with a given
    noise generator and no gradient, for validation and for tests on a fixed batch.
    """

    #: names of the optimisers this loss steps, in the order ``configure_optimizers`` returns them
    optimizer_names: tuple[str, ...] = ("memory",)
    #: some backward passes leave some trained parameters out (DDP must be told to look for them)
    leaves_parameters_unused: bool = False

    def attach(self, module: MemoryFinetune) -> None:
        """Check the loss against the module (sizes, memory kind) and build what it needs; called once."""

    def extra_optimizers(self, module: MemoryFinetune) -> list[torch.optim.Optimizer]:
        """Optimisers besides the module's own (a critic's)."""
        return []

    def check_strategy(self, trainer) -> None:
        """Raise if the Trainer's strategy cannot run this loss."""
        ddp = getattr(trainer.strategy, "_ddp_kwargs", None)
        if self.leaves_parameters_unused and ddp is not None and not ddp.get("find_unused_parameters", False):
            raise ConfigError(
                f"{type(self).__name__} runs backward passes that leave some trained parameters unused (a TBPTT "
                f"segment, a critic step): with DDP use trainer.strategy 'ddp_find_unused_parameters_true'"
            )

    def training_step(self, module: MemoryFinetune, batch: dict) -> None:
        raise NotImplementedError

    def evaluate(self, module: MemoryFinetune, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``{"loss": ..., ...}`` on ``batch`` without gradient; the same generator state gives the same noise."""
        raise NotImplementedError
