"""The handle's fast path: per chunk, each layer's memory prepares what the chunk's passes share (held keys and
values, RoPE tables, the router's weight) once, and the denoising and context passes reuse it."""

from __future__ import annotations

import logging

import torch

from memkit.memory import LocalMemory
from memkit.memory.local import PreparedChunk
from memkit.ops import backends
from memkit.state import StreamState

log = logging.getLogger("memkit.adapters")


class FastPath:
    """Part of :class:`~adapters.handle.AdapterHandle`: when a pass runs on the fast path, and its prepared
    chunks."""

    def _fast_pass(self, mode: str) -> bool:
        """Whether a pass of ``mode`` runs on the fast path now."""
        return (self.fast and mode in ("read", "commit") and not torch.is_grad_enabled()
                and all(isinstance(m, LocalMemory) and m.fast_path_exact() for m in self.memories))

    def _prepared_chunks(self, state: StreamState, frames: int) -> list[PreparedChunk]:
        """The layers' prepared chunks for ``frames`` frames after ``state``: built by the first pass of the chunk,
        reused by the rest of it."""
        rope = self.rope()
        # A prepared chunk holds values computed from the parameters (the router weight): an in-place update of
        # any of them (an optimiser step, load_memory) must prepare again.
        versions = tuple(p._version for p in self.memory_parameters())
        key = (frames, rope, torch.is_inference_mode_enabled(), versions)
        cached = self._chunk_cache
        if cached is not None and cached[0] is state and cached[1] == key:
            return cached[2]
        self._chunk_cache = None
        chunks = [mem.prepare(layer, frames, rope) for mem, layer in zip(self.memories, state.layers)]
        self._chunk_cache = (state, key, chunks)  # holding the state keeps its id from being reused
        self._log_kernels_once(chunks[0].keys)
        return chunks

    def _log_kernels_once(self, like: torch.Tensor) -> None:
        """One log line, at the first fast pass on a device and dtype, naming the kernels it runs and why the
        accelerated ones are not used (say, on a CPU or without fla)."""
        key = (like.device, like.dtype)
        if key in self._logged:
            return
        self._logged.add(key)
        mem = self.memories[0]
        attention = "SDPA" if mem.cfg.attention_backend in ("auto", "torch") else mem.cfg.attention_backend
        parts = [f"attention {attention}"]
        kernels = getattr(mem, "scan_kernels", ())
        if kernels:
            scan = mem.cfg.scan_backend
            if scan == "auto":
                reasons = {name: backends.why_not(name, like.device, like.dtype) for name in kernels}
                scan = next((name for name, why in reasons.items() if why is None), None)
                if scan is None:
                    scan = "torch (" + "; ".join(f"{n}: {why}" for n, why in reasons.items()) + ")"
            parts.append(f"global-memory scan {scan}")
        compiled = "compiled blocks" if self._compiled else "eager blocks"
        log.info("memkit fast path on %s %s, %s: %s", like.device, str(like.dtype).removeprefix("torch."),
                 compiled, ", ".join(parts))
