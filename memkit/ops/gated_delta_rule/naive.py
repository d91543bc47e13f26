"""Token-by-token reference of the gated delta rule (the definition itself)."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False):
    """``S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - (e^{g_t} S_{t-1})^T k_t)^T``, ``o_t = S_t^T q_t``.

    q, k: (B, T, H, K); v: (B, T, H, V); g, beta: (B, T, H); state (B, H, K, V). With ``q=None`` only the
    final state is computed: ``(None, final_state)``.
    """
    dtype = compute_dtype(k, initial_state)
    k, v, g, beta = (t.to(dtype) for t in (k, v, g, beta))
    B, T, H, K = k.shape
    S = k.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        kt, vt, bt = k[:, t], v[:, t], beta[:, t]
        pred = torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, bt[..., None] * (vt - pred))
        if q is not None:
            outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(dtype)))
    if q is None:
        return None, S
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape).to(dtype)
    return o, (S if output_final_state else None)
