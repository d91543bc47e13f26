"""What every backbone adapter shares: injection and removal, the handle, and the per-pass plumbing.

A backbone adapter (one file per family, e.g. ``wan.py``) says where a model's attention modules are,
how its self-attention projects q, k, v, where its RoPE tables live and how to call the model on a
chunk. Everything else is here:

* ``inject`` puts a memory beside each block's self-attention (a registered submodule, so its
  parameters train and save with the model), swaps the attention processors (the diffusers seam) for
  memory-backed ones, and returns an :class:`AdapterHandle`;
* the handle runs the *stock* forward of the model on a latent chunk; during that call the processors
  route each block's q, k, v through its memory: ``read`` (denoising passes), ``commit`` (the context
  pass), ``recache`` (re-encode the held frames after a prompt switch), ``teacher`` (noisy chunks that
  each read the memory of the clean clip before them, see :meth:`AdapterHandle.teacher_force`), or
  ``parallel`` (a whole clip, block-causal, when the model is called directly);
* ``remove`` restores the original processors and deletes the memories: the stock model again.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from memkit.errors import AdapterError, ConfigError, DeviceError, DTypeError, ShapeError, StateMismatchError
from memkit.memory import LocalMemory, Memory, MemoryConfig, build_memory
from memkit.memory.local import PreparedChunk
from memkit.ops import TabulatedRope3D, backends
from memkit.ops._checks import autocast_dtype, check_finite
from memkit.state import MemoryState, StreamState

log = logging.getLogger("memkit.adapters")
HANDLE_ATTR = "_memkit_handle"
_MISSING = object()
MEMORY_ATTR = "memory"

_BACKBONES: list[type[BackboneAdapter]] = []


def register_backbone(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Class decorator: make ``inject`` use this adapter for the models it ``matches``."""
    _BACKBONES.insert(0, cls)  # later registrations (subclasses, user adapters) win
    return cls


def list_backbones() -> list[str]:
    return sorted(cls.name for cls in _BACKBONES)


class BackboneAdapter:
    """How to drive one backbone family. Subclasses fill in the methods below; see ``wan.py``."""

    name: ClassVar[str] = "?"
    #: latent (height, width) of the family's native resolution, used when ``inject`` gets no ``latent_size``
    default_latent_size: ClassVar[tuple[int, int]] = (60, 104)

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    # -- the model's layout --------------------------------------------------------------
    def attention_modules(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """Per block, (self-attention module, cross-attention module or None)."""
        raise NotImplementedError

    def dims(self) -> Dims:
        raise NotImplementedError

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's RoPE (cos, sin) tables, ``(max_positions, head_dim)``, in TabulatedRope3D's layout."""
        raise NotImplementedError

    # -- one self-attention call ------------------------------------------------------------
    def self_attention_qkv(self, attn: nn.Module, hidden_states: torch.Tensor):
        """q, k, v ``(B, N, heads, head_dim)`` before RoPE, as the backbone's own processor computes them."""
        raise NotImplementedError

    def self_attention_out(self, attn: nn.Module, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The backbone's output projection of the mixed heads ``y (B, N, heads, head_dim)``."""
        raise NotImplementedError

    def cross_attention_processor(self, handle: AdapterHandle, original):
        """A processor for the cross-attention that caches prompt K/V, or None to keep the original."""
        return None

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order (what :meth:`AdapterHandle.compile` compiles)."""
        raise NotImplementedError

    def begin_fast_pass(self, handle: AdapterHandle, encoder_hidden_states: torch.Tensor, kwargs: dict) -> None:
        """Before a fast pass: look up what the blocks would otherwise find through Python bookkeeping (the prompt's
        cross-attention K/V), so that a compiled block runs without it."""

    def end_fast_pass(self, handle: AdapterHandle) -> None:
        """After a fast pass: drop what :meth:`begin_fast_pass` set up."""

    # -- one forward ---------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                **kwargs) -> torch.Tensor:
        """The stock model's prediction for ``latents``; ``timestep`` is ``(B,)`` or per frame ``(B, F)``."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------
    def checkpointing_modules(self) -> list[nn.Module]:
        """The modules whose ``gradient_checkpointing`` flag (diffusers' convention) turns per-block activation
        checkpointing on; the model's blocks are then run through ``_gradient_checkpointing_func``."""
        return [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]


@dataclass(frozen=True)
class Dims:
    num_heads: int
    head_dim: int
    dim: int
    in_channels: int
    patch_size: tuple[int, int, int]
    text_dim: int


@dataclass
class _Pass:
    """What the processors of one forward need: the mode, the layers' states, and where to put new ones."""

    mode: str  # "read" | "commit" | "recache" | "teacher"
    states: tuple[MemoryState, ...]
    prompt_key: int | None
    chunk_ids: torch.Tensor | None = None
    new_states: list = field(default_factory=list)
    prepared: list[PreparedChunk] | None = None  # the fast path's per-layer chunks (read and commit passes)


class MemorySelfAttention:
    """The self-attention processor of an injected block: the backbone's projections around a memory."""

    _attention_backend = None  # diffusers' set_attention_backend looks for these; the memory picks its kernels
    _parallel_config = None

    def __init__(self, handle: AdapterHandle, index: int):
        self.handle, self.index = handle, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        # The memory decides what each token attends to, so a causal mask the backbone builds itself
        # (SkyReels-V2's num_frame_per_block) and its rotary tables for frames 0.. are not used here.
        backbone = self.handle.backbone
        q, k, v = backbone.self_attention_qkv(attn, hidden_states)
        mem = getattr(attn, MEMORY_ATTR)
        chunk = mem._prepared
        if chunk is not None:  # the fast path of a chunk loop (AdapterHandle.read / commit)
            mix = mem.commit_prepared if chunk.commit else mem.read_prepared
            y = mix(chunk, q, k, v, hidden_states)
        else:
            y = self.handle._mix(self.index, mem, q, k, v, hidden_states)
        return backbone.self_attention_out(attn, y, like=q)


class AdapterHandle:
    """An injected model, driven chunk by chunk. Mirrors the memory API on latent chunks ``(B, C, F, H, W)``.

    States are :class:`memkit.StreamState` values: every layer's memory state, the frame cursor, and the
    clean latents of the frames the memories hold (``context``, for :meth:`recache`). No method changes
    a state in place, so any state can be resumed or forked from.
    """

    def __init__(self, model: nn.Module, backbone: BackboneAdapter, cfg: MemoryConfig, chunk_frames: int,
                 latent_size: tuple[int, int] | None, freeze_backbone: bool, memory_dtype: torch.dtype | None = None,
                 fast: bool = True):
        if not isinstance(cfg, MemoryConfig):
            raise ConfigError(f"inject needs a memkit.MemoryConfig, got {type(cfg).__name__}")
        if not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) or chunk_frames < 1:
            raise ConfigError(f"inject: chunk_frames must be a positive int, got {chunk_frames!r}")
        self.model, self.backbone, self.cfg, self.chunk_frames = model, backbone, cfg, chunk_frames
        self.dims = d = backbone.dims()
        size = tuple(latent_size or backbone.default_latent_size)
        if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
            raise ConfigError(f"inject: latent_size must be (height, width) of the latents, got {latent_size!r}")
        _, ph, pw = d.patch_size
        if size[0] % ph or size[1] % pw:
            raise ConfigError(f"inject: latent_size {size} is not divisible by the patch size {d.patch_size[1:]}")
        self.latent_size = size
        self.grid = (size[0] // ph, size[1] // pw)  # tokens per frame: height x width after patching
        positions = backbone.rope_tables()[0].shape[0]
        if max(self.grid) > positions:
            raise ConfigError(
                f"inject: latent_size {size} makes a {self.grid[0]}x{self.grid[1]} token grid, but this "
                f"{type(model).__name__}'s RoPE table covers {positions} positions per axis; pass a latent_size of "
                f"at most {positions * ph}x{positions * pw}, or use a backbone with a longer table"
            )
        modules = backbone.attention_modules()
        if not modules:
            raise AdapterError(f"{type(model).__name__} has no attention blocks to inject into")
        for i, (attn, _) in enumerate(modules):
            if hasattr(attn, MEMORY_ATTR):
                raise AdapterError(f"block {i}'s self-attention already has an attribute {MEMORY_ATTR!r}")
        param = next(model.parameters())
        if memory_dtype is not None and not (isinstance(memory_dtype, torch.dtype) and memory_dtype.is_floating_point):
            raise DTypeError(f"inject: memory_dtype must be a floating torch.dtype, got {memory_dtype!r}")
        memories = [
            build_memory(cfg, num_heads=d.num_heads, head_dim=d.head_dim, dim=d.dim,
                         frame_tokens=self.grid[0] * self.grid[1], frame_shape=self.grid,
                         ).to(device=param.device, dtype=memory_dtype or param.dtype)
            for _ in modules
        ]
        cross_procs = [None if cross is None else backbone.cross_attention_processor(self, cross.processor)
                       for _, cross in modules]
        # Nothing of the model was touched above. From here on every change is recorded, for remove() and for
        # undoing a half-done injection.
        self._originals = [(attn, attn.processor, cross, None if cross is None else cross.processor)
                           for attn, cross in modules]
        self._frozen: list[tuple[nn.Parameter, bool]] = []  # by object: names change if peft wraps a layer later
        self._checkpointing: list[tuple[nn.Module, bool, object]] | None = None  # flags before we turned it on
        try:
            if freeze_backbone:
                for p in model.parameters():
                    self._frozen.append((p, p.requires_grad))
                    p.requires_grad_(False)
            for i, ((attn, cross), mem, cross_proc) in enumerate(zip(modules, memories, cross_procs)):
                attn.add_module(MEMORY_ATTR, mem)
                attn.set_processor(MemorySelfAttention(self, i))
                if cross_proc is not None:
                    cross.set_processor(cross_proc)
        except Exception:
            _restore(model, self)
            raise
        self.memories = memories
        self._pass: _Pass | None = None
        self._prompts: OrderedDict[int, tuple[tuple[torch.Tensor, ...], tuple[int, ...]]] = OrderedDict()
        self._prompt_ids = itertools.count()
        self._rope: tuple[tuple, TabulatedRope3D] | None = None
        #: run read and commit passes without gradient on the fast path (see :meth:`read`); False: the reference
        self.fast = bool(fast)
        self._chunk_cache: tuple[StreamState, tuple, list[PreparedChunk]] | None = None
        self._compiled: list[tuple[nn.Module, object]] = []  # (block, its compiled call before ours)
        self._logged: set = set()
        self.removed = False
        object.__setattr__(model, HANDLE_ATTR, self)  # a plain attribute, not a submodule

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.memories)} layers"
        return (f"AdapterHandle({self.backbone.name}, {self.cfg.kind}, chunk_frames={self.chunk_frames}, "
                f"latent_size={self.latent_size}, {state})")

    # -- public API ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.memories)

    def memory_parameters(self) -> Iterator[nn.Parameter]:
        """The memories' parameters (what fine-tuning trains)."""
        for mem in self.memories:
            yield from mem.parameters()

    def describe(self) -> dict:
        """What a stream made on this adapter records of it (JSON-able): the backbone family, the model's class and
        config hash, the memory config, chunk frames and latent size. ``StreamState.settings`` reads it back."""
        from .loading import backbone_identity

        identity = backbone_identity(self.model)
        return {"backbone": self.backbone.name, "backbone_class": identity["class"],
                "backbone_config_hash": identity["config_hash"], "memory": self.cfg.to_dict(),
                "chunk_frames": self.chunk_frames, "latent_size": list(self.latent_size)}

    def held_frames(self, cursor: int) -> list[int]:
        """Stream indices of the frames the memories hold after ``cursor`` committed frames."""
        return self.memories[0].held_frames(cursor)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> StreamState:
        """An empty stream for ``batch`` videos. Device and dtype default to the model's; under autocast the
        dtype defaults to autocast's, which is what the attention projections then produce."""
        self._check_live()
        param = next(self.model.parameters())
        device = param.device if device is None else torch.device(device)
        if dtype is None:
            dtype = autocast_dtype(device.type) or param.dtype
        return StreamState(tuple(mem.init_state(batch, device=device, dtype=dtype) for mem in self.memories))

    def read(self, state: StreamState, latents, timestep, encoder_hidden_states, **kwargs) -> torch.Tensor:
        """The model's prediction for a noisy chunk given the memory before it (a denoising pass).

        Without gradient and with :attr:`fast` on (the default), the passes of a chunk (the reads of one state,
        then its commit) share their preparation: held keys and values are gathered once per chunk, the global
        memories are written together after the commit, and the finite check of the inputs runs once, at the
        commit, so that no pass waits for the device. It computes what the reference path computes.
        """
        t = self._check_chunk(state, latents, timestep, encoder_hidden_states, exact=True,
                              finite=not self._fast_pass("read"))
        with self._running("read", state, encoder_hidden_states, kwargs, frames=latents.shape[2]):
            return self.backbone.forward(latents, t, encoder_hidden_states, **kwargs)

    def commit(self, state: StreamState, latents, timestep, encoder_hidden_states,
               **kwargs) -> tuple[torch.Tensor, StreamState]:
        """What ``read`` returns for this chunk, and the stream advanced past it (the context pass). On the fast
        path the finite check of the latents and the prediction runs after the pass: the chunk's one wait for the
        device; a non-finite chunk is refused and ``state`` stays as it is."""
        t = self._check_chunk(state, latents, timestep, encoder_hidden_states, exact=True,
                              finite=not self._fast_pass("commit"))
        return self._commit(state, latents, t, encoder_hidden_states, **kwargs)

    def prefill(self, state: StreamState, latents, encoder_hidden_states, timestep=0.0, **kwargs) -> StreamState:
        """Commit clean latents of any length (an encoded image, a video to extend) before generating.

        The prefix is committed in pieces of ``chunk_frames``, the remainder first, so that a prefix
        made of whole chunks is committed exactly as a stream would have committed it.
        """
        t = self._check_chunk(state, latents, timestep, encoder_hidden_states, exact=False)
        F = latents.shape[2]
        sizes = ([F % self.chunk_frames] if F % self.chunk_frames else []) + [self.chunk_frames] * (
            F // self.chunk_frames)
        f0 = 0
        for size in sizes:
            piece_t = t[:, f0: f0 + size] if t.ndim == 2 else t
            _, state = self._commit(state, latents[:, :, f0: f0 + size], piece_t, encoder_hidden_states, **kwargs)
            f0 += size
        return state

    def recache(self, state: StreamState, encoder_hidden_states, **kwargs) -> StreamState:
        """Re-encode the frames the memories hold under new conditioning (a prompt switch).

        Runs the context pass again over the held frames' clean latents (kept in ``state.context``),
        each frame attending to the held frames of its own and earlier chunks; the global memory and the
        cursor are kept.
        """
        self.check_state(state)
        if state.cursor == 0:
            return state
        ctx = state.context
        if not {"latents", "frames", "chunks", "timestep"} <= set(ctx):
            raise StateMismatchError(
                "this state holds no context latents to re-encode (it was not made by this adapter's commit or "
                "prefill, or its memory does not say which frames it holds)"
            )
        latents, t = ctx["latents"], ctx["timestep"]
        self._check_prompt(encoder_hidden_states, latents)
        if bool((t == t[:, :1]).all()):
            t = t[:, 0]
        with self._running("recache", state, encoder_hidden_states, kwargs, chunk_ids=ctx["chunks"]) as p:
            self.backbone.forward(latents, t, encoder_hidden_states, **kwargs)
        return state.replace(layers=tuple(p.new_states))

    def teacher_force(self, state: StreamState, latents, timestep, encoder_hidden_states, *, context,
                      context_timestep=0.0, **kwargs) -> tuple[torch.Tensor, StreamState]:
        """Teacher forcing over whole chunks in one forward: chunk ``i`` of the noisy ``latents`` reads the memory
        as it is after committing the clean ``context`` chunks before it (from ``state`` on).

        Equals, chunk by chunk, ``read(s, latents_i, t_i)`` then ``s = commit(s, context_i, context_t_i)``, i.e.
        exactly what generation sees, but runs the model once over ``[context | latents]`` (twice the frames).
        ``context`` has the shape of ``latents``: the clean chunks (or lightly noised ones, at
        ``context_timestep``). Returns the predictions for ``latents`` and the state after the context.
        Gradients flow through the memory state from chunk to chunk.
        """
        t = self._check_chunk(state, latents, timestep, encoder_hidden_states, exact=False)
        F = latents.shape[2]
        if F % self.chunk_frames:
            raise ShapeError(f"teacher_force needs whole chunks of {self.chunk_frames} frames, got {F} frames")
        if not isinstance(context, torch.Tensor) or context.shape != latents.shape:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ShapeError(f"context must have the shape of the latents {tuple(latents.shape)}, got {got}")
        self._check_latents(context, exact=False)
        t_ctx = self._timestep(context_timestep, context)
        per_frame = [x if x.dim() == 2 else x[:, None].expand(-1, F) for x in (t_ctx, t)]
        with self._running("teacher", state, encoder_hidden_states, kwargs) as p:
            pred = self.backbone.forward(torch.cat([context, latents], dim=2), torch.cat(per_frame, dim=1),
                                         encoder_hidden_states, **kwargs)
        cursor = state.cursor + F
        held = self._held_context(state, context, t_ctx, cursor)
        return pred[:, :, F:], state.replace(layers=tuple(p.new_states), cursor=cursor, context=held)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (per-block activation
        checkpointing, through diffusers' ``gradient_checkpointing`` hook). Works in every pass mode: the
        recomputation sees the memory states of the pass that made the activations. ``remove`` restores the
        model's own setting."""
        self._check_live()
        modules = self.backbone.checkpointing_modules()
        if not modules:
            raise AdapterError(f"{type(self.model).__name__} has no gradient_checkpointing hook to use")
        if enabled:
            if self._checkpointing is None:
                self._checkpointing = [
                    (m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func", _MISSING))
                    for m in modules
                ]
            for m in modules:
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = self._checkpoint_block
        elif self._checkpointing is not None:
            _restore_checkpointing(self._checkpointing)
            self._checkpointing = None

    def _checkpoint_block(self, block, *args):
        p = self._pass

        def run(*inputs):
            if self._pass is p:  # the forward itself
                return block(*inputs)
            outer, self._pass = self._pass, p  # recomputation during backward: the pass is over, bring it back
            try:
                return block(*inputs)
            finally:
                self._pass = outer

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    def parallel(self, latents, timestep, encoder_hidden_states, **kwargs) -> torch.Tensor:
        """A whole clip at once, block-causal over chunks of ``chunk_frames`` (teacher forcing).

        The same as calling the injected model directly; equals streaming the clip with ``commit``.
        """
        self._check_live()
        self._check_latents(latents, exact=False)
        t = self._timestep(timestep, latents)
        self._check_prompt(encoder_hidden_states, latents)
        return self.backbone.forward(latents, t, encoder_hidden_states, **kwargs)

    def remove(self) -> None:
        remove(self.model)

    def compile(self, **options) -> None:
        """Compile every block with ``torch.compile(**options)`` (in place, like ``nn.Module.compile``) for the
        fast path, whose per-block step has no graph break: all blocks share one graph per pass kind (read,
        commit). Other passes (training, recache, ``fast=False``) and the chunks that fill a bounded memory run
        the same blocks eagerly, so only steady-state shapes are compiled. ``remove`` (or ``compile(disable=True)``)
        undoes it. Dynamo keeps graphs per code object, which every compiled module shares: after compiling
        another memory variant in the same process, ``torch._dynamo.reset()`` keeps the old graphs from filling
        its recompile limit."""
        self._check_live()
        _uncompile(self)
        if options.pop("disable", False):
            return
        try:
            blocks = self.backbone.blocks()
        except NotImplementedError:
            raise AdapterError(f"the {self.backbone.name} adapter does not list its blocks (BackboneAdapter.blocks), "
                               f"so they cannot be compiled") from None
        self._compiled = [(block, block._compiled_call_impl) for block in blocks]
        for block in blocks:
            block.compile(**options)

    # -- the processors' side -----------------------------------------------------------------
    def rope(self) -> TabulatedRope3D:
        """The backbone's RoPE tables for this injection's frame grid (one object per table, shared by layers)."""
        cos, sin = self.backbone.rope_tables()
        key = (cos.data_ptr(), cos.dtype, cos.device, cos._version)
        if self._rope is None or self._rope[0] != key:
            self._rope = (key, TabulatedRope3D(cos, sin, *self.grid))
        return self._rope[1]

    def _mix(self, index: int, mem: Memory, q, k, v, x) -> torch.Tensor:
        p = self._pass
        if p is None:  # the model called directly: teacher forcing over the whole clip
            return mem.parallel(q, k, v, x, self.chunk_frames, rope=self.rope())
        state = p.states[index]
        if p.mode == "read":
            return mem.read(state, q, k, v, x, rope=self.rope())
        if p.mode == "commit":
            y, new = mem.commit(state, q, k, v, x, rope=self.rope())
        elif p.mode == "teacher":
            y, new = self._teacher_mix(mem, state, q, k, v, x)
        else:
            y, new = mem.recache(state, q, k, v, x, rope=self.rope(), chunk_ids=p.chunk_ids)
        p.new_states[index] = new
        return y

    def _teacher_mix(self, mem: Memory, state: MemoryState, q, k, v, x):
        """Tokens ``[context | noisy]``: commit each context chunk, read each noisy chunk before its commit."""
        half = q.shape[1] // 2
        n = self.chunk_frames * mem.frame_tokens
        rope = self.rope()
        ys_ctx, ys_noisy = [], []
        for c0 in range(0, half, n):
            ctx, noisy = slice(c0, c0 + n), slice(half + c0, half + c0 + n)
            ys_noisy.append(mem.read(state, q[:, noisy], k[:, noisy], v[:, noisy], x[:, noisy], rope=rope))
            y, state = mem.commit(state, q[:, ctx], k[:, ctx], v[:, ctx], x[:, ctx], rope=rope)
            ys_ctx.append(y)
        return torch.cat(ys_ctx + ys_noisy, dim=1), state

    def prompt_key(self) -> int | None:
        """An id of the prompt of the pass in progress, for caching its cross-attention K/V (None: no cache)."""
        return None if self._pass is None else self._pass.prompt_key

    # -- internals ------------------------------------------------------------------------
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

    @contextmanager
    def _running(self, mode: str, state: StreamState, encoder_hidden_states, kwargs: dict, chunk_ids=None,
                 frames: int | None = None):
        if self._pass is not None:
            raise AdapterError("this adapter is already running a pass (re-entrant call)")
        conditioning = (encoder_hidden_states, *(v for _, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)))
        p = _Pass(mode, state.layers, self._prompt_id(conditioning), chunk_ids, [None] * len(self.memories))
        if frames is not None and self._fast_pass(mode):
            p.prepared = self._prepared_chunks(state, frames)
            for mem, chunk in zip(self.memories, p.prepared):
                chunk.commit, chunk.payload = mode == "commit", None
                mem._prepared = chunk
        self._pass = p
        try:
            if p.prepared is not None:
                self.backbone.begin_fast_pass(self, encoder_hidden_states, kwargs)
            # The reference path is not made to be compiled; and while a bounded memory fills up, each chunk holds
            # another number of frames: compiling those would spend Dynamo's recompile budget on shapes never seen
            # again, so they run eagerly and the compiled graphs are those of the steady state.
            if self._compiled and (p.prepared is None or not p.prepared[0].steady):
                with torch.compiler.set_stance("force_eager"):
                    yield p
            else:
                yield p
        finally:
            self._pass = None
            if p.prepared is not None:
                self.backbone.end_fast_pass(self)
            for mem in self.memories:
                mem._prepared = None
        if mode != "read" and p.prepared is None and any(s is None for s in p.new_states):
            raise AdapterError(f"the {mode} pass did not reach every injected block")

    def _commit(self, state, latents, t, encoder_hidden_states, **kwargs):
        with self._running("commit", state, encoder_hidden_states, kwargs, frames=latents.shape[2]) as p:
            pred = self.backbone.forward(latents, t, encoder_hidden_states, **kwargs)
        self._chunk_cache = None  # the chunk is over (its buffers go)
        if p.prepared is None:
            layers = tuple(p.new_states)
        else:
            if any(chunk.payload is None for chunk in p.prepared):
                raise AdapterError("the commit pass did not reach every injected block")
            if self.cfg.check_finite:
                check_finite(latents=latents, prediction=pred)
            layers = tuple(type(self.memories[0]).commit_many(self.memories, p.prepared))
        F = latents.shape[2]
        cursor = state.cursor + F
        context = self._held_context(state, latents, t, cursor)
        return pred, state.replace(layers=layers, cursor=cursor, context=context)

    def _held_context(self, state: StreamState, latents, t, cursor: int) -> dict[str, torch.Tensor]:
        """The clean latents (with frame index, chunk id and timestep) of the frames held after a commit.

        Frame indices and chunk ids stay on the CPU, so this bookkeeping never waits for the device.
        """
        try:
            held = set(self.held_frames(cursor))
        except NotImplementedError:  # a memory that does not say what it holds cannot be recached either
            return {}
        B, _, F = latents.shape[:3]
        ctx = state.context
        chunk = int(ctx["chunks"][-1]) + 1 if ctx else 0
        new = {
            "latents": latents.detach().clone(),  # a state is a value: it must not share the caller's tensors
            "frames": torch.arange(state.cursor, cursor),
            "chunks": torch.full((F,), chunk),
            "timestep": (t[:, None].expand(B, F) if t.dim() == 1 else t).to(torch.float32).clone(),
        }
        if ctx:
            dims = {"latents": 2, "frames": 0, "chunks": 0, "timestep": 1}
            new = {name: torch.cat([ctx[name].to(value.device), value], dim=dims[name]) for name, value in new.items()}
        keep = [i for i, f in enumerate(new["frames"].tolist()) if f in held]
        if len(keep) == len(new["frames"]):
            return new
        idx = torch.tensor(keep)
        on_device = idx.to(latents.device, non_blocking=True)  # a host-to-device copy that waits for nothing
        return {"latents": new["latents"][:, :, on_device], "frames": new["frames"][idx],
                "chunks": new["chunks"][idx], "timestep": new["timestep"][:, on_device]}

    def _prompt_id(self, conditioning: tuple[torch.Tensor, ...]) -> int | None:
        """One id per set of conditioning tensors (the prompt, and an image context where there is one).

        The same tensor objects, unmodified since, are the same conditioning; holding references keeps their
        ids from being reused by other tensors.
        """
        if any(t.requires_grad or t.is_inference() for t in conditioning):
            return None  # inference tensors keep no version counter: an in-place edit could not be seen
        versions = tuple(t._version for t in conditioning)
        for key, (refs, seen) in self._prompts.items():
            if len(refs) == len(conditioning) and all(a is b for a, b in zip(refs, conditioning)) and seen == versions:
                self._prompts.move_to_end(key)
                return key
        key = next(self._prompt_ids)
        self._prompts[key] = (conditioning, versions)
        while len(self._prompts) > 4:
            self._prompts.popitem(last=False)
        return key

    # -- checks (before anything runs: a bad call changes nothing) -----------------------------
    def _check_live(self) -> None:
        if self.removed:
            raise AdapterError("this adapter was removed from its model; inject again to use it")

    def _check_chunk(self, state, latents, timestep, encoder_hidden_states, exact: bool,
                     finite: bool = True) -> torch.Tensor:
        self.check_state(state)
        self._check_latents(latents, exact, finite)
        if latents.shape[0] != state.layers[0].batch:
            raise StateMismatchError(
                f"the state holds {state.layers[0].batch} streams but the latents have batch {latents.shape[0]}"
            )
        if latents.device != state.layers[0].device:
            raise DeviceError(f"latents are on {latents.device} but the state on {state.layers[0].device}")
        self._check_prompt(encoder_hidden_states, latents)
        return self._timestep(timestep, latents, finite)

    def check_state(self, state) -> None:
        """Raise if ``state`` cannot continue on this adapter (layers, configs, cursor)."""
        self._check_live()
        if not isinstance(state, StreamState):
            raise TypeError(f"state must be a memkit.StreamState (from init_state or commit), got "
                            f"{type(state).__name__}")
        recorded = state.info.get("adapter")
        if recorded:
            self._check_recorded(recorded)
        if len(state.layers) != len(self.memories):
            raise StateMismatchError(
                f"the state has {len(state.layers)} layers but this model has {len(self.memories)} injected blocks"
            )
        for i, (layer, mem) in enumerate(zip(state.layers, self.memories)):
            if layer.fingerprint != mem.fingerprint:
                raise StateMismatchError(
                    f"layer {i} of the state belongs to a {layer.kind} memory of config {layer.fingerprint}; "
                    f"this model's is a {mem.kind} memory of config {mem.fingerprint}"
                )
            if layer.frames != state.cursor:
                raise StateMismatchError(f"layer {i} has {layer.frames} frames but the stream cursor is {state.cursor}")

    def _check_recorded(self, recorded: dict) -> None:
        """Name each field that shapes a state and differs between a stream's record and this adapter."""
        mine, theirs = self.describe(), dict(recorded)
        mem = self.memories[0]
        fields = [("memory", "kind"), *((name, name) for name in mem.state_fields)]
        pairs = [(label, theirs.get("memory", {}).get(key), mine["memory"][key]) for label, key in fields]
        pairs += [(name, theirs.get(name), mine[name]) for name in ("chunk_frames", "latent_size")]
        if "memory" in theirs:  # a record from before place codes wrote none
            pairs.append(("global_position", type(mem).place_code(theirs["memory"]), type(mem).place_code(
                mine["memory"])))
        diffs = [f"{name}: state {got}, adapter {want}" for name, got, want in pairs
                 if got is not None and _listed(got) != _listed(want)]
        if diffs:
            raise StateMismatchError("this stream state was made with another memory setup: " + "; ".join(diffs))

    def _check_latents(self, latents, exact: bool, finite: bool = True) -> None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        d = self.dims
        if latents.dim() != 5:
            raise ShapeError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
        B, C, F, H, W = latents.shape
        if C != d.in_channels:
            raise ShapeError(f"latents have {C} channels; this {self.backbone.name} model takes {d.in_channels}")
        if (H, W) != self.latent_size:
            raise ShapeError(
                f"latents are {H}x{W} but the memories were built for {self.latent_size[0]}x{self.latent_size[1]} "
                f"latent frames (adapters.inject(..., latent_size=({H}, {W})))"
            )
        if exact and F != self.chunk_frames:
            raise ShapeError(
                f"a chunk must be chunk_frames={self.chunk_frames} latent frames, got {F} "
                f"(use prefill for a prefix of any length)"
            )
        if F < 1 or F % d.patch_size[0]:
            raise ShapeError(f"latents need a positive multiple of {d.patch_size[0]} frames, got {F}")
        param = next(self.model.parameters())
        if not latents.is_floating_point():
            raise DTypeError(f"latents must be floating point, got {latents.dtype}")
        if latents.device != param.device:
            raise DeviceError(f"latents are on {latents.device} but the model on {param.device}")
        if latents.dtype != param.dtype and autocast_dtype(latents.device.type) is None:
            raise DTypeError(f"latents are {latents.dtype} but the model is {param.dtype}")
        if self.cfg.check_finite and finite:
            check_finite(latents=latents)

    def _check_prompt(self, encoder_hidden_states, latents) -> None:
        if not isinstance(encoder_hidden_states, torch.Tensor):
            raise TypeError(f"encoder_hidden_states must be a torch.Tensor, got {type(encoder_hidden_states).__name__}")
        d = self.dims
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[2] != d.text_dim:
            raise ShapeError(
                f"encoder_hidden_states must be (B, L, {d.text_dim}), got {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[0] != latents.shape[0]:
            raise ShapeError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, the latents {latents.shape[0]}"
            )
        if encoder_hidden_states.device != latents.device:
            raise DeviceError(
                f"encoder_hidden_states is on {encoder_hidden_states.device}, latents on {latents.device}"
            )

    def _timestep(self, timestep, latents, finite: bool = True) -> torch.Tensor:
        """``(B,)`` for a timestep shared by the chunk's frames, ``(B, F)`` for one per frame (float32)."""
        B, F = latents.shape[0], latents.shape[2]
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            if not math.isfinite(timestep):
                raise ConfigError(f"timestep must be finite, got {timestep}")
            return torch.full((B,), float(timestep), device=latents.device)  # no host-to-device copy
        t = torch.as_tensor(timestep)
        on_host = t.device.type == "cpu"  # checking a host tensor costs no device sync: always do it
        t = t.to(device=latents.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(B)
        elif t.shape not in ((B,), (B, F)):
            raise ShapeError(f"timestep must be a number, (B,) = ({B},) or per frame (B, F) = ({B}, {F}); "
                             f"got {tuple(t.shape)}")
        if ((self.cfg.check_finite and finite) or on_host) and not bool(torch.isfinite(t).all()):
            raise ConfigError("timestep contains NaN or Inf")
        return t


def backbone_for(model: nn.Module) -> type[BackboneAdapter]:
    for cls in _BACKBONES:
        if cls.matches(model):
            return cls
    raise AdapterError(
        f"no memkit adapter for {type(model).__name__}; known backbones: {', '.join(list_backbones())}. "
        f"An adapter for a new backbone is one file (docs/adapters.md)"
    )


def inject(model: nn.Module, cfg: MemoryConfig, chunk_frames: int = 3, *, latent_size: tuple[int, int] | None = None,
           freeze_backbone: bool = False, memory_dtype: torch.dtype | None = None, fast: bool = True) -> AdapterHandle:
    """Put a memory of config ``cfg`` into every block of ``model``, in place, and return its handle.

    latent_size: (height, width) of the latent frames the stream will have (it sizes the memories'
        caches); defaults to the backbone's native resolution (Wan2.1: 480x832 video, 60x104 latents).
    freeze_backbone: turn off gradients of every backbone parameter (restored by ``remove``).
    memory_dtype: dtype of the memories' parameters; defaults to the model's. Training keeps them float32
        (master weights) beside a bf16 backbone and runs under autocast (Lightning's ``bf16-mixed``).
    fast: run the chunk loop's passes on the fast path (see :meth:`AdapterHandle.read`); ``handle.fast`` switches
        it later. False runs the reference path in every pass.
    """
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise AdapterError("this model already has a memkit adapter injected; adapters.remove(model) first")
    return AdapterHandle(model, backbone_for(model)(model), cfg, chunk_frames, latent_size, freeze_backbone,
                         memory_dtype, fast)


def remove(model: nn.Module) -> nn.Module:
    """Undo ``inject``: original processors back, memories deleted, frozen flags restored. Returns the model."""
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise AdapterError(f"this {type(model).__name__} has no memkit adapter injected")
    _restore(model, handle)
    handle.removed = True
    handle._prompts.clear()
    handle._chunk_cache = None
    object.__delattr__(model, HANDLE_ATTR)
    return model


def _uncompile(handle: AdapterHandle) -> None:
    for block, before in getattr(handle, "_compiled", ()):  # a half-done injection has none yet
        block._compiled_call_impl = before
    handle._compiled = []


def _restore(model: nn.Module, handle: AdapterHandle) -> None:
    """Put back what injection changed: processors, memories (if added), requires_grad flags, checkpointing,
    compiled blocks."""
    _uncompile(handle)
    if handle._checkpointing is not None:
        _restore_checkpointing(handle._checkpointing)
        handle._checkpointing = None
    for attn, _, _, _ in handle._originals:
        if isinstance(getattr(attn, MEMORY_ATTR, None), Memory):
            delattr(attn, MEMORY_ATTR)
    for attn, proc, cross, cross_proc in handle._originals:
        attn.set_processor(proc)
        if cross is not None:
            cross.set_processor(cross_proc)
    for p, flag in handle._frozen:
        p.requires_grad_(flag)


def _restore_checkpointing(saved) -> None:
    for module, flag, fn in saved:
        module.gradient_checkpointing = flag
        if fn is _MISSING:
            module.__dict__.pop("_gradient_checkpointing_func", None)
        else:
            module._gradient_checkpointing_func = fn


def get_handle(model: nn.Module) -> AdapterHandle:
    """The handle of the adapter injected into ``model``."""
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise AdapterError(f"this {type(model).__name__} has no memkit adapter injected")
    return handle


def _listed(value):
    return list(value) if isinstance(value, (tuple, list)) else value
