"""``hybrid_ssd``: sink + window with a Mamba2-style SSD global state.

Evicted tokens update ``M <- e^{dt A} M + dt k v^T`` with ``dt = softplus(W_dt x + b)``
computed from the token's block input when it entered the window, ``A = -exp(A_log)``.
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
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, H)))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus(torch.logspace(-3, -1, H)))

    def _token_gates(self, x):
        return {"dt": F.softplus(self.dt_proj(x)).to(state_dtype(x.dtype))}

    def _scan(self, M, k, v, gates):
        A = -self.A_log.exp()
        _, M = ssd_scan(
            v, gates["dt"], A.to(gates["dt"].dtype), k, k, initial_state=M,
            output_final_state=True, backend=self.cfg.scan_backend,
        )
        return M
