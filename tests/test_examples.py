"""The examples run, and the example variant is a full citizen of the registry."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from helpers import SUBPROCESS_LIMIT, make_clip, rel_err, stream

import memkit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_stream_memory_example_runs():
    cmd = [sys.executable, str(EXAMPLES / "stream_memory.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT)
    assert proc.returncode == 0, proc.stderr
    assert "bit-identically: True" in proc.stdout


def test_retrofit_wan_example_runs():
    cmd = [sys.executable, str(EXAMPLES / "retrofit_wan.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT)
    assert proc.returncode == 0, proc.stderr
    for line in ("full memory == stock forward: True", "hybrid_gdn before training == stock: True",
                 "resumed bit-identically: True"):
        assert line in proc.stdout


def test_custom_variant_is_one_file_and_a_registry_entry(tmp_path):
    spec = importlib.util.spec_from_file_location("custom_memory", EXAMPLES / "custom_memory.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "hybrid_linear" in memkit.list_memories()
    cfg = memkit.MemoryConfig(kind="hybrid_linear", sink_frames=1, window_frames=2)
    mem = memkit.build_memory(cfg, num_heads=2, head_dim=8, dim=12, frame_tokens=4).double()
    torch.nn.init.normal_(mem.out_gate.weight)
    q, k, v, x = make_clip(mem, frames=9)
    y, state, _ = stream(mem, q, k, v, x, 2)
    assert rel_err(y, mem.parallel(q, k, v, x, chunk_frames=2)) < 1e-10
    state.save(tmp_path / "s.safetensors")
    assert memkit.MemoryState.load(tmp_path / "s.safetensors").kind == "hybrid_linear"


def test_finetune_lightning_example_runs():
    cmd = [sys.executable, str(EXAMPLES / "finetune_lightning.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("first chunks equal (nothing evicted yet): True", "trained memory changes later chunks: True",
                 "reloaded weights reproduce the stream: True"):
        assert line in proc.stdout
