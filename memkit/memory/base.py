"""The Memory interface every variant implements: init_state / read / commit / parallel."""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from torch import nn

from memkit.errors import ConfigError, DeviceError, DTypeError, ShapeError, StateMismatchError
from memkit.ops import Rope3D
from memkit.ops._checks import autocast_dtype, check_finite, check_same_device, check_same_dtype, check_shape
from memkit.state import MemoryState

from .config import MemoryConfig


class Memory(nn.Module):
    """One block's memory. Subclasses implement ``_empty_tensors``, ``_step`` and ``_parallel``.

    q, k, v: ``(B, N, H, D)`` with ``N = frames * frame_tokens``, frame-major;
    x: the block input ``(B, N, C)``. Outputs are ``(B, N, H, D)``, before the
    backbone's output projection.
    """

    kind: ClassVar[str] = "?"

    def __init__(self, cfg: MemoryConfig, *, num_heads: int, head_dim: int, dim: int, frame_tokens: int,
                 frame_shape: tuple[int, int] | None = None):
        super().__init__()
        dims = {"num_heads": num_heads, "head_dim": head_dim, "dim": dim, "frame_tokens": frame_tokens}
        for name, value in dims.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"build_memory: {name} must be a positive int, got {value!r}")
        self.cfg = cfg
        self.num_heads, self.head_dim, self.dim, self.frame_tokens = num_heads, head_dim, dim, frame_tokens
        self.frame_shape = _frame_shape(frame_shape, frame_tokens)
        self._layouts: dict[tuple[int, torch.dtype], dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
        # The prepared chunk of the fast pass in progress (set by an adapter around each pass of a chunk loop,
        # where its attention processor finds it without knowing the layer's index), else None.
        self._prepared = None

    # The config fields that decide what a state holds; others (the router horizon, backends) may change
    # between saving a state and resuming it.
    state_fields: ClassVar[tuple[str, ...]] = ("rope_mode",)

    @functools.cached_property
    def fingerprint(self) -> str:
        return self.cfg.fingerprint(
            self.state_fields,
            num_heads=self.num_heads, head_dim=self.head_dim, dim=self.dim, frame_tokens=self.frame_tokens,
            **self._fingerprint_extra(),
        )

    def _fingerprint_extra(self) -> dict:
        """More of what shapes this memory's states (e.g. the token grid of a memory that groups tokens by place)."""
        return {}

    @classmethod
    def has_places(cls, evict_aggregate: str) -> bool:
        """Whether this variant's global writes of ``evict_aggregate`` carry a place in the frame (then
        ``MemoryConfig.global_position`` applies to them)."""
        return False

    @classmethod
    def place_code(cls, config: dict) -> str:
        """The place code a recorded config of this variant writes with: its ``global_position`` where writes have
        places, else ``"none"`` (a record from before the field: ``"none"``)."""
        from .config import LEGACY, MemoryConfig

        if not cls.has_places(config.get("evict_aggregate", MemoryConfig.evict_aggregate)):
            return "none"
        return config.get("global_position", LEGACY["global_position"])

    @classmethod
    def time_code(cls, config: dict) -> str:
        """The time code (``global_time``) a recorded config of this variant writes its global keys with:
        ``"none"`` for a memory without a global state (a record from before the field: ``"none"``)."""
        return "none"

    @classmethod
    def key_codes(cls, config: dict) -> dict[str, str]:
        """What a recorded config's global keys carry: ``{"global_position": place code, "global_time": time
        code}``. A state, weights or a checkpoint made with other codes means something else."""
        return {"global_position": cls.place_code(config), "global_time": cls.time_code(config)}

    def extra_repr(self) -> str:
        heads = f"{self.num_heads}x{self.head_dim}"
        return f"kind={self.kind}, heads={heads}, dim={self.dim}, frame_tokens={self.frame_tokens}"

    # -- public API ---------------------------------------------------------
    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> MemoryState:
        """An empty memory for ``batch`` streams; ``dtype`` is the activations' dtype."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ConfigError(f"init_state: batch must be a positive int, got {batch!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DTypeError(f"init_state: dtype must be a floating dtype (the activations'), got {dtype!r}")
        tensors = self._empty_tensors(batch, torch.device(device or "cpu"), dtype)
        return MemoryState(tensors, 0, self.kind, self.fingerprint, batch)

    def read(self, state: MemoryState, q, k, v, x, rope: Rope3D | None = None) -> torch.Tensor:
        """The output for this chunk given the memory before it; ``state`` is not changed."""
        self._check_tokens(q, k, v, x, rope)
        self._check_state(state, q)
        y, _ = self._step(state, q, k, v, x, rope, advance=False)
        return y

    def commit(self, state: MemoryState, q, k, v, x, rope: Rope3D | None = None) -> tuple[torch.Tensor, MemoryState]:
        """What ``read`` returns for this chunk, and the memory advanced past it (a new state)."""
        self._check_tokens(q, k, v, x, rope)
        self._check_state(state, q)
        return self._step(state, q, k, v, x, rope, advance=True)

    def parallel(self, q, k, v, x, chunk_frames: int, rope: Rope3D | None = None) -> torch.Tensor:
        """The whole clip at once, block-causal over chunks of ``chunk_frames`` (teacher forcing).

        Equals concatenating ``commit`` outputs over the clip's chunks from an empty state.
        """
        if not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) or chunk_frames < 1:
            raise ConfigError(f"parallel: chunk_frames must be a positive int, got {chunk_frames!r}")
        self._check_tokens(q, k, v, x, rope)
        return self._parallel(q, k, v, x, chunk_frames, rope)

    def held_frames(self, frames: int) -> list[int]:
        """Stream indices of the frames whose keys and values the memory holds after ``frames`` committed ones
        (what a chunk starting there attends to besides itself), oldest first."""
        raise NotImplementedError

    def recache(self, state: MemoryState, q, k, v, x, rope: Rope3D | None = None,
                chunk_ids: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, MemoryState]:
        """Re-encode the frames the memory holds from fresh ``q, k, v, x`` (say, under a new prompt).

        The tokens are those of ``held_frames(state.frames)``, in that order. The held keys, values and gates
        are replaced by the new ones; the frame count and any global memory are kept. Returns the frames'
        outputs (each attends to the held frames of its own and earlier chunks, ``chunk_ids`` giving each
        frame's chunk; by default every frame is its own chunk; window frames also read the global memory,
        which holds only frames older than them, while sink frames read none, as when they were committed)
        and the new state.
        """
        self._check_tokens(q, k, v, x, rope)
        self._check_state(state, q)
        held = self.held_frames(state.frames)
        if not held:
            raise StateMismatchError("recache: the memory holds no frames yet (commit a chunk first)")
        if q.shape[1] != len(held) * self.frame_tokens:
            raise ShapeError(
                f"recache needs the {len(held)} frames the memory holds (stream frames {_span(held)}), "
                f"got {q.shape[1] // self.frame_tokens}"
            )
        if chunk_ids is None:
            chunk_ids = held
        if isinstance(chunk_ids, torch.Tensor):
            if chunk_ids.is_floating_point() or chunk_ids.dim() != 1:
                raise ShapeError(f"recache: chunk_ids must be {len(held)} integers, one per held frame")
            chunk_ids = chunk_ids.tolist()
        if len(chunk_ids) != len(held) or not all(isinstance(c, int) for c in chunk_ids):
            raise ShapeError(f"recache: chunk_ids must be {len(held)} integers, one per held frame")
        if any(b < a for a, b in zip(chunk_ids, chunk_ids[1:])):
            raise ConfigError("recache: chunk_ids must not decrease (frames are held in stream order)")
        return self._recache(state, q, k, v, x, rope, chunk_ids)

    # -- to implement ---------------------------------------------------------
    def _recache(self, state, q, k, v, x, rope, chunk_ids):
        raise NotImplementedError

    def _empty_tensors(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _step(self, state, q, k, v, x, rope, advance: bool):
        raise NotImplementedError

    def _parallel(self, q, k, v, x, chunk_frames, rope):
        raise NotImplementedError

    def _layout(self, batch: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of an empty state; memoised, as every read and commit checks against it."""
        key = (batch, dtype)
        if key not in self._layouts:
            empty = self._empty_tensors(batch, torch.device("meta"), dtype)
            self._layouts[key] = {name: (tuple(t.shape), t.dtype) for name, t in empty.items()}
        return self._layouts[key]

    def _grows(self, name: str) -> bool:
        """Whether state tensor ``name`` grows along dim 1 as frames stream (an unbounded cache)."""
        return False

    def _check_backends(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise now, not halfway through a stream, if an explicitly requested kernel cannot run."""

    # -- checks (run before anything is computed, so a bad call changes nothing) --
    def _check_parameters(self, device: torch.device, dtype: torch.dtype, x_dtype: torch.dtype) -> None:
        """The parameters can act on tokens of ``dtype`` (block input ``x_dtype``) on ``device``, and every kernel
        asked for can run there (host-side checks only: nothing waits for the device)."""
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        if param is not None and param.device != device:
            raise DeviceError(f"{self.kind} memory parameters are on {param.device} but inputs on {device}; "
                              f"call memory.to(device) first")
        # The parameters act on x. Under autocast, float32 parameters with half-precision x are normal.
        if param is not None and param.dtype != x_dtype and autocast_dtype(device.type) is None:
            raise DTypeError(
                f"{self.kind} memory parameters are {param.dtype} but x is {x_dtype}; "
                f"call memory.to(dtype) first, or run under torch.autocast"
            )
        self._check_backends(device, dtype)

    def _check_tokens(self, q, k, v, x, rope) -> None:
        layout = "(B, N, heads, head_dim)"
        check_shape("q", q, (None, None, self.num_heads, self.head_dim), layout)
        B, N = q.shape[:2]
        check_shape("k", k, (B, N, self.num_heads, self.head_dim), layout)
        check_shape("v", v, (B, N, self.num_heads, self.head_dim), layout)
        check_shape("x", x, (B, N, self.dim), "(B, N, dim)")
        if N == 0 or N % self.frame_tokens:
            raise ShapeError(
                f"a chunk must hold a whole, positive number of frames of {self.frame_tokens} tokens; got N={N}"
            )
        check_same_dtype(q=q, k=k, v=v)
        check_same_dtype(x=x)  # x may differ from q, k, v (a float32 residual stream under autocast)
        check_same_device(q=q, k=k, v=v, x=x)
        self._check_parameters(q.device, q.dtype, x.dtype)
        if rope is not None:
            if not isinstance(rope, Rope3D):
                raise TypeError(f"rope must be a memkit.ops.Rope3D, got {type(rope).__name__}")
            if rope.frame_tokens != self.frame_tokens or rope.head_dim != self.head_dim:
                raise ShapeError(
                    f"rope is for {rope.height}x{rope.width} frames with head_dim {rope.head_dim}; this memory has "
                    f"{self.frame_tokens} tokens per frame and head_dim {self.head_dim}"
                )
        if self.cfg.check_finite:
            check_finite(q=q, k=k, v=v, x=x)

    def _check_state(self, state: MemoryState, q) -> None:
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a MemoryState (from init_state or commit), got {type(state).__name__}")
        if state.batch != q.shape[0] and state.fingerprint == self.fingerprint:
            raise StateMismatchError(f"state holds {state.batch} streams but the chunk has batch {q.shape[0]}")
        self._check_state_layout(state, state.batch, q.dtype, q.device)

    def _check_state_layout(self, state: MemoryState, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise unless ``state`` holds this memory's tensors for ``batch`` streams of ``dtype`` tokens on
        ``device``."""
        if state.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"this state belongs to a {state.kind} memory of config {state.fingerprint}; this {self.kind} "
                f"memory has config {self.fingerprint}"
            )
        expected = self._layout(batch, dtype)
        if set(expected) != set(state.tensors):
            raise StateMismatchError(
                f"state tensors {sorted(state.tensors)} do not match this memory's {sorted(expected)}"
            )
        for name, (want_shape, want_dtype) in expected.items():
            got = state.tensors[name]
            grows = self._grows(name)  # an unbounded cache: any length along dim 1
            fixed = (lambda s: (s[0], *s[2:])) if grows else tuple
            if got.dim() != len(want_shape) or fixed(got.shape) != fixed(want_shape):
                raise StateMismatchError(
                    f"state tensor {name!r} has shape {tuple(got.shape)}, expected {want_shape}"
                )
            if got.dtype != want_dtype:
                raise DTypeError(
                    f"state tensor {name!r} is {got.dtype} but this chunk needs {want_dtype}; "
                    f"use state.to(dtype) or init_state(dtype=...)"
                )
        if state.device != device:
            raise DeviceError(f"state is on {state.device} but the chunk is on {device}; use state.to(device)")


def default_frame_shape(frame_tokens: int) -> tuple[int, int]:
    """The most nearly square token grid (rows <= columns) with ``frame_tokens`` tokens."""
    rows = max(r for r in range(1, math.isqrt(frame_tokens) + 1) if frame_tokens % r == 0)
    return rows, frame_tokens // rows


def _frame_shape(shape, frame_tokens: int) -> tuple[int, int]:
    """The token grid (rows, columns) of a frame: as given, or :func:`default_frame_shape`."""
    if shape is None:
        return default_frame_shape(frame_tokens)
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ConfigError(f"build_memory: frame_shape must be (rows, columns) of tokens, got {shape!r}")
    if shape[0] * shape[1] != frame_tokens:
        raise ConfigError(f"build_memory: frame_shape {tuple(shape)} holds {shape[0] * shape[1]} tokens, "
                          f"but frame_tokens is {frame_tokens}")
    return int(shape[0]), int(shape[1])


def _span(frames: list[int]) -> str:
    """``[0, 1, 2, 7, 8]`` -> ``"0-2, 7-8"``."""
    runs, start = [], frames[0]
    for prev, cur in zip(frames, frames[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ", ".join(runs)
