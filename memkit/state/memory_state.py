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
        """Like ``Tensor.to``; a dtype applies to floating tensors only."""
        return self._map(lambda t: t.to(*args, **kwargs) if t.is_floating_point() else _to_device_only(t, args, kwargs))

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


def _to_device_only(t: torch.Tensor, args, kwargs) -> torch.Tensor:
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            device = a
    return t if device is None else t.to(device)
