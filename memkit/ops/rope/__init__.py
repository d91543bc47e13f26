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

__all__ = ["Rope3D", "rope_3d"]


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
            positions = frame_offset.to(x.device)
            if positions.shape != (frames,):
                raise ShapeError(f"Rope3D: need {frames} frame positions, got shape {tuple(positions.shape)}")
        elif isinstance(frame_offset, int) and not isinstance(frame_offset, bool):
            positions = torch.arange(frames, device=x.device) + frame_offset
        else:
            raise TypeError(f"Rope3D: frame_offset must be an int or a 1-D integer tensor, got {frame_offset!r}")
        ang = self.angles(positions)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]
        x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return out.to(x.dtype)


def rope_3d(x, height, width, frame_offset=0, theta=10000.0):
    """Functional form of :class:`Rope3D`."""
    return Rope3D(x.shape[-1], height, width, theta)(x, frame_offset)
