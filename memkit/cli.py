"""The ``memkit`` command: ``demo``, ``doctor``, ``generate``, ``train``, ``encode``, ``bench memory``,
``bench stream``, ``bench speed``, ``bench train``, ``bench quality``, ``bench recall``."""

from __future__ import annotations

import sys
import traceback

import torch
from rich.console import Console
from rich.markup import escape

from memkit.bench.train import LOSSES as TRAIN_LOSSES
from memkit.cli_args import ArgumentParser, checked_device, nonnegative_int, positive_int
from memkit.errors import ConfigError
from memkit.ops._checks import DTYPES
from memkit.outputs import check_outputs

#: Exit codes: 0 done, 1 the work failed, 2 a bad command line or input, 130 interrupted (Ctrl-C); stopped by a
#: signal: 128 + its number (143 SIGTERM, 129 SIGHUP).
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _bench_memory(args, console: Console) -> int:
    from memkit.bench.memory import plot_results, print_results, run_memory_bench

    _check_bench(args)
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
        plot_results(results, args.plot, title)
        console.print(f"plot written to {args.plot}")
    return 0


def _check_bench(args) -> None:
    """What a benchmark needs, checked before it runs: a usable device and a plot path it may write."""
    checked_device(args.device)
    check_outputs({"--plot": getattr(args, "plot", None)}, overwrite=getattr(args, "overwrite", False))


def _bench_train(args, console: Console) -> int:
    from memkit.bench.train import results_table, run_train_bench

    _check_bench(args)
    if args.frames < args.chunk_frames:
        raise ConfigError(f"--frames {args.frames} is shorter than one chunk (--chunk-frames {args.chunk_frames})")
    overrides = {"in_channels": 3, "out_channels": 3} if args.pixel else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_train_bench(
        losses=args.losses, size=args.size, latent_size=tuple(args.latent_size), frames=args.frames,
        batch=args.batch, chunk_frames=args.chunk_frames, memory=args.memory, sink_frames=args.sink_frames,
        window_frames=args.window_frames, steps=args.steps, warmup=args.warmup, device=args.device,
        dtype=DTYPES[args.dtype], activation_checkpointing=args.activation_checkpointing, overrides=overrides,
    )
    h, w = args.latent_size
    title = (f"memkit bench train: Wan {args.size!r} (random weights), batch {args.batch} x {args.frames} latent "
             f"frames of {h}x{w}, chunks of {args.chunk_frames}, {args.memory} (sink {args.sink_frames} + window "
             f"{args.window_frames}), memory-only training, {args.device} {args.dtype}"
             f"{', activation checkpointing' if args.activation_checkpointing else ''}; {args.steps} timed steps")
    console.print(results_table(results, title))
    return 0


def _train(argv: list[str]) -> int:
    from memkit.train.cli import run_train

    return run_train(argv)


def _encode(args, console: Console) -> int:
    from memkit.data.encode import run_encode

    return run_encode(args, console)


def _demo(args, console: Console) -> int:
    from memkit.demo import run_demo

    return run_demo(console, out_dir=args.out, chunks=args.chunks, overwrite=args.overwrite)


def _doctor(args, console: Console) -> int:
    from memkit.doctor import doctor

    return doctor(console)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="memkit", description="Plug-in memories for autoregressive video diffusion transformers",
        epilog="exit codes: 0 done, 1 the work failed, 2 a bad command line or input file, 130 interrupted. "
               "Errors are one line; --debug (anywhere on the line) shows the traceback.",
    )
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="stream every memory variant, check streaming == parallel, plot cost per chunk")
    demo.add_argument("--out", default="out", help="folder for the plot and the video (default: out/)")
    demo.add_argument("--chunks", type=positive_int, default=96)
    demo.add_argument("--overwrite", action="store_true", help="replace the demo's files in --out")
    demo.set_defaults(fn=_demo)

    doc = sub.add_parser("doctor", help="versions, and which optional GPU backends import and match the reference here")
    doc.set_defaults(fn=_doctor)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    mem = bsub.add_parser("memory", help="stream chunks through one block-sized memory of every variant")
    mem.add_argument("--chunks", type=positive_int, default=256)
    mem.add_argument("--memories", nargs="+", default=None, help="variants to run (default: all)")
    mem.add_argument("--chunk-frames", type=positive_int, default=3)
    mem.add_argument("--sink-frames", type=nonnegative_int, default=3)
    mem.add_argument("--window-frames", type=positive_int, default=6)
    mem.add_argument("--heads", type=positive_int, default=4)
    mem.add_argument("--head-dim", type=positive_int, default=32)
    mem.add_argument("--frame-tokens", type=positive_int, default=64)
    mem.add_argument("--dim", type=positive_int, default=128)
    mem.add_argument("--device", default="cpu", help="default: cpu (cuda for the GPU)")
    mem.add_argument("--dtype", choices=list(DTYPES), default="float32")
    mem.add_argument("--plot", default=None, help="write a PNG of time per chunk and state size")
    mem.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    mem.add_argument("--quiet", action="store_true", help="no progress bar")
    mem.set_defaults(fn=_bench_memory)

    tr = bsub.add_parser("train", help="training steps/s and peak memory of each loss beside the stock model's "
                                       "forward+backward over the same frames")
    tr.add_argument("--losses", nargs="+", default=list(TRAIN_LOSSES), choices=list(TRAIN_LOSSES))
    tr.add_argument("--size", default="tiny", help="Wan config: tiny, small or 1.3B (default: tiny)")
    tr.add_argument("--pixel", action="store_true", help="a 3-channel (pixel-space) variant of the config")
    tr.add_argument("--latent-size", type=positive_int, nargs=2, default=[16, 16], metavar=("H", "W"))
    tr.add_argument("--frames", type=positive_int, default=12, help="latent frames per clip (default: 12)")
    tr.add_argument("--batch", type=positive_int, default=1)
    tr.add_argument("--chunk-frames", type=positive_int, default=3)
    tr.add_argument("--memory", default="hybrid_gdn")
    tr.add_argument("--sink-frames", type=nonnegative_int, default=3)
    tr.add_argument("--window-frames", type=positive_int, default=6)
    tr.add_argument("--steps", type=positive_int, default=5, help="timed steps per loss")
    tr.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first")
    tr.add_argument("--activation-checkpointing", action="store_true")
    tr.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    tr.add_argument("--device", default="cpu", help="default: cpu (cuda for the GPU)")
    tr.add_argument("--dtype", choices=list(DTYPES), default="float32")
    tr.set_defaults(fn=_bench_train)

    from memkit.bench.quality import add_quality_parser
    from memkit.bench.recall import add_recall_parser
    from memkit.bench.speed import add_speed_parsers

    add_speed_parsers(bsub)
    add_quality_parser(bsub)
    add_recall_parser(bsub)

    sub.add_parser("train", help="fine-tune a memory with Lightning (memkit train --help)", add_help=False)

    from memkit.data.encode import add_encode_parser

    add_encode_parser(sub)

    from memkit.generate import add_generate_parser

    add_generate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is one line on stderr and a non-zero exit code; ``--debug`` adds the
    traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    console, errors = Console(), Console(stderr=True, soft_wrap=True)
    from memkit.errors import MemkitError
    from memkit.signals import Terminated, stop_on_signals

    try:
        with stop_on_signals():
            if argv[:1] == ["train"]:  # Lightning's CLI parses its own flags
                return _train(argv[1:])
            args = build_parser().parse_args(argv)
            return args.fn(args, console)
    except KeyboardInterrupt:
        _report(errors, "interrupted (outputs not finished were not written)", debug)
        return EXIT_INTERRUPTED
    except Terminated as stop:
        _report(errors, f"stopped by {stop.name} (outputs not finished were not written)", debug)
        return stop.exit_code
    except (MemkitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        _report(errors, str(exc), debug)
        return EXIT_USAGE
    except Exception as exc:  # anything else is a failure of the work, still reported in one line
        _report(errors, f"{type(exc).__name__}: {exc} (memkit --debug ... shows where)", debug)
        return EXIT_FAILED


def _report(console: Console, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
