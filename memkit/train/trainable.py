"""What fine-tuning trains: the memories only (default), the memories plus LoRA on the backbone, or everything."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from memkit.errors import ConfigError
from memkit.memory import memory_modules

TRAINABLE = ("memory", "lora", "all")
LORA_ADAPTER = "memkit"
# The attention projections of each block (self and cross) and its feed-forward layers; never a memory's own layers.
DEFAULT_LORA_TARGETS = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"


@dataclass(frozen=True)
class LoraOptions:
    """LoRA on the backbone (``trainable="lora"``), through peft: rank, alpha, dropout and a regular expression
    of the module names to adapt (default: every block's attention projections)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = DEFAULT_LORA_TARGETS
    extra: dict = field(default_factory=dict)  # more peft.LoraConfig fields

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be a positive int, got {self.rank!r}")


def add_lora(model: nn.Module, options: LoraOptions) -> list[nn.Parameter]:
    """Add a LoRA adapter named ``memkit`` to a diffusers model (its peft integration); returns its parameters,
    kept float32 whatever the backbone's dtype."""
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is a core dependency
        raise ConfigError("trainable='lora' needs peft: pip install peft") from exc
    if not hasattr(model, "add_adapter"):
        raise ConfigError(f"{type(model).__name__} has no peft integration (add_adapter); use trainable='memory'")
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_modules, **options.extra)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}  # peft freezes all but its own
    try:
        model.add_adapter(config, adapter_name=LORA_ADAPTER)
    except ValueError as exc:
        raise ConfigError(f"LoRA could not be added (lora.target_modules={options.target_modules!r}): {exc}") from None
    for name, p in model.named_parameters():
        key = name.replace(".base_layer.", ".")
        if key in flags:
            p.requires_grad_(flags[key])
    params = [p for n, p in model.named_parameters() if f".{LORA_ADAPTER}." in n and "lora_" in n]
    if not params:
        raise ConfigError(f"lora.target_modules={options.target_modules!r} matched no module of the backbone")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of the ``memkit`` adapter, with peft's key names."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=LORA_ADAPTER)


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by role: ``memory_read`` (read-out gate, norm, router), ``memory_write`` (what the
    global state is written with: gates, decays), ``lora`` and ``backbone``."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"memory_read": [], "memory_write": [], "lora": [],
                                                         "backbone": []}
    in_memory = set()
    for path, mem in memory_modules(model).items():
        read = set(getattr(mem, "read_parameters", ()))
        for name, p in mem.named_parameters():
            in_memory.add(id(p))
            if p.requires_grad:
                groups["memory_read" if name.split(".")[0] in read else "memory_write"].append((f"{path}.{name}", p))
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in in_memory:
            groups["lora" if "lora_" in name else "backbone"].append((name, p))
    return groups


__all__ = ["TRAINABLE", "LoraOptions", "add_lora", "lora_state_dict", "parameter_groups", "DEFAULT_LORA_TARGETS"]
