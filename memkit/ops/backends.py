"""Optional kernel backends: discovery, selection and fallback.

Every op has a PyTorch implementation ("torch") that runs anywhere. GPU
backends are optional extras. An explicitly requested backend that cannot run
raises :class:`BackendUnavailableError` naming the extra to install; "auto"
picks the first accelerated backend that can run and otherwise falls back to
"torch", logging the reason once.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import torch

from memkit._dist import install_hint
from memkit.errors import BackendUnavailableError, ConfigError

log = logging.getLogger("memkit.ops")


@dataclass(frozen=True)
class BackendInfo:
    module: str          # what must import for the backend to be usable
    install: str         # how to get it
    needs_cuda: bool = True
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    probe: str | None = None  # name of a function below that runs the kernel once on CUDA


def _probe_xformers() -> None:
    # A wheel built for another torch imports fine and only fails when an op is looked up.
    import xformers.ops as xops

    q = torch.zeros(1, 8, 1, 8, device="cuda", dtype=torch.float16)
    xops.memory_efficient_attention(q, q, q)


BACKENDS: dict[str, BackendInfo] = {
    "fla": BackendInfo("fla.ops.gated_delta_rule", f"{install_hint('gpu')}  (flash-linear-attention)"),
    "mamba_ssm": BackendInfo(
        "mamba_ssm.ops.triton.ssd_combined",
        f"{install_hint('mamba')}  (mamba-ssm; without its CUDA build: "
        "MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation mamba-ssm)",
    ),
    "xformers": BackendInfo("xformers.ops", install_hint("xformers"), probe="_probe_xformers"),
}


@functools.lru_cache(maxsize=None)
def probe_error(name: str) -> str | None:
    """None when backend ``name`` runs a tiny problem on the current CUDA device, else why not."""
    probe = BACKENDS[name].probe
    if probe is None:
        return None
    try:
        globals()[probe]()
    except Exception as exc:
        return f"it imports but does not run here ({type(exc).__name__}: {str(exc)[:200]})"
    return None


@functools.lru_cache(maxsize=None)
def import_error(name: str) -> str | None:
    """None when backend ``name`` imports, else the reason it does not."""
    try:
        importlib.import_module(BACKENDS[name].module)
    except Exception as exc:  # broken builds raise all sorts of things
        return f"{type(exc).__name__}: {exc}"
    return None


def is_available(name: str) -> bool:
    return name == "torch" or import_error(name) is None


def why_not(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when backend ``name`` can run on tensors of ``dtype`` on ``device``, else the reason."""
    info = BACKENDS[name]
    err = import_error(name)
    if err is not None:
        return f"it does not import ({err}); install it with: {info.install}"
    if info.needs_cuda and device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type} tensors"
    if dtype not in info.dtypes:
        return f"it does not support {dtype}"
    if device.type == "cuda":
        return probe_error(name)
    return None


@functools.lru_cache(maxsize=None)
def _log_fallback_once(op: str, reason: str) -> None:
    log.warning("memkit.ops.%s: backend='auto' falls back to 'torch': %s", op, reason)


def resolve(op: str, backend: str, accelerated: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> str:
    """Pick the backend that runs ``op`` for tensors on ``device`` of ``dtype``."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"  # the expected path on CPU, not a fallback worth a log line
        reasons = []
        for name in accelerated:
            why = why_not(name, device, dtype)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        if reasons:
            _log_fallback_once(op, "; ".join(reasons))
        return "torch"
    if backend not in accelerated:
        choices = ", ".join(["auto", "torch", *accelerated])
        raise ConfigError(f"memkit.ops.{op}: unknown backend {backend!r}; choose one of {choices}")
    why = why_not(backend, device, dtype)
    if why is not None:
        raise BackendUnavailableError(f"memkit.ops.{op}: backend {backend!r} cannot run: {why}")
    return backend
