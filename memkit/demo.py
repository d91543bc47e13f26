"""``memkit demo``: memkit end to end on the built-in default (random weights, CPU-friendly).

1. Streams a clip through every variant chunk by chunk and checks it against
   the parallel (teacher-forcing) form.
2. Streams many chunks through every variant and plots cost per chunk and
   state size: ``full`` grows, the others stay flat.
3. Retrofits a small random Wan2.1 DiT with ``hybrid_gdn`` and streams a video
   with a prompt switch into ``out/demo.mp4`` (``memkit generate``).
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from memkit.bench.memory import plot_results, print_results, run_memory_bench
from memkit.memory import MemoryConfig, build_memory, list_memories


def check_streaming_equals_parallel(console: Console) -> bool:
    table = Table(title="streaming (commit per chunk) vs parallel, float64, 16 frames in chunks of 3")
    for col in ("memory", "max |stream - parallel|", "state KiB after 16 frames", "verdict"):
        table.add_column(col)
    ok = True
    heads, head_dim, dim, T, frames, F = 2, 16, 32, 16, 16, 3
    for kind in list_memories():
        torch.manual_seed(0)
        mem = build_memory(MemoryConfig(kind=kind, sink_frames=1, window_frames=3), num_heads=heads,
                           head_dim=head_dim, dim=dim, frame_tokens=T).double()
        with torch.no_grad():  # move off the zero init so the global memory takes part
            for p in mem.parameters():
                p.add_(0.3 * torch.randn_like(p))
        q, k, v = (torch.randn(1, frames * T, heads, head_dim, dtype=torch.float64) for _ in range(3))
        x = torch.randn(1, frames * T, dim, dtype=torch.float64)
        state, outs = mem.init_state(1, dtype=torch.float64), []
        with torch.no_grad():
            for c0 in range(0, frames, F):
                sl = slice(c0 * T, min(frames, c0 + F) * T)
                y, state = mem.commit(state, q[:, sl], k[:, sl], v[:, sl], x[:, sl])
                outs.append(y)
            err = (torch.cat(outs, 1) - mem.parallel(q, k, v, x, chunk_frames=F)).abs().max().item()
        good = err < 1e-10
        ok &= good
        verdict = "[green]equal[/]" if good else "[red]DIFFERENT[/]"
        table.add_row(kind, f"{err:.1e}", f"{state.nbytes / 1024:.1f}", verdict)
    console.print(table)
    return ok


DEMO_FILES = ["memory_demo.png", "demo.mp4"]


def run_demo(console: Console, out_dir: str = "out", chunks: int = 96, overwrite: bool = False) -> int:
    from memkit.outputs import check_output_folder

    folder = check_output_folder(out_dir, "--out", DEMO_FILES, overwrite=overwrite)  # before any work
    console.print("[bold]memkit demo[/bold]: memories on random inputs (CPU, built-in default sizes)\n")
    ok = check_streaming_equals_parallel(console)
    results = run_memory_bench(chunks=chunks)
    title = f"{chunks} chunks x 3 frames x 64 tokens, 4x32 heads, sink 3 + window 6, CPU float32"
    print_results(results, "time per chunk and state size: " + title, console)
    path = str(folder / DEMO_FILES[0])
    plot_results(results, path, title)
    console.print(f"plot written to {path}\n")
    from memkit.cli import build_parser
    from memkit.generate import run_generate

    video = str(folder / DEMO_FILES[1])
    args = build_parser().parse_args(["generate", "--seconds", "10", "--switch", "7", "--out", video,
                                      "--device", "cpu", "--dtype", "float32", *(["--overwrite"] if overwrite else [])])
    generated = run_generate(args, console)
    return 0 if ok and generated == 0 else 1
