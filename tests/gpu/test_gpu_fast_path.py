"""The fast path on CUDA: no host sync inside a chunk, and the reference's outputs in bf16, compiled or not."""

import pytest
import torch

import adapters
import memkit
from memkit.rollout.sampler import commit_chunk, denoise_chunk
from memkit.rollout.schedule import FlowSchedule

pytestmark = pytest.mark.gpu
LATENT = (16, 16)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def injected(kind="hybrid_gdn", rope_mode="absolute", check_finite=True):
    model = adapters.random_wan("small", dtype=torch.bfloat16, device="cuda")
    cfg = memkit.MemoryConfig(kind=kind, sink_frames=3, window_frames=3, rope_mode=rope_mode,
                              check_finite=check_finite)
    h = adapters.inject(model, cfg, chunk_frames=3, latent_size=LATENT)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in h.memory_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype))
    prompt = torch.randn(1, 32, model.config.text_dim, device="cuda", dtype=torch.bfloat16)
    return h, prompt


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
@pytest.mark.parametrize("check_finite", [False, True])
def test_no_host_sync_inside_a_chunk(rope_mode, check_finite):
    """Every chunk after two warm-up chunks under ``set_sync_debug_mode("error")``: the denoising passes (and the
    preparation of the chunk they share), and without finite checks the commit and the generator's bookkeeping
    too. With checks on, the commit's one check is the chunk's only wait."""
    h, prompt = injected(rope_mode=rope_mode, check_finite=check_finite)
    noise = lambda: torch.randn(1, 16, 3, *LATENT, device="cuda")  # noqa: E731
    schedule, state = FlowSchedule(), h.init_state(1)
    with torch.no_grad():
        for c in range(6):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if c >= 2 else 0)
            try:
                x0 = denoise_chunk(h, state, prompt, schedule, noise, dtype=torch.bfloat16)
                if check_finite:
                    torch.cuda.set_sync_debug_mode(0)
                state = commit_chunk(h, state, x0, prompt, schedule, noise, dtype=torch.bfloat16, context_noise=50.0)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert state.cursor == 18


def test_the_generator_streams_without_a_sync():
    from memkit.rollout import StreamingGenerator

    h, prompt = injected(check_finite=False)
    gen = StreamingGenerator(h, prompt, seed=0, progress=False)
    list(gen.stream(2))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunks = list(gen.stream(4))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(chunks) == 4 and gen.cursor == 18


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", ["window", "sink_window", "hybrid_gdn", "full"])
def test_fast_path_equals_the_reference_in_bf16(kind, compiled):
    h, prompt = injected(kind)
    gen = torch.Generator(device="cuda").manual_seed(1)
    chunks = [torch.randn(1, 16, 3, *LATENT, device="cuda", generator=gen).bfloat16() for _ in range(5)]

    def run(fast):
        h.fast, state, outs = fast, h.init_state(1), []
        with torch.no_grad():
            for x in chunks:
                outs += [h.read(state, x, t, prompt) for t in (1000.0, 500.0)]
                y, state = h.commit(state, x, 0.0, prompt)
                outs.append(y)
        return outs

    reference = run(False)
    if compiled:
        torch._dynamo.reset()
        h.compile()
    fast = run(True)
    for a, b in zip(fast, reference, strict=True):
        assert rel_err(a, b) < 1e-2


def test_fla_batched_writes_equal_per_layer_writes():
    if not memkit.ops.is_available("fla"):
        pytest.skip("flash-linear-attention is not installed")
    from memkit.ops import gated_delta_rule_state

    gen = torch.Generator(device="cuda").manual_seed(2)
    L, B, T, H, D = 4, 1, 4680, 12, 128
    k = torch.nn.functional.normalize(torch.randn(L * B, T, H, D, device="cuda", generator=gen), dim=-1).bfloat16()
    v = torch.randn(L * B, T, H, D, device="cuda", generator=gen).bfloat16()
    g = -0.01 * torch.rand(L * B, T, H, device="cuda", generator=gen)
    beta = 0.5 * torch.rand(L * B, T, H, device="cuda", generator=gen).bfloat16()
    S0 = torch.randn(L * B, H, D, D, device="cuda", generator=gen)
    batched = gated_delta_rule_state(k, v, g, beta, initial_state=S0, backend="fla")
    for i in range(L):
        one = gated_delta_rule_state(k[i:i + 1], v[i:i + 1], g[i:i + 1], beta[i:i + 1],
                                     initial_state=S0[i:i + 1], backend="fla")
        assert rel_err(batched[i:i + 1], one) < 1e-3
        ref = gated_delta_rule_state(k[i:i + 1].float(), v[i:i + 1].float(), g[i:i + 1], beta[i:i + 1].float(),
                                     initial_state=S0[i:i + 1], backend="torch")
        assert rel_err(one, ref) < 2e-2


def test_vae_offload_and_batched_frames_on_cuda():
    from memkit.rollout.vae import StreamingVAEDecoder, tiny_wan_vae

    z = torch.randn(1, 16, 7, 8, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    on_gpu = tiny_wan_vae().cuda()
    reference = torch.cat([StreamingVAEDecoder(on_gpu).decode(p) for p in z.split([1, 3, 3], dim=2)], dim=2)
    batched = StreamingVAEDecoder(on_gpu, batch_frames=True)
    assert rel_err(torch.cat([batched.decode(p) for p in z.split([1, 3, 3], dim=2)], dim=2), reference) < 1e-4
    on_cpu = tiny_wan_vae()
    offloaded = StreamingVAEDecoder(on_cpu, offload_to="cuda", batch_frames=True)
    video = torch.cat([offloaded.decode(p) for p in z.split([1, 3, 3], dim=2)], dim=2)
    assert video.device.type == "cuda" and rel_err(video, reference) < 1e-4
    assert next(on_cpu.parameters()).device.type == "cpu"
    assert all(c.device.type == "cpu" for c in offloaded._cache if isinstance(c, torch.Tensor))


def test_generator_reports_peak_memory_per_part():
    from memkit.rollout import StreamingGenerator
    from memkit.rollout.vae import tiny_wan_vae

    h, prompt = injected()
    gen = StreamingGenerator(h, prompt, seed=0, progress=False, vae=tiny_wan_vae().bfloat16(), vae_offload=True,
                             track_peak_memory=True)
    list(gen.stream(3))
    assert set(gen.peak_memory.peaks) == {"DiT", "VAE decode"}
    assert all(v > 0 for v in gen.peak_memory.peaks.values())


def test_bench_speed_runs_compiled_on_cuda(tmp_path):
    import json

    from memkit.cli import main

    assert main(["bench", "speed", "--size", "small", "--latent-size", "16", "16", "--chunks", "12", "--probes", "10",
                 "12", "--e2e-chunks", "2", "--quiet", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["summary"]
    assert all(row["fast-ref err"] < 1e-2 and row["GiB@12"] > 0 for row in rows)
