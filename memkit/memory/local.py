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

The fast path of a chunk loop (:meth:`LocalMemory.prepare`) computes what ``read`` and ``commit`` compute,
but shares the work of a chunk's passes: the held keys and values are gathered (and, with cache-relative
RoPE, rotated) once per chunk into a buffer with free slots for the chunk, the router weight is computed
once, the global read is skipped while the global state is still empty, and a commit hands back what to
append instead of appending it, so that :meth:`LocalMemory.commit_many` updates every layer's global state
in one batched scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memkit.errors import DTypeError, ShapeError, StateMismatchError
from memkit.ops import attention, backends
from memkit.ops.rope import Rope3D, rotate
from memkit.state import MemoryState, state_dtype

from .base import Memory


@dataclass(eq=False)
class PreparedChunk:
    """What the passes of one chunk share on one layer (built by :meth:`LocalMemory.prepare`, read by
    :meth:`LocalMemory.read_prepared` and :meth:`LocalMemory.commit_prepared`).

    ``keys`` / ``values`` hold the held frames as attention sees them, followed by free slots that each pass
    fills with the chunk's own keys and values: a scratch buffer, never part of a state.
    """

    state: MemoryState
    keys: torch.Tensor            # (B, held + chunk tokens, H, D)
    values: torch.Tensor
    tokens: int                   # the chunk's tokens (the same for every chunk of a stream)
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin rotating the chunk's q and k (None: they come rotated)
    gamma: torch.Tensor | None    # (H,) router weight of the global read; None while the global state is empty
    steady: bool                  # the memory is full: later chunks look like this one (see AdapterHandle.compile)
    commit: bool = False          # whether the pass in progress commits (set by the caller per pass)
    payload: dict[str, torch.Tensor] | None = None  # what a commit pass appends, for commit_many
    # The stream's RoPE when the global memory takes keys and queries without it (see
    # LocalMemory._global_strips_rope): the global read then uses the chunk's queries before RoPE, and
    # commit_many turns the evicted keys back. None otherwise.
    global_rope: Rope3D | None = None
    # The stream indices of the chunk's frames where the global memory's keys carry times (None otherwise).
    frames: torch.Tensor | None = None

    @property
    def held(self) -> int:
        """Tokens held; the chunk's slots start here. Read from the buffer's shape, so that a compiled pass sees a
        size (which may become dynamic) rather than an integer it would specialise on."""
        return self.keys.shape[1] - self.tokens


def held_frame_indices(sink_frames: int, window_frames: int | None, t: int) -> list[int]:
    """The frames a local memory holds after ``t`` committed ones, oldest first: the first ``sink_frames``, then
    the last ``window_frames`` after them (every later frame when ``window_frames`` is None)."""
    sink = range(min(sink_frames, t))
    lo = sink_frames if window_frames is None else max(sink_frames, t - window_frames)
    return [*sink, *range(lo, t)]


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
        return held_frame_indices(self.sink_frames, self.window_frames, t)

    # -- hooks for a global memory ---------------------------------------------
    gate_names: tuple[str, ...] = ()  # per-token, per-head gates kept in the window

    def _token_gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: (B, N, H)}`` for each of ``gate_names``, in the state dtype."""
        return {}

    def _global_empty(self, batch, device, dtype) -> dict[str, torch.Tensor]:
        return {}

    def _global_read(self, tensors, q, x, t: int, frames: torch.Tensor | None = None) -> torch.Tensor | None:
        """The global memory's read for queries of whole frames after ``t`` streamed frames (``frames``: their
        stream indices when they are not the chunk's ``t, t + 1, ...``); None where there is none."""
        return None

    def _global_gamma(self, tensors, t: int) -> torch.Tensor | None:
        """The router weight of a chunk's global read after ``t`` frames; None when nothing can be read yet."""
        return None

    def _global_mix(self, tensors, q, x, gamma: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _global_write_many(cls, memories: list, tensors: list[dict], evicted: list[dict]) -> None:
        """The global writes of several layers committing the same frames; by default one by one."""
        for mem, layer, ev in zip(memories, tensors, evicted):
            mem._global_write(layer, ev)

    def _global_write(self, tensors: dict, evicted: dict[str, torch.Tensor]) -> None:
        pass

    def _global_parallel(self, q, k, v, x, chunk_frames: int) -> torch.Tensor | None:
        return None

    def _global_strips_rope(self, rope: Rope3D | None) -> bool:
        """Whether the global memory takes keys and queries without the stream's RoPE while the cache holds
        them rotated ("absolute" mode with ``rope=``): its reads then use the queries before RoPE, and evicted
        keys are rotated back (:meth:`_unrotate_evicted`) before they are written."""
        return False

    def _first_evicted(self, t: int, frames: int) -> int:
        """The stream index of the first frame a chunk of ``frames`` frames evicts after ``t`` committed ones
        (evicted frames are consecutive: the window's oldest, then the chunk's first non-sink frames)."""
        to_sink = min(frames, max(0, self.sink_frames - t))
        return t - self._counts(t)[1] + to_sink

    def _read_frames(self, t: int, frames: int, device) -> torch.Tensor | None:
        """The stream indices of a chunk's ``frames`` frames after ``t`` where the global memory reads by time."""
        return None

    def _stamp_evicted(self, evicted: dict[str, torch.Tensor], first: int) -> None:
        """Tell evicted frames (the first is stream frame ``first``) their stream indices, where the global
        memory writes by time."""

    def _unrotate_evicted(self, evicted: dict[str, torch.Tensor], rope: Rope3D, t: int, frames: int) -> None:
        """Undo the absolute RoPE of the evicted keys of a chunk of ``frames`` frames committed after ``t``."""
        k = evicted["k"]
        cos, sin = rope.tables(self._first_evicted(t, frames), k.shape[1] // self.frame_tokens, k.dtype, k.device)
        evicted["k"] = rotate(k, cos, -sin)

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
        q_raw = q
        q, k = self._cache_qk(q, k, rope, t)
        q_global = q_raw if self._global_strips_rope(rope) else q
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
        g = self._global_read(tensors, q_global, x, t)
        if g is not None:
            y = y + g
        if not advance:
            return y, None
        new_tensors = dict(tensors)
        evicted = self._push(new_tensors, {"k": k, "v": v, **self._token_gates(x)}, t)
        if evicted is not None:
            if self._global_strips_rope(rope):
                self._unrotate_evicted(evicted, rope, t, q.shape[1] // T)
            self._stamp_evicted(evicted, self._first_evicted(t, q.shape[1] // T))
            self._global_write(new_tensors, evicted)
        return y, state.replace(new_tensors, frames=t + q.shape[1] // T)

    # -- the fast path: a chunk's passes share their preparation ---------------------------
    @classmethod
    def fast_path_exact(cls) -> bool:
        """Whether :meth:`prepare` and its passes compute what ``read`` / ``commit`` compute for this class: true
        unless a subclass changed ``_step`` or ``_cache_qk``, or its global read without the fast path's
        counterparts (``_global_gamma`` and ``_global_mix``). Adapters use the reference path otherwise."""
        base = LocalMemory
        if cls._step is not base._step or cls._cache_qk is not base._cache_qk:
            return False
        return cls._global_read is base._global_read or (
            cls._global_gamma is not base._global_gamma and cls._global_mix is not base._global_mix)

    def prepare(self, state: MemoryState, chunk_frames: int, rope: Rope3D | None = None) -> PreparedChunk:
        """Build what the passes of the next chunk (``chunk_frames`` frames) share. ``state`` is not changed."""
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a MemoryState (from init_state or commit), got {type(state).__name__}")
        k_sink = state.tensors.get("sink.k")
        if k_sink is None:
            raise StateMismatchError(f"state tensors {sorted(state.tensors)} are not a {self.kind} memory's")
        self._check_state_layout(state, state.batch, k_sink.dtype, k_sink.device)
        # Without autocast the block input x has the activations' dtype (under autocast it may not, and need not).
        self._check_parameters(k_sink.device, k_sink.dtype, k_sink.dtype)
        T, t = self.frame_tokens, state.frames
        n_sink, n_win = (n * T for n in self._counts(t))
        tensors = state.tensors
        B, _, H, D = k_sink.shape
        keys, values = (torch.empty(B, n_sink + n_win + chunk_frames * T, H, D, dtype=k_sink.dtype,
                                    device=k_sink.device) for _ in range(2))
        for name, buf in (("k", keys), ("v", values)):
            win = tensors[f"win.{name}"]
            buf[:, :n_sink] = tensors[f"sink.{name}"][:, :n_sink]
            buf[:, n_sink: n_sink + n_win] = win[:, win.shape[1] - n_win:]
        chunk_rope = None
        if rope is not None:
            if self.cfg.rope_mode == "relative":
                held_frames = (n_sink + n_win) // T
                if held_frames:
                    keys[:, : n_sink + n_win] = rope(keys[:, : n_sink + n_win], 0)
                chunk_rope = rope.tables(held_frames, chunk_frames, keys.dtype, keys.device)
            else:
                chunk_rope = rope.tables(t, chunk_frames, keys.dtype, keys.device)
        steady = self.window_frames is None or t > self.sink_frames + self.window_frames
        return PreparedChunk(state, keys, values, chunk_frames * T, chunk_rope, self._global_gamma(tensors, t),
                             steady, global_rope=rope if self._global_strips_rope(rope) else None,
                             frames=self._read_frames(t, chunk_frames, k_sink.device))

    def read_prepared(self, chunk: PreparedChunk, q, k, v, x) -> torch.Tensor:
        """What ``read(chunk.state, q, k, v, x, rope)`` returns (``chunk`` from :meth:`prepare`)."""
        return self._run_prepared(chunk, q, k, v, x)[0]

    def commit_prepared(self, chunk: PreparedChunk, q, k, v, x) -> torch.Tensor:
        """The output of ``commit(chunk.state, ...)``; what it appends is kept in ``chunk.payload`` for
        :meth:`commit_many`, which makes the new states."""
        y, k_cached = self._run_prepared(chunk, q, k, v, x)
        chunk.payload = {"k": k_cached, "v": v, **self._token_gates(x)}
        return y

    def _run_prepared(self, chunk: PreparedChunk, q, k, v, x):
        keys = chunk.keys
        expected = (keys.shape[0], chunk.tokens, *keys.shape[2:])
        if q.shape != expected or k.shape != q.shape or v.shape != q.shape:
            raise ShapeError(f"this chunk was prepared for q, k, v of shape {expected}, got {tuple(q.shape)}")
        if q.dtype != keys.dtype or k.dtype != keys.dtype or v.dtype != keys.dtype:
            raise DTypeError(f"the state holds {keys.dtype} keys but q, k, v are {q.dtype}, {k.dtype}, {v.dtype}")
        q_att, k_att = (q, k) if chunk.rope is None else (rotate(q, *chunk.rope), rotate(k, *chunk.rope))
        keys[:, chunk.held:] = k_att
        chunk.values[:, chunk.held:] = v
        y = attention(q_att, keys, chunk.values, backend=self.cfg.attention_backend)
        cached = (q_att, k_att) if self.cfg.rope_mode == "absolute" else (q, k)
        if chunk.gamma is not None:
            q_global = q if chunk.global_rope is not None else cached[0]
            y = y + self._global_mix(chunk.state.tensors, q_global, x, chunk.gamma, chunk.frames)
        return y, cached[1]

    @classmethod
    def commit_many(cls, memories: list, chunks: list[PreparedChunk]) -> list[MemoryState]:
        """The states after the commit passes of ``chunks`` (one per layer, all of one config and frame count):
        what ``commit`` returns, with the layers' global writes made together."""
        tensors, evicted = [], []
        for mem, chunk in zip(memories, chunks):
            if chunk.payload is None:
                raise StateMismatchError("commit_many: a layer's chunk was not committed (no commit pass reached it)")
            layer = dict(chunk.state.tensors)
            out = mem._push(layer, chunk.payload, chunk.state.frames)
            frames = chunk.tokens // mem.frame_tokens
            if out is not None and chunk.global_rope is not None:
                mem._unrotate_evicted(out, chunk.global_rope, chunk.state.frames, frames)
            if out is not None:
                mem._stamp_evicted(out, mem._first_evicted(chunk.state.frames, frames))
            evicted.append(out)
            tensors.append(layer)
        if evicted[0] is not None:
            cls._global_write_many(memories, tensors, evicted)
        return [chunk.state.replace(layer, frames=chunk.state.frames + chunk.payload["k"].shape[1] // mem.frame_tokens)
                for mem, chunk, layer in zip(memories, chunks, tensors)]

    # -- recache (re-encode the held frames, keep the global memory) --------------------
    def _recache(self, state, q, k, v, x, rope, chunk_ids):
        T, t = self.frame_tokens, state.frames
        held = torch.tensor(self.held_frames(t), device=q.device)
        q_raw = q
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
        q_global = q_raw if self._global_strips_rope(rope) else q
        window = self.held_frames(t)[n_sink // T:]  # consecutive frames
        window = self._read_frames(window[0], len(window), q.device) if window else None
        g = self._global_read(tensors, q_global[:, n_sink:], x[:, n_sink:], t, window)
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
        raw = (q, k) if self._global_strips_rope(rope) else None
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
        q_global, k_global = (q, k) if raw is None else raw
        g = self._global_parallel(q_global, k_global, v, x, chunk_frames)
        return y if g is None else y + g


__all__ = ["LocalMemory"]
