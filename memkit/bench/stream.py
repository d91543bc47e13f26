"""``memkit bench stream``: the whole generation loop (4 denoising reads + 1 commit per chunk) on a
randomly initialised Wan backbone, one memory variant after another in one process.

Reports, per memory, the time per chunk near chunk 10 and at the end, state bytes and (on CUDA)
peak memory at those points: ``full`` grows with the stream, the others stay flat.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from rich.table import Table
from tqdm import tqdm

DEFAULT_MEMORIES = ("full", "sink_window", "hybrid_gdn")


@dataclass
class StreamResult:
    kind: str
    times_ms: list[float] = field(default_factory=list)
    state_bytes: list[int] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    stopped: str | None = None  # why the stream ended early (out of memory)

    def median_ms(self, lo: int, hi: int) -> float:
        return statistics.median(self.times_ms[lo:hi])


def run_stream_bench(memories=DEFAULT_MEMORIES, chunks: int = 200, size: str = "small", latent_size=(16, 16),
                     chunk_frames: int = 3, sink_frames: int = 3, window_frames: int = 6, device="cpu",
                     dtype=torch.float32, seed: int = 0, progress: bool = True) -> dict[str, StreamResult]:
    import adapters
    import memkit
    from memkit.rollout import StreamingGenerator

    device = torch.device(device)
    cuda = device.type == "cuda"
    model = adapters.random_wan(size, seed=seed, dtype=dtype, device=device)
    prompt = torch.randn(1, 32, model.config.text_dim, generator=torch.Generator().manual_seed(seed))
    results = {}
    bar = tqdm(total=chunks * len(memories), desc="streaming", unit="chunk", disable=not progress)
    for kind in memories:
        cfg = memkit.MemoryConfig(kind=kind, sink_frames=sink_frames, window_frames=window_frames,
                                  horizon_frames=chunks * chunk_frames, check_finite=False)
        handle = adapters.inject(model, cfg, chunk_frames=chunk_frames, latent_size=tuple(latent_size))
        gen = StreamingGenerator(handle, prompt, seed=seed, progress=False)
        result = results[kind] = StreamResult(kind)
        bar.set_postfix_str(kind)
        stream = gen.stream(chunks)
        try:
            for _ in range(chunks):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                next(stream)
                if cuda:
                    torch.cuda.synchronize()
                    result.peak_bytes.append(torch.cuda.max_memory_allocated())
                result.times_ms.append(1e3 * (time.perf_counter() - t0))
                result.state_bytes.append(gen.memory_nbytes)
                bar.update()
        except torch.cuda.OutOfMemoryError:
            result.stopped = f"out of memory at chunk {len(result.times_ms)}"
            bar.update(chunks - len(result.times_ms))
        finally:
            stream.close()
            del gen, stream
            adapters.remove(model)
            if cuda:
                torch.cuda.empty_cache()
    bar.close()
    return results


def points(chunks: int, early: int = 10, span: int = 5) -> tuple[tuple[int, int], tuple[int, int]]:
    """Chunk ranges for the early and late medians: around ``early`` and the last ``span`` chunks."""
    early = min(early, max(0, chunks - span))
    lo = max(0, early - span // 2)
    return (lo, min(chunks, lo + span)), (max(0, chunks - span), chunks)


def results_table(results: dict[str, StreamResult], title: str, frames_per_chunk: int) -> Table:
    chunks = max(len(r.times_ms) for r in results.values())
    (e0, e1), (l0, l1) = points(chunks)
    cuda = any(r.peak_bytes for r in results.values())
    cols = ["memory", f"ms/chunk @{e0}-{e1 - 1}", f"ms/chunk @{l0}-{l1 - 1}", "late / early",
            f"state MiB @{e1 - 1}", f"state MiB @{l1 - 1}", "video FPS (late)"]
    if cuda:
        cols += [f"peak GiB @{e1 - 1}", f"peak GiB @{l1 - 1}"]
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="left" if col == "memory" else "right")
    for r in results.values():
        if len(r.times_ms) < l1:
            table.add_row(r.kind, *(["-"] * (len(cols) - 2)), r.stopped or "stopped")
            continue
        early, late = r.median_ms(e0, e1), r.median_ms(l0, l1)
        row = [r.kind, f"{early:.1f}", f"{late:.1f}", f"{late / early:.2f}", f"{r.state_bytes[e1 - 1] / 2**20:.2f}",
               f"{r.state_bytes[l1 - 1] / 2**20:.2f}", f"{1e3 * frames_per_chunk / late:.1f}"]
        if cuda:
            row += [f"{r.peak_bytes[e1 - 1] / 2**30:.2f}", f"{r.peak_bytes[l1 - 1] / 2**30:.2f}"]
        table.add_row(*row)
    return table
