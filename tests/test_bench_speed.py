"""``memkit bench speed`` end to end on a tiny model on the CPU (the real run is on the GPU machine)."""

import json

import pytest

from memkit.bench.costs import chunk_costs
from memkit.cli import main

TINY = ["bench", "speed", "--device", "cpu", "--size", "tiny", "--latent-size", "8", "8", "--dtype", "float32",
        "--chunks", "6", "--probes", "5", "6", "--e2e-chunks", "1", "--check-chunks", "1", "--quiet"]


def test_bench_speed_reports_every_variant(tmp_path, capsys):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    rows = {row["variant"]: row for row in report["summary"]}
    assert list(rows) == ["window", "sink_window", "hybrid_gdn", "full"]
    assert [rows[v]["keys"] for v in rows] == [15, 12, 12, 15]  # keys at chunk 5, the first probe
    for row in rows.values():
        assert row["DiT FPS"] > 0 and row["e2e FPS"] > 0 and row["ms@5"] > 0 and row["ms@6"] > 0
        assert row["fast-ref err"] < 1e-5  # float32 on the CPU
        assert 0 < row["mem ops %"] and 0 < row["roofline"] < 1
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "hybrid_gdn" in (tmp_path / "speed.md").read_text()
    # the files are never replaced without --overwrite
    before = (tmp_path / "speed.json").read_bytes()
    assert main(TINY + ["--out", str(tmp_path), "--variants", "window"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "speed.json").read_bytes() == before


def test_bench_speed_refuses_probes_past_the_stream(tmp_path, capsys):
    i = TINY.index("--probes")
    assert main(TINY[:i + 1] + ["10"] + TINY[i + 3:] + ["--out", str(tmp_path)]) == 2  # past --chunks 6
    err = capsys.readouterr().err
    assert "probes" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind,held,keys", [("window", 18, 21), ("sink_window", 9, 12), ("hybrid_gdn", 9, 12)])
def test_costs_of_the_wan_1_3b_chunk(kind, held, keys):
    from types import SimpleNamespace

    from adapters.wan import WAN_CONFIGS

    config = SimpleNamespace(**{**WAN_CONFIGS["1.3B"], "num_layers": 30})
    sink, window = {"window": (0, 18), "sink_window": (3, 6), "hybrid_gdn": (3, 6)}[kind]
    c = chunk_costs(config, (60, 104), 3, sink, window, kind)
    assert c["key_frames"] == keys
    N, C, L = 4680, 1536, 512
    # self-attention over (held + chunk) frames of 1,560 tokens and cross-attention over 512: 30 layers, 5 passes
    assert c["attention_flops"] == 5 * 30 * (4 * N * keys * 1560 * C + 4 * N * L * C)
    # by hand, the blocks' linear layers (self q, k, v, out; cross q, out; the two ffn layers), 30 x 5 passes;
    # the embedders and the patch projections add a little
    blocks = 5 * 30 * 2 * N * (6 * C * C + 2 * C * 8960)
    assert blocks < c["matmul_flops"] - c["memory_flops"] < 1.01 * blocks
    if kind == "sink_window":  # LongLive's 12 frames of keys: the ceiling near 50 video FPS
        assert 45 < 12 / (c["roofline_ms"] / 1e3) < 55


def test_held_frames_by_hand_before_and_after_the_window_fills():
    from memkit.bench.costs import held_frames

    # sink 3 + window 6: the sink fills first, then the window, then it stays at 9; full holds everything
    want = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 7: 7, 9: 9, 10: 9, 12: 9, 100: 9}
    for committed, held in want.items():
        assert held_frames("sink_window", 3, 6, committed) == held, committed
        assert held_frames("full", 3, 6, committed) == committed
    assert [held_frames("window", 0, 4, t) for t in range(7)] == [0, 1, 2, 3, 4, 4, 4]


@pytest.mark.parametrize("kind", ["hybrid_gdn", "hybrid_ssd"])
def test_the_gate_cache_costs_what_the_memorys_gate_projections_count(kind):
    """A commit pass computes the gates of its tokens; their FLOPs, counted by torch on the memory itself."""
    from types import SimpleNamespace

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from adapters.wan import WAN_CONFIGS
    from memkit.bench.costs import pass_flops
    from memkit.memory import MemoryConfig, build_memory

    config = SimpleNamespace(**{**WAN_CONFIGS["1.3B"], "num_layers": 2})
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    N = 3 * (60 // 2) * (104 // 2)
    mem = build_memory(MemoryConfig(kind=kind), num_heads=heads, head_dim=head_dim, dim=heads * head_dim,
                       frame_tokens=N // 3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mem._token_gates(torch.zeros(1, N, heads * head_dim))
    args = (config, (60, 104), 3, 9, kind)
    added = (pass_flops(*args, text_tokens=512, global_live=False, commit=True)["memory"]
             - pass_flops(*args, text_tokens=512, global_live=False, commit=False)["memory"])
    assert added == config.num_layers * counter.get_total_flops()
