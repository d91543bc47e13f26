"""Attention backends against the explicit reference; 3D RoPE properties."""

import pytest
import torch
from helpers import rel_err
from hypothesis import given
from hypothesis import strategies as st

from memkit.errors import BackendUnavailableError, ConfigError, DTypeError, ShapeError
from memkit.ops import Rope3D, attention, naive_attention, rope_3d


@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 20), st.integers(1, 3), st.integers(1, 8),
       st.booleans(), st.integers(0, 999))
def test_sdpa_matches_reference(B, N, M, H, D, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, M, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(N, M, generator=gen) < 0.6
        mask[:, 0] = True  # every query sees at least one key
    assert rel_err(attention(q, k, v, mask, backend="torch"), naive_attention(q, k, v, mask)) < 1e-12


def test_attention_rejects_bad_inputs():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ShapeError):
        attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(DTypeError):
        attention(q, q.double(), q)
    with pytest.raises(DTypeError):
        attention(q, q, q, attn_mask=torch.ones(4, 4))
    with pytest.raises(BackendUnavailableError, match="xformers"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(ConfigError, match="unknown backend"):
        attention(q, q, q, backend="cudnn-magic")


def test_rope_split_follows_wan():
    assert Rope3D(128, 30, 52).axis_dims == (44, 42, 42)
    assert sum(Rope3D(12, 2, 2).axis_dims) == 12


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 99))
def test_rope_scores_depend_on_frame_distance_only(a, b, seed):
    """q_i . k_j after RoPE depends on positions only through i - j: shifting both changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    rope = Rope3D(12, 2, 3)
    q, k = (torch.randn(1, 6, 2, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    s1 = (rope(q, a) * rope(k, b)).sum(-1)
    s2 = (rope(q, a + 7) * rope(k, b + 7)).sum(-1)
    assert torch.allclose(s1, s2, rtol=1e-10, atol=1e-10)
    assert torch.allclose(rope(q, a).norm(dim=-1), q.norm(dim=-1), rtol=1e-12)


def test_rope_offset_and_positions_agree():
    x = torch.randn(2, 3 * 4, 1, 12, dtype=torch.float64)
    rope = Rope3D(12, 2, 2)
    assert torch.equal(rope(x, 5), rope(x, torch.tensor([5, 6, 7])))
    assert torch.equal(rope_3d(x, 2, 2, 5), rope(x, 5))
    assert torch.equal(rope(x, 0)[:, :4], Rope3D(12, 2, 2)(x[:, :4], 0))
    assert not torch.allclose(rope(x, 0), rope(x, 1))
    with pytest.raises(ShapeError):
        rope(x[:, :5], 0)
    with pytest.raises(ConfigError):
        Rope3D(7, 2, 2)
