"""The fast path of the chunk loop against the reference path, the batched global writes against per-layer
writes, the state-only scan against the recurrence, and the fast path's promises: no host read of device data
inside a chunk, one finite check per chunk, no graph break in the per-block step."""

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adapters
import memkit
from memkit.errors import NonFiniteError
from memkit.memory import LocalMemory
from memkit.ops import gated_delta_rule, gated_delta_rule_state
from memkit.rollout.sampler import commit_chunk, denoise_chunk
from memkit.rollout.schedule import FlowSchedule
from tests.helpers import make_memory, rel_err

KINDS = ["full", "window", "sink_window", "hybrid_gdn", "hybrid_ssd", "hybrid_blockwise"]
LATENT = (8, 8)  # a 4x4 token grid on the tiny Wan


def injected(kind, dtype=torch.float64, rope_mode="absolute", **cfg):
    model = adapters.random_wan("tiny", dtype=dtype)
    cfg = memkit.MemoryConfig(kind=kind, sink_frames=1, window_frames=2, rope_mode=rope_mode, horizon_frames=8, **cfg)
    h = adapters.inject(model, cfg, chunk_frames=2, latent_size=LATENT)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking memories: the global read-out and the gates matter
        for p in h.memory_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model, h


def run_chunks(h, chunks=5, reads=2, seed=0):
    """A prefix shorter than a chunk, then per chunk ``reads`` denoising passes and a commit; every output."""
    dtype = next(h.model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    prompt = randn(1, 8, h.model.config.text_dim)
    outs = []
    with torch.no_grad():
        state = h.prefill(h.init_state(1), randn(1, 16, 1, *LATENT), prompt)
        for _ in range(chunks):
            x = randn(1, 16, 2, *LATENT)
            for s in range(reads):
                outs.append(h.read(state, x * (1 + s), 900.0 - 300 * s, prompt))
            y, state = h.commit(state, x, 0.0, prompt)
            outs.append(y)
    return outs, state


@pytest.fixture
def prepares(monkeypatch):
    """Counts LocalMemory.prepare calls (the fast path's mark)."""
    calls = []
    original = LocalMemory.prepare

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LocalMemory, "prepare", counting)
    return calls


PLACE_CODED = [("hybrid_gdn", "token"), ("hybrid_gdn", "block_mean"), ("hybrid_blockwise", "token")]


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
@pytest.mark.parametrize("kind,aggregate", [(k, "frame_mean") for k in KINDS] + PLACE_CODED)
def test_fast_path_equals_the_reference_path_in_float64(kind, aggregate, rope_mode, prepares):
    """Every variant, and the hybrids whose global keys carry places (in absolute mode their evicted keys are
    rotated back from RoPE in the batched commit)."""
    _, h = injected(kind, rope_mode=rope_mode, evict_aggregate=aggregate)
    assert getattr(h.memories[0], "addressed", False) == ((kind, aggregate) in PLACE_CODED)
    check_fast_equals_reference(h, prepares)


TIME_CODED = [("hybrid_gdn", "frame_mean", "rope", "frame"), ("hybrid_gdn", "token", "learned", "token"),
              ("hybrid_blockwise", "token", "learned", "token"), ("hybrid_blockwise", "frame_mean", "rope", "token")]


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
@pytest.mark.parametrize("kind,aggregate,time,strength", TIME_CODED)
def test_fast_path_equals_the_reference_path_with_time_coded_keys(kind, aggregate, time, strength, rope_mode,
                                                                  prepares):
    """Keys that carry their frame's stream index: the batched commit stamps the evicted frames as the reference
    does, and each chunk's reads rotate their queries by their own frames'."""
    _, h = injected(kind, rope_mode=rope_mode, evict_aggregate=aggregate, global_time=time, write_strength=strength)
    assert h.memories[0].timed
    check_fast_equals_reference(h, prepares)


def check_fast_equals_reference(h, prepares):
    fast, fast_state = run_chunks(h)
    # one preparation per layer per chunk (the prefix piece and 5 chunks), shared by the chunk's 3 passes
    assert len(prepares) == 6 * h.num_layers
    h.fast = False
    ref, ref_state = run_chunks(h)
    assert len(prepares) == 6 * h.num_layers
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for fl, rl in zip(fast_state.layers, ref_state.layers, strict=True):
        assert fl.frames == rl.frames and set(fl.tensors) == set(rl.tensors)
        for name in rl.tensors:
            torch.testing.assert_close(fl[name], rl[name], rtol=0, atol=1e-10, msg=name)


def test_the_global_read_is_skipped_only_while_the_global_state_is_empty():
    mem = make_memory("hybrid_gdn", sink_frames=1, window_frames=2)
    state = mem.init_state(1, dtype=torch.float64)
    assert mem._global_gamma(state.tensors, 3) is None  # 1 + 2 frames held, nothing evicted yet
    assert torch.equal(mem._global_gamma(state.tensors, 4), mem.router(4))


@pytest.mark.parametrize("kind,aggregate", [("hybrid_gdn", "frame_mean"), ("hybrid_gdn", "token"),
                                            ("hybrid_gdn", "block_mean"), ("hybrid_blockwise", "frame_mean"),
                                            ("hybrid_blockwise", "token"), ("hybrid_ssd", "frame_mean")])
def test_batched_deferred_writes_equal_per_layer_commits(kind, aggregate, monkeypatch):
    """One scan for all layers, each layer's writes keyed with its own place phases where they carry places."""
    layers = [make_memory(kind, seed=i, sink_frames=1, window_frames=1, evict_aggregate=aggregate,
                          frame_shape=(2, 2)) for i in range(3)]
    gen = torch.Generator().manual_seed(0)

    def tokens(mem, frames):
        shape = (2, frames * mem.frame_tokens, mem.num_heads, mem.head_dim)
        return (*(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)),
                torch.randn(2, frames * mem.frame_tokens, mem.dim, generator=gen, dtype=torch.float64))

    states = []
    for mem in layers:  # each layer its own history, so the layers' global states differ
        s = mem.init_state(2, dtype=torch.float64)
        for _ in range(3):
            s = mem.commit(s, *tokens(mem, 2))[1]
        states.append(s)
    chunk_inputs = [tokens(mem, 2) for mem in layers]
    reference = [mem.commit(s, *x) for mem, s, x in zip(layers, states, chunk_inputs)]

    scans = []
    scan = type(layers[0])._scan
    monkeypatch.setattr(type(layers[0]), "_scan", lambda self, *a: scans.append(1) or scan(self, *a))
    chunks = [mem.prepare(s, 2) for mem, s in zip(layers, states)]
    ys = [mem.commit_prepared(c, *x) for mem, c, x in zip(layers, chunks, chunk_inputs)]
    new = type(layers[0]).commit_many(layers, chunks)
    assert len(scans) == (3 if kind == "hybrid_ssd" else 1)  # one scan for all layers (ssd's decay is per layer)
    for (ref_y, ref_state), y, state in zip(reference, ys, new):
        torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-10)
        assert state.frames == ref_state.frames
        for name in ref_state.tensors:
            torch.testing.assert_close(state[name], ref_state[name], rtol=0, atol=1e-10, msg=name)
        assert state["global.M"].abs().max() > 0
    # the states own their tensors: saving them one by one must work (no shared storage)
    assert len({s["global.M"].untyped_storage().data_ptr() for s in new}) == 3


@pytest.mark.parametrize("steps", [3, 100])
def test_state_only_scan_equals_the_recurrence(steps):
    gen = torch.Generator().manual_seed(steps)
    B, H, K = 2, 3, 8
    k = torch.nn.functional.normalize(torch.randn(B, steps, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, steps, H, K, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, steps, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, steps, H, generator=gen, dtype=torch.float64)
    S0 = torch.randn(B, H, K, K, generator=gen, dtype=torch.float64)
    # the definition, step by step
    S = S0.clone()
    for t in range(steps):
        S = S * g[:, t].exp()[..., None, None]
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * err)
    assert (gated_delta_rule_state(k, v, g, beta, initial_state=S0) - S).abs().max().item() < 1e-10
    full = gated_delta_rule(k, k, v, g, beta, initial_state=S0, output_final_state=True)[1]
    assert (full - S).abs().max().item() < 1e-10


class NoBlockingCopyToDevice(TorchDispatchMode):
    """Refuses a copy from host memory to the (meta) device that is not ``non_blocking``: on a GPU it would wait
    for the device's queue to drain."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, dst, blocking = args[0], torch.device(kwargs.get("device", args[0].device)), \
                not kwargs.get("non_blocking", False)
        elif func is torch.ops.aten.copy_.default:
            dst, src = args[0].device, args[1]
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        else:
            return func(*args, **kwargs)
        if blocking and src.device.type == "cpu" and dst.type == "meta":
            raise AssertionError(f"a blocking copy from the host to the device ({func})")
        return func(*args, **kwargs)


def meta_loop(kind, rope_mode, check_finite, chunks=4, aggregate="frame_mean"):
    """The chunk loop (the sampler's denoising passes and commit) with the model and every tensor on the meta
    device: there is no data, so any read of device data on the host (a sync on a GPU) raises; from the second
    chunk on, a blocking copy from the host to the device raises too."""
    model = adapters.random_wan("tiny")
    cfg = memkit.MemoryConfig(kind=kind, sink_frames=1, window_frames=2, rope_mode=rope_mode,
                              check_finite=check_finite, evict_aggregate=aggregate)
    h = adapters.inject(model, cfg, chunk_frames=2, latent_size=LATENT)
    torch.nn.Module.to(model, device="meta")
    state = h.init_state(1)
    prompt = torch.empty(1, 8, model.config.text_dim, device="meta")
    noise = lambda: torch.empty(1, 16, 2, *LATENT, device="meta")  # noqa: E731
    schedule = FlowSchedule()
    with torch.no_grad():
        for c in range(chunks):
            with NoBlockingCopyToDevice() if c else torch.no_grad():
                x0 = denoise_chunk(h, state, prompt, schedule, noise, dtype=torch.float32)
                state = commit_chunk(h, state, x0, prompt, schedule, noise, dtype=torch.float32,
                                     context_noise=100.0)
    return h, state


@pytest.mark.parametrize("kind,rope_mode,aggregate", [
    ("hybrid_gdn", "absolute", "frame_mean"), ("hybrid_gdn", "relative", "frame_mean"),
    ("hybrid_gdn", "absolute", "token"), ("hybrid_gdn", "relative", "block_mean"),  # keys with place codes
    ("hybrid_blockwise", "absolute", "frame_mean"), ("sink_window", "absolute", "frame_mean"),
    ("full", "absolute", "frame_mean")])
def test_no_pass_of_a_chunk_reads_device_data_on_the_host(kind, rope_mode, aggregate):
    h, state = meta_loop(kind, rope_mode, check_finite=False, aggregate=aggregate)
    assert state.cursor == 8 and state.layers[0].device.type == "meta"


def test_reads_wait_for_nothing_even_with_finite_checks_on_and_the_reference_path_does():  # the guard can fail
    h, state = meta_loop("hybrid_gdn", "absolute", check_finite=True, chunks=0)
    latents = torch.empty(1, 16, 2, *LATENT, device="meta")
    prompt = torch.empty(1, 8, h.model.config.text_dim, device="meta")
    with torch.no_grad():
        h.read(state, latents, 500.0, prompt)
        h.fast = False
        with pytest.raises(NotImplementedError, match="meta"):
            h.read(state, latents, 500.0, prompt)


def test_finite_checks_run_once_per_chunk_after_the_commit_pass(monkeypatch):
    import adapters.checks
    import adapters.handle

    _, h = injected("hybrid_gdn", dtype=torch.float32)
    checked = []
    real = adapters.handle.check_finite
    for module in (adapters.handle, adapters.checks):  # the commit's check, and the inputs' checks
        monkeypatch.setattr(module, "check_finite", lambda **t: checked.append(sorted(t)) or real(**t))
    run_chunks(h, chunks=2, reads=4)
    # the prefix's own check (prefill), then one check per commit, on the latents and the prediction
    assert checked[1:] == [["latents", "prediction"]] * 3


def test_a_non_finite_chunk_is_refused_at_its_commit_and_the_state_kept():
    _, h = injected("hybrid_gdn", dtype=torch.float32)
    _, state = run_chunks(h, chunks=3)
    prompt = torch.randn(1, 8, h.model.config.text_dim)
    bad = torch.randn(1, 16, 2, *LATENT)
    bad[0, 0, 0, 0, 0] = float("nan")
    before = {name: t.clone() for name, t in state.layers[0].tensors.items()}
    with torch.no_grad():
        h.read(state, bad, 500.0, prompt)  # a read does not wait for the device: nothing is checked yet
        with pytest.raises(NonFiniteError, match="latents"):
            h.commit(state, bad, 0.0, prompt)
        assert all(torch.equal(state.layers[0][n], t) for n, t in before.items())
        _, after = h.commit(state, torch.randn(1, 16, 2, *LATENT), 0.0, prompt)  # the stream goes on from it
    assert after.cursor == state.cursor + 2


def test_the_fast_path_names_its_kernels_in_one_log_line(caplog):
    _, h = injected("hybrid_gdn", dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="memkit.adapters"):
        run_chunks(h, chunks=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "memkit.adapters"]
    assert len(lines) == 1
    assert "global-memory scan torch (fla:" in lines[0] and "cpu float32" in lines[0]


def block_inputs(h, state, latents, prompt):
    captured = []
    hook = h.model.blocks[0].register_forward_pre_hook(lambda m, a, k: captured.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            h.read(state, latents, 500.0, prompt)
    finally:
        hook.remove()
    return captured[0]


@pytest.mark.parametrize("mode", ["read", "commit"])
@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
def test_the_per_block_step_has_no_graph_break(mode, rope_mode):
    _, h = injected("hybrid_gdn", dtype=torch.float32, rope_mode=rope_mode)
    _, state = run_chunks(h, chunks=3)
    prompt = torch.randn(1, 8, h.model.config.text_dim)
    latents = torch.randn(1, 16, 2, *LATENT)
    args, kwargs = block_inputs(h, state, latents, prompt)
    torch._dynamo.reset()
    with torch.no_grad(), h._running(mode, state, prompt, {}, frames=2) as p:
        assert p.prepared is not None and p.prepared[0].gamma is not None  # the global read is in the step
        explanation = torch._dynamo.explain(h.model.blocks[0])(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind,graphs", [("hybrid_gdn", 2), ("window", 2), ("full", 3)])
def test_compiled_blocks_trace_few_graphs_shared_by_all_blocks(kind, graphs):
    """From an empty stream: the chunks that fill a bounded memory run eagerly, then a read and a commit graph
    serve every block and chunk. ``full`` grows forever and compiles from the start: its 1-frame prefix commit,
    then a read and a commit graph whose lengths Dynamo made dynamic (no recompile per chunk)."""
    from torch._dynamo.utils import counters

    _, h = injected(kind, dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    h.compile(backend="eager")  # Dynamo's graphs without inductor: what is counted is the tracing
    try:
        run_chunks(h, chunks=8)
    finally:
        h.compile(disable=True)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_blocks_equal_the_reference_path_in_float32():
    _, h = injected("hybrid_gdn", dtype=torch.float32)
    h.fast = False
    ref, _ = run_chunks(h, chunks=4)
    h.fast = True
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    h.compile()  # inductor, on the CPU
    try:
        fast, _ = run_chunks(h, chunks=4)
    finally:
        h.compile(disable=True)
    assert counters["stats"]["unique_graphs"] == 2  # the last chunks ran compiled (the first fill the memory)
    assert all(b._compiled_call_impl is None for b in h.model.blocks)
    for a, b in zip(fast, ref, strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("kind,aggregate", [("sink_window", "frame_mean"), ("hybrid_gdn", "frame_mean"),
                                            ("hybrid_gdn", "token"), ("hybrid_gdn", "block_mean"),
                                            ("full", "frame_mean")])
def test_the_cost_model_counts_the_flops_torch_counts(kind, aggregate):
    """Also with place-coded global keys (token and block writes): their rotation is elementwise work, which the
    model leaves out as the counter does."""
    from torch.utils.flop_counter import FlopCounterMode

    from memkit.bench.costs import pass_flops

    model = adapters.random_wan("tiny")
    # naive attention: explicit matmuls, which the counter sees on a CPU (it does not count CPU SDPA; nor does it
    # see the prompt's cross-attention, which runs through diffusers' SDPA dispatch)
    cfg = memkit.MemoryConfig(kind=kind, sink_frames=1, window_frames=2, attention_backend="naive",
                              evict_aggregate=aggregate)
    h = adapters.inject(model, cfg, chunk_frames=2, latent_size=LATENT)
    prompt = torch.randn(1, 8, model.config.text_dim)
    state = h.init_state(1)
    with torch.no_grad():
        for _ in range(3):
            state = h.commit(state, torch.randn(1, 16, 2, *LATENT), 0.0, prompt)[1]
        for mode in ("read", "commit"):
            counter = FlopCounterMode(display=False)
            with counter:
                getattr(h, mode)(state, torch.randn(1, 16, 2, *LATENT), 500.0, prompt)
            f = pass_flops(model.config, LATENT, 2, len(h.held_frames(state.cursor)), kind, text_tokens=8,
                           global_live=True, commit=mode == "commit")
            modelled = f["linear"] + f["memory"] + f["self_attention"]
            if mode == "read":
                assert counter.get_total_flops() == modelled
            elif aggregate == "frame_mean":  # the global write's scan is left out of the model: small here
                assert 0 <= counter.get_total_flops() - modelled < 0.01 * modelled
            else:  # the scan of a token or block write per place is not small at this toy width; only the rest is
                assert counter.get_total_flops() >= modelled


def test_an_in_place_parameter_update_between_reads_prepares_again():
    _, h = injected("hybrid_gdn")
    _, state = run_chunks(h, chunks=3)
    prompt, x = torch.randn(1, 8, h.model.config.text_dim, dtype=torch.float64), torch.randn(1, 16, 2, *LATENT,
                                                                                             dtype=torch.float64)
    with torch.no_grad():
        h.read(state, x, 500.0, prompt)  # prepares the chunk
        for mem in h.memories:
            mem.router_b.add_(2.0)  # an optimiser step, load_memory, ...
        fast = h.read(state, x, 500.0, prompt)
        h.fast = False
        reference = h.read(state, x, 500.0, prompt)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-10)


def test_a_memory_that_overrides_the_global_read_alone_runs_the_reference_path(prepares):
    from memkit.memory.sink_window import SinkWindowMemory

    class Extra(SinkWindowMemory):
        def _global_read(self, tensors, q, x, t):  # a documented hook, without the fast path's counterparts
            return torch.ones_like(q)

    assert SinkWindowMemory.fast_path_exact() and not Extra.fast_path_exact()
    _, h = injected("sink_window")
    for mem in h.memories:
        mem.__class__ = Extra
    outs, _ = run_chunks(h, chunks=2)
    assert not prepares  # the reference path, which reads through _global_read
    h.fast = False
    torch.testing.assert_close(outs, run_chunks(h, chunks=2)[0], rtol=0, atol=0)


class _Linear:
    """A plain linear-attention global state (examples/custom_memory.py), as a mixin for the tests below."""

    gate_names = ()

    def _scan(self, M, k, v, gates):
        return M + torch.einsum("bnhk,bnhv->bhkv", k.to(M.dtype), v.to(M.dtype))


def _scaled():
    from memkit.memory.hybrid import HybridMemory

    class Scaled(_Linear, HybridMemory):  # with a parameter of its own in the scan
        kind = "scaled_linear"

        def __init__(self, cfg, **dims):
            super().__init__(cfg, **dims)
            self.scale = torch.nn.Parameter(torch.rand(()) + 0.5)

        def _scan(self, M, k, v, gates):
            return self.scale * super()._scan(M, k, v, gates) + (1 - self.scale) * M

    return Scaled


def _own_write():
    from memkit.memory.hybrid import HybridMemory

    class OwnWrite(_Linear, HybridMemory):  # overrides _write (not _items): its layers cannot share one scan
        kind = "own_write"
        write_uses_parameters = False

        def __init__(self, cfg, **dims):
            super().__init__(cfg, **dims)
            self.scale = torch.nn.Parameter(torch.rand(()) + 0.5)

        def _write(self, M, evicted):
            return super()._write(M, {**evicted, "v": self.scale * evicted["v"]})

    return OwnWrite


@pytest.mark.parametrize("make", [_scaled, _own_write])
def test_a_write_that_reads_its_own_parameters_is_not_batched_across_layers(make):
    Scaled = make()
    cfg = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=1)
    layers = [Scaled(cfg, num_heads=2, head_dim=8, dim=12, frame_tokens=4).double() for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    for mem in layers:
        torch.nn.init.normal_(mem.out_gate.weight, generator=gen)
    tokens = lambda: (*(torch.randn(1, 8, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3)),  # noqa: E731
                      torch.randn(1, 8, 12, generator=gen, dtype=torch.float64))
    states = [m.init_state(1, dtype=torch.float64) for m in layers]
    for _ in range(3):
        inputs = [tokens() for _ in layers]
        reference = [m.commit(s, *x)[1] for m, s, x in zip(layers, states, inputs)]
        chunks = [m.prepare(s, 2) for m, s in zip(layers, states)]
        for m, c, x in zip(layers, chunks, inputs):
            m.commit_prepared(c, *x)
        states = Scaled.commit_many(layers, chunks)
        for new, ref in zip(states, reference):
            torch.testing.assert_close(new["global.M"], ref["global.M"], rtol=0, atol=1e-12)
    assert states[0]["global.M"].abs().max() > 0


def test_the_fast_path_refuses_what_the_reference_refuses_before_any_work():
    from memkit.errors import BackendUnavailableError, DTypeError

    model = adapters.random_wan("tiny")
    h = adapters.inject(model, memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=2),
                        chunk_frames=2, latent_size=LATENT, memory_dtype=torch.float64)
    prompt, x = torch.randn(1, 8, model.config.text_dim), torch.randn(1, 16, 2, *LATENT)
    with torch.no_grad(), pytest.raises(DTypeError, match="memory.to"):
        h.read(h.init_state(1), x, 500.0, prompt)
    adapters.remove(model)
    h = adapters.inject(model, memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=2,
                                                   scan_backend="fla"), chunk_frames=2, latent_size=LATENT)
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="fla"):  # at the first chunk, not an eviction
        h.read(h.init_state(1), x, 500.0, prompt)


def test_i2v_cross_attention_on_the_fast_path_splits_the_context_as_the_model_does():
    from tests.backbones import LATENT as GRID
    from tests.backbones import tiny_model

    model = tiny_model("wan", image_dim=8, added_kv_proj_dim=24)
    cfg = memkit.MemoryConfig(kind="sink_window", sink_frames=1, window_frames=2)
    h = adapters.inject(model, cfg, chunk_frames=3, latent_size=GRID)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, *GRID, generator=gen, dtype=torch.float64)
    image = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)
    outs = []
    for fast in (True, False):  # each path its own prompt tensors: no K/V cached by the other
        h.fast = fast
        text = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with torch.no_grad():
            outs.append(h.read(h.init_state(2), latents, 500.0, text, encoder_hidden_states_image=image.clone()))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)


def test_a_read_of_another_stream_between_two_reads_gets_its_own_chunk(prepares):
    """The prepared chunks are kept for the passes of one state's chunk: a read of another stream in between
    prepares its own, and each read equals the reference path's."""
    _, h = injected("hybrid_gdn")
    _, a = run_chunks(h, chunks=3, seed=0)
    _, b = run_chunks(h, chunks=3, seed=1)
    prompt = torch.randn(1, 8, h.model.config.text_dim, dtype=torch.float64)
    x = torch.randn(1, 16, 2, *LATENT, dtype=torch.float64)
    prepares.clear()
    with torch.no_grad():
        fast = [h.read(s, x, 500.0, prompt) for s in (a, b, a)]
        assert len(prepares) == 3 * h.num_layers
        h.fast = False
        reference = [h.read(s, x, 500.0, prompt) for s in (a, b)]
    assert (reference[0] - reference[1]).abs().max() > 1e-3  # the two streams read differently
    assert torch.allclose(fast[0], reference[0], atol=1e-10) and torch.allclose(fast[2], reference[0], atol=1e-10)
    assert torch.allclose(fast[1], reference[1], atol=1e-10)
