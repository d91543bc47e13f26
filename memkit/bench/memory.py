"""``memkit bench memory``: stream chunks through one block-sized memory of every variant.

Variants run one after another in one process, on the same inputs; per-chunk
times are medians over a few chunks around an early and
a late point, and their ratio shows whether a memory's cost grows with the
stream (``full``) or stays flat (everything else).
"""

from __future__ import annotations

import statistics
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from memkit.memory import MemoryConfig, build_memory, list_memories
from memkit.memory.base import default_frame_shape
from memkit.outputs import atomic_output


@dataclass
class BenchResult:
    kind: str
    times_ms: list[float]
    state_bytes: list[int]

    def median_ms(self, lo: int, hi: int) -> float:
        return statistics.median(self.times_ms[lo:hi])

    def early_late_ms(self) -> tuple[float, float]:
        """Median ms per chunk over the early and the late chunks of :func:`windows`."""
        (e0, e1), (l0, l1) = windows(len(self.times_ms))
        return self.median_ms(e0, e1), self.median_ms(l0, l1)


def run_memory_bench(kinds=None, chunks=256, chunk_frames=3, sink_frames=3, window_frames=6, heads=4, head_dim=32,
                     frame_tokens=64, dim=128, device="cpu", dtype=torch.float32, seed=0, progress=True):
    kinds = list(kinds or list_memories())
    device = torch.device(device)
    torch.manual_seed(seed)
    mems, states = {}, {}
    blocks = min(2, *default_frame_shape(frame_tokens))  # a 2x2 grid of blocks where the token grid holds one
    for kind in kinds:
        cfg = MemoryConfig(kind=kind, sink_frames=sink_frames, window_frames=window_frames, blocks=blocks,
                           horizon_frames=chunks * chunk_frames, check_finite=False)
        mem = build_memory(cfg, num_heads=heads, head_dim=head_dim, dim=dim, frame_tokens=frame_tokens)
        mems[kind] = mem.to(device=device, dtype=dtype).eval()
        states[kind] = mems[kind].init_state(1, device=device, dtype=dtype)
    N = chunk_frames * frame_tokens
    pool = [
        tuple(torch.randn(1, N, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
        + (torch.randn(1, N, dim, device=device, dtype=dtype),)
        for _ in range(4)
    ]
    results = {kind: BenchResult(kind, [], []) for kind in kinds}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # One variant at a time: interleaving them lets full's growing cache evict the others' data from the
    # CPU caches, which shows up as a slow drift in every variant's time.
    bar = tqdm(total=chunks * len(kinds), desc="streaming chunks", disable=not progress, unit="chunk")
    with torch.inference_mode():
        for kind in kinds:
            bar.set_postfix_str(kind)
            for c in range(chunks):
                q, k, v, x = pool[c % len(pool)]
                sync()
                t0 = time.perf_counter()
                _, states[kind] = mems[kind].commit(states[kind], q, k, v, x)
                sync()
                results[kind].times_ms.append(1e3 * (time.perf_counter() - t0))
                results[kind].state_bytes.append(states[kind].nbytes)
                bar.update()
    bar.close()
    return results


def windows(chunks: int, span: int = 8) -> tuple[tuple[int, int], tuple[int, int]]:
    """(early, late) chunk ranges: a few chunks after warm-up, and the last few."""
    span = max(1, min(span, chunks // 4 or 1))
    early_lo = min(span, max(0, chunks - 2 * span))
    return (early_lo, early_lo + span), (chunks - span, chunks)


def results_table(results: dict[str, BenchResult], title: str) -> Table:
    chunks = len(next(iter(results.values())).times_ms)
    (e0, e1), (l0, l1) = windows(chunks)
    table = Table(title=title)
    for col in ("memory", f"chunk {e0}-{e1 - 1} ms", f"chunk {l0}-{l1 - 1} ms", "late / early", "state MiB (end)"):
        table.add_column(col, justify="left" if col == "memory" else "right")
    for r in results.values():
        early, late = r.early_late_ms()
        table.add_row(r.kind, f"{early:.3f}", f"{late:.3f}", f"{late / early:.2f}", f"{r.state_bytes[-1] / 2**20:.2f}")
    return table


def timing_caveat(results: dict[str, BenchResult], bound: float = 1.3) -> str | None:
    """A note when a bounded memory (all but ``full``) got slower than ``bound`` x from its early to its late
    chunks: its cost is flat by construction, so such a ratio measures the machine (other load, clock changes),
    not the memory. None when every bounded memory stays within ``bound``."""
    import os

    ratios = {r.kind: late / early for r in results.values() if r.kind != "full" for early, late in [r.early_late_ms()]}
    worst = max(ratios, key=ratios.get, default=None)
    if worst is None or ratios[worst] <= bound:
        return None
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    return (f"note: {worst}'s late / early time is {ratios[worst]:.1f}x, but a bounded memory does the same work "
            f"every chunk: these timings are noisy ({load}); rerun on an idle machine to see its flat cost")


def plot_results(results: dict[str, BenchResult], path: str, title: str) -> None:
    """Time per chunk and state size of each result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results.values():
        ax_t.plot(r.times_ms, label=r.kind, lw=1)
        ax_m.plot([b / 2**20 for b in r.state_bytes], label=r.kind, lw=1.5)
    ax_t.set(xlabel="chunk index", ylabel="commit time per chunk (ms)", title="time per chunk", yscale="log")
    ax_m.set(xlabel="chunk index", ylabel="state size (MiB)", title="memory state size")
    ax_t.legend()
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def print_results(results, title, console: Console | None = None):
    (console or Console()).print(results_table(results, title))
