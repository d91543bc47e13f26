"""memkit: plug-in memories for autoregressive video diffusion transformers."""

from memkit import errors, ops
from memkit.errors import MemkitError
from memkit.memory import (
    Memory,
    MemoryConfig,
    build_memory,
    list_memories,
    load_memory,
    register_memory,
    save_memory,
)
from memkit.state import MemoryState, StreamState

__version__ = "0.1.0"

__all__ = [
    "MemoryConfig", "build_memory", "list_memories", "register_memory", "Memory", "save_memory", "load_memory",
    "MemoryState", "StreamState", "StreamingGenerator", "MemkitError", "errors", "ops", "__version__",
]


def __getattr__(name: str):
    # The generation layer pulls in diffusers; load it only when asked for.
    if name == "StreamingGenerator":
        from memkit.rollout import StreamingGenerator

        return StreamingGenerator
    raise AttributeError(f"module 'memkit' has no attribute {name!r}")
