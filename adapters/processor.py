"""The seam into someone else's model: the self-attention processor an injected block runs (the diffusers
attention-processor pattern), and what it needs of the pass in progress."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memkit.memory.local import PreparedChunk
from memkit.state import MemoryState

MEMORY_ATTR = "memory"  # the attribute of an injected self-attention module that holds its memory


@dataclass
class _Pass:
    """What the processors of one forward need: the mode, the layers' states, and where to put new ones."""

    mode: str  # "read" | "commit" | "recache" | "teacher"
    states: tuple[MemoryState, ...]
    prompt_key: int | None
    chunk_ids: torch.Tensor | None = None
    new_states: list = field(default_factory=list)
    prepared: list[PreparedChunk] | None = None  # the fast path's per-layer chunks (read and commit passes)


class MemorySelfAttention:
    """The self-attention processor of an injected block: the backbone's projections around a memory."""

    _attention_backend = None  # diffusers' set_attention_backend looks for these; the memory picks its kernels
    _parallel_config = None

    def __init__(self, handle, index: int):  # handle: the AdapterHandle
        self.handle, self.index = handle, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        # The memory decides what each token attends to, so a causal mask the backbone builds itself
        # (SkyReels-V2's num_frame_per_block) and its rotary tables for frames 0.. are not used here.
        backbone = self.handle.backbone
        q, k, v = backbone.self_attention_qkv(attn, hidden_states)
        mem = getattr(attn, MEMORY_ATTR)
        chunk = mem._prepared
        if chunk is not None:  # the fast path of a chunk loop (AdapterHandle.read / commit)
            mix = mem.commit_prepared if chunk.commit else mem.read_prepared
            y = mix(chunk, q, k, v, hidden_states)
        else:
            y = self.handle._mix(self.index, mem, q, k, v, hidden_states)
        return backbone.self_attention_out(attn, y, like=q)
