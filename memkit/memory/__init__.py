"""Memory variants, one file each, and their registry."""

from . import full, hybrid_blockwise, hybrid_gdn, hybrid_ssd, sink_window, window  # noqa: F401  (registers them)
from .base import Memory
from .config import MemoryConfig
from .local import LocalMemory, PreparedChunk
from .probe import retention
from .registry import build_memory, list_memories, memory_class, register_memory
from .weights import load_memory, memory_modules, memory_weights_info, save_memory

__all__ = ["Memory", "LocalMemory", "PreparedChunk", "MemoryConfig", "build_memory", "list_memories", "memory_class",
           "register_memory", "save_memory", "load_memory", "memory_weights_info", "memory_modules", "retention"]
