"""``sink_window``: the first ``sink_frames`` frames kept forever plus a sliding window (the LongLive baseline)."""

from .local import LocalMemory
from .registry import register_memory


@register_memory("sink_window")
class SinkWindowMemory(LocalMemory):
    state_fields = ("sink_frames", "window_frames", "rope_mode")

    def __init__(self, cfg, **dims):
        super().__init__(cfg, **dims)
        self.sink_frames, self.window_frames = cfg.sink_frames, cfg.window_frames
