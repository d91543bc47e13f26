"""``hybrid_blockwise``: sink + window with one gated-delta-rule state per spatial block (the block-wise scan of
Po et al., 2505.20171).

The frame's token grid is cut into a ``blocks x blocks`` grid. Each block carries its own state ``M_b``, scanned
along time over what that block evicts (its mean per frame with ``evict_aggregate="frame_mean"``, or its tokens
in raster order with ``"token"``), so the global memory keeps *where* things were; a token reads the state of
its own block. The update and the gates are those of ``hybrid_gdn``, per frame and shared by the block's writes
of that frame. With ``"token"`` writes, ``global_position`` tells the tokens of a block apart by their place in
the frame, as in ``hybrid_gdn``; a block's mean needs no place code (its state is its place).

With ``"token"`` writes, a time code (``global_time``) and per-token write strength (``write_strength="token"``)
this is the layout design of ``memkit bench recall --address time``: blocks of a few tokens, so that each state
holds its block's tokens of several scenes, told apart by place and by when they were shown.
"""

from __future__ import annotations

import functools

import torch

from memkit.errors import ConfigError
from memkit.state import state_dtype

from .hybrid import block_grid, l2norm, read_state
from .hybrid_gdn import HybridGDNMemory
from .registry import register_memory


@register_memory("hybrid_blockwise")
class HybridBlockwiseMemory(HybridGDNMemory):
    state_fields = ("sink_frames", "window_frames", "rope_mode", "evict_aggregate", "blocks")

    def __init__(self, cfg, **dims):
        if cfg.evict_aggregate == "block_mean":
            raise ConfigError("hybrid_blockwise keeps one state per block already; use evict_aggregate "
                              "'frame_mean' (each block's mean per frame) or 'token'")
        super().__init__(cfg, **dims)

    @property
    def spatial(self) -> bool:
        return True

    @classmethod
    def has_places(cls, evict_aggregate: str) -> bool:
        return evict_aggregate == "token"  # a block's mean: its state is its place

    def _read_places(self):
        return torch.arange(self.frame_tokens)

    @functools.cached_property
    def _block_tokens(self) -> list[torch.Tensor]:
        """Per block, the indices of its tokens within a frame (raster order)."""
        with torch.inference_mode(False):  # cached: it must be usable with autograd later
            ids = block_grid(self.frame_shape, self.cfg.blocks, self.kind).flatten()
            return [torch.nonzero(ids == b).flatten() for b in range(self.cfg.blocks**2)]

    def _global_empty(self, batch, device, dtype):
        D, n = self.head_dim, self.cfg.blocks**2
        return {"global.M": torch.zeros(batch, n, self.num_heads, D, D, device=device, dtype=state_dtype(dtype))}

    def _groups(self, evicted: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per block, its writes ``(B, n_b, ...)`` in time order, each shared gate divided by the block's writes per
        frame (token keys rotated by their places' phases where ``global_position`` applies, and every key by its
        frame's time code where ``global_time`` does)."""
        groups = []
        frames = evicted.get("frames")
        for idx in self._constant("block_tokens", lambda: self._block_tokens, evicted["k"].device):
            group = {}
            for name, e in evicted.items():
                if name == "frames":
                    continue
                part = e.unflatten(1, (-1, self.frame_tokens))[:, :, idx]  # (B, frames, tokens, ...)
                if self.cfg.evict_aggregate == "frame_mean":
                    group[name] = part.mean(dim=2)
                else:
                    part = part.flatten(1, 2)
                    group[name] = part / len(idx) if self._shared(name) else part
            group["k"] = self._code(group["k"], idx if self.addressed else None, frames)
            groups.append(group)
        return groups

    def _items(self, evicted):
        return self._groups(evicted)

    def _write_prepared(self, M, groups):
        if len({g["k"].shape[1] for g in groups}) == 1:  # equal blocks: one scan over (batch x blocks)
            stacked = {name: torch.stack([g[name] for g in groups], dim=1).flatten(0, 1) for name in groups[0]}
            return self._write_items(M.flatten(0, 1), stacked).unflatten(0, M.shape[:2])
        return torch.stack([self._write_items(M[:, b], g) for b, g in enumerate(groups)], dim=1)

    def _readout(self, tensors, q, frames):
        M = tensors["global.M"]
        q = self._code(q, self._read_place_ids(q.device), frames)
        qn = l2norm(q.to(M.dtype)).unflatten(1, (-1, self.frame_tokens))  # (B, frames, T, H, D)
        blocks = self._constant("block_tokens", lambda: self._block_tokens, q.device)
        parts = [torch.einsum("bfthk,bhkv->bfthv", qn[:, :, idx], M[:, b]) for b, idx in enumerate(blocks)]
        by_block = torch.cat(parts, dim=2)  # tokens grouped by block; put them back in raster order
        return by_block[:, :, self._constant("raster_order", lambda: self._raster_order, q.device)].flatten(1, 2)

    @functools.cached_property
    def _raster_order(self) -> torch.Tensor:
        with torch.inference_mode(False):
            return torch.argsort(torch.cat(self._block_tokens))

    def recall(self, tensors, evicted):
        M = tensors["global.M"]
        reads, values = [], []
        for b, g in enumerate(self._groups(evicted)):
            reads.append(read_state(M[:, b], g["k"]))
            values.append(g["v"].to(M.dtype))
        return torch.cat(reads, dim=1), torch.cat(values, dim=1)


__all__ = ["HybridBlockwiseMemory"]
