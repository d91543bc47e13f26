"""StreamState: everything a generation stream needs to resume, as one value."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from memkit.errors import StateFormatError

from . import io
from .memory_state import MemoryState


@dataclass(frozen=True, eq=False)
class StreamState:
    """Every layer's :class:`MemoryState`, the frame cursor, the prompt cache and the RNG state."""

    layers: tuple[MemoryState, ...]
    cursor: int = 0
    prompt_cache: Mapping[str, torch.Tensor] = field(default_factory=dict)
    rng: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "prompt_cache", MappingProxyType(dict(self.prompt_cache)))

    def replace(self, layers: Sequence[MemoryState] | None = None, cursor: int | None = None,
                prompt_cache: Mapping[str, torch.Tensor] | None = None,
                rng: torch.Tensor | None = None) -> "StreamState":
        return StreamState(
            self.layers if layers is None else tuple(layers),
            self.cursor if cursor is None else cursor,
            self.prompt_cache if prompt_cache is None else prompt_cache,
            self.rng if rng is None else rng,
        )

    def _map(self, fn_layer, fn_tensor) -> "StreamState":
        return StreamState(
            tuple(fn_layer(s) for s in self.layers),
            self.cursor,
            {k: fn_tensor(t) for k, t in self.prompt_cache.items()},
            None if self.rng is None else self.rng.clone(),
        )

    def detach(self) -> "StreamState":
        return self._map(MemoryState.detach, torch.Tensor.detach)

    def clone(self) -> "StreamState":
        return self._map(MemoryState.clone, torch.Tensor.clone)

    def to(self, *args, **kwargs) -> "StreamState":
        return self._map(lambda s: s.to(*args, **kwargs), lambda t: t.to(*args, **kwargs))

    @property
    def nbytes(self) -> int:
        prompt = sum(t.numel() * t.element_size() for t in self.prompt_cache.values())
        return sum(s.nbytes for s in self.layers) + prompt

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"cursor": torch.tensor(self.cursor, dtype=torch.int64)}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": t for k, t in layer.state_dict().items()})
        out.update({f"prompt.{k}": t for k, t in self.prompt_cache.items()})
        if self.rng is not None:
            out["rng"] = self.rng
        return out

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"layers.{i}.{k}": t for i, layer in enumerate(self.layers) for k, t in layer.tensors.items()}
        tensors.update({f"prompt.{k}": t for k, t in self.prompt_cache.items()})
        if self.rng is not None:
            tensors["rng"] = self.rng
        meta = {"type": "StreamState", "cursor": self.cursor, "layers": [layer.meta() for layer in self.layers]}
        io.write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "StreamState":
        tensors, meta = io.read(path, "stream state")
        if meta.get("type") != "StreamState":
            raise StateFormatError(f"{path} holds a memkit {meta.get('type')!r}, not a StreamState")
        layers = []
        for i, layer_meta in enumerate(meta.get("layers", [])):
            prefix = f"layers.{i}."
            layer_tensors = {k[len(prefix):]: t.to(map_location) for k, t in tensors.items() if k.startswith(prefix)}
            layers.append(MemoryState.from_meta(layer_tensors, layer_meta))
        prompt = {k[len("prompt."):]: t.to(map_location) for k, t in tensors.items() if k.startswith("prompt.")}
        try:
            cursor = int(meta["cursor"])
        except (KeyError, TypeError, ValueError):
            raise StateFormatError(f"{path}: stream state metadata has no cursor") from None
        return cls(tuple(layers), cursor, prompt, tensors.get("rng"))
