"""Distributed training through Lightning's DDP strategy on two CPU ranks (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SUBPROCESS_LIMIT
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def train(tmp_path, loss, strategy):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), loss, strategy], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_LIMIT)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("loss,strategy", [("teacher_forcing", "ddp"), ("rolling", "ddp_find_unused_parameters_true")])
def test_two_ddp_ranks_train_on_different_data_and_end_with_identical_parameters(tmp_path, loss, strategy):
    train(tmp_path, loss, strategy)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(s["world"] == 2 for s in seen)
    # 3 optimiser steps: 3 batches of teacher forcing, 2 of rolling (2 TBPTT segments each, a step per segment)
    assert len(seen[0]["seen"]) == len(seen[1]["seen"]) == {"teacher_forcing": 3, "rolling": 2}[loss]
    assert not set(seen[0]["seen"]) & set(seen[1]["seen"])  # each rank its own shard of the data
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    assert any(value.abs().sum() > 0 for name, value in ranks[0].items() if "out_gate" in name)  # it trained


@pytest.mark.gpu
def test_fsdp_strategy_trains_the_memory(tmp_path):
    train(tmp_path, "teacher_forcing", "fsdp")
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert len(seen["seen"]) == 3
