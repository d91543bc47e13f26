"""What every backbone adapter shares, one role per module; this module gathers their public names.

A backbone adapter (one file per family, e.g. ``wan.py``) says where a model's attention modules are, how its
self-attention projects q, k, v, where its RoPE tables live and how to call the model on a chunk. The rest:

* ``registry.py``: :class:`BackboneAdapter`, :class:`Dims`, ``register_backbone`` and which adapter fits a model;
* ``inject.py``: ``inject`` puts a memory beside each block's self-attention (a registered submodule, so its
  parameters train and save with the model), swaps the attention processors for memory-backed ones and returns
  an :class:`AdapterHandle`; ``remove`` restores the stock model;
* ``processor.py``: the processor (the diffusers seam) that routes each block's q, k, v through its memory;
* ``handle.py``: the handle runs the *stock* forward of the model on a latent chunk, in one of the modes
  ``read`` (denoising passes), ``commit`` (the context pass), ``recache`` (re-encode the held frames after a
  prompt switch), ``teacher`` (noisy chunks that each read the memory of the clean clip before them) or
  ``parallel`` (a whole clip, block-causal, when the model is called directly); its fast path
  (``fast_path.py``) and its input checks (``checks.py``) are parts of it;
* ``identity.py``: what streams, checkpoints and weights record of a backbone.
"""

from .handle import HANDLE_ATTR, AdapterHandle
from .identity import backbone_identity
from .inject import get_handle, inject, remove
from .processor import MEMORY_ATTR, MemorySelfAttention
from .registry import BackboneAdapter, Dims, backbone_for, list_backbones, register_backbone

__all__ = ["AdapterHandle", "BackboneAdapter", "Dims", "MemorySelfAttention", "register_backbone", "list_backbones",
           "backbone_for", "backbone_identity", "inject", "remove", "get_handle", "HANDLE_ATTR", "MEMORY_ATTR"]
