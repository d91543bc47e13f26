"""Gated delta rule: ``S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - (e^{g_t} S_{t-1})^T k_t)^T``, ``o_t = S_t^T q_t``.

Layout follows fla: q, k ``(B, T, H, K)``, v ``(B, T, H, V)``, g (natural-log
decay, <= 0) and beta ``(B, T, H)``, state ``(B, H, K, V)``. No scale is
applied: the caller scales q.
"""

from __future__ import annotations

import torch

from memkit.errors import BackendUnavailableError, ConfigError
from memkit.ops import backends
from memkit.ops._checks import check_same_device, check_same_dtype, check_shape

from .chunk import chunk_gated_delta_rule_torch
from .naive import compute_dtype, naive_recurrent_gated_delta_rule

__all__ = ["gated_delta_rule", "gated_delta_rule_state", "naive_recurrent_gated_delta_rule",
           "chunk_gated_delta_rule_torch"]

#: up to this many steps the state-only scan runs the recurrence itself (a few small kernels per step beat the
#: chunked form's triangular solves for the handful of writes a chunk's evicted frames make)
RECURRENT_STATE_STEPS = 16


def check_linear_rnn_inputs(q, k, v, gates: dict, initial_state):
    check_shape("q", q, (None, None, None, None), "(B, T, H, K)")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), "(B, T, H, K)")
    check_shape("v", v, (B, T, H, None), "(B, T, H, V)")
    for gname, gate in gates.items():
        check_shape(gname, gate, (B, T, H), "(B, T, H)")
    check_same_dtype(q=q, k=k, v=v)
    for gname, gate in gates.items():
        check_same_dtype(**{gname: gate})
    check_same_device(q=q, k=k, v=v, initial_state=initial_state, **gates)
    if initial_state is not None:
        check_shape("initial_state", initial_state, (B, H, K, v.shape[-1]), "(B, H, K, V)")
        check_same_dtype(initial_state=initial_state)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False, backend="auto", mode="chunk"):
    """Run the gated delta rule; returns ``(o, final_state)`` (``final_state`` None unless asked).

    backend: "auto" | "torch" | "fla". mode: "chunk" (parallel within chunks)
    or "recurrent" (token by token); both compute the same recurrence.
    """
    if mode not in ("chunk", "recurrent"):
        raise ConfigError(f"gated_delta_rule: mode must be 'chunk' or 'recurrent', got {mode!r}")
    check_linear_rnn_inputs(q, k, v, {"g": g, "beta": beta}, initial_state)
    if q.shape[1] == 0:
        S = initial_state if initial_state is not None else q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        return v.new_zeros(v.shape), (S.to(compute_dtype(q, initial_state)) if output_final_state else None)
    kernels = ("fla",)
    trains = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)
    )
    if mode == "recurrent" and trains:
        # fla's fused recurrent kernel has no backward pass.
        if backend == "fla":
            raise BackendUnavailableError(
                "gated_delta_rule: fla's recurrent kernel has no backward; use mode='chunk' to train with fla"
            )
        kernels = ()
    chosen = backends.resolve("gated_delta_rule", backend, kernels, q.device, q.dtype)
    if chosen == "fla":
        from .fla import fla_gated_delta_rule

        return fla_gated_delta_rule(q, k, v, g, beta, initial_state, output_final_state, mode)
    if mode == "chunk":
        o, S = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state, output_final_state)
    else:
        o, S = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state, output_final_state)
    return o.to(v.dtype), S


def gated_delta_rule_state(k, v, g, beta, initial_state=None, backend="auto"):
    """Only the final state of :func:`gated_delta_rule` (for writes into a memory, whose outputs nobody reads).

    Same layout and backends; the PyTorch path skips the outputs' work. fla has no state-only entry point, so
    its kernel runs with ``q = k`` and the outputs are dropped.
    """
    check_linear_rnn_inputs(k, k, v, {"g": g, "beta": beta}, initial_state)
    if k.shape[1] == 0:
        S = initial_state if initial_state is not None else k.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3])
        return S.to(compute_dtype(k, initial_state))
    chosen = backends.resolve("gated_delta_rule", backend, ("fla",), k.device, k.dtype)
    if chosen == "fla":
        from .fla import fla_gated_delta_rule

        return fla_gated_delta_rule(k, k, v, g, beta, initial_state, True, "chunk")[1]
    if k.shape[1] <= RECURRENT_STATE_STEPS:
        return naive_recurrent_gated_delta_rule(None, k, v, g, beta, initial_state, True)[1]
    return chunk_gated_delta_rule_torch(None, k, v, g, beta, initial_state, True)[1]
