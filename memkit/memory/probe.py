"""``retention``: how well a hybrid memory's global state still holds a frame after ``n`` later frames.

A probe, not a benchmark: random, independent frames (no two share content, the hardest case for a
compressed state) are written through the memory's own write path with its own gates; the frame of
interest is read back with the keys it was written with, and the cosine of the read-out with the values it
wrote is reported per head. 1 is perfect recall, about 0 nothing left.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from memkit.errors import ConfigError

from .hybrid import HybridMemory


@torch.no_grad()
def retention(memory: HybridMemory, lags: Iterable[int], *, batch: int = 2, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cosine ``(len(lags), heads)`` between the read-out of one frame and what it wrote, ``lag`` frames later.

    The frame is written first, then ``max(lags)`` random frames; ``lag = 0`` reads right after writing it.
    """
    if not isinstance(memory, HybridMemory):
        raise ConfigError(f"retention probes a hybrid memory's global state; {memory.kind} has none")
    lags = list(lags)
    if not lags or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lags):
        raise ConfigError(f"lags must be non-negative ints, got {lags!r}")
    param = next(memory.parameters())
    device = param.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    T, H, D = memory.frame_tokens, memory.num_heads, memory.head_dim

    def frame(index: int) -> dict[str, torch.Tensor]:
        k, v = (torch.randn(batch, T, H, D, generator=gen).to(device, dtype) for _ in range(2))
        x = torch.randn(batch, T, memory.dim, generator=gen).to(device, param.dtype)
        written = {"k": k, "v": v, **memory._token_gates(x)}
        memory._stamp_evicted(written, index)  # the stream index of the frame, for a time code
        return written

    tensors = memory._global_empty(batch, device, dtype)
    target = frame(0)
    memory._global_write(tensors, target)
    written, out = 0, {}
    for lag in sorted(set(lags)):
        while written < lag:
            written += 1
            memory._global_write(tensors, frame(written))
        read, values = memory.recall(tensors, target)
        out[lag] = F.cosine_similarity(read, values, dim=-1).mean(dim=(0, 1))
    return torch.stack([out[n] for n in lags])


__all__ = ["retention"]
