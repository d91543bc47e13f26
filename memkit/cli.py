"""The ``memkit`` command: ``demo``, ``doctor``, ``bench memory``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _bench_memory(args, console: Console) -> int:
    from memkit.bench.memory import plot_results, print_results, run_memory_bench

    results = run_memory_bench(
        kinds=args.memories, chunks=args.chunks, chunk_frames=args.chunk_frames, sink_frames=args.sink_frames,
        window_frames=args.window_frames, heads=args.heads, head_dim=args.head_dim, frame_tokens=args.frame_tokens,
        dim=args.dim, device=args.device, dtype=DTYPES[args.dtype], progress=not args.quiet,
    )
    title = (f"memkit bench memory: {args.chunks} chunks x {args.chunk_frames} frames x {args.frame_tokens} tokens, "
             f"{args.heads}x{args.head_dim} heads, sink {args.sink_frames} + window {args.window_frames}, "
             f"{args.device} {args.dtype}")
    print_results(results, title, console)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_results(results, args.plot, title)
        console.print(f"plot written to {args.plot}")
    return 0


def _demo(args, console: Console) -> int:
    from memkit.demo import run_demo

    return run_demo(console, out_dir=args.out, chunks=args.chunks)


def _doctor(args, console: Console) -> int:
    from memkit.doctor import doctor

    return doctor(console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memkit", description="Plug-in memories for autoregressive video diffusion transformers"
    )
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="stream every memory variant, check streaming == parallel, plot cost per chunk")
    demo.add_argument("--out", default="out", help="folder for the plot (default: out/)")
    demo.add_argument("--chunks", type=int, default=96)
    demo.set_defaults(fn=_demo)

    doc = sub.add_parser("doctor", help="versions, and which optional GPU backends import and match the reference here")
    doc.set_defaults(fn=_doctor)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    mem = bsub.add_parser("memory", help="stream chunks through one block-sized memory of every variant")
    mem.add_argument("--chunks", type=int, default=256)
    mem.add_argument("--memories", nargs="+", default=None, help="variants to run (default: all)")
    mem.add_argument("--chunk-frames", type=int, default=3)
    mem.add_argument("--sink-frames", type=int, default=3)
    mem.add_argument("--window-frames", type=int, default=6)
    mem.add_argument("--heads", type=int, default=4)
    mem.add_argument("--head-dim", type=int, default=32)
    mem.add_argument("--frame-tokens", type=int, default=64)
    mem.add_argument("--dim", type=int, default=128)
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--dtype", choices=list(DTYPES), default="float32")
    mem.add_argument("--plot", default=None, help="write a PNG of time per chunk and state size")
    mem.add_argument("--quiet", action="store_true", help="no progress bar")
    mem.set_defaults(fn=_bench_memory)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    from memkit.errors import MemkitError

    try:
        return args.fn(args, console)
    except MemkitError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
