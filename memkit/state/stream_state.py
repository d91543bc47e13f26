"""StreamState: everything a generation stream needs to resume, as one value."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import torch

from memkit.errors import ConfigError, StateFormatError, StateMismatchError

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
    prompt_cache: the prompt embeddings: the one the memory holds now (``"embeds"``) and the
        stream's whole prompt schedule (``"schedule.<i>"``).
    context: clean latents of the frames the local memories hold, with their stream indices and
        chunk ids, so a prompt switch can re-encode them.
    decoder: a streaming VAE decoder's causal cache, so decoded frames also resume seamlessly.
    info: JSON-able facts. A :class:`~memkit.rollout.StreamingGenerator` records what the stream
        was made with (``"adapter"``: backbone, memory config, chunk and latent sizes; ``"sampling"``:
        denoising steps, shift, context noise and the noise seed; ``"prompts"``: names and switch
        chunks), the chunk index and the decoder cache layout; ``"recipe"`` is free-form, for the
        caller (``memkit generate`` records how to rebuild its backbone there). :attr:`settings`
        reads them as one flat dict.
    """

    layers: tuple[MemoryState, ...]
    cursor: int = 0
    prompt_cache: Mapping[str, torch.Tensor] = field(default_factory=dict)
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
        return replace(self, layers=tuple(fn_layer(s) for s in self.layers), **groups)

    def detach(self) -> "StreamState":
        return self._map(MemoryState.detach, torch.Tensor.detach)

    def clone(self) -> "StreamState":
        return self._map(MemoryState.clone, torch.Tensor.clone)

    def to(self, *args, **kwargs) -> "StreamState":
        """Move every tensor. A dtype is the activations' dtype: it casts
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
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors: every layer's (frame counts included), the cursor, prompt, context, decoder."""
        return {"cursor": torch.tensor(self.cursor, dtype=torch.int64), **self._flat(MemoryState.state_dict)}

    def save(self, path: str | os.PathLike) -> None:
        meta = {"type": "StreamState", "cursor": self.cursor, "layers": [layer.meta() for layer in self.layers],
                "info": dict(self.info)}
        io.write(path, self._flat(lambda layer: dict(layer.tensors)), meta)

    @property
    def settings(self) -> dict[str, Any]:
        """What the stream was made with, as recorded in :attr:`info`, in one flat dict: ``backbone``,
        ``backbone_class``, ``backbone_config_hash``, ``memory`` (the kind) and every other
        :class:`~memkit.MemoryConfig` field, ``chunk_frames``, ``latent_size``, ``steps``, ``shift``,
        ``context_noise``, ``seed``, ``prompts`` (names), ``switches``, the ``recipe`` entries, ``cursor`` and
        ``chunk``. Only what was recorded is there."""
        info = self.info
        out: dict[str, Any] = {}
        adapter = dict(info.get("adapter", {}))
        memory = dict(adapter.pop("memory", {}))
        if "kind" in memory:
            memory["memory"] = memory.pop("kind")
        out.update(adapter)
        out.update(memory)
        out.update(info.get("sampling", {}))
        if "prompts" in info:
            out["prompts"] = info["prompts"].get("names")
            out["switches"] = info["prompts"].get("switches")
        out.update(info.get("recipe", {}))
        out["cursor"] = self.cursor
        if "chunk" in info:
            out["chunk"] = info["chunk"]
        return {k: _plain(v) for k, v in out.items()}

    def differences(self, expect: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """``(field, recorded, expected)`` for each field of ``expect`` that :attr:`settings` records otherwise
        (or does not record: ``recorded`` is then :data:`NOT_RECORDED`)."""
        settings = self.settings
        unknown = sorted(set(expect) - set(settings) - KNOWN_SETTINGS)
        if unknown:
            raise ConfigError(f"unknown stream setting(s) {unknown}; known: {sorted(KNOWN_SETTINGS | set(settings))}")
        return [(name, settings.get(name, NOT_RECORDED), _plain(value)) for name, value in expect.items()
                if name not in settings or not _same(settings[name], _plain(value))]

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
             expect: Mapping[str, Any] | None = None) -> "StreamState":
        """Read a saved stream. ``expect`` (a field -> value mapping over :attr:`settings`) makes any field the
        file records otherwise a :class:`StateMismatchError` naming each one with both values."""
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
        state = cls(tuple(layers), cursor, info=meta.get("info", {}), **groups)
        if expect:
            diffs = state.differences(expect)
            if diffs:
                raise StateMismatchError(f"{path} was made with other settings: " + "; ".join(
                    f"{name}: file {got}, expected {want}" for name, got, want in diffs))
        return state


#: Fields :attr:`StreamState.settings` may hold (``recipe`` entries are the caller's and may add more).
KNOWN_SETTINGS = frozenset({
    "backbone", "backbone_class", "backbone_config_hash", "memory", "sink_frames", "window_frames", "horizon_frames",
    "evict_aggregate", "blocks", "halflife_frames", "global_position", "global_time", "write_strength", "rope_mode",
    "attention_backend", "scan_backend", "check_finite",
    "chunk_frames",
    "latent_size", "steps", "shift", "context_noise", "seed", "prompts", "switches", "cursor", "chunk",
})


def _plain(value):
    """JSON's view of a value: tuples become lists, as they come back from a saved file."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


class _NotRecorded:
    def __repr__(self) -> str:
        return "(not recorded)"


NOT_RECORDED = _NotRecorded()
