"""``hybrid_gdn``: VideoSSM's hybrid memory with a gated delta rule global state.

Evicted frames update ``M`` write by write with ``M <- e^g M + beta k (v - (e^g M)^T k)^T``
where, per frame, ``beta = sigmoid(W_b x + b_b)`` and ``g = -exp(A) softplus(W_a x + b_a)``, computed
from the token's block input when it entered the window; each of a frame's ``W`` writes uses
``g / W`` and ``beta / W`` (see :mod:`memkit.memory.hybrid`).

At init ``W_a`` and ``W_b`` are zero, so the gates are the same for every token: head ``h`` keeps
``2^(-n / half_life_h)`` of a frame after ``n`` later frames (half-lives log-spaced over
``halflife_frames``), and writes with ``beta = 0.5`` per frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memkit.ops import gated_delta_rule_state
from memkit.state import state_dtype

from .hybrid import HybridMemory, inverse_softplus
from .registry import register_memory


@register_memory("hybrid_gdn")
class HybridGDNMemory(HybridMemory):
    gate_names = ("g", "beta")
    strength_gates = ("beta",)
    scan_kernels = ("fla",)
    write_uses_parameters = False  # the gates were computed when the tokens entered the window

    def __init__(self, cfg, **dims):
        super().__init__(cfg, **dims)
        H = self.num_heads
        self.a_proj = nn.Linear(self.dim, H)      # W_a, b
        self.b_proj = nn.Linear(self.dim, H)      # W_b
        self.A_log = nn.Parameter(torch.zeros(H))
        with torch.no_grad():  # data-independent gates at init: the retention of each head is its half-life
            nn.init.zeros_(self.a_proj.weight)
            nn.init.zeros_(self.b_proj.weight)
            nn.init.zeros_(self.b_proj.bias)
            self.a_proj.bias.copy_(inverse_softplus(self.initial_rates()))

    def _token_gates(self, x):
        sdt = state_dtype(x.dtype)
        g = -self.A_log.exp() * F.softplus(self.a_proj(x))
        return {"g": g.to(sdt), "beta": torch.sigmoid(self.b_proj(x)).to(sdt)}

    def _scan(self, M, k, v, gates):
        return gated_delta_rule_state(k, v, gates["g"], gates["beta"], initial_state=M, backend=self.cfg.scan_backend)
