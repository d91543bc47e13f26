"""Memory weights only: save and load the parameters of the memories injected into a model."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from memkit.errors import CheckpointError, StateFormatError
from memkit.state import io

from .base import Memory
from .config import MemoryConfig

log = logging.getLogger("memkit.memory")

# Config fields that choose kernels or checks, not what the weights mean.
RUNTIME_FIELDS = ("attention_backend", "scan_backend", "check_finite")
_INIT_FIELDS = ("halflife_frames",)  # only set the weights' initial values, which the file's weights replace


def memory_modules(model: nn.Module) -> dict[str, Memory]:
    """Every memkit memory inside ``model``, by module path (``blocks.0.attn1.memory``, ...)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Memory)}


def _describe(m: Memory) -> dict:
    return {"kind": m.kind, "config": m.cfg.to_dict(), "num_heads": m.num_heads, "head_dim": m.head_dim,
            "dim": m.dim, "params": {n: list(t.shape) for n, t in m.state_dict().items()}}


def save_memory(model: nn.Module, path: str | os.PathLike, *, record: dict | None = None) -> None:
    """Write the parameters of every memory in ``model`` (nothing of the backbone) to a safetensors file.

    record: what the memory was trained in, for whoever loads it (JSON-able): the backbone's identity, chunk
        frames, latent size, how the backbone was built. ``AdapterHandle.save_memory`` fills it in;
        :func:`memory_weights_info` reads it back."""
    mods = memory_modules(model)
    if not mods:
        raise CheckpointError("this model holds no memkit memories; inject one first (adapters.inject)")
    tensors = {f"{name}.{p}": t for name, m in mods.items() for p, t in m.state_dict().items()}
    import memkit

    meta = {"type": "MemoryWeights", "memkit_version": memkit.__version__,
            "layers": {name: _describe(m) for name, m in mods.items()}, "record": dict(record or {})}
    io.write(path, tensors, meta)


def memory_weights_info(path: str | os.PathLike) -> dict:
    """What a memory-weights file says besides its tensors: ``layers`` (per layer: kind, config, dims), ``config``
    (the memory config they share) and ``record`` (what it was trained in, see :func:`save_memory`; empty for
    files that record nothing)."""
    meta = io.read_meta(path, "memory weights")
    _check_type(path, meta)
    layers = meta.get("layers", {})
    config = next(iter(layers.values()), {}).get("config", {})  # every layer shares the injection's config
    return {"layers": layers, "config": config, "record": meta.get("record", {})}


def _read(path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = io.read(path, "memory weights")
    _check_type(path, meta)
    return tensors, meta


def _check_type(path, meta: dict) -> None:
    if meta.get("type") != "MemoryWeights":
        raise StateFormatError(f"{path} holds a memkit {meta.get('type')!r}, not memory weights")


def load_memory(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load memory weights saved by :func:`save_memory` into the memories of ``model``, in place.

    The file must hold the same layers with the same kind, head/width dims and global-key codes
    (``global_position`` where writes have places, ``global_time``). Other config differences
    (sink / window sizes, horizon, RoPE mode, eviction aggregate) are an error when ``strict``, a warning
    otherwise. Everything is checked before anything is written: on error the model is unchanged.
    """
    tensors, meta = _read(path)
    mods = memory_modules(model)
    if not mods:
        raise CheckpointError("this model holds no memkit memories; inject one first (adapters.inject)")
    saved = meta.get("layers", {})
    if set(saved) != set(mods):
        raise CheckpointError(
            f"{path} has memories for {len(saved)} layers ({_names(saved)}) but the model has {len(mods)} "
            f"({_names(mods)}): saved from another backbone or injection"
        )
    loads, diffs = {}, set()
    for name, m in mods.items():
        s = saved[name]
        here = _describe(m)
        for key in ("kind", "num_heads", "head_dim", "dim"):
            if s.get(key) != here[key]:
                raise CheckpointError(
                    f"{path} is for another memory: layer {name} has {key}={s.get(key)!r} in the file, "
                    f"{here[key]!r} in the model"
                )
        saved_codes, codes = type(m).key_codes(s.get("config", {})), type(m).key_codes(m.cfg.to_dict())
        for field, what in (("global_position", "place"), ("global_time", "time")):
            if saved_codes[field] != codes[field]:  # the global state's keys mean something else: no loading that
                raise CheckpointError(
                    f"{path} is for another memory: layer {name} writes its global keys with {what} codes "
                    f"{saved_codes[field]!r} in the file, {codes[field]!r} in the model; build the memory with "
                    f"MemoryConfig({field}={saved_codes[field]!r})"
                )
        diff = _config_diff(s.get("config", {}), m)
        if diff and strict:
            raise CheckpointError(f"{path} was saved with another memory config ({diff}); "
                                  f"pass strict=False to load the weights anyway")
        if diff:
            diffs.add(diff)
        prefix = f"{name}."
        sub = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        own = m.state_dict()
        if set(sub) != set(own):
            raise CheckpointError(f"{path}: layer {name} holds {sorted(sub)}, the model's memory {sorted(own)}")
        for p, t in sub.items():
            if t.shape != own[p].shape:
                raise CheckpointError(
                    f"{path}: {name}.{p} is {tuple(t.shape)} in the file, {tuple(own[p].shape)} in the model"
                )
        loads[name] = sub
    for diff in sorted(diffs):
        log.warning("%s was saved with another memory config (%s); loading the weights anyway", path, diff)
    with torch.no_grad():
        for name, sub in loads.items():
            for p, t in mods[name].state_dict(keep_vars=True).items():
                t.copy_(sub[p])


def _config_diff(saved: dict, mem: Memory) -> str:
    """The config fields that differ between a file and ``mem``. A field the file lacks (saved before the field
    existed) counts as its default; ``blocks`` counts only for memories that use it, and ``global_position`` is
    compared by :meth:`Memory.key_codes` before (what they mean where writes have places, and times)."""
    here, defaults = mem.cfg.to_dict(), MemoryConfig().to_dict()
    skip = {*RUNTIME_FIELDS, *_INIT_FIELDS, "global_position", "global_time",
            *(() if getattr(mem, "spatial", False) else ("blocks",))}
    keys = [k for k in here if k not in skip and saved.get(k, defaults[k]) != here[k]]
    return ", ".join(f"{k}: file {saved.get(k, defaults[k])!r}, model {here[k]!r}" for k in keys)


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
