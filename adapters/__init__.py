"""Backbone adapters: put a memkit memory into a video DiT you did not write, drive it chunk by chunk,
and take it out again (the PEFT pattern: inject in place, memory-only weights, clean removal).

```python
import adapters, memkit
h = adapters.inject(model, memkit.MemoryConfig(kind="hybrid_gdn"), chunk_frames=3)
state = h.init_state(batch=1)
pred = h.read(state, latents, timestep, prompt_embeds)            # a denoising pass
pred, state = h.commit(state, latents, timestep, prompt_embeds)   # the context pass
adapters.remove(model)                                            # the stock model again
```
One file per backbone family; the shared machinery is one role per module (``base.py`` lists them).
"""

from . import skyreels_v2, wan  # noqa: F401  (registers the backbones)
from .handle import AdapterHandle
from .inject import get_handle, inject, remove
from .registry import BackboneAdapter, Dims, list_backbones, register_backbone
from .skyreels_v2 import random_skyreels_v2
from .wan import WAN_CONFIGS, random_wan

__all__ = [
    "inject", "remove", "get_handle", "AdapterHandle", "BackboneAdapter", "Dims", "register_backbone",
    "list_backbones", "random_wan", "random_skyreels_v2", "WAN_CONFIGS", "load_wan_checkpoint",
]


def __getattr__(name: str):
    if name == "load_wan_checkpoint":
        from .wan_checkpoint import load_wan_checkpoint

        return load_wan_checkpoint
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
