"""What one chunk of the loop costs on a Wan-shaped backbone: FLOPs (matmuls and attention apart) and bytes
moved, from the model's config, and the roofline time at the ceilings measured on one H100.

A chunk is ``passes`` forwards of ``chunk_frames`` latent frames (4 denoising reads + 1 commit). Counted per
forward: every linear layer of every block, self-attention over [held frames | chunk], cross-attention over the
prompt (its K/V are cached per prompt, so their projections are not counted), the global memory's read-out and
gates, the patch embedding and output projection, the time and text embedders. The scan that writes evicted
frames into a global state is not counted (a few ``head_dim x head_dim`` updates per layer and chunk), nor is
elementwise work (norms, RoPE, and the rotation of global-memory queries by their places' phases: 3 FLOPs per
query element). Bytes: every
weight read once per pass and every held key and value read once per pass (activations are not counted).
"""

from __future__ import annotations

#: measured on the H100 here (see docs/performance.md): bf16 matmul, SDPA (cuDNN) at these shapes, device copy
MATMUL_FLOPS_PER_S = 797e12
ATTENTION_FLOPS_PER_S = 520e12
BYTES_PER_S = 3.0e12


def held_frames(kind: str, sink_frames: int, window_frames: int, committed: int) -> int:
    """Frames of keys a chunk attends to besides itself after ``committed`` frames (``full`` holds them all)."""
    from memkit.memory.local import held_frame_indices

    return len(held_frame_indices(sink_frames, None if kind == "full" else window_frames, committed))


def pass_flops(config, latent_size: tuple[int, int], chunk_frames: int, held: int, kind: str, *,
               text_tokens: int, global_live: bool, commit: bool) -> dict[str, int]:
    """FLOPs of one forward of one chunk (batch 1) with ``held`` frames of keys held, by kind of work: ``linear``
    (the backbone's matmuls and convolutions), ``memory`` (the global memory's read-out and gate cache),
    ``self_attention`` and ``cross_attention``."""
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    C, ffn, layers = heads * head_dim, config.ffn_dim, config.num_layers
    pt, ph, pw = config.patch_size
    T = (latent_size[0] // ph) * (latent_size[1] // pw)
    N = chunk_frames // pt * T
    per_block = 2 * N * C * C * 4                  # self-attention q, k, v and output projections
    per_block += 2 * N * C * C * 2                 # cross-attention q and output projections
    per_block += 2 * N * C * ffn * 2               # feed-forward
    patch = pt * ph * pw
    linear = layers * per_block
    linear += 2 * N * config.in_channels * patch * C + 2 * N * C * config.out_channels * patch
    linear += 2 * (config.freq_dim * C + C * C + C * 6 * C)  # time embedder and its projection (one timestep)
    # the text embedder, twice per pass: in the model, and to look up the prompt's cached K/V before it
    linear += 2 * 2 * text_tokens * (config.text_dim * C + C * C)
    memory = 0
    if kind.startswith("hybrid") and global_live:
        memory += 2 * N * C * C + 2 * N * C * head_dim   # read-out gate W_g x, and q M per head
    if kind.startswith("hybrid") and commit:
        memory += 2 * N * C * heads * (1 if kind == "hybrid_ssd" else 2)  # the gate cache's projections
    return {"linear": linear, "memory": layers * memory,
            "self_attention": layers * 4 * N * (N + held * T) * C,
            "cross_attention": layers * 4 * N * text_tokens * C}


def chunk_costs(config, latent_size: tuple[int, int], chunk_frames: int, sink_frames: int, window_frames: int,
                kind: str, *, text_tokens: int = 512, dtype_bytes: int = 2, passes: int = 5,
                at_chunk: int = 10) -> dict:
    """FLOPs, bytes and roofline time of chunk ``at_chunk`` (1-based; later chunks cost the same for the bounded
    memories, more for ``full``)."""
    committed = (at_chunk - 1) * chunk_frames
    held = held_frames(kind, sink_frames, window_frames, committed)
    global_live = committed > sink_frames + window_frames
    matmul = attention = memory = 0
    for p in range(passes):
        f = pass_flops(config, latent_size, chunk_frames, held, kind, text_tokens=text_tokens,
                       global_live=global_live, commit=p == passes - 1)
        matmul += f["linear"] + f["memory"]
        memory += f["memory"]
        attention += f["self_attention"] + f["cross_attention"]
    C, ffn, layers = config.num_attention_heads * config.attention_head_dim, config.ffn_dim, config.num_layers
    weights = layers * (8 * C * C + 2 * C * ffn) * dtype_bytes
    _, ph, pw = config.patch_size
    T = (latent_size[0] // ph) * (latent_size[1] // pw)
    kv = layers * 2 * held * T * C * dtype_bytes
    moved = passes * (weights + kv)
    compute_s = matmul / MATMUL_FLOPS_PER_S + attention / ATTENTION_FLOPS_PER_S
    return {"key_frames": held + chunk_frames, "matmul_flops": matmul, "memory_flops": memory,
            "attention_flops": attention,
            "bytes": moved, "roofline_ms": 1e3 * max(compute_s, moved / BYTES_PER_S)}
