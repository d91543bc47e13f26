"""The registry of memory variants: one decorator per variant file."""

from __future__ import annotations

from memkit.errors import UnknownMemoryError

from .config import MemoryConfig

_REGISTRY: dict[str, type] = {}


def register_memory(name: str):
    """Class decorator: make a Memory subclass buildable as ``MemoryConfig(kind=name)``."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"memory {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_memories() -> list[str]:
    return sorted(_REGISTRY)


def memory_class(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMemoryError(f"unknown memory {name!r}; known: {', '.join(list_memories())}") from None


def build_memory(cfg: MemoryConfig, *, num_heads: int, head_dim: int, dim: int, frame_tokens: int,
                 frame_shape: tuple[int, int] | None = None):
    """Build the memory ``cfg.kind`` for one block of ``num_heads x head_dim`` heads, width ``dim``.

    frame_shape: the frame's token grid (rows, columns), ``rows * columns == frame_tokens``; memories that
    group tokens spatially use it (default: the most nearly square grid).
    """
    if not isinstance(cfg, MemoryConfig):
        raise TypeError(f"build_memory needs a MemoryConfig, got {type(cfg).__name__}")
    return memory_class(cfg.kind)(cfg, num_heads=num_heads, head_dim=head_dim, dim=dim, frame_tokens=frame_tokens,
                                  frame_shape=frame_shape)
