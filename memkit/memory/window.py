"""``window``: attention over the last ``window_frames`` committed frames and the chunk."""

from .local import LocalMemory
from .registry import register_memory


@register_memory("window")
class WindowMemory(LocalMemory):
    state_fields = ("window_frames", "rope_mode")

    def __init__(self, cfg, **dims):
        super().__init__(cfg, **dims)
        self.sink_frames, self.window_frames = 0, cfg.window_frames
