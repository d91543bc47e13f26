"""Local memory: attention of each chunk over [sink frames | window of recent frames | the chunk].

The shared machinery of every variant. Caches are fixed-size, right-aligned
buffers (``sink.*`` holds ``sink_frames`` frames, ``win.*`` holds
``window_frames``), so a state's size is constant while frames stream; only an
unbounded window (``full``) grows. Committed frames fill the sink first, then
the window; frames pushed out of the window are *evicted*, which the hybrid
memories feed into their global state.

Subclasses with a global memory override the ``_global_*`` hooks and
``_token_gates`` (per-token values computed when a token enters the window and
carried beside its K/V until it is evicted: the gate cache).
"""

from __future__ import annotations

import torch

from memkit.ops import attention, backends
from memkit.state import state_dtype

from .base import Memory


class LocalMemory(Memory):
    sink_frames: int = 0
    window_frames: int | None = None  # None: unbounded

    # -- sizes ---------------------------------------------------------------
    def _counts(self, t: int) -> tuple[int, int]:
        """Valid (sink, window) frames after ``t`` committed frames."""
        n_sink = min(self.sink_frames, t)
        rest = t - n_sink
        return n_sink, rest if self.window_frames is None else min(self.window_frames, rest)

    def held_frames(self, t: int) -> list[int]:
        sink = range(min(self.sink_frames, t))
        lo = self.sink_frames if self.window_frames is None else max(self.sink_frames, t - self.window_frames)
        return [*sink, *range(lo, t)]

    # -- hooks for a global memory ---------------------------------------------
    gate_names: tuple[str, ...] = ()  # per-token, per-head gates kept in the window

    def _token_gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: (B, N, H)}`` for each of ``gate_names``, in the state dtype."""
        return {}

    def _global_empty(self, batch, device, dtype) -> dict[str, torch.Tensor]:
        return {}

    def _global_read(self, tensors, q, x, t: int) -> torch.Tensor | None:
        return None

    def _global_write(self, tensors: dict, evicted: dict[str, torch.Tensor]) -> None:
        pass

    def _global_parallel(self, q, k, v, x, chunk_frames: int) -> torch.Tensor | None:
        return None

    def _grows(self, name: str) -> bool:
        return self.window_frames is None and name.startswith("win.")

    def _check_backends(self, device, dtype):
        if self.cfg.attention_backend == "xformers":
            backends.resolve("attention", "xformers", ("xformers",), device, dtype)

    # -- state ------------------------------------------------------------------
    def _empty_tensors(self, batch, device, dtype):
        T, H, D = self.frame_tokens, self.num_heads, self.head_dim
        win = (self.window_frames or 0) * T

        def buf(tokens, *tail, dt=dtype):
            return torch.zeros(batch, tokens, *tail, device=device, dtype=dt)

        tensors = {
            "sink.k": buf(self.sink_frames * T, H, D), "sink.v": buf(self.sink_frames * T, H, D),
            "win.k": buf(win, H, D), "win.v": buf(win, H, D),
        }
        for name in self.gate_names:
            tensors[f"win.{name}"] = buf(win, H, dt=state_dtype(dtype))
        tensors.update(self._global_empty(batch, device, dtype))
        return tensors

    def _cache_qk(self, q, k, rope, t: int):
        """q, k in the form the cache keeps: rotated at stream positions unless RoPE is cache-relative."""
        if rope is not None and self.cfg.rope_mode == "absolute":
            return rope(q, t), rope(k, t)
        return q, k

    def _push(self, tensors: dict, payload: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor] | None:
        """Append a chunk's per-token payload after ``t`` frames; return what left the window, oldest first."""
        T = self.frame_tokens
        F = payload["k"].shape[1] // T
        to_sink = min(F, max(0, self.sink_frames - t))
        if to_sink:
            for name in ("k", "v"):
                old = tensors[f"sink.{name}"]
                tensors[f"sink.{name}"] = torch.cat(
                    [old[:, : t * T], payload[name][:, : to_sink * T], old[:, (t + to_sink) * T:]], dim=1
                )
        r = F - to_sink
        if r == 0:
            return None
        rest = {name: p[:, to_sink * T:] for name, p in payload.items()}
        if self.window_frames is None:
            for name, p in rest.items():
                tensors[f"win.{name}"] = torch.cat([tensors[f"win.{name}"], p], dim=1)
            return None
        pad = self.window_frames - self._counts(t)[1]  # leading empty slots
        n_evict = max(0, r - pad)
        evicted = {}
        for name, p in rest.items():
            joined = torch.cat([tensors[f"win.{name}"], p], dim=1)
            tensors[f"win.{name}"] = joined[:, r * T:]
            evicted[name] = joined[:, pad * T: (pad + n_evict) * T]
        return evicted if n_evict else None

    # -- streaming ----------------------------------------------------------------
    def _step(self, state, q, k, v, x, rope, advance):
        T, t = self.frame_tokens, state.frames
        q, k = self._cache_qk(q, k, rope, t)
        n_sink, n_win = self._counts(t)
        tensors = state.tensors
        ctx = {}
        for name, new in (("k", k), ("v", v)):
            win = tensors[f"win.{name}"]
            ctx[name] = torch.cat(
                [tensors[f"sink.{name}"][:, : n_sink * T], win[:, win.shape[1] - n_win * T:], new], dim=1
            )
        q_att, k_att = q, ctx["k"]
        if rope is not None and self.cfg.rope_mode == "relative":
            q_att, k_att = rope(q, n_sink + n_win), rope(k_att, 0)
        y = attention(q_att, k_att, ctx["v"], backend=self.cfg.attention_backend)
        g = self._global_read(tensors, q, x, t)
        if g is not None:
            y = y + g
        if not advance:
            return y, None
        new_tensors = dict(tensors)
        evicted = self._push(new_tensors, {"k": k, "v": v, **self._token_gates(x)}, t)
        if evicted is not None:
            self._global_write(new_tensors, evicted)
        return y, state.replace(new_tensors, frames=t + q.shape[1] // T)

    # -- recache (re-encode the held frames, keep the global memory) --------------------
    def _recache(self, state, q, k, v, x, rope, chunk_ids):
        T, t = self.frame_tokens, state.frames
        held = torch.tensor(self.held_frames(t), device=q.device)
        q_att, k_att = q, k
        if rope is not None and self.cfg.rope_mode == "absolute":
            q, k = rope(q, held), rope(k, held)  # the cache keeps keys rotated at their stream positions
            q_att, k_att = q, k
        elif rope is not None:
            q_att, k_att = rope(q, 0), rope(k, 0)  # slots 0 .. n-1, as a read would place them
        # Chunk ids do not decrease, so a chunk's frames see exactly the held frames up to its own last one.
        outs, f0 = [], 0
        for f1 in [i + 1 for i, (a, b) in enumerate(zip(chunk_ids, chunk_ids[1:] + [None])) if a != b]:
            outs.append(attention(q_att[:, f0 * T: f1 * T], k_att[:, : f1 * T], v[:, : f1 * T],
                                  backend=self.cfg.attention_backend))
            f0 = f1
        y = torch.cat(outs, dim=1)
        tensors = state.tensors
        n_sink = self._counts(t)[0] * T
        # The global state holds evicted frames: older than every window frame, newer than the sink frames.
        g = self._global_read(tensors, q[:, n_sink:], x[:, n_sink:], t)
        if g is not None:
            y = torch.cat([y[:, :n_sink], y[:, n_sink:] + g], dim=1)
        fresh = {"k": k, "v": v, **self._token_gates(x[:, n_sink:])}
        new_tensors = dict(tensors)
        for name, value in fresh.items():
            if name in ("k", "v"):
                sink = tensors[f"sink.{name}"]
                new_tensors[f"sink.{name}"] = torch.cat([value[:, :n_sink], sink[:, n_sink:]], dim=1)
                value = value[:, n_sink:]
            win = tensors[f"win.{name}"]
            new_tensors[f"win.{name}"] = torch.cat([win[:, : win.shape[1] - value.shape[1]], value], dim=1)
        return y, state.replace(new_tensors)

    # -- parallel (teacher forcing) -------------------------------------------------
    def _parallel(self, q, k, v, x, chunk_frames, rope):
        T = self.frame_tokens
        frames = q.shape[1] // T
        q, k = self._cache_qk(q, k, rope, 0)
        outs = []
        for c0 in range(0, frames, chunk_frames):
            c1 = min(frames, c0 + chunk_frames)
            ctx = self.held_frames(c0) + list(range(c0, c1))
            idx = (torch.tensor(ctx, device=q.device)[:, None] * T + torch.arange(T, device=q.device)).flatten()
            qc, kc, vc = q[:, c0 * T: c1 * T], k[:, idx], v[:, idx]
            if rope is not None and self.cfg.rope_mode == "relative":
                qc, kc = rope(qc, len(ctx) - (c1 - c0)), rope(kc, 0)
            outs.append(attention(qc, kc, vc, backend=self.cfg.attention_backend))
        y = torch.cat(outs, dim=1)
        g = self._global_parallel(q, k, v, x, chunk_frames)
        return y if g is None else y + g


__all__ = ["LocalMemory"]
