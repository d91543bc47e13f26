"""The memory API on one block: stream a clip chunk by chunk, save and resume, compare with parallel.

    python examples/stream_memory.py
"""

import tempfile
from pathlib import Path

import torch

import memkit

B, H, D, C = 1, 4, 32, 128            # batch, heads, head dim, block width
HEIGHT, WIDTH = 4, 6                   # latent tokens per frame after patchify
T, F, FRAMES = HEIGHT * WIDTH, 3, 30   # tokens per frame, frames per chunk, clip length

cfg = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=3, window_frames=6, rope_mode="relative")
mem = memkit.build_memory(cfg, num_heads=H, head_dim=D, dim=C, frame_tokens=T)
rope = memkit.ops.Rope3D(head_dim=D, height=HEIGHT, width=WIDTH)  # the memory rotates q, k itself

torch.manual_seed(0)
q, k, v = (torch.randn(B, FRAMES * T, H, D) for _ in range(3))
x = torch.randn(B, FRAMES * T, C)


def chunk(c):
    sl = slice(c * F * T, (c + 1) * F * T)
    return q[:, sl], k[:, sl], v[:, sl], x[:, sl]


state = mem.init_state(batch=B)
outputs = []
with torch.no_grad():
    for c in range(FRAMES // F):
        for _ in range(4):                       # denoising passes only read
            mem.read(state, *chunk(c), rope=rope)
        y, state = mem.commit(state, *chunk(c), rope=rope)   # the context pass commits
        outputs.append(y)
        if c == 4:
            path = Path(tempfile.mkdtemp()) / "layer0.safetensors"
            state.save(path)
    print(f"streamed {state.frames} frames; state {state.nbytes / 1024:.1f} KiB (constant while streaming)")

    resumed = memkit.MemoryState.load(path, expect_fingerprint=mem.fingerprint)
    y_resumed, _ = mem.commit(resumed, *chunk(5), rope=rope)
    print("resumed from chunk 5 bit-identically:", torch.equal(y_resumed, outputs[5]))

    y_parallel = mem.parallel(q, k, v, x, chunk_frames=F, rope=rope)
    print(f"streaming vs parallel max abs diff: {(torch.cat(outputs, 1) - y_parallel).abs().max():.2e}")
