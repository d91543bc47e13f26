"""StreamState: everything a generation stream needs to resume, as one value."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import torch

from memkit.errors import StateFormatError

from . import io
from .memory_state import MemoryState, _parse_to

# The tensor groups of a stream state, each saved under its own key prefix.
_GROUPS = ("prompt_cache", "context", "decoder")
_PREFIX = {"prompt_cache": "prompt.", "context": "context.", "decoder": "decoder."}


@dataclass(frozen=True, eq=False)
class StreamState:
    """Every layer's :class:`MemoryState`, the frame cursor, and what a generator needs beside them.

    layers: one memory state per injected block.
    cursor: latent frames committed so far (every layer's ``frames``).
    prompt_cache: the prompt embeddings the stream is conditioned on now.
    rng: the noise generator's state (``torch.Generator.get_state()``, a CPU byte tensor).
    context: clean latents of the frames the local memories hold, with their stream indices and
        chunk ids, so a prompt switch can re-encode them.
    decoder: a streaming VAE decoder's causal cache, so decoded frames also resume seamlessly.
    info: JSON-able facts (chunk index, active prompt, decoder cache layout, ...).
    """

    layers: tuple[MemoryState, ...]
    cursor: int = 0
    prompt_cache: Mapping[str, torch.Tensor] = field(default_factory=dict)
    rng: torch.Tensor | None = None
    context: Mapping[str, torch.Tensor] = field(default_factory=dict)
    decoder: Mapping[str, torch.Tensor] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for name in (*_GROUPS, "info"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        try:
            json.dumps(dict(self.info))
        except TypeError as exc:
            raise TypeError(f"StreamState.info must be JSON-able: {exc}") from None

    def replace(self, **changes) -> "StreamState":
        """A copy with the given fields changed (``layers=``, ``cursor=``, ``context=``, ...)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"StreamState has no fields {sorted(unknown)}")
        return replace(self, **changes)

    def _map(self, fn_layer, fn_tensor) -> "StreamState":
        groups = {name: {k: fn_tensor(t) for k, t in getattr(self, name).items()} for name in _GROUPS}
        rng = None if self.rng is None else self.rng.clone()
        return replace(self, layers=tuple(fn_layer(s) for s in self.layers), rng=rng, **groups)

    def detach(self) -> "StreamState":
        return self._map(MemoryState.detach, torch.Tensor.detach)

    def clone(self) -> "StreamState":
        return self._map(MemoryState.clone, torch.Tensor.clone)

    def to(self, *args, **kwargs) -> "StreamState":
        """Move every tensor but the RNG state (a CPU byte tensor). A dtype is the activations' dtype: it casts
        the memories (as :meth:`MemoryState.to` does) and the held clean latents; the prompt, the timesteps and
        the decoder cache keep theirs, so a resumed stream still recognises its prompt."""
        device, dtype, non_blocking = _parse_to(args, kwargs)
        moved = self._map(lambda s: s.to(device=device, dtype=dtype, non_blocking=non_blocking),
                          lambda t: t.to(device=device, non_blocking=non_blocking))
        if dtype is None or "latents" not in moved.context:
            return moved
        return replace(moved, context={**moved.context, "latents": moved.context["latents"].to(dtype)})

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for name in _GROUPS for t in getattr(self, name).values())
        return sum(s.nbytes for s in self.layers) + extra

    def _flat(self, layer_tensors) -> dict[str, torch.Tensor]:
        out = {f"layers.{i}.{k}": t for i, layer in enumerate(self.layers) for k, t in layer_tensors(layer).items()}
        for name in _GROUPS:
            out.update({_PREFIX[name] + k: t for k, t in getattr(self, name).items()})
        if self.rng is not None:
            out["rng"] = self.rng
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors: every layer's (frame counts included), the cursor, prompt, context, decoder, rng."""
        return {"cursor": torch.tensor(self.cursor, dtype=torch.int64), **self._flat(MemoryState.state_dict)}

    def save(self, path: str | os.PathLike) -> None:
        meta = {"type": "StreamState", "cursor": self.cursor, "layers": [layer.meta() for layer in self.layers],
                "info": dict(self.info)}
        io.write(path, self._flat(lambda layer: dict(layer.tensors)), meta)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "StreamState":
        tensors, meta = io.read(path, "stream state")
        if meta.get("type") != "StreamState":
            raise StateFormatError(f"{path} holds a memkit {meta.get('type')!r}, not a StreamState")

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: t.to(map_location) for k, t in tensors.items() if k.startswith(prefix)}

        layers = [MemoryState.from_meta(group(f"layers.{i}."), layer_meta)
                  for i, layer_meta in enumerate(meta.get("layers", []))]
        try:
            cursor = int(meta["cursor"])
        except (KeyError, TypeError, ValueError):
            raise StateFormatError(f"{path}: stream state metadata has no cursor") from None
        groups = {name: group(_PREFIX[name]) for name in _GROUPS}
        return cls(tuple(layers), cursor, rng=tensors.get("rng"), info=meta.get("info", {}), **groups)
