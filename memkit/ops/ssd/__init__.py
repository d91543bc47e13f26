"""Mamba2 SSD scan: ``h_t = e^{dt_t A} h_{t-1} + dt_t B_t x_t^T``, ``y_t = h_t^T C_t``.

x ``(b, T, H, P)``, dt ``(b, T, H)`` (already positive, e.g. after softplus),
A ``(H,)`` (negative), B and C ``(b, T, H, N)``; state ``(b, H, N, P)``. The
skip term ``D x`` and any output gate are the caller's.
"""

from __future__ import annotations

from memkit.errors import ConfigError
from memkit.ops import backends
from memkit.ops._checks import check_same_device, check_same_dtype, check_shape
from memkit.ops.gated_delta_rule import check_linear_rnn_inputs
from memkit.ops.gated_delta_rule.naive import compute_dtype

from .chunk import chunk_ssd_torch
from .kernels import fla_ssd, mamba_ssd
from .naive import naive_recurrent_ssd

__all__ = ["ssd_scan", "naive_recurrent_ssd", "chunk_ssd_torch"]


def ssd_scan(x, dt, A, B, C, initial_state=None, output_final_state=False, backend="auto", mode="chunk"):
    """Run the SSD scan; returns ``(y, final_state)``. backend: "auto" | "torch" | "fla" | "mamba_ssm"."""
    if mode not in ("chunk", "recurrent"):
        raise ConfigError(f"ssd_scan: mode must be 'chunk' or 'recurrent', got {mode!r}")
    check_linear_rnn_inputs(C, B, x, {"dt": dt}, initial_state)
    check_shape("A", A, (x.shape[2],), "(H,)")
    check_same_dtype(A=A)
    check_same_device(x=x, A=A)
    if x.shape[1] == 0:
        h = initial_state if initial_state is not None else x.new_zeros(x.shape[0], x.shape[2], B.shape[3], x.shape[3])
        return x.new_zeros(x.shape), (h.to(compute_dtype(x, initial_state)) if output_final_state else None)
    chosen = backends.resolve("ssd_scan", backend, ("mamba_ssm", "fla"), x.device, x.dtype)
    if chosen == "fla":
        return fla_ssd(x, dt, A, B, C, initial_state, output_final_state)
    if chosen == "mamba_ssm":
        return mamba_ssd(x, dt, A, B, C, initial_state, output_final_state)
    run = chunk_ssd_torch if mode == "chunk" else naive_recurrent_ssd
    y, h = run(x, dt, A, B, C, initial_state, output_final_state)
    return y.to(x.dtype), h
