"""Chunked == recurrent for the gated delta rule and the SSD scan, initial and final states included."""

import pytest
import torch
from helpers import TOL, rel_err
from hypothesis import given
from hypothesis import strategies as st

from memkit.ops import gated_delta_rule, ssd_scan
from memkit.ops.gated_delta_rule import chunk_gated_delta_rule_torch, naive_recurrent_gated_delta_rule
from memkit.ops.ssd import chunk_ssd_torch, naive_recurrent_ssd

dims = st.fixed_dictionaries({
    "B": st.integers(1, 2), "T": st.integers(1, 80), "H": st.integers(1, 3),
    "K": st.integers(1, 9), "V": st.integers(1, 9), "chunk": st.sampled_from([1, 4, 16, 64]),
    "decay": st.floats(0.0, 3.0), "seed": st.integers(0, 2**16), "init": st.booleans(),
    "dtype": st.sampled_from([torch.float64, torch.float32]),
})


def gdr_inputs(d):
    gen = torch.Generator().manual_seed(d["seed"])
    B, T, H, K, V, dt = d["B"], d["T"], d["H"], d["K"], d["V"], d["dtype"]

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dt)

    k = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)  # as the hybrid memory feeds it
    g = -d["decay"] * torch.rand(B, T, H, generator=gen, dtype=dt)
    beta = torch.rand(B, T, H, generator=gen, dtype=dt)
    S0 = r(B, H, K, V) if d["init"] else None
    return r(B, T, H, K), k, r(B, T, H, V), g, beta, S0


@given(dims)
def test_gated_delta_rule_chunk_equals_recurrent(d):
    q, k, v, g, beta, S0 = gdr_inputs(d)
    o_ref, S_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, S0, output_final_state=True)
    o, S = chunk_gated_delta_rule_torch(q, k, v, g, beta, S0, output_final_state=True, chunk_size=d["chunk"])
    assert rel_err(o, o_ref) < TOL[d["dtype"]]
    assert rel_err(S, S_ref) < TOL[d["dtype"]]


@given(dims)
def test_ssd_chunk_equals_recurrent(d):
    gen = torch.Generator().manual_seed(d["seed"])
    B, T, H, K, V, dt = d["B"], d["T"], d["H"], d["K"], d["V"], d["dtype"]
    x, Bm, C = (torch.randn(*s, generator=gen, dtype=dt) for s in ((B, T, H, V), (B, T, H, K), (B, T, H, K)))
    step = torch.rand(B, T, H, generator=gen, dtype=dt)
    A = -d["decay"] * torch.rand(H, generator=gen, dtype=dt)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=dt) if d["init"] else None
    y_ref, h_ref = naive_recurrent_ssd(x, step, A, Bm, C, h0, output_final_state=True)
    y, h = chunk_ssd_torch(x, step, A, Bm, C, h0, output_final_state=True, chunk_size=d["chunk"])
    assert rel_err(y, y_ref) < TOL[dt]
    assert rel_err(h, h_ref) < TOL[dt]


def test_public_ops_split_sequences_through_the_state():
    """Running a sequence in two halves, passing the final state on, equals one pass."""
    d = {"B": 2, "T": 50, "H": 2, "K": 6, "V": 5, "decay": 1.0, "seed": 3, "init": True, "dtype": torch.float64}
    q, k, v, g, beta, S0 = gdr_inputs(d)
    o, S = gated_delta_rule(q, k, v, g, beta, S0, output_final_state=True)
    o1, S1 = gated_delta_rule(q[:, :20], k[:, :20], v[:, :20], g[:, :20], beta[:, :20], S0, output_final_state=True)
    o2, S2 = gated_delta_rule(q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], beta[:, 20:], S1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-12 and rel_err(S2, S) < 1e-12
    A = -torch.rand(2, dtype=torch.float64)
    y, h = ssd_scan(v, beta, A, k, q, output_final_state=True, mode="recurrent")
    y1, h1 = ssd_scan(v[:, :20], beta[:, :20], A, k[:, :20], q[:, :20], output_final_state=True)
    y2, h2 = ssd_scan(v[:, 20:], beta[:, 20:], A, k[:, 20:], q[:, 20:], initial_state=h1, output_final_state=True)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12 and rel_err(h2, h) < 1e-12


def test_gated_delta_rule_matches_its_definition_by_hand():
    """One head, two tokens, computed with plain matrices."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1, 3, dtype=torch.float64) for _ in range(3))
    g = torch.tensor([[[-0.3], [-0.7]]], dtype=torch.float64)
    beta = torch.tensor([[[0.4], [0.9]]], dtype=torch.float64)
    S = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    o, S_out = gated_delta_rule(q, k, v, g, beta, S, output_final_state=True)
    M = S[0, 0]
    for t in range(2):
        kt, vt = k[0, t, 0], v[0, t, 0]
        M = g[0, t, 0].exp() * M
        M = M + beta[0, t, 0] * torch.outer(kt, vt - M.T @ kt)
        assert torch.allclose(o[0, t, 0], M.T @ q[0, t, 0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(S_out[0, 0], M, rtol=1e-12, atol=1e-12)


def test_ssd_equals_gated_delta_rule_without_the_delta():
    """With beta -> the SSD input scale and no erase term, SSD is a plain gated linear recurrence."""
    torch.manual_seed(1)
    B, T, H, K, V = 1, 9, 2, 4, 3
    x, Bm, C = torch.randn(B, T, H, V), torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    x, Bm, C = x.double(), Bm.double(), C.double()
    step = torch.rand(B, T, H, dtype=torch.float64)
    A = -torch.rand(H, dtype=torch.float64)
    y, _ = ssd_scan(x, step, A, Bm, C)
    ref = torch.zeros(B, T, H, V, dtype=torch.float64)
    for t in range(T):  # y_t = sum_{s<=t} exp(sum_{s<r<=t} dt_r A) dt_s (C_t . B_s) x_s
        for s in range(t + 1):
            decay = (step[:, s + 1: t + 1] * A).sum(1).exp()
            ref[:, t] += (decay * step[:, s] * (C[:, t] * Bm[:, s]).sum(-1))[..., None] * x[:, s]
    assert rel_err(y, ref) < 1e-12


def test_chunked_form_has_gradients_matching_recurrent():
    d = {"B": 1, "T": 7, "H": 1, "K": 3, "V": 2, "decay": 1.0, "seed": 5, "init": True, "dtype": torch.float64}
    ins = [t.requires_grad_() for t in gdr_inputs(d)]
    o, S = chunk_gated_delta_rule_torch(*ins, output_final_state=True, chunk_size=4)
    grads = torch.autograd.grad((o.sin().sum() + S.cos().sum()), ins)
    o_r, S_r = naive_recurrent_gated_delta_rule(*ins, output_final_state=True)
    grads_r = torch.autograd.grad((o_r.sin().sum() + S_r.cos().sum()), ins)
    for a, b in zip(grads, grads_r):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("op", ["gdr", "ssd"])
def test_empty_sequence_returns_initial_state(op):
    S0 = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    q = torch.zeros(1, 0, 2, 3, dtype=torch.float64)
    v = torch.zeros(1, 0, 2, 4, dtype=torch.float64)
    gate = torch.zeros(1, 0, 2, dtype=torch.float64)
    if op == "gdr":
        o, S = gated_delta_rule(q, q, v, gate, gate, S0, output_final_state=True)
    else:
        o, S = ssd_scan(v, gate, torch.zeros(2, dtype=torch.float64), q, q, S0, output_final_state=True)
    assert o.shape == v.shape and torch.equal(S, S0)
