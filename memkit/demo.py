"""``memkit demo``: memkit end to end on the built-in default (random weights, CPU-friendly).

1. Streams a clip through every variant chunk by chunk and checks it against
   the parallel (teacher-forcing) form.
2. Streams many chunks through every variant and plots cost per chunk and
   state size: ``full`` grows, the others stay flat.
3. Plays a procedural world it never saw with two small trained models shipped in the package (a pixel-space
   Wan DiT with ``hybrid_gdn``, and the same DiT trained with ``sink_window``): a minute of video from one
   chunk of ground truth and the camera's actions, side by side with the ground truth in ``out/world.mp4``,
   and their PSNR against time in ``out/world_drift.png``. A fourth panel shows ``hybrid_gdn`` sampling each
   chunk from the true past: what it learned, apart from how its own errors compound over a free rollout.
"""

from __future__ import annotations

import math

import torch
from rich.console import Console
from rich.table import Table

from memkit.bench.memory import plot_results, print_results, run_memory_bench, timing_caveat
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


DEMO_FILES = ["memory_demo.png", "world.mp4", "world_drift.png"]
#: The models the demo plays, shipped in memkit/assets (made by ``memkit bench quality --export``).
WORLD_MODELS = {"hybrid_gdn": "world_hybrid_gdn.safetensors", "sink_window": "world_sink_window.safetensors"}


def run_demo(console: Console, out_dir: str = "out", chunks: int = 96, overwrite: bool = False) -> int:
    from memkit.outputs import check_output_folder

    folder = check_output_folder(out_dir, "--out", DEMO_FILES, overwrite=overwrite)  # before any work
    check_world_models()
    console.print("[bold]memkit demo[/bold]: memories on random inputs (CPU, built-in default sizes)\n")
    ok = check_streaming_equals_parallel(console)
    results = run_memory_bench(chunks=chunks)
    title = f"{chunks} chunks x 3 frames x 64 tokens, 4x32 heads, sink 3 + window 6, CPU float32"
    print_results(results, "time per chunk and state size: " + title, console)
    caveat = timing_caveat(results)
    if caveat:
        console.print(caveat, markup=False)
        title += " (timings noisy here: a busy machine)"
    path = str(folder / DEMO_FILES[0])
    plot_results(results, path, title)
    console.print(f"plot written to {path}\n")
    run_world_demo(console, folder / DEMO_FILES[1], folder / DEMO_FILES[2])
    return 0 if ok else 1


def asset(name: str):
    from importlib.resources import files

    return files("memkit") / "assets" / name


def check_world_models() -> None:
    """Fail in one line, before any work, if the shipped models are missing (an install without package data)."""
    from memkit.errors import CheckpointError

    missing = [file for file in WORLD_MODELS.values() if not asset(file).is_file()]
    if missing:
        raise CheckpointError(f"the demo's models {', '.join(missing)} are missing from {asset('')}: reinstall "
                              "memkit with its package data (pip install -e . from a full clone)")


def run_world_demo(console: Console, video_path, plot_path, seconds: float = 60.0, fps: int = 8,
                   world_seed: int = 20_000) -> None:
    """Play a held-out world with the shipped models; write the side-by-side video and the drift plot."""
    from dataclasses import fields

    from memkit.bench.quality import QualitySetup, frame_psnr
    from memkit.rollout.video import VideoWriter
    from memkit.rollout.world import WorldModel

    frames = int(seconds * fps)
    models = {name: WorldModel.load(str(asset(file)), max_frames=frames) for name, file in WORLD_MODELS.items()}
    trained = next(iter(models.values())).meta["training"]
    known = {f.name for f in fields(QualitySetup)}
    setup = QualitySetup(**{k: v for k, v in trained["setup"].items() if k in known})
    frames = frames // setup.chunk_frames * setup.chunk_frames
    world = setup.world(1, frames, world_seed)
    size = (setup.frame_size, setup.frame_size)
    truth = world.read(0, 0, frames, size)["video"]
    actions = world.actions(0)
    console.print(f"world demo: {frames} frames ({frames / fps:.0f} s at {fps} fps) of a world never trained on, "
                  f"from its first {setup.chunk_frames} frames and the camera's actions "
                  f"({trained['steps']} training steps per model)")
    videos, psnr = {}, {}
    chunks = frames // setup.chunk_frames
    for name, model in models.items():
        out = model.rollout(truth[:, : setup.chunk_frames], actions, frames, seed=0,
                            progress=chunk_lines(console, f"  {name}", chunks))
        videos[name] = out.video
        psnr[name] = frame_psnr(out.video, truth)
        console.print(f"  {name}: PSNR {psnr[name][setup.chunk_frames:].mean():.2f} dB over the generated frames, "
                      f"{1e3 * sum(out.chunk_seconds) / len(out.chunk_seconds):.0f} ms per chunk")
    # What the model learned, apart from how its own errors compound: each chunk sampled from the true past.
    first = next(iter(models))
    true_past = f"{first}, true past"
    videos[true_past] = models[first].rollout(truth[:, : setup.chunk_frames], actions, frames, seed=0,
                                              history=truth, progress=chunk_lines(console, f"  {true_past}",
                                                                                  chunks)).video
    psnr[true_past] = frame_psnr(videos[true_past], truth)
    console.print(f"  {true_past} (each chunk sampled from the true frames before it, not its own): PSNR "
                  f"{psnr[true_past][setup.chunk_frames:].mean():.2f} dB")
    panels = {"ground truth": truth, **videos}
    with VideoWriter(video_path, fps=fps) as writer:
        writer.write(side_by_side(panels, actions))
    labels = world.labels(0, window=setup.window_frames, sink=setup.sink_frames, chunk=setup.chunk_frames)
    plot_drift(psnr, labels["revisit"], setup.chunk_frames, fps, plot_path)
    console.print(f"video written to {video_path} (left to right: {', '.join(panels)})")
    console.print(f"drift plot written to {plot_path}")


def chunk_lines(console: Console, label: str, total: int, lines: int = 4):
    """A per-chunk callback that prints ``label: n/total chunks`` about ``lines`` times over ``total`` chunks (a
    line a log can keep, where a progress bar would not draw)."""
    marks = {math.ceil(total * i / lines) for i in range(1, lines)}
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if done in marks:
            console.print(f"{label}: {done}/{total} chunks", markup=False)

    return tick


def side_by_side(panels: dict[str, torch.Tensor], actions: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """uint8 frames (F, H, W, 3): the videos ``(3, F, h, w)`` enlarged ``scale`` times, side by side under their
    names, with the camera's action of each frame below."""
    import numpy as np
    from PIL import Image, ImageDraw

    from memkit.data.world import ACTIONS
    from memkit.rollout.video import to_uint8_frames

    big = [to_uint8_frames(v).repeat_interleave(scale, 1).repeat_interleave(scale, 2) for v in panels.values()]
    F, h, w, _ = big[0].shape
    gap, head = 4, 18
    canvas = torch.full((F, h + 2 * head, len(big) * (w + gap) - gap, 3), 24, dtype=torch.uint8)
    for i, video in enumerate(big):
        canvas[:, head: head + h, i * (w + gap): i * (w + gap) + w] = video
    titles = Image.new("RGB", (canvas.shape[2], head), (24, 24, 24))
    draw = ImageDraw.Draw(titles)
    for i, name in enumerate(panels):
        draw.text((i * (w + gap) + 4, 3), name, fill=(230, 230, 230))
    canvas[:, :head] = torch.from_numpy(np.asarray(titles).copy())
    footers = {}
    for a in actions.unique().tolist():
        img = Image.new("RGB", (canvas.shape[2], head), (24, 24, 24))
        ImageDraw.Draw(img).text((4, 3), f"action: {ACTIONS[a]}", fill=(255, 210, 90))
        footers[a] = torch.from_numpy(np.asarray(img).copy())
    for t in range(F):
        canvas[t, head + h:] = footers[int(actions[t])]
    return canvas


def plot_drift(psnr: dict[str, torch.Tensor], revisit: torch.Tensor, chunk: int, fps: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memkit.outputs import atomic_output

    fig, ax = plt.subplots(figsize=(9, 3.2))
    seconds = torch.arange(len(revisit)) / fps
    for t in torch.nonzero(revisit).flatten().tolist():
        ax.axvspan(t / fps, (t + 1) / fps, color="tab:blue", alpha=0.08, lw=0)
    for name, values in psnr.items():
        ax.plot(seconds[chunk:].tolist(), values[chunk:].tolist(), label=name, lw=1.4,
                ls=":" if "true past" in name else "-")
    ax.set(xlabel="seconds", ylabel="PSNR against ground truth (dB)",
           title="world demo: PSNR against time (shaded: revisits of places that left the local memory)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
