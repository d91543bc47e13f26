"""Random inputs for memory and op tests."""

import torch

import memkit
from memkit.ops import Rope3D

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_memory(kind, heads=2, head_dim=8, dim=12, frame_tokens=4, dtype=torch.float64, seed=0, perturb=True,
                frame_shape=None, **cfg):
    torch.manual_seed(seed)
    mem = memkit.build_memory(
        memkit.MemoryConfig(kind=kind, **cfg), num_heads=heads, head_dim=head_dim, dim=dim, frame_tokens=frame_tokens,
        frame_shape=frame_shape,
    ).to(dtype)
    if perturb:
        perturb_params(mem, seed)
    return mem


def perturb_params(mem, seed=0):
    """Move every parameter away from its init (so hybrid global read-outs are non-zero)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in mem.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_clip(mem, batch=2, frames=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = frames * mem.frame_tokens
    shape = (batch, N, mem.num_heads, mem.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    x = torch.randn(batch, N, mem.dim, generator=gen, dtype=dtype)
    return q, k, v, x


def stream(mem, q, k, v, x, chunk_frames, rope=None, state=None):
    """Commit a clip chunk by chunk; returns (concatenated outputs, final state, states after each chunk).

    ``chunk_frames`` is a chunk length in frames, or a list of chunk lengths covering the clip.
    """
    T = mem.frame_tokens
    frames = q.shape[1] // T
    sizes = chunk_frames if isinstance(chunk_frames, list) else [chunk_frames] * -(-frames // chunk_frames)
    state = state or mem.init_state(q.shape[0], device=q.device, dtype=q.dtype)
    outs, states, c0 = [], [], 0
    for size in sizes:
        sl = slice(c0 * T, min(frames, c0 + size) * T)
        y, state = mem.commit(state, q[:, sl], k[:, sl], v[:, sl], x[:, sl], rope=rope)
        outs.append(y)
        states.append(state)
        c0 += size
    return torch.cat(outs, dim=1), state, states


def chunk_starts(sizes):
    """[(first frame, end frame)] of consecutive chunks of the given sizes."""
    out, c0 = [], 0
    for size in sizes:
        out.append((c0, c0 + size))
        c0 += size
    return out


def rope_for(mem, height=2):
    return Rope3D(mem.head_dim, height, mem.frame_tokens // height)

#: A limit for a test's subprocess: it stops a hung command, not a slow one. A loaded 2-core machine runs the
#: demo or a training run several times slower than an idle one (the demo took 308 s against 300), so the limit is
#: far above any measured run; CI stops the whole suite at 90 minutes anyway.
SUBPROCESS_LIMIT = 1800
