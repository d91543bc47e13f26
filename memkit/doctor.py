"""``memkit doctor``: what works on this machine, checked rather than assumed.

For each optional backend: does it import, and does it match the PyTorch
reference on a small problem here. Broken kernel builds are common; this
answers in one command, with the install hint where something is missing.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memkit.ops import attention, backends, gated_delta_rule, naive_attention, ssd_scan


@dataclass
class Check:
    backend: str
    op: str
    status: str  # "ok", "mismatch", "error", "missing", "needs CUDA"
    detail: str


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _gdr_problem(device):
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, D = 1, 200, 2, 64
    q = torch.randn(B, T, H, D, generator=g, device=device) * D ** -0.5
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g, device=device), dim=-1)
    v = torch.randn(B, T, H, D, generator=g, device=device)
    gate = -0.1 * torch.rand(B, T, H, generator=g, device=device)
    beta = torch.rand(B, T, H, generator=g, device=device)
    return q, k, v, gate, beta


def _check_gdr(backend, device):
    q, k, v, g, beta = _gdr_problem(device)
    o, S = gated_delta_rule(q, k, v, g, beta, output_final_state=True, backend=backend)
    o_r, S_r = gated_delta_rule(q, k, v, g, beta, output_final_state=True, backend="torch")
    return max(_rel(o, o_r), _rel(S, S_r))


def _check_ssd(backend, device):
    q, k, v, g, beta = _gdr_problem(device)
    A = -torch.linspace(1, 2, q.shape[2], device=device)
    y, h = ssd_scan(v, 0.05 * beta, A, k, q, output_final_state=True, backend=backend)
    y_r, h_r = ssd_scan(v, 0.05 * beta, A, k, q, output_final_state=True, backend="torch")
    return max(_rel(y, y_r), _rel(h, h_r))


def _check_attention(backend, device):
    q, k, v, _, _ = _gdr_problem(device)
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=device).tril()
    return _rel(attention(q, k, v, mask, backend=backend), naive_attention(q, k, v, mask))


CHECKS = [
    ("fla", "gated_delta_rule", _check_gdr),
    ("fla", "ssd_scan (simple GLA)", _check_ssd),
    ("mamba_ssm", "ssd_scan", _check_ssd),
    ("xformers", "attention", _check_attention),
]
DISTS = {"fla": "flash-linear-attention", "mamba_ssm": "mamba-ssm", "xformers": "xformers"}


#: Max relative error against the float32 reference. The Triton kernels (fla, mamba-ssm) multiply float32 inputs
#: in TF32 (a 10-bit mantissa), which puts them near 1e-3 on a correct build (1.4e-3 measured on an H200);
#: a broken one is off by order 1.
TOLERANCE = {"fla": 5e-3, "mamba_ssm": 5e-3, "xformers": 1e-4}


def run_checks(progress=None) -> list[Check]:
    """Each backend's check. ``progress(backend, op)`` is called before each check on CUDA (the first use of a
    Triton kernel compiles it: tens of seconds)."""
    cuda = torch.cuda.is_available()
    out = []
    for backend, op, fn in CHECKS:
        err = backends.import_error(backend)
        if err is not None:
            out.append(Check(backend, op, "missing", f"{err}\n  install: {backends.BACKENDS[backend].install}"))
            continue
        if not cuda:
            out.append(Check(backend, op, "needs CUDA", "imports; its kernels run on CUDA tensors only"))
            continue
        if progress is not None:
            progress(backend, op)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not a TF32 one
            with torch.no_grad():
                e = fn(backend, torch.device("cuda"))
        except Exception as exc:  # a broken build fails in many ways; report it, do not crash
            out.append(Check(backend, op, "error", f"{type(exc).__name__}: {exc}"[:300]))
            continue
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        tol = TOLERANCE[backend]
        out.append(Check(backend, op, "ok" if e < tol else "mismatch",
                         f"max rel. err vs torch reference {e:.2e} (tolerance {tol:.0e})"))
    return out


def doctor(console: Console | None = None) -> int:
    console = console or Console()
    console.print(f"[bold]memkit doctor[/bold]  python {platform.python_version()}  torch {torch.__version__}")
    if torch.cuda.is_available():
        console.print(f"CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name()}")
    else:
        console.print("CUDA: not available (CPU only: every op runs its PyTorch reference)")
    table = Table(title="optional backends")
    for col in ("backend", "version", "op", "status"):
        table.add_column(col)
    colors = {"ok": "green", "mismatch": "red", "error": "red", "missing": "yellow", "needs CUDA": "yellow"}
    with console.status("checking the backends") as status:
        checks = run_checks(lambda backend, op: status.update(
            f"checking {backend} / {op} on CUDA (the first use compiles its kernels)"))
    for c in checks:
        table.add_row(c.backend, _version(DISTS[c.backend]), c.op, f"[{colors[c.status]}]{c.status}[/]")
    console.print(table)
    for c in checks:
        console.print(f"[bold]{c.backend}[/bold] / {c.op}: {escape(c.detail)}", soft_wrap=True)
    bad = [c for c in checks if c.status in ("mismatch", "error")]
    return 1 if bad else 0
