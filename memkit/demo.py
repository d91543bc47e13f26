"""``memkit demo``: memkit end to end on the built-in default (random weights, CPU-friendly).

1. Streams a clip through every variant chunk by chunk and checks it against
   the parallel (teacher-forcing) form.
2. Streams many chunks through every variant and plots cost per chunk and
   state size: ``full`` grows, the others stay flat.
3. Plays a world it never saw with two small trained models shipped in the package (a pixel-space Wan DiT with
   ``hybrid_gdn``, and the same DiT trained with ``sink_window``): a camera cuts between places in a loop, so
   every return to a place comes after it left the local memory. Each model samples every chunk from the true
   past and, in a free rollout, from its own; ``out/world.mp4`` shows them beside the ground truth with each
   frame's place marked (yellow: a return), and ``out/world_drift.png`` their PSNR per frame, returns shaded.
4. Plays a held-out video of scenes of shapes (``SceneVideos``) with two more shipped models, ``hybrid_layout``
   (the layout design: per-block states, time-coded keys) and ``sink_window``: the camera cuts back to a scene
   2 to 4 shots after it left the local memory, and only a memory that brings back a layout can show it;
   ``out/scenes.mp4`` and ``out/scenes_drift.png``.
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


DEMO_FILES = ["memory_demo.png", "world.mp4", "world_drift.png", "scenes.mp4", "scenes_drift.png"]
#: The models the demo plays, shipped in memkit/assets (made by ``memkit bench quality --export``).
WORLD_MODELS = {"hybrid_gdn": "world_hybrid_gdn.safetensors", "sink_window": "world_sink_window.safetensors"}
#: The models of the scenes part (``memkit bench quality --world scenes --export``).
SCENE_MODELS = {"hybrid_layout": "scenes_hybrid_layout.safetensors",
                "sink_window": "scenes_sink_window.safetensors"}


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
    run_scene_demo(console, folder / DEMO_FILES[3], folder / DEMO_FILES[4])
    return 0 if ok else 1


def asset(name: str):
    from importlib.resources import files

    return files("memkit") / "assets" / name


def load_shipped(files: dict[str, str]):
    """The shipped models ``{name: file}`` of ``files``, and the setup they were trained with."""
    from memkit.bench.quality import QualitySetup
    from memkit.rollout.world import WorldModel

    models = {name: WorldModel.load(str(asset(file))) for name, file in files.items()}
    return models, QualitySetup.from_record(next(iter(models.values())).meta["training"]["setup"])


def held_out_video(setup, frames: int, seed: int):
    """The first video of ``setup``'s world at ``seed``: the source, its true frames, its prompt ids and its labels
    for the setup's local memory."""
    world = setup.world(1, frames, seed)
    truth = world.read(0, 0, frames, (setup.frame_size, setup.frame_size))["video"]
    labels = world.labels(0, window=setup.window_frames, sink=setup.sink_frames, chunk=setup.chunk_frames)
    return world, truth, world.actions(0), labels


def check_world_models() -> None:
    """Fail in one line, before any work, if the shipped models are missing (an install without package data)."""
    from memkit.errors import CheckpointError

    missing = [file for file in (*WORLD_MODELS.values(), *SCENE_MODELS.values()) if not asset(file).is_file()]
    if missing:
        raise CheckpointError(f"the demo's models {', '.join(missing)} are missing from {asset('')}: reinstall "
                              "memkit with its package data (pip install -e . from a full clone)")


def run_world_demo(console: Console, video_path, plot_path, loops: int = 5, fps: int = 4,
                   world_seed: int = 20_000) -> None:
    """Play a held-out world with the shipped models; write the side-by-side video and the PSNR plot."""
    from memkit.bench.quality import frame_means, frame_psnr, self_psnr
    from memkit.rollout.video import VideoWriter

    models, setup = load_shipped(WORLD_MODELS)
    trained = next(iter(models.values())).meta["training"]
    F = setup.chunk_frames
    frames = F * (1 + loops * setup.loop_places)  # the start place, then the loop `loops` times
    world, truth, places, labels = held_out_video(setup, frames, world_seed)
    console.print(f"world demo: a camera cutting between {setup.loop_places} places in a loop ({frames} frames, "
                  f"{frames / fps:.0f} s at {fps} fps), a world never trained on; each model keeps "
                  f"{setup.sink_frames} sink + {setup.window_frames} window frames, so every return to a place "
                  f"comes after it left the local memory ({trained['steps']} training steps per model)")
    videos, psnr = {}, {}
    for name, model in models.items():
        for past in ("true past", "free"):
            label = f"{name}, {past}"
            out = model.rollout(truth[:, :F], places, frames, seed=0, history=truth if past == "true past" else None,
                                progress=chunk_lines(console, f"  {label}", frames // F))
            videos[label], psnr[label] = out.video, frame_psnr(out.video, truth)
            values = psnr[label]
            colours = frame_means(out.video)
            if past == "true past":
                colour, against = frame_psnr(colours, frame_means(truth)), "the truth's"
            else:  # a free rollout's colours are its own: are the returns the colours it showed before?
                colour = torch.cat([torch.full((F,), float("nan")), self_psnr(colours, labels["last_seen"], F)])
                against = "its own last showing's"
            returns, new = labels["revisit"], labels["new"].clone()
            new[:F] = False  # the first chunk is given, not generated
            console.print(f"  {label}: PSNR on returns {values[returns].mean():.2f} dB, on new places "
                          f"{values[new].mean():.2f} dB; mean colour against {against}: returns "
                          f"{colour[returns].mean():.2f} dB, new places {colour[new].mean():.2f} dB", markup=False)
    order = [f"{name}, true past" for name in models] + [f"{name}, free" for name in models]
    panels = {"ground truth": truth, **{label: videos[label] for label in order}}
    captions = [f"place {int(places[t])}: " + ("back, it left the local memory" if labels["revisit"][t] else
                                               "new" if labels["new"][t] else "still in the local memory")
                for t in range(frames)]
    with VideoWriter(video_path, fps=fps) as writer:
        writer.write(side_by_side(panels, captions, highlight=labels["revisit"]))
    plot_drift({label: psnr[label] for label in order}, labels["revisit"], F, fps, plot_path)
    console.print(f"video written to {video_path} (left to right: {', '.join(panels)}; 'true past': each chunk "
                  f"sampled from the true frames before it; 'free': from the model's own)")
    console.print(f"PSNR plot written to {plot_path} (shaded: returns to a place that left the local memory)")


def run_scene_demo(console: Console, video_path, plot_path, fps: int = 4, world_seed: int = 20_000) -> None:
    """Play a held-out video of scenes with the shipped layout models, from the true past (what the memory
    recalls); write the side-by-side video and the PSNR plot."""
    from memkit.bench.quality import frame_psnr
    from memkit.rollout.video import VideoWriter

    models, setup = load_shipped(SCENE_MODELS)
    F, frames = setup.chunk_frames, setup.eval_frames
    world, truth, prompts, labels = held_out_video(setup, frames, world_seed)
    returns, new = labels["revisit"], labels["new"].clone()
    new[:F] = False  # the first chunk is given, not generated
    console.print(f"\nscenes demo: a camera cutting between scenes of shapes and back to one of 2-4 shots before "
                  f"({frames} frames, a video never trained on; prompts say only how many shots back), each model "
                  f"with {setup.sink_frames} sink + {setup.window_frames} window frames; every chunk sampled from "
                  f"the true past")
    videos, psnr = {}, {}
    for name, model in models.items():
        out = model.rollout(truth[:, :F], prompts, frames, seed=0, history=truth,
                            progress=chunk_lines(console, f"  {name}", frames // F))
        videos[name], psnr[name] = out.video, frame_psnr(out.video, truth)
        console.print(f"  {name}: PSNR on returns {psnr[name][returns].mean():.2f} dB, on new scenes "
                      f"{psnr[name][new].mean():.2f} dB", markup=False)
    scenes = world.scenes(0)
    captions = [f"scene {int(scenes[t])}: " + (f"back after {int(prompts[t])} shots, it left the local memory"
                                               if returns[t] else "new" if labels["new"][t] else
                                               "still in the local memory") for t in range(frames)]
    with VideoWriter(video_path, fps=fps) as writer:
        writer.write(side_by_side({"ground truth": truth, **videos}, captions, highlight=returns))
    plot_drift({f"{name}, true past": values for name, values in psnr.items()}, returns, F, fps, plot_path,
               title="scenes demo: PSNR per frame (shaded: returns to a scene that left the local memory)")
    console.print(f"video written to {video_path} (left to right: ground truth, {', '.join(models)})")
    console.print(f"PSNR plot written to {plot_path}")


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


def side_by_side(panels: dict[str, torch.Tensor], captions: list[str], highlight=None,
                 scale: int = 8) -> torch.Tensor:
    """uint8 frames (F, H, W, 3): the videos ``(3, F, h, w)`` enlarged ``scale`` times, side by side under their
    names, with each frame's caption below (in yellow where ``highlight`` is true, else grey)."""
    import numpy as np
    from PIL import Image, ImageDraw

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
    for t in range(F):
        key = (captions[t], bool(highlight[t]) if highlight is not None else False)
        if key not in footers:
            img = Image.new("RGB", (canvas.shape[2], head), (24, 24, 24))
            ImageDraw.Draw(img).text((4, 3), key[0], fill=(255, 210, 90) if key[1] else (170, 170, 170))
            footers[key] = torch.from_numpy(np.asarray(img).copy())
        canvas[t, head + h:] = footers[key]
    return canvas


def plot_drift(psnr: dict[str, torch.Tensor], revisit: torch.Tensor, chunk: int, fps: int, path,
               title: str = "world demo: PSNR per frame (shaded: returns to a place that left the local memory)",
               ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memkit.outputs import atomic_output

    fig, ax = plt.subplots(figsize=(9, 3.2))
    seconds = torch.arange(len(revisit)) / fps
    for t in torch.nonzero(revisit).flatten().tolist():
        ax.axvspan(t / fps, (t + 1) / fps, color="tab:blue", alpha=0.08, lw=0)
    for name, values in psnr.items():
        ax.plot(seconds[chunk:].tolist(), values[chunk:].tolist(), label=name, lw=1.4, marker=".",
                ls="-" if "true past" in name else ":")
    ax.set(xlabel="seconds", ylabel="PSNR against ground truth (dB)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
