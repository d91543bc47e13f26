"""The memkit command: doctor, bench memory, demo (memory checks, plot, and a generated video)."""

import subprocess
import sys

import torch
from helpers import SUBPROCESS_LIMIT

from memkit.bench.memory import run_memory_bench, windows
from memkit.cli import main
from memkit.doctor import run_checks


def test_doctor_reports_every_backend(capsys):
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("fla", "mamba_ssm", "xformers", "torch"):
        assert name in out
    statuses = {c.status for c in run_checks()}
    if not torch.cuda.is_available():
        assert statuses <= {"missing", "needs CUDA"}
    assert "videossm-memkit[gpu]" in out or "fla" not in {c.backend for c in run_checks() if c.status == "missing"}


def test_bench_memory_table_and_plot(tmp_path, capsys):
    png = tmp_path / "bench.png"
    code = main(["bench", "memory", "--chunks", "12", "--quiet", "--heads", "2", "--head-dim", "8",
                 "--frame-tokens", "4", "--dim", "16", "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and png.stat().st_size > 10_000
    for kind in ("full", "window", "sink_window", "hybrid_gdn", "hybrid_ssd"):
        assert kind in out
    assert "late / early" in out


def test_bench_state_sizes_show_full_growing():
    res = run_memory_bench(chunks=10, heads=1, head_dim=8, frame_tokens=4, dim=8, progress=False)
    assert res["full"].state_bytes[-1] == 10 * res["full"].state_bytes[0]
    for kind in ("window", "sink_window", "hybrid_gdn", "hybrid_ssd"):
        assert len(set(res[kind].state_bytes)) == 1
    assert windows(256) == ((8, 16), (248, 256))
    assert windows(3)[1] == (2, 3)
    odd = run_memory_bench(["hybrid_blockwise"], chunks=4, heads=1, head_dim=8, frame_tokens=7, dim=8, progress=False)
    assert len(set(odd["hybrid_blockwise"].state_bytes)) == 1  # a 1x7 token grid: one block, not an error


def test_demo_runs_and_writes_its_plots_and_the_world_video(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memkit", "demo", "--chunks", "16", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=SUBPROCESS_LIMIT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DIFFERENT" not in proc.stdout and "equal" in proc.stdout
    assert (tmp_path / "memory_demo.png").stat().st_size > 10_000
    assert (tmp_path / "world_drift.png").stat().st_size > 10_000
    out = " ".join(proc.stdout.split())
    assert f"video written to {tmp_path / 'world.mp4'}" in out and "PSNR plot written to" in out
    assert "hybrid_gdn, true past: PSNR on returns" in out and "sink_window, free: PSNR on returns" in out
    assert "mean colour against the truth's: returns" in out and "mean colour against its own last showing's" in out
    from memkit.rollout.video import read_video

    video, fps = read_video(tmp_path / "world.mp4")
    assert video.shape[0] == 48 and fps == 4 and video.shape[2] > 4 * video.shape[1]  # 5 loops; 5 panels (4 < 3.6)
    assert "hybrid_layout: PSNR on returns" in out and "sink_window: PSNR on returns" in out
    assert f"video written to {tmp_path / 'scenes.mp4'}" in out
    assert (tmp_path / "scenes_drift.png").stat().st_size > 10_000
    scenes, _ = read_video(tmp_path / "scenes.mp4")
    assert scenes.shape[0] == 36 and scenes.shape[2] > 2 * scenes.shape[1]  # 3 panels


def test_cli_turns_memkit_errors_into_a_message(capsys):
    assert main(["bench", "memory", "--chunks", "2", "--memories", "nope", "--quiet"]) == 2
    assert "unknown memory 'nope'" in capsys.readouterr().err
