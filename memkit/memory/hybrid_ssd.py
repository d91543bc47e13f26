"""``hybrid_ssd``: sink + window with a Mamba2-style SSD global state.

Evicted frames update ``M <- e^{dt A} M + dt k v^T`` write by write, with the per-frame step
``dt = softplus(W_dt x + b)`` computed from the token's block input when it entered the window, each of a
frame's ``W`` writes using ``dt / W``, and ``A = -exp(A_log)``. At init ``W_dt = 0`` and ``A = -1``: head ``h``
keeps ``2^(-n / half_life_h)`` of a frame after ``n`` later frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memkit.ops import ssd_scan
from memkit.state import state_dtype

from .hybrid import HybridMemory, inverse_softplus
from .registry import register_memory


@register_memory("hybrid_ssd")
class HybridSSDMemory(HybridMemory):
    gate_names = ("dt",)
    scan_kernels = ("mamba_ssm", "fla")

    def __init__(self, cfg, **dims):
        super().__init__(cfg, **dims)
        H = self.num_heads
        self.dt_proj = nn.Linear(self.dim, H)
        self.A_log = nn.Parameter(torch.zeros(H))
        with torch.no_grad():
            nn.init.zeros_(self.dt_proj.weight)
            self.dt_proj.bias.copy_(inverse_softplus(self.initial_rates()))

    def _token_gates(self, x):
        return {"dt": F.softplus(self.dt_proj(x)).to(state_dtype(x.dtype))}

    def _scan(self, M, k, v, gates):
        A = -self.A_log.exp()
        _, M = ssd_scan(
            v, gates["dt"], A.to(gates["dt"].dtype), k, k, initial_state=M,
            output_final_state=True, backend=self.cfg.scan_backend,
        )
        return M
