"""Rolling-memory training: long clips streamed chunk by chunk with the memory carried along, truncated
backpropagation through time (stage 2 of VideoSSM's training, LongLive's streaming long tuning).

A clip of many chunks is cut into segments of ``tbptt_chunks`` chunks. Within a segment each noisy chunk reads
the memory left by the clean chunks before it and the context pass commits (differentiably) into it, so the
loss of later chunks reaches the global memory's write path (gates, decay, write strength) through the state.
Between segments the state is carried on, detached. With ``step_every_segment`` the optimiser steps after
each segment (classic TBPTT); otherwise the clip's segments accumulate into one step.
"""

from __future__ import annotations

import logging
import math

import torch

from memkit.errors import ConfigError
from memkit.memory.hybrid import HybridMemory

from ..flow import NoiseLevels
from .base import TrainingLoss
from .teacher_forcing import chunk_losses

log = logging.getLogger("memkit.train")


class RollingMemory(TrainingLoss):
    """Truncated BPTT through the memory state over ``tbptt_chunks`` chunks (see the module docstring)."""

    leaves_parameters_unused = True

    def __init__(self, tbptt_chunks: int = 4, context_noise: float = 0.0, noise: NoiseLevels | None = None,
                 step_every_segment: bool = True):
        super().__init__()
        if not isinstance(tbptt_chunks, int) or isinstance(tbptt_chunks, bool) or tbptt_chunks < 1:
            raise ConfigError(f"loss.tbptt_chunks must be a positive int, got {tbptt_chunks!r}")
        if not 0 <= context_noise < 1000:
            raise ConfigError(f"loss.context_noise must lie in [0, 1000), got {context_noise}")
        self.tbptt_chunks, self.context_noise = tbptt_chunks, float(context_noise)
        self.noise = noise or NoiseLevels()
        self.step_every_segment = step_every_segment

    def attach(self, module):
        mem = module.handle.memories[0]
        if isinstance(mem, HybridMemory):
            # A token enters the window in one chunk's commit, leaves it ceil(window / chunk) commits later, and
            # is first read by the chunk after that: all inside one segment for its write gates to get gradient.
            needed = math.ceil(mem.window_frames / module.handle.chunk_frames) + 2
            if self.tbptt_chunks < needed:
                log.warning("loss.tbptt_chunks=%d: the global memory's write gates get gradient only through "
                            "segments of >= %d chunks (window %d frames, chunks of %d)", self.tbptt_chunks, needed,
                            mem.window_frames, module.handle.chunk_frames)

    def _segments(self, chunks: int) -> list[tuple[int, int]]:
        return [(c0, min(chunks, c0 + self.tbptt_chunks)) for c0 in range(0, chunks, self.tbptt_chunks)]

    def _run(self, module, batch, generator, train: bool):
        x0, prompt = module.prepare(batch)
        F = module.handle.chunk_frames
        chunks = x0.shape[2] // F
        state = None
        losses = []
        for c0, c1 in self._segments(chunks):
            segment_prompt = prompt[:, c0:c1] if prompt.dim() == 4 else prompt  # per-chunk prompts: this segment's
            per_chunk, state = chunk_losses(module, x0[:, :, c0 * F: c1 * F], segment_prompt, generator, self.noise,
                                            context_noise=self.context_noise, state=state)
            if train:
                weight = 1.0 if self.step_every_segment else (c1 - c0) / chunks
                module.backward_term(per_chunk.mean() * weight)
                if self.step_every_segment:
                    module.step_optimizer()
            state = state.detach()
            losses.append(per_chunk.detach())
        if train and not self.step_every_segment:
            module.step_optimizer()
        return torch.cat(losses, dim=1)

    def training_step(self, module, batch):
        per_chunk = self._run(module, batch, module.noise_generator(), train=True)
        module.log_losses("train", per_chunk.mean(), per_chunk.mean(dim=0))

    @torch.no_grad()
    def evaluate(self, module, batch, generator):
        per_chunk = self._run(module, batch, generator, train=False)
        return {"loss": per_chunk.mean(), "per_chunk": per_chunk.mean(dim=0)}


__all__ = ["RollingMemory"]
