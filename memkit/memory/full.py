"""``full``: an unbounded causal KV cache (the Self-Forcing / CausVid baseline). Its state grows."""

from .local import LocalMemory
from .registry import register_memory


@register_memory("full")
class FullMemory(LocalMemory):
    """Every chunk attends to every committed frame and to itself."""

    def __init__(self, cfg, **dims):
        super().__init__(cfg, **dims)
        self.sink_frames, self.window_frames = 0, None
