"""MemoryState: one layer's memory as an immutable value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from memkit.errors import StateFormatError, StateMismatchError

from . import io


@dataclass(frozen=True, eq=False)
class MemoryState:
    """What one memory layer remembers after ``frames`` committed latent frames.

    ``tensors`` maps names (``"sink.k"``, ``"win.v"``, ``"global.M"``, ...) to
    tensors whose leading dim is the batch. Memories never modify a state in
    place: ``commit`` returns a new one, so an old state stays a valid value
    to resume or fork from.
    """

    tensors: Mapping[str, torch.Tensor]
    frames: int
    kind: str
    fingerprint: str
    batch: int

    def __post_init__(self):
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def replace(self, tensors: Mapping[str, torch.Tensor] | None = None, frames: int | None = None) -> "MemoryState":
        return MemoryState(
            dict(self.tensors) if tensors is None else tensors,
            self.frames if frames is None else frames,
            self.kind,
            self.fingerprint,
            self.batch,
        )

    def _map(self, fn) -> "MemoryState":
        return self.replace({name: fn(t) for name, t in self.tensors.items()})

    # -- value semantics -------------------------------------------------
    def detach(self) -> "MemoryState":
        return self._map(torch.Tensor.detach)

    def clone(self) -> "MemoryState":
        return self._map(torch.Tensor.clone)

    def to(self, *args, **kwargs) -> "MemoryState":
        """Like ``Tensor.to`` (a device, a dtype, or both). A dtype is the *activations'* dtype:
        KV caches (names ending in ``.k`` / ``.v``) take it, recurrent states and gates take
        :func:`state_dtype` of it, integer tensors keep theirs."""
        device, dtype, non_blocking = _parse_to(args, kwargs)

        def move(name: str, t: torch.Tensor) -> torch.Tensor:
            target = None
            if dtype is not None and t.is_floating_point():
                target = dtype if name.rsplit(".", 1)[-1] in ("k", "v") else state_dtype(dtype)
            return t.to(device=device, dtype=target, non_blocking=non_blocking)

        return self.replace({name: move(name, t) for name, t in self.tensors.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    # -- serialisation -----------------------------------------------------
    def meta(self) -> dict:
        return {"type": "MemoryState", "kind": self.kind, "fingerprint": self.fingerprint,
                "frames": self.frames, "batch": self.batch}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors, the frame count included."""
        return {**self.tensors, "frames": torch.tensor(self.frames, dtype=torch.int64)}

    def save(self, path: str | os.PathLike) -> None:
        io.write(path, dict(self.tensors), self.meta())

    @classmethod
    def from_meta(cls, tensors: Mapping[str, torch.Tensor], meta: dict) -> "MemoryState":
        try:
            return cls(tensors, int(meta["frames"]), str(meta["kind"]), str(meta["fingerprint"]), int(meta["batch"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFormatError(f"memory state metadata is incomplete: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_fingerprint: str | None = None,
             map_location: str | torch.device = "cpu") -> "MemoryState":
        tensors, meta = io.read(path, "memory state")
        if meta.get("type") != "MemoryState":
            raise StateFormatError(f"{path} holds a memkit {meta.get('type')!r}, not a MemoryState")
        state = cls.from_meta({k: t.to(map_location) for k, t in tensors.items()}, meta)
        if expect_fingerprint is not None and state.fingerprint != expect_fingerprint:
            raise StateMismatchError(
                f"{path} is a {state.kind} state of config {state.fingerprint}, expected config {expect_fingerprint}"
            )
        return state


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of recurrent states and gates for activations of ``dtype``: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _parse_to(args, kwargs) -> tuple[torch.device | None, torch.dtype | None, bool]:
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    non_blocking = kwargs.pop("non_blocking", False)
    if kwargs:
        raise TypeError(f"MemoryState.to got unexpected arguments {sorted(kwargs)}")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device, int)):
            device = a
        else:
            raise TypeError(f"MemoryState.to takes a device and/or a dtype, got {a!r}")
    return device, dtype, non_blocking
