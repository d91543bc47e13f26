"""The handle of an injected model: it runs the *stock* forward of the model on a latent chunk while the
processors route each block's q, k, v through its memory (``read``, ``commit``, ``recache``, ``teacher``,
``parallel``), and it knows how to put the model back as it was."""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from memkit.errors import AdapterError, ConfigError, DTypeError, ShapeError, StateMismatchError
from memkit.memory import Memory, MemoryConfig, build_memory
from memkit.memory.local import PreparedChunk
from memkit.ops import TabulatedRope3D
from memkit.ops._checks import autocast_dtype, check_finite
from memkit.state import MemoryState, StreamState

from .checks import InputChecks
from .fast_path import FastPath
from .identity import backbone_identity
from .processor import MEMORY_ATTR, MemorySelfAttention, _Pass
from .registry import BackboneAdapter

log = logging.getLogger("memkit.adapters")
HANDLE_ATTR = "_memkit_handle"  # the model's attribute that holds its handle (a plain attribute, not a submodule)
_MISSING = object()


class AdapterHandle(FastPath, InputChecks):
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
        identity = backbone_identity(self.model)
        return {"backbone": self.backbone.name, "backbone_class": identity["class"],
                "backbone_config_hash": identity["config_hash"], "memory": self.cfg.to_dict(),
                "chunk_frames": self.chunk_frames, "latent_size": list(self.latent_size)}

    def save_memory(self, path, **record) -> None:
        """``memkit.save_memory`` of the injected memories, recording what they were trained in (the backbone's
        identity, the memory config, chunk frames and latent size: :meth:`describe`) and ``record``'s entries
        (how the backbone was built, say), so that ``memkit generate --memory-weights`` can rebuild their
        setting or refuse another."""
        from memkit.memory import save_memory

        save_memory(self.model, path, record={**self.describe(), **record})

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
        """Undo the injection (``adapters.remove(model)``): original processors back, memories deleted, frozen
        flags restored; the handle is spent."""
        if getattr(self.model, HANDLE_ATTR, None) is not self:
            raise AdapterError(f"this {type(self.model).__name__} has no memkit adapter injected")
        _restore(self.model, self)
        self.removed = True
        self._prompts.clear()
        self._chunk_cache = None
        object.__delattr__(self.model, HANDLE_ATTR)

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
