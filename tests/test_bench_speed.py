"""``memkit bench speed`` and its CPU preset ``bench stream`` end to end on a tiny model on the CPU (the real run is
on the GPU machine)."""

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
        assert 0 < row["mem ops %"]
        assert row["roofline"] is None  # the roofline is an H100's: no measure of a CPU
        assert 0 < report["results"][row["variant"]]["costs"]["roofline_ms"]
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "hybrid_gdn" in (tmp_path / "speed.md").read_text()
    # the files are never replaced without --overwrite
    before = (tmp_path / "speed.json").read_bytes()
    assert main(TINY + ["--out", str(tmp_path), "--variants", "window"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "speed.json").read_bytes() == before


def _held_frame_bytes(size="tiny", latent=(8, 8)):
    """Bytes a stream holds per committed frame, from the model's config: every layer's key and value of each
    token, the clean latent frame, and its bookkeeping (frame index, chunk index: int64; timestep: float32)."""
    from adapters.wan import WAN_CONFIGS

    c = WAN_CONFIGS[size]
    tokens = (latent[0] // c["patch_size"][1]) * (latent[1] // c["patch_size"][2])
    kv = c["num_layers"] * 2 * tokens * c["num_attention_heads"] * c["attention_head_dim"] * 4
    return kv + c["in_channels"] * latent[0] * latent[1] * 4 + 8 + 8 + 4


def test_bench_stream_is_the_cpu_preset_full_grows_and_bounded_memories_stay_flat(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code = main(["bench", "stream", "--chunks", "12", "--size", "tiny", "--latent-size", "8", "8", "--quiet",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "stream.json").read_text())
    assert report["setup"]["device"] == "cpu" and not report["setup"]["compile"] and not report["setup"]["vae"]
    rows = {row["variant"]: row for row in report["summary"]}
    assert list(rows) == ["full", "sink_window", "hybrid_gdn"]
    per_frame = _held_frame_bytes()
    mib = 2**20
    # probes: the preset's chunk 10 and the stream's last; full holds every frame, sink_window 3 + 6
    assert rows["full"]["state MiB@10"] * mib == 30 * per_frame
    assert rows["full"]["state MiB@12"] * mib == 36 * per_frame
    assert rows["sink_window"]["state MiB@10"] * mib == rows["sink_window"]["state MiB@12"] * mib == 9 * per_frame
    hybrid = rows["hybrid_gdn"]
    assert hybrid["state MiB@10"] == hybrid["state MiB@12"] > rows["sink_window"]["state MiB@12"]
    assert len(report["results"]["full"]["times_ms"]) == 12  # no time limit on full in this preset
    assert "e2e FPS" not in out and "roofline" not in (tmp_path / "stream.md").read_text().split("Costs")[0]
    assert "state MiB@12" in out and "hybrid_gdn" in out
    assert (tmp_path / "stream.png").stat().st_size > 0 and (tmp_path / "stream.md").exists()


def test_bench_stream_takes_any_memory_kind_and_one_local_memory_for_all(tmp_path, capsys):
    code = main(["bench", "stream", "--chunks", "4", "--size", "tiny", "--latent-size", "8", "8", "--quiet",
                 "--variants", "sink_window", "window", "hybrid_ssd", "full", "--sink-frames", "1",
                 "--window-frames", "2", "--check-chunks", "0", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().out
    rows = {row["variant"]: row for row in json.loads((tmp_path / "stream.json").read_text())["summary"]}
    # keys at chunk 4 (9 frames committed) with the chunk's 3: sink 1 + window 2; the window kind has no sink
    assert {v: rows[v]["keys"] for v in rows} == {"sink_window": 6, "window": 5, "hybrid_ssd": 6, "full": 12}
    assert main(["bench", "stream", "--variants", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown variants ['nope']" in err and len(err.strip().splitlines()) == 1


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
