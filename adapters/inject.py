"""Put a memory into a model you did not write, and take it out again (the PEFT pattern: in place, memory-only
weights, clean removal)."""

from __future__ import annotations

import torch
from torch import nn

from memkit.errors import AdapterError
from memkit.memory import MemoryConfig

from .handle import HANDLE_ATTR, AdapterHandle
from .registry import backbone_for


def inject(model: nn.Module, cfg: MemoryConfig, chunk_frames: int = 3, *, latent_size: tuple[int, int] | None = None,
           freeze_backbone: bool = False, memory_dtype: torch.dtype | None = None, fast: bool = True) -> AdapterHandle:
    """Put a memory of config ``cfg`` into every block of ``model``, in place, and return its handle.

    latent_size: (height, width) of the latent frames the stream will have (it sizes the memories'
        caches); defaults to the backbone's native resolution (Wan2.1: 480x832 video, 60x104 latents).
    freeze_backbone: turn off gradients of every backbone parameter (restored by ``remove``).
    memory_dtype: dtype of the memories' parameters; defaults to the model's. Training keeps them float32
        (master weights) beside a bf16 backbone and runs under autocast (Lightning's ``bf16-mixed``).
    fast: run the chunk loop's passes on the fast path (see :meth:`AdapterHandle.read`); ``handle.fast`` switches
        it later. False runs the reference path in every pass.
    """
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise AdapterError("this model already has a memkit adapter injected; adapters.remove(model) first")
    return AdapterHandle(model, backbone_for(model)(model), cfg, chunk_frames, latent_size, freeze_backbone,
                         memory_dtype, fast)


def remove(model: nn.Module) -> nn.Module:
    """Undo ``inject``: original processors back, memories deleted, frozen flags restored. Returns the model."""
    get_handle(model).remove()
    return model


def get_handle(model: nn.Module) -> AdapterHandle:
    """The handle of the adapter injected into ``model``."""
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise AdapterError(f"this {type(model).__name__} has no memkit adapter injected")
    return handle
