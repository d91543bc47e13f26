"""``memkit bench recall``: the task's layout by hand, the reach of each local memory by hand, the model's streaming
against its parallel form, the command line's errors, and the quick run's thresholds (full recalls, the window-only
memories guess beyond their reach, the best hybrid recalls from a small global state)."""

import json
from dataclasses import replace

import pytest
import torch

from memkit.bench.recall import REPORT_FILES, quick_setup
from memkit.bench.recall_task import (
    IGNORE,
    RecallNet,
    RecallSetting,
    RecallSetup,
    make_streams,
    reach,
    recall_of,
    stream_layout,
    training_lag,
)
from memkit.cli import main
from memkit.errors import ConfigError

SETUP = RecallSetup(rows=2, cols=3, vocab=5, cues=6, sink_frames=1, window_frames=2, chunk_frames=3)


@pytest.mark.parametrize("scenes,lag", [(1, 3), (2, 6), (3, 20)])
def test_every_query_comes_exactly_lag_frames_after_its_scene(scenes, lag):
    batch = make_streams(SETUP, torch.Generator().manual_seed(0), 4, scenes, lag)
    scene_frames = list(range(1, 1 + scenes))  # after the one sink frame, one scene per frame
    assert batch.scene_frames == scene_frames
    assert batch.query_frames == [s + lag for s in scene_frames]
    assert batch.frames == scene_frames[-1] + lag + 1
    for s, q in zip(batch.scene_frames, batch.query_frames):
        assert torch.equal(batch.targets[:, q], batch.symbols[:, s])  # the scene's symbol at every place
        assert (batch.symbols[:, q] == SETUP.vocab).all()             # the query shows none
        assert torch.equal(batch.cues[:, q], batch.cues[:, s]) and (batch.cues[:, s] > 0).all()
    queries = set(batch.query_frames)
    for f in range(batch.frames):
        if f not in queries:
            assert (batch.targets[:, f] == IGNORE).all()
        if f not in queries and f not in batch.scene_frames:
            assert (batch.cues[:, f] == 0).all() and (batch.symbols[:, f] < SETUP.vocab).all()
    assert batch.cues[:, 0].eq(0).all()  # the sink holds a distractor
    # each stream's scenes have distinct cues
    codes = batch.cues[:, batch.scene_frames]
    assert all(len(set(row.tolist())) == scenes for row in codes)


def test_a_lag_shorter_than_the_scenes_is_refused():
    with pytest.raises(ConfigError, match="cannot separate 3 consecutive scenes"):
        stream_layout(SETUP, 3, 2)


@pytest.mark.parametrize("kind,scenes,lag,seen", [
    # sink 1 + window 2 (window: 3), chunks of 3 frames; scenes from frame 1, each queried lag frames later
    ("sink_window", 1, 3, 1.0),   # query 4, chunk 3-5: reads sink 0 + window 1, 2 before it
    ("sink_window", 1, 4, 1.0),   # query 5, the same chunk
    ("sink_window", 1, 5, 0.0),   # query 6, chunk 6-8: reads 0 + 4, 5
    ("sink_window", 2, 4, 0.5),   # queries 5 (chunk 3-5: sees 1) and 6 (chunk 6-8: not 2)
    ("window", 1, 3, 1.0),        # query 4: reads 0, 1, 2
    ("window", 1, 5, 0.0),        # query 6: reads 3, 4, 5
    ("window", 3, 4, 2 / 3),      # scenes 1-3 at 5 (chunk 3-5 reads 0-2: sees 1), 6 (chunk 6-8 reads 3-5: not 2), 7
    ("full", 2, 90, 1.0),
])
def test_reach_follows_the_chunks_by_hand(kind, scenes, lag, seen):
    mem = RecallNet(SETUP, RecallSetting(kind).config(SETUP)).layers[0].memory
    assert reach(SETUP, mem, scenes, lag) == pytest.approx(seen)


def test_training_lags_span_the_evaluated_range():
    gen = torch.Generator().manual_seed(0)
    lags = [training_lag(SETUP, gen, 2) for _ in range(2000)]
    assert min(lags) == 2 and max(lags) == SETUP.lags[-1]
    short = sum(lag <= SETUP.local_frames for lag in lags) / len(lags)
    assert 0.1 < short < 0.3  # log-uniform: about log(3/2) / log(96/2) of them


@pytest.mark.parametrize("setting", [RecallSetting("full"), RecallSetting("hybrid_gdn"),
                                     RecallSetting("hybrid_gdn", rope_mode="absolute"),
                                     RecallSetting("hybrid_blockwise", evict_aggregate="frame_mean")])
def test_streaming_the_model_equals_its_parallel_form(setting):
    """Evaluation streams chunk by chunk, training runs the clip in parallel: the same function."""
    setup = replace(SETUP, layers=2, head_dim=8, dim=16)
    torch.manual_seed(0)
    net = RecallNet(setup, setting.config(setup)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = make_streams(setup, torch.Generator().manual_seed(1), 2, 2, 10)
    with torch.no_grad():
        parallel = net(batch.symbols, batch.cues)
    streamed, state_bytes, global_bytes = net.stream(batch.symbols, batch.cues, batch.query_frames[0])
    torch.testing.assert_close(streamed, parallel, rtol=0, atol=1e-10)
    assert state_bytes > global_bytes > 0 if setting.memory != "full" else global_bytes == 0


def test_recall_counts_queried_places_only():
    targets = torch.full((1, 2, 3), IGNORE)
    targets[0, 1] = torch.tensor([0, 1, 2])
    logits = torch.zeros(1, 2, 3, 4)
    logits[0, 1, 0, 0] = logits[0, 1, 1, 3] = logits[0, 1, 2, 2] = 1.0
    logits[0, 0, :, 3] = 5.0  # non-queried frames do not count
    assert recall_of(logits, targets) == pytest.approx(2 / 3)


def test_the_command_line_refuses_bad_runs_before_any_work(tmp_path, capsys):
    (tmp_path / "recall.md").write_text("keep me")
    assert main(["bench", "recall", "--quick", "--out", str(tmp_path)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "recall.md").read_text() == "keep me"
    assert main(["bench", "recall", "--variants", "full", "full", "--out", str(tmp_path / "x")]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["bench", "recall", "--lrs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    assert main(["bench", "recall", "--quick", "--out", str(out), "--threads", "2"]) == 0
    return out, json.loads((out / "recall.json").read_text())


def test_quick_run_writes_its_report(quick_report):
    out, report = quick_report
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    setup = quick_setup()
    row = report["rows"][0]
    for key in ("memory", "evict_aggregate", "rope_mode", "global_position", "lag_frames", "local_frames", "recall",
                "chance", "state_bytes", "global_bytes", "scenes", "reach", "beyond_reach"):
        assert key in row
    assert {r["lag_frames"] for r in report["rows"]} == set(setup.lags)
    assert max(setup.lags) >= 32 * setup.local_frames
    assert {r["memory"] for r in report["rows"]} == {"full", "window", "sink_window", "hybrid_gdn", "hybrid_ssd",
                                                      "hybrid_blockwise"}
    assert all(len(s["sweep"]) == len(setup.lrs) for s in report["settings"])
    assert "Learning-rate sweep" in (out / "recall.md").read_text()


def test_quick_run_full_recalls_the_floors_guess_and_a_hybrid_recalls_from_a_small_state(quick_report):
    _, report = quick_report
    v = report["verdicts"]
    chance = v["chance"]
    assert v["full_min_recall"] >= 0.95, "full, the ceiling, must recall at every lag"
    assert v["window_max_beyond_reach"] <= chance + 0.05
    assert v["sink_window_max_beyond_reach"] <= chance + 0.05
    assert v["best_hybrid_recall"] >= 0.9 * v["full_recall_8x"], v
    assert v["global_over_full_kv"] < 1 / 8, v
    # beyond the window's reach the global memory does the recalling: far above the floors at every lag
    best = [r for r in report["rows"] if r["setting"] == v["best_hybrid"] and r["scenes"] == v["scenes"]]
    assert all(r["recall"] >= chance + 0.5 for r in best)
