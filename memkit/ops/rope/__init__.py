"""3D rotary position embedding on (frame, height, width) token grids, with a frame offset.

The head dim is split as in Wan2.1: ``2 * (D // 6)`` channels each for height
and width, the rest for time; channel pairs ``(2i, 2i+1)`` rotate together.
Tokens are frame-major: ``N = frames * height * width``.

"absolute" positions are the frames' indices in the stream; "relative"
(cache-relative) positions are their slots in the attention context
``[sink | window | chunk]``, which stay bounded however long the stream runs.
The memories take this object as ``rope=`` to rotate q, k themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memkit.errors import ConfigError, DTypeError, ShapeError
from memkit.ops._checks import check_rank

__all__ = ["Rope3D", "TabulatedRope3D", "rope_3d", "rotate"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x (B, N, heads, head_dim)`` by angles given as ``cos, sin (N, 1, head_dim // 2)``
    (from :meth:`Rope3D.tables`), in their dtype; the result has ``x``'s dtype."""
    x1, x2 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


@dataclass(frozen=True)
class Rope3D:
    head_dim: int
    height: int
    width: int
    theta: float = 10000.0

    def __post_init__(self):
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"Rope3D: head_dim must be even and >= 6, got {self.head_dim}")
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"Rope3D: height and width must be positive, got {self.height}x{self.width}")

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def axis_dims(self) -> tuple[int, int, int]:
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    def _axis_angles(self, positions: torch.Tensor, dim: int) -> torch.Tensor:
        inv_freq = self.theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        return positions.to(torch.float64)[:, None] * inv_freq

    def angles(self, frame_positions: torch.Tensor) -> torch.Tensor:
        """Rotation angles ``(len(frame_positions) * height * width, head_dim // 2)`` in float64."""
        dt, dh, dw = self.axis_dims
        dev = frame_positions.device
        f = self._axis_angles(frame_positions, dt)
        h = self._axis_angles(torch.arange(self.height, device=dev), dh)
        w = self._axis_angles(torch.arange(self.width, device=dev), dw)
        F, H, W = f.shape[0], self.height, self.width
        return torch.cat(
            [
                f[:, None, None].expand(F, H, W, -1),
                h[None, :, None].expand(F, H, W, -1),
                w[None, None, :].expand(F, H, W, -1),
            ],
            dim=-1,
        ).reshape(F * H * W, -1)

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if x_dtype == torch.float64 else torch.float32

    def cos_sin(self, frame_positions: torch.Tensor, dtype: torch.dtype,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotation angles, ``(frames * height * width, head_dim // 2)`` each, in ``dtype``, on
        ``device`` (default: the positions')."""
        # non_blocking: a copy of host positions to the GPU need not wait for the device's queue
        ang = self.angles(frame_positions.to(device or frame_positions.device, non_blocking=True))
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def __call__(self, x: torch.Tensor, frame_offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate ``x`` ``(B, N, heads, head_dim)``; frames sit at ``frame_offset + arange(N // frame_tokens)``,
        or at the per-frame positions given as a 1-D tensor."""
        check_rank("x", x, 4, "(B, N, heads, head_dim)")
        N, D = x.shape[1], x.shape[3]
        if D != self.head_dim:
            raise ShapeError(f"Rope3D was built for head_dim {self.head_dim}, got x with head_dim {D}")
        if N % self.frame_tokens:
            raise ShapeError(f"Rope3D: {N} tokens is not a whole number of {self.height}x{self.width} frames")
        frames = N // self.frame_tokens
        if isinstance(frame_offset, torch.Tensor):
            if frame_offset.is_floating_point() or frame_offset.is_complex():
                raise DTypeError(f"Rope3D: frame positions must be integers, got {frame_offset.dtype}")
            if frame_offset.shape != (frames,):
                raise ShapeError(f"Rope3D: need {frames} frame positions, got shape {tuple(frame_offset.shape)}")
            key = tuple(frame_offset.tolist())
        elif isinstance(frame_offset, int) and not isinstance(frame_offset, bool):
            key = (frame_offset, frame_offset + frames)
        else:
            raise TypeError(f"Rope3D: frame_offset must be an int or a 1-D integer tensor, got {frame_offset!r}")
        cos, sin = self._memo(key, self.compute_dtype(x.dtype), x.device, frame_offset, frames)
        return rotate(x, cos, sin)

    def tables(self, frame_offset: int, frames: int, x_dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(frames * height * width, 1, head_dim // 2)`` that rotate ``frames`` frames of ``x_dtype``
        tokens at ``frame_offset, frame_offset + 1, ...`` (see :func:`rotate`)."""
        key = (frame_offset, frame_offset + frames)
        return self._memo(key, self.compute_dtype(x_dtype), torch.device(device), frame_offset, frames)

    def _memo(self, key, dtype, device, frame_offset, frames):
        # Every layer of a backbone rotates at the same positions in a pass: compute cos/sin once per pass.
        # A pass rotates at most two position sets (queries, context keys); inference-mode tensors must not
        # reach a later pass that records gradients.
        memo = self.__dict__.setdefault("_cos_sin_memo", {})
        full_key = (key if isinstance(frame_offset, torch.Tensor) else ("range", *key), dtype, device,
                    torch.is_inference_mode_enabled())
        if full_key not in memo:
            # Positions are built on the host, so checking them against a table never waits for the device.
            positions = frame_offset if isinstance(frame_offset, torch.Tensor) else torch.arange(frames) + frame_offset
            if len(memo) >= 4:
                memo.pop(next(iter(memo)))
            cos, sin = self.cos_sin(positions, dtype, device)
            memo[full_key] = (cos[:, None], sin[:, None])
        return memo[full_key]


class TabulatedRope3D(Rope3D):
    """A :class:`Rope3D` that reads its angles' cos / sin from a backbone's precomputed tables.

    ``cos_table`` / ``sin_table`` are ``(max_positions, head_dim)`` with each pair's value repeated
    (``[c0, c0, c1, c1, ...]``) and the channel blocks ``[time | height | width]``, the layout of
    diffusers' ``WanRotaryPosEmbed.freqs_cos / freqs_sin``. Rotating with the backbone's own tables
    reproduces its attention bit for bit; positions past the table are an error, not an extrapolation.
    """

    def __init__(self, cos_table: torch.Tensor, sin_table: torch.Tensor, height: int, width: int):
        check_rank("cos_table", cos_table, 2, "(max_positions, head_dim)")
        if sin_table.shape != cos_table.shape:
            raise ShapeError(f"sin_table {tuple(sin_table.shape)} and cos_table {tuple(cos_table.shape)} differ")
        super().__init__(cos_table.shape[1], height, width)
        if max(height, width) > cos_table.shape[0]:
            raise ConfigError(f"a {height}x{width} frame does not fit a RoPE table of {cos_table.shape[0]} positions")
        object.__setattr__(self, "cos_table", cos_table[:, 0::2])
        object.__setattr__(self, "sin_table", sin_table[:, 0::2])

    __eq__ = object.__eq__  # tables differ where the dataclass fields agree
    __hash__ = object.__hash__

    @property
    def max_positions(self) -> int:
        return self.cos_table.shape[0]

    def compute_dtype(self, x_dtype):
        # What the backbone does: x times its table, in their promoted dtype.
        return torch.promote_types(x_dtype, self.cos_table.dtype)

    def cos_sin(self, frame_positions, dtype, device=None):
        if len(frame_positions) and int(frame_positions.max()) >= self.max_positions:
            raise ConfigError(
                f"frame position {int(frame_positions.max())} is past the backbone's RoPE table "
                f"({self.max_positions} positions); stream longer videos with MemoryConfig(rope_mode='relative')"
            )
        dt, dh, _ = (d // 2 for d in self.axis_dims)
        dev = self.cos_table.device
        frame_positions = frame_positions.to(dev, non_blocking=True)
        F, H, W = len(frame_positions), self.height, self.width

        def grid(table):
            t = table[frame_positions, :dt]
            h = table[:H, dt: dt + dh]
            w = table[:W, dt + dh:]
            return torch.cat([
                t[:, None, None].expand(F, H, W, -1),
                h[None, :, None].expand(F, H, W, -1),
                w[None, None, :].expand(F, H, W, -1),
            ], dim=-1).reshape(F * H * W, -1).to(dtype)

        return grid(self.cos_table), grid(self.sin_table)


def rope_3d(x, height, width, frame_offset=0, theta=10000.0):
    """Functional form of :class:`Rope3D`."""
    return Rope3D(x.shape[-1], height, width, theta)(x, frame_offset)
