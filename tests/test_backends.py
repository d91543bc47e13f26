"""Backend selection: explicit requests fail loudly, "auto" falls back with one log line."""

import logging

import pytest
import torch

from memkit.errors import BackendUnavailableError, ConfigError
from memkit.ops import backends

CUDA = torch.device("cuda")  # selection only looks at the device type; nothing runs on it here


def test_torch_is_always_torch():
    assert backends.resolve("gated_delta_rule", "torch", ("fla",), CUDA, torch.float32) == "torch"


def test_auto_on_cpu_is_torch_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="memkit.ops"):
        assert backends.resolve("gated_delta_rule", "auto", ("fla",), torch.device("cpu"), torch.float32) == "torch"
    assert not caplog.records


@pytest.mark.skipif(backends.is_available("fla"), reason="fla installed: no fallback to observe")
def test_auto_on_cuda_without_the_kernel_logs_once(caplog):
    backends._log_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="memkit.ops"):
        for _ in range(3):
            assert backends.resolve("gated_delta_rule", "auto", ("fla",), CUDA, torch.float32) == "torch"
    assert len(caplog.records) == 1
    assert "falls back to 'torch'" in caplog.text and "videossm-memkit[gpu]" in caplog.text


def test_explicit_backend_that_cannot_run_names_the_reason():
    if not backends.is_available("fla"):
        with pytest.raises(BackendUnavailableError, match="install it with: pip install 'videossm-memkit\\[gpu\\]'"):
            backends.resolve("gated_delta_rule", "fla", ("fla",), CUDA, torch.float32)
    if not backends.is_available("mamba_ssm"):
        with pytest.raises(BackendUnavailableError, match="MAMBA_SKIP_CUDA_BUILD"):
            backends.resolve("ssd_scan", "mamba_ssm", ("mamba_ssm", "fla"), CUDA, torch.float32)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of auto, torch, fla"):
        backends.resolve("gated_delta_rule", "mamba_ssm", ("fla",), CUDA, torch.float32)


def test_float64_is_not_sent_to_kernels(monkeypatch):
    monkeypatch.setattr(backends, "import_error", lambda name: None)  # pretend it is installed
    assert backends.resolve("gated_delta_rule", "auto", ("fla",), CUDA, torch.float64) == "torch"
    with pytest.raises(BackendUnavailableError, match="does not support torch.float64"):
        backends.resolve("gated_delta_rule", "fla", ("fla",), CUDA, torch.float64)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        backends.resolve("gated_delta_rule", "fla", ("fla",), torch.device("cpu"), torch.float32)
    assert backends.resolve("gated_delta_rule", "auto", ("fla",), CUDA, torch.bfloat16) == "fla"
