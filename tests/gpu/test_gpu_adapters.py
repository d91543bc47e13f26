"""Adapters and the generator on CUDA in bf16 with the accelerated kernels (run on the GPU machine)."""

import pytest
import torch

import adapters
import memkit
from memkit.rollout import StreamingGenerator

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture
def wan():
    return adapters.random_wan("small", dtype=torch.bfloat16, device="cuda")


def test_full_memory_matches_the_stock_forward_in_bf16(wan):
    latents = torch.randn(1, 16, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randn(1, 32, wan.config.text_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    with torch.no_grad():
        stock = wan(latents, t, prompt, return_dict=False)[0]
        h = adapters.inject(wan, memkit.MemoryConfig(kind="full"), chunk_frames=3, latent_size=(16, 16))
        ours = h.read(h.init_state(1), latents, t, prompt)
    assert rel_err(ours, stock) < 1e-2


@pytest.mark.parametrize("scan_backend", ["torch", "fla"])
def test_hybrid_streaming_matches_parallel_on_cuda(wan, scan_backend):
    if scan_backend == "fla" and not memkit.ops.is_available("fla"):
        pytest.skip("flash-linear-attention is not installed")
    cfg = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=3, window_frames=3, scan_backend=scan_backend)
    h = adapters.inject(wan, cfg, chunk_frames=3, latent_size=(16, 16))
    for mem in h.memories:
        torch.nn.init.normal_(mem.out_gate.weight, std=0.05)
    latents = torch.randn(1, 16, 15, 16, 16, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randn(1, 32, wan.config.text_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    with torch.no_grad():
        state, outs = h.init_state(1), []
        for f0 in range(0, 15, 3):
            y, state = h.commit(state, latents[:, :, f0: f0 + 3], t, prompt)
            outs.append(y)
        parallel = h.parallel(latents, t, prompt)
    assert rel_err(torch.cat(outs, dim=2), parallel) < 2e-2


def test_generator_streams_and_resumes_on_cuda(wan, tmp_path):
    h = adapters.inject(wan, memkit.MemoryConfig(kind="hybrid_gdn"), chunk_frames=3, latent_size=(16, 16))
    prompt = torch.randn(1, 32, wan.config.text_dim)
    gen = StreamingGenerator(h, prompt, seed=0, progress=False)
    list(gen.stream(4))
    gen.save(tmp_path / "s.safetensors")
    a = torch.cat([c.latents for c in gen.stream(3)], dim=2)
    b = torch.cat([c.latents for c in StreamingGenerator.from_state(h, tmp_path / "s.safetensors",
                                                                    progress=False).stream(3)], dim=2)
    assert torch.isfinite(a).all() and rel_err(b, a) < 1e-2  # GPU kernels need not be bit-deterministic
