"""Token-by-token reference of the Mamba2 SSD scan (the definition itself)."""

from __future__ import annotations

import torch

from memkit.ops.gated_delta_rule.naive import compute_dtype


def naive_recurrent_ssd(x, dt, A, B, C, initial_state=None, output_final_state=False):
    """``h_t = e^{dt_t A} h_{t-1} + dt_t B_t x_t^T``, ``y_t = h_t^T C_t``.

    x: (b, T, H, P); dt: (b, T, H) (positive); A: (H,) (negative);
    B, C: (b, T, H, N); state h: (b, H, N, P).
    """
    dtype = compute_dtype(x, initial_state)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    b, T, H, P = x.shape
    h = x.new_zeros(b, H, B.shape[-1], P) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(T):
        h = h * (dt[:, t] * A).exp()[..., None, None]
        h = h + torch.einsum("bhn,bhp->bhnp", B[:, t], dt[:, t, :, None] * x[:, t])
        ys.append(torch.einsum("bhnp,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y, (h if output_final_state else None)
