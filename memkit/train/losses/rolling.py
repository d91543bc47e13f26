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


def global_read_frames(sink: int, window: int, chunk: int) -> int:
    """The frames a stream needs before one of its chunks reads a global memory that holds something: a frame
    leaves the window (into the global memory) in the commit of the chunk holding frame ``sink + window``, and the
    chunk after that is the first to read it."""
    return ((sink + window) // chunk + 2) * chunk


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
            F = module.handle.chunk_frames
            # A token enters the window in one chunk's commit, leaves it ceil(window / chunk) commits later, and
            # is first read by the chunk after that: all inside one segment for its write gates to get gradient.
            needed = math.ceil(mem.window_frames / F) + 2
            if self.tbptt_chunks < needed:
                log.warning("loss.tbptt_chunks=%d: the global memory's write gates get gradient only through "
                            "segments of >= %d chunks (window %d frames, chunks of %d)", self.tbptt_chunks, needed,
                            mem.window_frames, F)
            self._first_read = global_read_frames(mem.sink_frames, mem.window_frames, F) // F
            self._warned = False

    def _check_clip(self, chunks: int) -> None:
        first_read = getattr(self, "_first_read", None)
        if first_read is not None and chunks < first_read and not self._warned:
            self._warned = True
            log.warning("clips of %d chunks: the global memory is first read by chunk %d of a clip, so it never "
                        "takes part in training; use longer clips", chunks, first_read)

    def _segments(self, chunks: int) -> list[tuple[int, int]]:
        return [(c0, min(chunks, c0 + self.tbptt_chunks)) for c0 in range(0, chunks, self.tbptt_chunks)]

    def _run(self, module, batch, generator, train: bool):
        x0, prompt = module.prepare(batch)
        F = module.handle.chunk_frames
        chunks = x0.shape[2] // F
        self._check_clip(chunks)
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
