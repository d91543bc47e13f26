"""The stable state interface and its safetensors format."""

from .io import SCHEMA_VERSION
from .memory_state import MemoryState, state_dtype
from .stream_state import StreamState

__all__ = ["MemoryState", "StreamState", "SCHEMA_VERSION", "state_dtype"]
