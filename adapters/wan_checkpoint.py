"""Load Wan2.1 checkpoints in the original Wan-AI key layout into diffusers' Wan transformers.

Covers the weights released by Wan-AI (one file or a directory of shards) and the training checkpoints of
Self-Forcing, CausVid and LongLive, which wrap the Wan model as ``generator.model`` and may carry DDP, FSDP,
activation-checkpointing or torch.compile prefixes. Key names are translated by diffusers' own single-file
converter; this module picks the state dict out of its container, strips wrapper prefixes, checks that the file
fits the model and only then copies the values into the model's existing parameters.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import SafetensorError
from safetensors.torch import load_file

from memkit.errors import CheckpointError
from memkit.memory import memory_modules

#: Keys under which training checkpoints keep the model's state dict, in order of preference.
CONTAINER_KEYS = ("generator_ema", "generator", "model", "state_dict", "module")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
SUPPORTED_MODELS = (WanTransformer3DModel, SkyReelsV2Transformer3DModel)

# Path components that wrappers insert anywhere in a key: DDP/DeepSpeed, FSDP, activation checkpointing,
# torch.compile, peft (whose `base_layer` holds the un-adapted weight of a LoRA-wrapped linear).
_WRAPPER_PARTS = frozenset({"module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer"})
# Stripped only at the front: a `.model.` further in could be a real module name.
_LEADING_PREFIXES = (("model", "diffusion_model"), ("base_model", "model"), ("model",), ("diffusion_model",))
# Original names the diffusers converter leaves untouched, applied after it.
_EXTRA_RENAMES = (
    ("fps_projection.0.", "fps_projection.net.0.proj."),  # SkyReels-V2
    ("fps_projection.2.", "fps_projection.net.2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),  # Wan2.1 FLF2V
)
_DIFFUSERS_MARKERS = ("condition_embedder.", ".attn1.", ".attn2.", ".ffn.net.")
_ORIGINAL_MARKERS = (".self_attn.", ".cross_attn.", "head.head.", "text_embedding.", "time_embedding.")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_LIST_LIMIT = 8


@dataclass
class WanLoadReport:
    """What :func:`load_wan_checkpoint` loaded. Key names in ``missing`` are the model's (diffusers) names; those
    in ``unexpected`` and ``skipped_lora`` are the file's, with wrapper prefixes stripped."""

    path: str
    container_key: str | None
    key_naming: str
    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    skipped_lora: tuple[str, ...] = ()
    dtype_conversions: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        container = f"container {self.container_key!r}" if self.container_key else "flat state dict"
        lines = [
            f"Wan checkpoint {self.path} ({container}, {self.key_naming} key names)",
            f"  loaded {self.loaded} tensors",
            f"  missing from the file ({len(self.missing)}): {_short_list(self.missing)}",
            f"  unexpected in the file ({len(self.unexpected)}): {_short_list(self.unexpected)}",
        ]
        if self.skipped_lora:
            lines.append(
                f"  skipped LoRA tensors ({len(self.skipped_lora)}): {_short_list(self.skipped_lora)} -- not applied; "
                "LongLive ships its LoRA separately: load the base weights here, then apply the LoRA with peft"
            )
        if self.dtype_conversions:
            casts = ", ".join(f"{cast} x{count}" for cast, count in sorted(self.dtype_conversions.items()))
            lines.append(f"  dtype conversions: {casts}")
        return "\n".join(lines)


def load_wan_checkpoint(
    model: torch.nn.Module, path: str | os.PathLike, *, key: str | None = None, strict: bool = False
) -> WanLoadReport:
    """Copy an original-format Wan checkpoint into ``model`` in place and report what was loaded.

    ``path`` is a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` file (read with ``weights_only=True``; files
    that need full unpickling are refused) or a directory whose ``*.safetensors`` shards are all loaded. A state
    dict nested in a training checkpoint is found under one of :data:`CONTAINER_KEYS` (``generator_ema`` first);
    ``key`` picks the container instead. Files already in diffusers naming load as they are.

    Raises CheckpointError, leaving the model untouched, when the file is unreadable, holds no Wan transformer,
    was saved from another Wan size (shapes or block count differ), or, with ``strict``, when any model key is
    missing from the file or any file key has no place in the model. LoRA tensors are skipped and reported.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, SUPPORTED_MODELS):
        names = " or ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise CheckpointError(f"load_wan_checkpoint loads into a diffusers {names}, got {type(model).__name__}")
    path = Path(path)
    raw, container_key = _select_state_dict(_read(path), key, path)
    state, lora = _strip_wrappers_and_lora(raw, path)
    converted, sources, naming = _to_diffusers_names(state)
    # Memories injected by memkit are not part of a Wan checkpoint: they load with memkit.load_memory.
    memories = tuple(f"{name}." for name in memory_modules(model))
    targets = {k: t for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(memories)}
    _check_fits(model, converted, sources, targets, raw, lora, path)

    missing = tuple(name for name in targets if name not in converted)
    unexpected = tuple(sources[name] for name in converted if name not in targets)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not cover the model exactly (strict=True): "
            f"{len(missing)} model keys missing from the file: {_short_list(missing)}; "
            f"{len(unexpected)} file keys unexpected: {_short_list(unexpected)}"
        )
    matched = [name for name in converted if name in targets]
    on_meta = [name for name in matched if targets[name].is_meta]
    if on_meta:
        raise CheckpointError(
            f"the model has {len(on_meta)} tensors on the meta device (e.g. {on_meta[0]}); "
            "materialize it (model.to_empty(device=...)) before loading weights into it"
        )
    conversions = _copy_into(targets, converted, matched)
    return WanLoadReport(
        path=str(path),
        container_key=container_key,
        key_naming=naming,
        loaded=len(matched),
        missing=missing,
        unexpected=unexpected,
        skipped_lora=tuple(lora),
        dtype_conversions=conversions,
    )


def _read(path: Path) -> object:
    if path.is_dir():
        return _read_shard_directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Wan checkpoint at {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint suffix {suffix!r}; expected {SAFETENSORS_SUFFIX}, {', '.join(TORCH_SUFFIXES)} "
        "or a directory of .safetensors shards"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "weights only" not in message.lower():
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {message}") from None
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if culprit:
            why = f"it references {culprit.group(1)}, which only full unpickling could restore"
        else:
            why = (
                f"the weights_only reader rejected it ({_unpickler_reason(message)}): either it is not a torch "
                "checkpoint or it holds objects that only full unpickling could restore"
            )
        raise CheckpointError(
            f"refuses to unpickle {path}: {why}, and full unpickling can run arbitrary code. "
            "Re-save just the tensors (torch.save(model.state_dict(), ...) or safetensors) and load that."
        ) from None
    except Exception as exc:  # torch.load fails with many types (RuntimeError, KeyError, EOFError) on bad files
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None


def _unpickler_reason(message: str) -> str:
    detail = message.partition("WeightsUnpickler error:")[2]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return lines[0] if lines else "no reason given"


def _read_shard_directory(directory: Path) -> dict[str, torch.Tensor]:
    for index in sorted(directory.glob(f"*{SAFETENSORS_SUFFIX}.index.json")):
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a readable shard index: {exc}") from None
        absent = sorted(name for name in listed if not (directory / name).is_file())
        if absent:
            raise CheckpointError(f"{directory} is incomplete: {index.name} lists shards that are absent: {absent}")
    shards = sorted(directory.glob(f"*{SAFETENSORS_SUFFIX}"))
    if not shards:
        raise CheckpointError(f"{directory} holds no *{SAFETENSORS_SUFFIX} shards")
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = _read_safetensors(shard)
        if not any(_looks_like_wan(name) for name in tensors):
            raise CheckpointError(
                f"{shard} holds no Wan transformer weights (its tensors: {_short_list(list(tensors))}); a folder "
                f"given as a checkpoint must hold the *{SAFETENSORS_SUFFIX} shards of one Wan-format model"
            )
        for name, tensor in tensors.items():
            if name in merged:
                raise CheckpointError(f"{name!r} is in more than one shard of {directory} (again in {shard.name})")
            merged[name] = tensor
    return merged


def _looks_like_wan(name: str) -> bool:
    return "blocks." in name or any(marker in name for marker in (*_ORIGINAL_MARKERS, *_DIFFUSERS_MARKERS))


def _select_state_dict(obj: object, key: str | None, path: Path) -> tuple[Mapping, str | None]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    chosen: list[str] = []
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{path} has no container {key!r}; its top-level keys are {_short_list(list(obj))}")
        obj = obj[key]
        chosen.append(key)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: {key!r} holds a {type(obj).__name__}, not a state dict")
    # Containers can nest (a DeepSpeed `module` inside a Lightning `state_dict`); descend until tensors appear.
    while True:
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            break
        obj = obj[inner]
        chosen.append(inner)
    if not any(isinstance(value, torch.Tensor) for value in obj.values()):
        where = f" under {'/'.join(chosen)!r}" if chosen else ""
        raise CheckpointError(
            f"{path} holds no tensors{where} and none of the known containers {CONTAINER_KEYS}; "
            f"its keys are {_short_list(list(obj))} -- pass key= to pick the one holding the model"
        )
    return obj, "/".join(chosen) or None


def _strip_wrappers_and_lora(raw: Mapping, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    state: dict[str, torch.Tensor] = {}
    lora: list[str] = []
    origin: dict[str, str] = {}
    for raw_name, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue  # training metadata (step counters, configs) stored beside the tensors
        name = _strip_wrapper_prefixes(str(raw_name))
        if "lora_" in name:
            lora.append(name)
            continue
        if name in state:
            raise CheckpointError(
                f"{path}: {origin[name]!r} and {raw_name!r} both name {name!r} once wrapper prefixes are stripped"
            )
        state[name] = value
        origin[name] = str(raw_name)
    return state, lora


def _strip_wrapper_prefixes(name: str) -> str:
    """``name`` without the components wrappers add (``module.``, FSDP, checkpointing, compile, peft) and without
    leading ``model.`` / ``model.diffusion_model.`` prefixes."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_PREFIXES:
            if len(parts) > len(prefix) and tuple(parts[: len(prefix)]) == prefix:
                parts = parts[len(prefix) :]
                stripped = True
                break
    return ".".join(parts)


def _to_diffusers_names(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The state under diffusers names, the file name each came from, and which naming the file used."""
    names = list(state)
    is_diffusers = any(m in n for n in names for m in _DIFFUSERS_MARKERS)
    is_original = any(m in n for n in names for m in _ORIGINAL_MARKERS)
    if is_diffusers and not is_original:
        # The converter would swap norm2/norm3 a second time in names that are already converted.
        return dict(state), {name: name for name in names}, "diffusers"
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name, tensor in state.items():
        # One key per call keeps each result tied to its source name (for reporting); the converter's renames are
        # per key anyway. It mutates what it is given, hence the fresh dict.
        for new_name, new_tensor in convert_wan_transformer_to_diffusers({name: tensor}).items():
            for old, new in _EXTRA_RENAMES:
                if new_name.startswith(old):
                    new_name = new + new_name[len(old) :]
            converted[new_name] = new_tensor
            sources[new_name] = name
    return converted, sources, "original"


def _check_fits(
    model: torch.nn.Module,
    converted: dict[str, torch.Tensor],
    sources: dict[str, str],
    targets: dict[str, torch.Tensor],
    raw: Mapping,
    lora: list[str],
    path: Path,
) -> None:
    if not converted and lora:
        raise CheckpointError(
            f"{path} holds only LoRA tensors ({len(lora)}, e.g. {lora[0]!r}); LongLive ships its LoRA separately "
            "from the base weights: load the base checkpoint with load_wan_checkpoint, then apply the LoRA with peft"
        )
    if not any(name.startswith("blocks.") and name in targets for name in converted):
        raise CheckpointError(
            f"{path} is not a Wan-format checkpoint: none of its tensors is a Wan transformer block weight. "
            f"Its first keys: {_short_list([str(k) for k in raw], limit=5)}"
        )
    mismatched = [name for name in converted if name in targets and converted[name].shape != targets[name].shape]
    if mismatched:
        name = mismatched[0]
        label = repr(name) if sources[name] == name else f"{sources[name]!r} (model key {name!r})"
        raise CheckpointError(
            f"{path} was saved from a different Wan architecture: {label} has shape "
            f"{tuple(converted[name].shape)} in the file but {tuple(targets[name].shape)} in the model "
            f"({len(mismatched)} tensors differ in shape). File: {_file_dims(converted, model)}; "
            f"model: {_model_dims(model)}"
        )
    file_blocks = _block_count(converted)
    model_blocks = _block_count(targets)
    if file_blocks != model_blocks:
        raise CheckpointError(
            f"{path} was saved from a different Wan architecture: it has {file_blocks} transformer blocks, the model "
            f"{model_blocks}. File: {_file_dims(converted, model)}; model: {_model_dims(model)}"
        )


def _block_count(state: Mapping[str, object]) -> int:
    indices = {int(match.group(1)) for name in state if (match := _BLOCK_INDEX.match(name))}
    return max(indices) + 1 if indices else 0


def _file_dims(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> str:
    def size(name: str, axis: int) -> int | str:
        tensor = converted.get(name)
        return tensor.shape[axis] if tensor is not None and tensor.dim() > axis else "?"

    dim = size("patch_embedding.weight", 0)
    head_dim = model.config.attention_head_dim
    heads = f"{dim // head_dim} at head dim {head_dim}" if isinstance(dim, int) and dim % head_dim == 0 else "?"
    return (
        f"dim={dim}, blocks={_block_count(converted)}, heads={heads}, "
        f"ffn_dim={size('blocks.0.ffn.net.0.proj.weight', 0)}, in_channels={size('patch_embedding.weight', 1)}, "
        f"text_dim={size('condition_embedder.text_embedder.linear_1.weight', 1)}"
    )


def _model_dims(model: torch.nn.Module) -> str:
    c = model.config
    return (
        f"dim={c.num_attention_heads * c.attention_head_dim}, blocks={c.num_layers}, heads={c.num_attention_heads}, "
        f"ffn_dim={c.ffn_dim}, in_channels={c.in_channels}, text_dim={c.text_dim}"
    )


def _copy_into(
    targets: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], names: list[str]
) -> dict[str, int]:
    casts: Counter[str] = Counter()
    with torch.no_grad():
        for name in names:
            target, value = targets[name], converted[name]
            if value.dtype != target.dtype:
                casts[f"{_dtype_name(value.dtype)} -> {_dtype_name(target.dtype)}"] += 1
            target.copy_(value)  # casts to the parameter's dtype and moves to its device
    return dict(casts)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short_list(names: list[str] | tuple[str, ...], limit: int = _LIST_LIMIT) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
