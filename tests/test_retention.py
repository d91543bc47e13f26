"""The global memory's time scales are counted in frames: a fresh hybrid keeps a frame for as many frames whatever
the resolution, and its slowest heads keep it past 10x the local window (``memkit.memory.retention``)."""

import math

import pytest
import torch

import memkit
from memkit.errors import ConfigError
from memkit.memory import retention

HEADS, HEAD_DIM = 12, 128  # Wan2.1's heads
RESOLUTIONS = {16: (4, 4), 1560: (30, 52)}  # tokens per frame: a toy frame and Wan at 832x480
HYBRIDS = ["hybrid_gdn", "hybrid_ssd", "hybrid_blockwise"]


def fresh(kind, tokens, **cfg):
    torch.manual_seed(0)
    return memkit.build_memory(memkit.MemoryConfig(kind=kind, check_finite=False, **cfg), num_heads=HEADS,
                               head_dim=HEAD_DIM, dim=32, frame_tokens=tokens, frame_shape=RESOLUTIONS[tokens])


@pytest.mark.parametrize("kind", HYBRIDS)
def test_slowest_heads_keep_a_frame_past_ten_windows_at_two_resolutions(kind):
    window = memkit.MemoryConfig().window_frames
    lags = [0, 2 * window, 10 * window]
    kept = {tokens: retention(fresh(kind, tokens), lags, batch=2) for tokens in RESOLUTIONS}
    for tokens, cos in kept.items():
        assert cos[0].min() > 0.9, f"{tokens} tokens: a frame just written is not read back"
        assert cos[2, -3:].mean() > 0.5, f"{tokens} tokens: the slowest heads lost the frame after 10 windows"
        assert cos[1, :3].mean() < 0.3, f"{tokens} tokens: the fastest heads should have moved on after two windows"
        assert cos[2, -3:].mean() > cos[2, :3].mean() + 0.4  # heads span time scales
    # the same time scales at 16 and at 1,560 tokens per frame
    assert (kept[16] - kept[1560]).abs()[:, -3:].mean() < 0.15


def test_token_writes_at_full_resolution_overflow_the_state():
    """Why frames are written as summaries by default: 1,560 token writes per frame into a 128 x 128 state
    cannot be read back even right after writing, while at 16 tokens per frame they can."""
    assert retention(fresh("hybrid_gdn", 1560, evict_aggregate="token"), [0])[0].mean() < 0.4
    assert retention(fresh("hybrid_gdn", 16, evict_aggregate="token"), [0])[0].mean() > 0.8


@pytest.mark.parametrize("aggregate", ["token", "frame_mean", "block_mean"])
@pytest.mark.parametrize("tokens", list(RESOLUTIONS))
def test_a_frame_decays_the_state_by_its_heads_half_lives(aggregate, tokens):
    """The log-decays of one frame's writes add up to -ln 2 / half-life per head, half-lives log-spaced over
    ``halflife_frames``, at any resolution and write granularity (the equations, not the probe)."""
    mem = fresh("hybrid_gdn", tokens, evict_aggregate=aggregate, halflife_frames=(2.0, 200.0))
    x = torch.randn(1, tokens, 32)
    gates = mem._token_gates(x)
    writes = mem._aggregate({"k": torch.randn(1, tokens, HEADS, HEAD_DIM), "v": torch.randn(1, tokens, HEADS,
                                                                                             HEAD_DIM), **gates})
    half_lives = torch.tensor([2.0 * 100.0 ** (h / (HEADS - 1)) for h in range(HEADS)])
    per_frame = writes["g"].sum(dim=1)[0].double()
    assert torch.allclose(per_frame, -math.log(2) / half_lives.double(), rtol=1e-4)  # float32 means
    assert torch.allclose(writes["beta"].sum(dim=1)[0], torch.full((HEADS,), 0.5), rtol=1e-4)
    assert writes["k"].shape[1] == {"token": tokens, "frame_mean": 1, "block_mean": 4}[aggregate]


def test_retention_checks_its_arguments():
    with pytest.raises(ConfigError, match="has none"):
        retention(memkit.build_memory(memkit.MemoryConfig(kind="sink_window"), num_heads=1, head_dim=4, dim=4,
                                      frame_tokens=4), [1])
    with pytest.raises(ConfigError, match="non-negative"):
        retention(fresh("hybrid_gdn", 16), [-1])
    with pytest.raises(ConfigError, match="halflife_frames"):
        memkit.MemoryConfig(halflife_frames=(10.0, 1.0))
    with pytest.raises(ConfigError, match="halflife_frames must be"):
        memkit.MemoryConfig(halflife_frames="12")  # not the half-lives (1, 2)


def test_a_single_head_takes_the_longest_half_life():
    mem = memkit.build_memory(memkit.MemoryConfig(kind="hybrid_gdn", halflife_frames=(2.0, 80.0)), num_heads=1,
                              head_dim=8, dim=16, frame_tokens=4)
    assert torch.allclose(mem.initial_rates(), torch.tensor([math.log(2) / 80.0]))
    with pytest.raises(ConfigError, match="blocks=8 needs a token grid of at least 8x8"):
        fresh("hybrid_blockwise", 16, blocks=8)


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("kind,aggregate", [("hybrid_gdn", "token"), ("hybrid_gdn", "block_mean"),
                                            ("hybrid_blockwise", "token")])
def test_the_probe_reads_place_coded_writes_back_with_their_places(kind, aggregate, position):
    """Keys that carry their place are read back with the same place codes: on random frames the codes cost no
    retention (a read without them would find next to nothing)."""
    coded = fresh(kind, 16, evict_aggregate=aggregate, global_position=position)
    plain = fresh(kind, 16, evict_aggregate=aggregate, global_position="none")
    assert coded.addressed and not plain.addressed
    lags = [0, 6, 60]
    kept, kept_plain = retention(coded, lags), retention(plain, lags)
    assert kept[0, -3:].mean() > 0.9
    assert (kept - kept_plain)[:, -3:].abs().max() < 0.05
