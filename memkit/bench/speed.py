"""``memkit bench speed``: the chunk loop's speed on the Wan2.1-1.3B shape, every memory variant side by side in
one run, against the cost model of :mod:`memkit.bench.costs`; ``memkit bench stream`` is the same benchmark with
the defaults of a CPU (:data:`PRESETS`).

Per variant (random weights; 4 denoising reads + 1 commit per chunk; the fast path, compiled on CUDA):
the fast path against the reference path on the first chunks (relative error per chunk), the steady-state video
FPS of the DiT alone and end to end with the VAE, latency, state size and peak memory at the probe chunks, the
share of a chunk spent in the memory's own operations, and on CUDA the fraction of the roofline reached.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memkit.errors import ConfigError

from .costs import chunk_costs

#: name -> (memory kind, sink frames, window frames): Self-Forcing's rolling cache (21 frames of keys with the
#: chunk), LongLive's sink + window (12), the hybrid on the same 12, and the unbounded cache.
VARIANTS = {
    "window": ("window", 0, 18),
    "sink_window": ("sink_window", 3, 6),
    "hybrid_gdn": ("hybrid_gdn", 3, 6),
    "full": ("full", 0, 6),
}


@dataclass
class SpeedSetup:
    size: str = "1.3B"
    latent_size: tuple[int, int] = (60, 104)
    chunk_frames: int = 3
    chunks: int = 800
    probes: tuple[int, ...] = (10, 100, 800)
    variants: tuple[str, ...] = tuple(VARIANTS)
    device: str = "cuda"
    dtype: str = "bfloat16"
    compile: bool = True
    vae: bool = True
    e2e_chunks: int = 20
    check_chunks: int = 2
    max_seconds: float | None = None  # per variant; `full` stops here (or at out of memory)
    full_max_seconds: float | None = 90.0
    # the local memory of every variant when set (``window`` has no sink; ``full`` keeps every frame)
    sink_frames: int | None = None
    window_frames: int | None = None
    seed: int = 0

    def __post_init__(self):
        from memkit.memory import list_memories

        known = [*VARIANTS, *(k for k in list_memories() if k not in VARIANTS)]
        unknown = [v for v in self.variants if v not in known]
        if unknown:
            raise ConfigError(f"bench: unknown variants {unknown}; choose from {', '.join(known)}")
        if not self.probes or any(p < 1 for p in self.probes) or max(self.probes) > self.chunks:
            raise ConfigError(f"bench: probes {list(self.probes)} must lie in 1..--chunks ({self.chunks})")

    def memory(self, name: str) -> tuple[str, int, int]:
        """(memory kind, sink frames, window frames) of a variant: its preset in :data:`VARIANTS` (a registered
        kind without one: sink 3 + window 6), with ``sink_frames`` / ``window_frames`` when set."""
        kind, sink, window = VARIANTS.get(name, (name, 3, 6))
        return (kind, sink if self.sink_frames is None else self.sink_frames,
                window if self.window_frames is None else self.window_frames)


#: The benchmark's two faces. ``speed``: the 1.3B shape on a GPU, compiled, with the VAE. ``stream``: a small Wan on a
#: CPU over a long stream, eager and without the VAE, the bounded memories against ``full`` (which runs to the end).
PRESETS = {
    "speed": SpeedSetup(),
    "stream": SpeedSetup(size="small", latent_size=(16, 16), chunks=200, probes=(10, 200),
                         variants=("full", "sink_window", "hybrid_gdn"), device="cpu", dtype="float32",
                         compile=False, vae=False, full_max_seconds=None),
}


def report_files(name: str) -> list[str]:
    return [f"{name}.md", f"{name}.json", f"{name}.png"]


def default_probes(preset: SpeedSetup, chunks: int) -> tuple[int, ...]:
    """A preset's probes that fall inside a stream of ``chunks``, and its last chunk."""
    return tuple(sorted({p for p in preset.probes if p < chunks} | {chunks}))


@dataclass
class VariantResult:
    name: str
    kind: str
    sink_frames: int
    window_frames: int | None  # None: `full` keeps every frame
    times_ms: list[float] = field(default_factory=list)
    state_bytes: list[int] = field(default_factory=list)  # per chunk: memories and held latents after it
    peak_gib: dict[int, float] = field(default_factory=dict)   # chunk -> peak GPU memory of that chunk
    check_rel_err: dict[str, list[float]] = field(default_factory=dict)  # "eager" / "compiled" -> per chunk
    e2e_ms: float | None = None      # median ms per chunk with the VAE decode
    memory_ms: float | None = None   # the memory's own operations per chunk (all layers, all passes)
    attention_ms: float | None = None  # of which the attention kernel itself
    stopped: str | None = None
    costs: dict = field(default_factory=dict)

    def latency(self, chunk: int, span: int = 5) -> float | None:
        """Median ms per chunk over the ``span`` chunks ending at ``chunk`` (1-based)."""
        if len(self.times_ms) < chunk:
            return None
        return statistics.median(self.times_ms[max(0, chunk - span): chunk])

    def steady_ms(self, first_probe: int = 10) -> float | None:
        """The time per chunk the FPS, shares and roofline refer to: a bounded memory's median after
        ``first_probe`` chunks; ``full`` (which only grows) at ``first_probe``, where its costs are modelled."""
        if self.kind == "full":
            return self.latency(first_probe)
        rest = self.times_ms[first_probe:] or self.times_ms[-1:]
        return statistics.median(rest) if rest else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_speed_bench(setup: SpeedSetup, progress: bool = True) -> dict[str, VariantResult]:
    import adapters
    from memkit.ops._checks import DTYPES

    device, dtype = torch.device(setup.device), DTYPES[setup.dtype]
    model = adapters.random_wan(setup.size, seed=setup.seed, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(setup.seed)
    prompt = torch.randn(1, 512, model.config.text_dim, generator=gen).to(device=device, dtype=dtype)
    vae = _random_vae(setup, device, dtype) if setup.vae else None
    results = {}
    for name in setup.variants:
        if setup.compile:
            # Compiled blocks share one code object: the graphs of the variant before would count against the
            # recompile limit of this one.
            torch._dynamo.reset()
        results[name] = _bench_variant(name, model, prompt, vae, setup, device, dtype, progress)
        # Nothing of this variant (its generators, the VAE's cache, its states) may count in the next one's peaks.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _bench_variant(name, model, prompt, vae, setup: SpeedSetup, device, dtype, progress: bool) -> VariantResult:
    import adapters
    import memkit
    from memkit.rollout import StreamingGenerator

    kind, sink, window = setup.memory(name)
    cfg = memkit.MemoryConfig(kind=kind, sink_frames=sink, window_frames=window,
                              horizon_frames=setup.chunks * setup.chunk_frames)
    h = adapters.inject(model, cfg, chunk_frames=setup.chunk_frames, latent_size=tuple(setup.latent_size))
    mem = h.memories[0]  # what the kind makes of the config (``window`` drops the sink, ``full`` the window)
    r = VariantResult(name, kind, mem.sink_frames, mem.window_frames)
    try:
        r.costs = chunk_costs(model.config, tuple(setup.latent_size), setup.chunk_frames, mem.sink_frames,
                              mem.window_frames or 0, kind, text_tokens=prompt.shape[1],
                              dtype_bytes=prompt.element_size(), at_chunk=min(setup.probes))
        r.check_rel_err = check_fast_path(h, prompt, setup)
        if setup.compile:
            h.compile()
        limits = [setup.max_seconds] + ([setup.full_max_seconds] if kind == "full" else [])
        limit = min((x for x in limits if x is not None), default=None)
        _time_stream(r, StreamingGenerator(h, prompt, seed=setup.seed, progress=False), setup, device, limit,
                     progress)
        if vae is not None:
            r.e2e_ms = _median_chunk_ms(StreamingGenerator(h, prompt, seed=setup.seed, vae=vae, progress=False),
                                        setup.e2e_chunks, device)
        r.memory_ms, r.attention_ms = time_memory_ops(h, setup, device, dtype)
    finally:
        adapters.remove(model)
    return r


def check_fast_path(h, prompt, setup: SpeedSetup) -> dict[str, list[float]]:
    """Per chunk, the largest relative error (max abs difference / max abs value) of the fast path's outputs
    (every read and the commit) against the reference path's, from the same inputs; eager, and compiled when the
    setup compiles. The stream first fills the memory (compiled blocks run those chunks eagerly), then
    ``check_chunks`` steady-state chunks follow; all are compared."""
    device, dtype = prompt.device, prompt.dtype
    gen = torch.Generator().manual_seed(setup.seed + 1)
    mem = h.memories[0]
    filling = 0 if mem.window_frames is None or not setup.check_chunks else \
        (mem.sink_frames + mem.window_frames) // setup.chunk_frames + 1
    chunks = [torch.randn(1, h.dims.in_channels, setup.chunk_frames, *setup.latent_size, generator=gen)
              .to(device=device, dtype=dtype) for _ in range(filling + setup.check_chunks)]
    steps = (1000.0, 750.0, 500.0, 250.0)

    def outputs(fast: bool):
        h.fast = fast
        # a prompt of its own: the paths must not share cached cross-attention K/V
        text = prompt if fast else prompt.clone()
        state, outs = h.init_state(1), []
        with torch.no_grad():
            for x in chunks:
                per_chunk = [h.read(state, x, t, text) for t in steps]
                y, state = h.commit(state, x, 0.0, text)
                outs.append(per_chunk + [y])
        return outs

    def errors(a, b):
        return [max(((p.float() - q.float()).abs().max() / q.float().abs().max().clamp_min(1e-30)).item()
                    for p, q in zip(pa, pb)) for pa, pb in zip(a, b)]

    try:
        reference = outputs(False)
        found = {"eager": errors(outputs(True), reference)}
        if setup.compile:
            h.compile()
            found["compiled"] = errors(outputs(True), reference)
            h.compile(disable=True)
    finally:
        h.fast = True
    return found


def _time_stream(r: VariantResult, gen, setup: SpeedSetup, device, limit: float | None, progress: bool) -> None:
    from tqdm.auto import tqdm

    from memkit.rollout.generator import PeakMemory

    stream = gen.stream(setup.chunks)
    spent, peaks = 0.0, PeakMemory(device)
    bar = tqdm(total=setup.chunks, desc=f"{r.name}", unit="chunk", disable=not progress)
    try:
        for i in range(1, setup.chunks + 1):
            with peaks.measure(i) if i in setup.probes else contextlib.nullcontext():
                _sync(device)
                t0 = time.perf_counter()
                try:
                    next(stream)
                except torch.cuda.OutOfMemoryError:
                    r.stopped = f"out of memory at chunk {i}"
                    break
                _sync(device)
                elapsed = time.perf_counter() - t0
            r.times_ms.append(1e3 * elapsed)
            r.state_bytes.append(gen.memory_nbytes)
            spent += elapsed
            bar.update()
            if limit is not None and spent > limit and i < setup.chunks:
                r.stopped = f"stopped at chunk {i} after {spent:.0f} s (time limit)"
                break
    finally:
        bar.close()
        stream.close()
        # the probes' peaks, of the chunks that finished
        r.peak_gib = {i: b / 2**30 for i, b in peaks.peaks.items() if i <= len(r.times_ms)}


def _median_chunk_ms(gen, chunks: int, device, warmup: int = 3) -> float:
    stream = gen.stream(chunks + warmup)
    times = []
    try:
        for i in range(chunks + warmup):
            _sync(device)
            t0 = time.perf_counter()
            next(stream)
            _sync(device)
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - t0))
    finally:
        stream.close()
    return statistics.median(times)


def time_memory_ops(h, setup: SpeedSetup, device, dtype, repeats: int = 3) -> tuple[float, float]:
    """ms per chunk of the memory's own operations on the stream's shapes, all layers, in steady state: one
    preparation, 4 reads and a commit per layer, then the batched commit; and of the attention kernel alone
    (SDPA over the same keys). Timed by themselves, side by side with the chunk."""
    from memkit.ops import attention

    mems = h.memories
    T, F = mems[0].frame_tokens, setup.chunk_frames
    d = h.dims
    gen = torch.Generator().manual_seed(setup.seed + 2)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # a steady-state state: the sink and the window full (and a global state written), by committing random tokens
    states = [m.init_state(1, device=device, dtype=dtype) for m in mems]
    q, k, v, x = randn(1, F * T, d.num_heads, d.head_dim), randn(1, F * T, d.num_heads, d.head_dim), \
        randn(1, F * T, d.num_heads, d.head_dim), randn(1, F * T, d.dim)
    # bounded memories: full, with a written global state; `full`: as at the first probe, where its costs are modelled
    window = mems[0].window_frames
    warm_chunks = -(-(mems[0].sink_frames + window + 2 * F) // F) if window is not None else min(setup.probes) - 1
    rope = h.rope()
    with torch.no_grad():
        for _ in range(warm_chunks):
            chunks = [m.prepare(s, F, rope) for m, s in zip(mems, states)]
            for m, c in zip(mems, chunks):
                m.commit_prepared(c, q, k, v, x)
            states = type(mems[0]).commit_many(mems, chunks)

        def memory_chunk():
            chunks = [m.prepare(s, F, rope) for m, s in zip(mems, states)]
            for m, c in zip(mems, chunks):
                for _ in range(4):
                    m.read_prepared(c, q, k, v, x)
                m.commit_prepared(c, q, k, v, x)
            type(mems[0]).commit_many(mems, chunks)

        held = mems[0].prepare(states[0], F, rope).keys.shape[1]
        keys, values = randn(1, held, d.num_heads, d.head_dim), randn(1, held, d.num_heads, d.head_dim)

        def attention_chunk():
            for _ in range(5 * len(mems)):
                attention(q, keys, values)

        return _best_ms(memory_chunk, device, repeats), _best_ms(attention_chunk, device, repeats)


def _best_ms(fn, device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, 1e3 * (time.perf_counter() - t0))
    return best


def _random_vae(setup: SpeedSetup, device, dtype):
    """The Wan2.1 VAE's architecture with random weights (the 1.3B shape), or the tiny test VAE for small models."""
    if setup.size != "1.3B":
        from memkit.rollout.vae import tiny_wan_vae

        return tiny_wan_vae(dtype=dtype).to(device)
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setup.seed)
        vae = AutoencoderKLWan()
    torch.nn.Module.to(vae, device=device, dtype=dtype)
    return vae.eval()


# -- report ------------------------------------------------------------------------------------------------------
def summary_rows(results: dict[str, VariantResult], setup: SpeedSetup) -> list[dict]:
    frames = 4 * setup.chunk_frames  # video frames per chunk: 4 per latent frame
    rows = []
    for r in results.values():
        steady = r.steady_ms(min(setup.probes))
        row = {"variant": r.name, "keys": r.costs.get("key_frames"),
               "DiT FPS": None if steady is None else frames * 1e3 / steady,
               "e2e FPS": None if r.e2e_ms is None else frames * 1e3 / r.e2e_ms}
        for p in setup.probes:
            row[f"ms@{p}"] = r.latency(p)
        last, first = r.latency(max(setup.probes)), r.latency(min(setup.probes))
        row["last/first"] = None if last is None or first is None else last / first
        for p in setup.probes:
            row[f"state MiB@{p}"] = r.state_bytes[p - 1] / 2**20 if len(r.state_bytes) >= p else None
        for p in setup.probes:
            row[f"GiB@{p}"] = r.peak_gib.get(p)
        row["mem ops %"] = None if r.memory_ms is None or not steady else 100 * r.memory_ms / steady
        row["attn %"] = None if r.attention_ms is None or not steady else 100 * r.attention_ms / steady
        ideal = r.costs.get("roofline_ms")  # at an H100's ceilings: no measure of a CPU
        row["roofline"] = None if ideal is None or not steady or not setup.device.startswith("cuda") \
            else ideal / steady
        worst = max((e for errs in r.check_rel_err.values() for e in errs), default=None)
        row["fast-ref err"] = worst
        row["note"] = r.stopped or ""
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 0.01 or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def shown_columns(rows: list[dict]) -> list[str]:
    """The summary's columns with something to say: none that is empty in every row (no VAE, no GPU)."""
    return [c for c in rows[0] if any(row[c] not in (None, "") for row in rows)]


def results_markdown(results, setup: SpeedSetup, command: str, device_name: str, name: str = "speed") -> str:
    rows = summary_rows(results, setup)
    cols = shown_columns(rows)
    lines = [f"# memkit bench {name}", "", f"`{command}`", "",
             f"{device_name}; Wan {setup.size} shape (random weights), {setup.dtype}, latents "
             f"{setup.latent_size[0]}x{setup.latent_size[1]}, {setup.chunk_frames} latent frames per chunk, "
             f"4 denoising reads + 1 commit per chunk, {'compiled' if setup.compile else 'eager'} blocks"
             f"{'' if setup.vae else ', no VAE'}. State: the memories and held latents after the chunk.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in rows]
    lines += ["", "Costs per chunk (model of memkit.bench.costs; the roofline at an H100's ceilings):", "",
              "| variant | keys (frames) | matmul GFLOP | attention GFLOP | MB moved | roofline ms |",
              "|---|---|---|---|---|---|"]
    for r in results.values():
        c = r.costs
        lines.append(f"| {r.name} | {c['key_frames']} | {_fmt(c['matmul_flops'] / 1e9)} | "
                     f"{_fmt(c['attention_flops'] / 1e9)} | {_fmt(c['bytes'] / 1e6)} | {_fmt(c['roofline_ms'])} |")
    return "\n".join(lines) + "\n"


def write_report(results, setup: SpeedSetup, out_dir, command: str, device_name: str,
                 name: str = "speed") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memkit.outputs import atomic_output

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f for f in report_files(name)]
    with atomic_output(paths[0]) as tmp:
        tmp.write_text(results_markdown(results, setup, command, device_name, name))
    with atomic_output(paths[1]) as tmp:
        tmp.write_text(json.dumps({"setup": asdict(setup), "device": device_name, "command": command,
                                   "summary": summary_rows(results, setup),
                                   "results": {k: asdict(r) for k, r in results.items()}}, indent=1))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results.values():
        chunks = range(1, len(r.times_ms) + 1)
        ax_t.plot(chunks, r.times_ms, label=r.name, lw=1)
        ax_m.plot(chunks, [b / 2**20 for b in r.state_bytes], label=r.name, lw=1.5)
    ax_t.set(xlabel="chunk", ylabel="ms per chunk (DiT)", yscale="log", title="time per chunk as the stream goes on")
    ax_m.set(xlabel="chunk", ylabel="MiB", title="state: memories and held latents")
    ax_t.legend()
    fig.suptitle(f"memkit bench {name}: {device_name}, Wan {setup.size}, {setup.dtype}", fontsize=10)
    fig.tight_layout()
    with atomic_output(paths[2]) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return paths


def _print_wide(console, table, width: int = 200) -> None:
    """A log file gets the whole table, a line per variant (a terminal folds what does not fit its width)."""
    narrow = console.width
    console.width = max(narrow, width)
    try:
        console.print(table)
    finally:
        console.width = narrow


def add_speed_parsers(bsub) -> None:
    """``bench speed`` and ``bench stream``: one benchmark, the flags of one, the defaults of its preset."""
    _add_parser(bsub, "speed", "the chunk loop on the Wan2.1-1.3B shape on a GPU: window 18, sink_window 3+6, "
                               "hybrid_gdn 3+6 and full side by side (FPS, latency, state, peak memory, roofline)")
    _add_parser(bsub, "stream", "bench speed's CPU preset: a small Wan over 200 chunks, full against sink_window "
                                "and hybrid_gdn (time per chunk and state, early and late)")


def _add_parser(bsub, name: str, help: str) -> None:
    from memkit.cli_args import nonnegative_int, positive_int

    d = PRESETS[name]
    s = bsub.add_parser(name, help=help, description=help)
    s.add_argument("--variants", nargs="+", default=list(d.variants), metavar="VARIANT",
                   help=f"presets {', '.join(VARIANTS)} or any memory kind ({' '.join(d.variants)})")
    s.add_argument("--size", default=d.size, help=f"Wan config: tiny, small or 1.3B ({d.size})")
    s.add_argument("--latent-size", type=positive_int, nargs=2, default=list(d.latent_size), metavar=("H", "W"),
                   help=f"latent frame size; 832x480 video: 60 104 ({d.latent_size[0]} {d.latent_size[1]})")
    s.add_argument("--chunk-frames", type=positive_int, default=d.chunk_frames)
    s.add_argument("--sink-frames", type=nonnegative_int, default=None,
                   help="sink frames of every variant (default: each variant's preset)")
    s.add_argument("--window-frames", type=positive_int, default=None,
                   help="window frames of every variant (default: each variant's preset)")
    s.add_argument("--chunks", type=positive_int, default=d.chunks, help=f"chunks streamed per variant ({d.chunks})")
    s.add_argument("--probes", type=positive_int, nargs="+", default=None,
                   help="chunks whose latency, state and peak memory are reported (default: "
                        f"{' '.join(map(str, d.probes))} within --chunks, and the last)")
    s.add_argument("--e2e-chunks", type=positive_int, default=d.e2e_chunks, help="chunks timed with the VAE")
    s.add_argument("--check-chunks", type=nonnegative_int, default=d.check_chunks,
                   help="chunks compared between the fast and the reference path")
    s.add_argument("--max-seconds", type=float, default=None, help="stop a variant after this many seconds")
    s.add_argument("--full-max-seconds", type=float, default=d.full_max_seconds,
                   help="stop the unbounded 'full' cache after this many seconds "
                        f"({'no limit' if d.full_max_seconds is None else f'{d.full_max_seconds:g}'})")
    s.add_argument("--no-compile", action="store_true", help="eager blocks (default: compiled on CUDA)")
    if d.vae:
        s.add_argument("--no-vae", action="store_true", help="skip the end-to-end timing with the VAE")
    else:
        s.add_argument("--vae", action="store_true", help="also time the chunk loop end to end with the VAE")
    s.add_argument("--device", default=d.device, help=f"default: {d.device}")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=d.dtype)
    s.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    s.add_argument("--out", default="docs/results",
                   help=f"folder for {', '.join(report_files(name))} (default: docs/results)")
    s.add_argument("--overwrite", action="store_true", help="replace existing report files")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=run_speed_command, report=name)


def run_speed_command(args, console) -> int:
    import shlex
    import sys

    from rich.table import Table

    from memkit.cli_args import checked_device
    from memkit.outputs import check_output_folder

    name, preset = args.report, PRESETS[args.report]
    device = checked_device(args.device)
    files = report_files(name)
    vae = not args.no_vae if preset.vae else args.vae
    setup = SpeedSetup(size=args.size, latent_size=tuple(args.latent_size), chunk_frames=args.chunk_frames,
                       chunks=args.chunks, probes=tuple(args.probes or default_probes(preset, args.chunks)),
                       variants=tuple(args.variants), device=str(device), dtype=args.dtype,
                       compile=not args.no_compile and device.type == "cuda", vae=vae, e2e_chunks=args.e2e_chunks,
                       check_chunks=args.check_chunks, max_seconds=args.max_seconds,
                       full_max_seconds=args.full_max_seconds, sink_frames=args.sink_frames,
                       window_frames=args.window_frames)
    check_output_folder(args.out, "--out", files, overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" \
        else f"CPU ({torch.get_num_threads()} threads)"
    results = run_speed_bench(setup, progress=not args.quiet)
    command = "memkit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] \
        else f"memkit bench {name}"
    rows = summary_rows(results, setup)
    table = Table(title=f"memkit bench {name}: {device_name}, Wan {setup.size}, {setup.dtype}")
    cols = shown_columns(rows)
    for col in cols:
        table.add_column(col, justify="left" if col in ("variant", "note") else "right", overflow="fold")
    for row in rows:
        table.add_row(*(_fmt(row[c]) for c in cols))
    console.print(table) if console.is_terminal else _print_wide(console, table)
    for path in write_report(results, setup, args.out, command, device_name, name):
        console.print(f"wrote {path}")
    return 0
