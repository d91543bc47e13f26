"""flash-linear-attention kernels for the gated delta rule (CUDA, optional)."""

from __future__ import annotations


def fla_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False, mode="chunk"):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    kernel = chunk_gated_delta_rule if mode == "chunk" else fused_recurrent_gated_delta_rule
    if initial_state is not None:
        initial_state = initial_state.float()
    # fla's state is (B, H, K, V) in float32, the memkit layout; scale=1 because the caller scales q.
    # Keywords throughout: fused_recurrent's 5th positional argument is gk, not beta.
    o, final = kernel(
        q=q, k=k, v=v, g=g.float(), beta=beta, scale=1.0,
        initial_state=initial_state, output_final_state=output_final_state,
    )
    return o, final
