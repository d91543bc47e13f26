"""The backbone registry: what an adapter for one backbone family says about its models (:class:`BackboneAdapter`,
one file per family, e.g. ``wan.py``), and which adapter ``inject`` picks for a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memkit.errors import AdapterError

_BACKBONES: list[type[BackboneAdapter]] = []


def register_backbone(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Class decorator: make ``inject`` use this adapter for the models it ``matches``."""
    _BACKBONES.insert(0, cls)  # later registrations (subclasses, user adapters) win
    return cls


def list_backbones() -> list[str]:
    return sorted(cls.name for cls in _BACKBONES)


class BackboneAdapter:
    """How to drive one backbone family. Subclasses fill in the methods below; see ``wan.py``."""

    name: ClassVar[str] = "?"
    #: latent (height, width) of the family's native resolution, used when ``inject`` gets no ``latent_size``
    default_latent_size: ClassVar[tuple[int, int]] = (60, 104)

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    # -- the model's layout --------------------------------------------------------------
    def attention_modules(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """Per block, (self-attention module, cross-attention module or None)."""
        raise NotImplementedError

    def dims(self) -> Dims:
        raise NotImplementedError

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's RoPE (cos, sin) tables, ``(max_positions, head_dim)``, in TabulatedRope3D's layout."""
        raise NotImplementedError

    # -- one self-attention call ------------------------------------------------------------
    def self_attention_qkv(self, attn: nn.Module, hidden_states: torch.Tensor):
        """q, k, v ``(B, N, heads, head_dim)`` before RoPE, as the backbone's own processor computes them."""
        raise NotImplementedError

    def self_attention_out(self, attn: nn.Module, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The backbone's output projection of the mixed heads ``y (B, N, heads, head_dim)``."""
        raise NotImplementedError

    def cross_attention_processor(self, handle, original):
        """A processor for the cross-attention that caches prompt K/V, or None to keep the original."""
        return None

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order (what :meth:`AdapterHandle.compile` compiles)."""
        raise NotImplementedError

    def begin_fast_pass(self, handle, encoder_hidden_states: torch.Tensor, kwargs: dict) -> None:
        """Before a fast pass: look up what the blocks would otherwise find through Python bookkeeping (the prompt's
        cross-attention K/V), so that a compiled block runs without it."""

    def end_fast_pass(self, handle) -> None:
        """After a fast pass: drop what :meth:`begin_fast_pass` set up."""

    # -- one forward ---------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                **kwargs) -> torch.Tensor:
        """The stock model's prediction for ``latents``; ``timestep`` is ``(B,)`` or per frame ``(B, F)``."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------
    def checkpointing_modules(self) -> list[nn.Module]:
        """The modules whose ``gradient_checkpointing`` flag (diffusers' convention) turns per-block activation
        checkpointing on; the model's blocks are then run through ``_gradient_checkpointing_func``."""
        return [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]


@dataclass(frozen=True)
class Dims:
    num_heads: int
    head_dim: int
    dim: int
    in_channels: int
    patch_size: tuple[int, int, int]
    text_dim: int


def backbone_for(model: nn.Module) -> type[BackboneAdapter]:
    for cls in _BACKBONES:
        if cls.matches(model):
            return cls
    raise AdapterError(
        f"no memkit adapter for {type(model).__name__}; known backbones: {', '.join(list_backbones())}. "
        f"An adapter for a new backbone is one file (docs/adapters.md)"
    )
