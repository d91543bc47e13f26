"""The ``memkit`` command: ``demo``, ``doctor``, ``generate``, ``train``, ``encode``, ``bench memory``,
``bench stream``, ``bench train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

from memkit.bench.train import LOSSES as TRAIN_LOSSES
from memkit.errors import ConfigError
from memkit.ops._checks import DTYPES


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


def _bench_stream(args, console: Console) -> int:
    from memkit.bench.memory import plot_results
    from memkit.bench.stream import results_table, run_stream_bench

    results = run_stream_bench(
        memories=args.memories, chunks=args.chunks, size=args.size, latent_size=tuple(args.latent_size),
        chunk_frames=args.chunk_frames, sink_frames=args.sink_frames, window_frames=args.window_frames,
        device=args.device, dtype=DTYPES[args.dtype], progress=not args.quiet,
    )
    h, w = args.latent_size
    title = (f"memkit bench stream: Wan {args.size!r} (random weights), {args.chunks} chunks x {args.chunk_frames} "
             f"latent frames of {h}x{w}, 4 denoising reads + 1 commit per chunk, sink {args.sink_frames} + window "
             f"{args.window_frames}, {args.device} {args.dtype}")
    console.print(results_table(results, title, frames_per_chunk=4 * args.chunk_frames))
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_results(results, args.plot, title, time_label="time per chunk (ms)")
        console.print(f"plot written to {args.plot}")
    return 0


def _bench_train(args, console: Console) -> int:
    from memkit.bench.train import results_table, run_train_bench

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


def _generate(args, console: Console) -> int:
    from memkit.generate import run_generate

    return run_generate(args, console)


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

    st = bsub.add_parser("stream", help="the generation loop on a random Wan backbone with full, sink_window, "
                                        "hybrid_gdn: time per chunk, state and peak memory early and late")
    st.add_argument("--chunks", type=int, default=200)
    st.add_argument("--memories", nargs="+", default=["full", "sink_window", "hybrid_gdn"])
    st.add_argument("--size", default="small", help="Wan config: tiny, small or 1.3B (default: small)")
    st.add_argument("--latent-size", type=int, nargs=2, default=[16, 16], metavar=("H", "W"),
                    help="latent frame size (832x480 video: 60 104)")
    st.add_argument("--chunk-frames", type=int, default=3)
    st.add_argument("--sink-frames", type=int, default=3)
    st.add_argument("--window-frames", type=int, default=6)
    st.add_argument("--device", default="cpu")
    st.add_argument("--dtype", choices=list(DTYPES), default="float32")
    st.add_argument("--plot", default=None, help="write a PNG of time per chunk and state size")
    st.add_argument("--quiet", action="store_true", help="no progress bar")
    st.set_defaults(fn=_bench_stream)

    tr = bsub.add_parser("train", help="training steps/s and peak memory of each loss beside the stock model's "
                                       "forward+backward over the same frames")
    tr.add_argument("--losses", nargs="+", default=list(TRAIN_LOSSES), choices=list(TRAIN_LOSSES))
    tr.add_argument("--size", default="tiny", help="Wan config: tiny, small or 1.3B (default: tiny)")
    tr.add_argument("--pixel", action="store_true", help="a 3-channel (pixel-space) variant of the config")
    tr.add_argument("--latent-size", type=int, nargs=2, default=[16, 16], metavar=("H", "W"))
    tr.add_argument("--frames", type=int, default=12, help="latent frames per clip (default: 12)")
    tr.add_argument("--batch", type=int, default=1)
    tr.add_argument("--chunk-frames", type=int, default=3)
    tr.add_argument("--memory", default="hybrid_gdn")
    tr.add_argument("--sink-frames", type=int, default=3)
    tr.add_argument("--window-frames", type=int, default=6)
    tr.add_argument("--steps", type=int, default=5, help="timed steps per loss")
    tr.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    tr.add_argument("--activation-checkpointing", action="store_true")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--dtype", choices=list(DTYPES), default="float32")
    tr.set_defaults(fn=_bench_train)

    sub.add_parser("train", help="fine-tune a memory with Lightning (memkit train --help)", add_help=False)

    from memkit.data.encode import add_encode_parser

    add_encode_parser(sub)

    gen = sub.add_parser("generate", help="stream a long video from a retrofitted backbone into an mp4")
    gen.add_argument("--backbone", choices=["wan", "skyreels_v2"], default="wan")
    gen.add_argument("--checkpoint", help="a diffusers model folder (with transformer/, vae/, text_encoder/) or an "
                                          "original Wan-format file (Self-Forcing, CausVid, LongLive); default: a "
                                          "small randomly initialised backbone")
    gen.add_argument("--size", default="tiny", help="Wan config for the random backbone or a Wan-format file: "
                                                    "tiny, small, 1.3B (default: tiny)")
    gen.add_argument("--vae", help="a diffusers AutoencoderKLWan folder (default: the checkpoint's vae/)")
    gen.add_argument("--no-decode", action="store_true", help="do not decode: latents only")
    gen.add_argument("--memory", default="hybrid_gdn", help="memory variant (memkit.list_memories())")
    gen.add_argument("--sink-frames", type=int, default=3)
    gen.add_argument("--window-frames", type=int, default=6)
    gen.add_argument("--rope-mode", choices=["absolute", "relative"], default="relative",
                     help="relative (default) keeps RoPE positions bounded however long the stream")
    gen.add_argument("--memory-weights", help="trained memory weights (memkit.save_memory)")
    gen.add_argument("--seconds", type=float, default=10.0, help="video length at 16 fps (default: 10)")
    gen.add_argument("--chunk-frames", type=int, default=3)
    gen.add_argument("--height", type=int, help="video height (default: 480; 64 for the tiny and small configs)")
    gen.add_argument("--width", type=int, help="video width (default: 832; 64 for the tiny and small configs)")
    gen.add_argument("--prompt-embeds", help="a safetensors file of prompt embeddings (1, L, text_dim), in order")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt text (repeat for a schedule)")
    gen.add_argument("--text-encoder", help="a local UMT5 encoder folder for --prompt")
    gen.add_argument("--switch", type=int, action="append", default=[],
                     help="chunk at which the next prompt takes over (repeat; one fewer than the prompts)")
    gen.add_argument("--prefix", help="clean start: latents (.safetensors with 'latents'), an image (image-to-video) "
                                      "or a video to extend")
    gen.add_argument("--steps", type=float, nargs="+",
                     help="denoising timesteps (default: 1000 750 500 250; a resumed stream keeps its own)")
    gen.add_argument("--shift", type=float, help="sampling shift (default: 5; a resumed stream keeps its own)")
    gen.add_argument("--context-noise", type=float,
                     help="noise level of the context pass, 0-1000 (default: 0; a resumed stream keeps its own)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=list(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32")
    gen.add_argument("--out", default="out/video.mp4")
    gen.add_argument("--save-latents", help="also save the generated latents (safetensors)")
    gen.add_argument("--save-state", help="save the stream state at the end (resume with --resume)")
    gen.add_argument("--resume", help="continue a saved stream state up to --seconds")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(fn=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    console = Console()
    from memkit.errors import MemkitError

    try:
        if argv[:1] == ["train"]:  # Lightning's CLI parses its own flags
            return _train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.fn(args, console)
    except (MemkitError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
