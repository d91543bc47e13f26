"""memkit: plug-in memories for autoregressive video diffusion transformers."""

from memkit import errors, ops
from memkit.errors import MemkitError
from memkit.memory import Memory, MemoryConfig, build_memory, list_memories, register_memory
from memkit.state import MemoryState, StreamState

__version__ = "0.1.0"

__all__ = [
    "MemoryConfig", "build_memory", "list_memories", "register_memory", "Memory",
    "MemoryState", "StreamState", "MemkitError", "errors", "ops", "__version__",
]
