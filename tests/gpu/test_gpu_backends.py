"""GPU backends against the PyTorch reference at video-sized shapes (run on the GPU machine).

One chunk of a Wan2.1-1.3B block: 3 latent frames x 1560 tokens = 4,680 tokens,
12 heads x 128. Tolerances: fp32 rel. err < 1e-4, bf16 < 1e-2 (issue #2); the chunked Triton kernels multiply
fp32 inputs in TF32 (10-bit mantissa), so for them fp32 is held to 5e-3 (their error was 1.4e-3 on an H200 in
`memkit doctor`). Each test reports every quantity's error at once: a GPU run is too rare to learn one per run.
"""

import sys
import types

import pytest
import torch
from helpers import rel_err

from memkit.ops import attention, backends, gated_delta_rule, naive_attention, ssd_scan

pytestmark = pytest.mark.gpu
B, T, H, D = 1, 4680, 12, 128
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
TRITON_TOL = {torch.float32: 5e-3, torch.bfloat16: 1e-2}


def assert_close_all(named, tol):
    """``named``: name -> (got, reference). Fails naming every quantity off by ``tol`` or more, with its error."""
    errors = {name: rel_err(a, b) for name, (a, b) in named.items()}
    bad = {name: f"{e:.2e}" for name, e in errors.items() if not e < tol}
    assert not bad, f"rel. err >= {tol:g}: {bad} (all: { {n: f'{e:.1e}' for n, e in errors.items()} })"


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def mamba_without_cuda_extension():
    """mamba-ssm's package __init__ imports its CUDA extension; its Triton SSD kernels do not need it."""
    added = "selective_scan_cuda" not in sys.modules
    if added:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    backends.import_error.cache_clear()
    yield
    if added:
        del sys.modules["selective_scan_cuda"]
    backends.import_error.cache_clear()


def need(name, dtype=torch.float32):
    why = backends.why_not(name, torch.device("cuda"), dtype)
    if why is not None:
        pytest.skip(f"{name} cannot run here: {why}")


def linear_rnn_inputs(dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=gen, device="cuda")).to(dtype)

    q = r(B, T, H, D, scale=D ** -0.5)
    k = torch.nn.functional.normalize(r(B, T, H, D).float(), dim=-1).to(dtype)
    v = r(B, T, H, D)
    g = (-0.05 * torch.rand(B, T, H, generator=gen, device="cuda")).to(dtype)
    beta = torch.rand(B, T, H, generator=gen, device="cuda").to(dtype)
    S0 = r(B, H, D, D, scale=0.1).float()
    return q, k, v, g, beta, S0


def forward_backward(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    o, S = fn(*inputs)
    (o.float().square().mean() + S.float().square().mean()).backward()
    return o, S, [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_gated_delta_rule_chunk_forward_backward(dtype):
    need("fla")
    ins = linear_rnn_inputs(dtype)

    def run(backend):
        return lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True, backend=backend)

    o, S, grads = forward_backward(run("fla"), ins)
    ref_ins = [t.float() for t in ins]  # the reference sees the same (rounded) values, in fp32
    o_r, S_r, grads_r = forward_backward(run("torch"), ref_ins)
    named = {"o": (o, o_r), "S": (S, S_r)}
    named.update({f"d{n}": (a, b) for n, a, b in zip("q k v g beta h0".split(), grads, grads_r)})
    assert_close_all(named, TRITON_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_gated_delta_rule_recurrent_forward(dtype):
    need("fla")
    q, k, v, g, beta, S0 = linear_rnn_inputs(dtype, seed=1)
    n = 1024  # token-by-token kernel: a shorter sequence
    args = (q[:, :n], k[:, :n], v[:, :n], g[:, :n], beta[:, :n])
    o, S = gated_delta_rule(*args, initial_state=S0, output_final_state=True, backend="fla", mode="recurrent")
    o_r, S_r = gated_delta_rule(*(a.float() for a in args), initial_state=S0, output_final_state=True, backend="torch")
    assert rel_err(o, o_r) < TOL[dtype] and rel_err(S, S_r) < TOL[dtype]


def ssd_inputs(dtype, seed=2):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=gen, device="cuda").to(dtype)
    dt = (0.01 + 0.05 * torch.rand(B, T, H, generator=gen, device="cuda")).to(dtype)
    A = -torch.linspace(1.0, 4.0, H, device="cuda")
    Bm = ((D ** -0.5) * torch.randn(B, T, H, D, generator=gen, device="cuda")).to(dtype)
    C = ((D ** -0.5) * torch.randn(B, T, H, D, generator=gen, device="cuda")).to(dtype)
    h0 = 0.1 * torch.randn(B, H, D, D, generator=gen, device="cuda")
    return x, dt, A, Bm, C, h0


@pytest.mark.parametrize("backend", ["fla", "mamba_ssm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_backends_forward_backward(backend, dtype, mamba_without_cuda_extension):
    need(backend)
    ins = ssd_inputs(dtype)

    def run(b):
        return lambda *a: ssd_scan(*a[:5], initial_state=a[5], output_final_state=True, backend=b)

    o, S, grads = forward_backward(run(backend), ins)
    o_r, S_r, grads_r = forward_backward(run("torch"), [t.float() for t in ins])
    named = {"y": (o, o_r), "h": (S, S_r)}
    named.update({f"d{n}": (a, b) for n, a, b in zip("x dt A B C h0".split(), grads, grads_r)})
    assert_close_all(named, TRITON_TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "xformers"])
def test_attention_backends_on_a_video_chunk(backend):
    if backend == "xformers":
        need("xformers")
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, T, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4 * T, H, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.rand(T, 4 * T, generator=gen, device="cuda") < 0.8
    out = attention(q, k, v, mask, backend=backend)
    ref = naive_attention(q.float(), k.float(), v.float(), mask)
    assert rel_err(out, ref) < 1e-2


def test_hybrid_memory_with_gpu_kernels_matches_torch():
    need("fla")
    from helpers import make_clip, make_memory, stream

    mems = {b: make_memory("hybrid_gdn", heads=4, head_dim=64, dim=64, frame_tokens=64, dtype=torch.float32,
                           sink_frames=1, window_frames=2, scan_backend=b).cuda() for b in ("torch", "fla")}
    clip = [t.cuda() for t in make_clip(mems["torch"], batch=1, frames=12, dtype=torch.float32)]
    y_t, s_t, _ = stream(mems["torch"], *clip, 3)
    y_f, s_f, _ = stream(mems["fla"], *clip, 3)
    assert rel_err(y_f, y_t) < 1e-4 and rel_err(s_f["global.M"], s_t["global.M"]) < 1e-4
