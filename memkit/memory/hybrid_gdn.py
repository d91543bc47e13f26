"""``hybrid_gdn``: VideoSSM's hybrid memory with a gated delta rule global state.

Evicted tokens update ``M`` with ``M <- e^g M + beta k (v - (e^g M)^T k)^T`` where
``beta = sigmoid(W_b x)`` and ``g = -exp(A) softplus(W_a x + b)``, both computed
from the token's block input when it entered the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memkit.ops import gated_delta_rule
from memkit.state import state_dtype

from .hybrid import HybridMemory, inverse_softplus
from .registry import register_memory


@register_memory("hybrid_gdn")
class HybridGDNMemory(HybridMemory):
    gate_names = ("g", "beta")
    scan_kernels = ("fla",)

    def __init__(self, cfg, **dims):
        super().__init__(cfg, **dims)
        H = self.num_heads
        self.a_proj = nn.Linear(self.dim, H)      # W_a, b
        self.b_proj = nn.Linear(self.dim, H)      # W_b
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, H)))
        with torch.no_grad():  # softplus(b) spans the usual SSM step range [1e-3, 1e-1]
            self.a_proj.bias.copy_(inverse_softplus(torch.logspace(-3, -1, H)))

    def _token_gates(self, x):
        sdt = state_dtype(x.dtype)
        g = -self.A_log.exp() * F.softplus(self.a_proj(x))
        return {"g": g.to(sdt), "beta": torch.sigmoid(self.b_proj(x)).to(sdt)}

    def _scan(self, M, k, v, gates):
        _, M = gated_delta_rule(
            k, k, v, gates["g"], gates["beta"], initial_state=M,
            output_final_state=True, backend=self.cfg.scan_backend,
        )
        return M
