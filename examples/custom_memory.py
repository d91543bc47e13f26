"""Adding a memory variant: one file and a registry entry.

This variant keeps sink + window attention and folds evicted tokens into a
plain (ungated) linear-attention state ``M <- M + k v^T``. Importing this file
registers it; then ``MemoryConfig(kind="hybrid_linear")`` builds it, and it
streams, saves and runs in parallel like the built-in variants.

    python examples/custom_memory.py
"""

import torch

import memkit
from memkit.memory.hybrid import HybridMemory


@memkit.register_memory("hybrid_linear")
class HybridLinearMemory(HybridMemory):
    gate_names = ()  # no per-token gates to carry in the window

    def _scan(self, M, k, v, gates):
        return M + torch.einsum("bnhk,bnhv->bhkv", k.to(M.dtype), v.to(M.dtype))


if __name__ == "__main__":
    cfg = memkit.MemoryConfig(kind="hybrid_linear", sink_frames=1, window_frames=2)
    mem = memkit.build_memory(cfg, num_heads=2, head_dim=16, dim=32, frame_tokens=8).double()
    torch.nn.init.normal_(mem.out_gate.weight, std=0.1)  # leave the zero init so the global memory shows
    q, k, v = (torch.randn(1, 10 * 8, 2, 16, dtype=torch.float64) for _ in range(3))
    x = torch.randn(1, 10 * 8, 32, dtype=torch.float64)
    state, outs = mem.init_state(1, dtype=torch.float64), []
    for c in range(0, 10, 2):
        y, state = mem.commit(state, *(t[:, c * 8:(c + 2) * 8] for t in (q, k, v, x)))
        outs.append(y)
    err = (torch.cat(outs, 1) - mem.parallel(q, k, v, x, chunk_frames=2)).abs().max().item()
    print(f"registered: {memkit.list_memories()}")
    print(f"hybrid_linear: streaming vs parallel max abs diff {err:.1e}, state {state.nbytes} bytes")
