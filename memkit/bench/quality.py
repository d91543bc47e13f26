"""``memkit bench quality``: does the global memory remember what the window forgot?

The same small pixel-space Wan DiT is trained from scratch with each memory variant, under one budget, on
``memkit.data.WorldVideos`` (a static procedural world seen through a camera whose action per chunk is the
prompt), with rolling-memory TBPTT (:class:`memkit.train.RollingMemory`). Each model then plays held-out worlds
forward from their first chunk, under the true actions, to many times its local window, and its frames are
compared with the ground truth (PSNR, SSIM from torchmetrics):

* on *revisited* frames: most of the view is content that left the local memory (sink + window) long ago;
* on *new* frames: most of the view was never seen (no memory can know it: the control);
* against time (drift), with the per-chunk time and the stream state's size.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

VARIANTS = ("full", "window", "sink_window", "hybrid_gdn", "hybrid_ssd", "hybrid_blockwise")
HYBRIDS = tuple(v for v in VARIANTS if v.startswith("hybrid"))


@dataclass(frozen=True)
class QualitySetup:
    """One run's sizes and budget. The defaults fit one sitting on a 2-core CPU (see docs/benchmarks.md)."""

    frame_size: int = 32  # pixels per side; a token is a patch x patch pixel square
    patch: int = 4
    view_cells: int = 8
    world_cells: int = 24
    objects: int = 20
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    ffn: int = 256
    text_dim: int = 32
    prompt_len: int = 4
    chunk_frames: int = 3
    sink_frames: int = 3
    window_frames: int = 6
    blocks: int = 2
    train_videos: int = 256
    clip_frames: int = 24
    batch: int = 2
    steps: int = 300
    lr: float = 5e-3
    eval_videos: int = 4
    eval_frames: int = 96
    sampling_steps: int = 4
    seed: int = 0

    def backbone(self):
        from adapters.loading import BackboneSpec

        overrides = {"in_channels": 3, "out_channels": 3, "patch_size": [1, self.patch, self.patch],
                     "num_attention_heads": self.heads, "attention_head_dim": self.head_dim,
                     "ffn_dim": self.ffn, "num_layers": self.layers, "text_dim": self.text_dim,
                     "freq_dim": 32, "rope_max_seq_len": 1024}
        return BackboneSpec(size="tiny", seed=self.seed, overrides=overrides)

    def memory(self, kind: str):
        from memkit.memory import MemoryConfig

        # `window` gets the sink's frames too: every bounded variant holds the same number of frames
        window = self.window_frames + (self.sink_frames if kind == "window" else 0)
        return MemoryConfig(kind=kind, sink_frames=self.sink_frames, window_frames=window, blocks=self.blocks,
                            horizon_frames=self.eval_frames, check_finite=False)

    def world(self, count: int, frames: int, seed: int):
        from memkit.data.world import WorldVideos

        return WorldVideos(count=count, frames=frames, seed=seed, view_cells=self.view_cells,
                           world_cells=self.world_cells, objects=self.objects, action_frames=self.chunk_frames)


@dataclass
class VariantResult:
    kind: str
    train_seconds: float = 0.0
    final_loss: float = float("nan")
    psnr: dict[str, float] = field(default_factory=dict)  # "revisit" / "new" / "all" -> dB, free rollouts
    ssim: dict[str, float] = field(default_factory=dict)
    psnr_tf: dict[str, float] = field(default_factory=dict)  # the same, each chunk sampled from the true past
    drift: list[float] = field(default_factory=list)  # PSNR per frame index (generated frames), mean over videos
    chunk_ms: dict[str, float] = field(default_factory=dict)  # "early" / "late" median per-chunk time
    state_bytes: int = 0
    first_video: torch.Tensor | None = field(default=None, repr=False)  # the first held-out rollout (for strips)


def train_variant(setup: QualitySetup, kind: str, progress: bool = True):
    """Train a fresh backbone with memory ``kind`` for ``setup.steps`` steps; return the WorldModel and seconds."""
    import lightning as L

    from memkit.data import ClipDataModule
    from memkit.rollout.world import WorldModel
    from memkit.train import MemoryFinetune, RollingMemory
    from memkit.train.flow import NoiseLevels

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(setup.seed)
    chunks = setup.clip_frames // setup.chunk_frames
    loss = RollingMemory(tbptt_chunks=chunks, noise=NoiseLevels(distribution="schedule"))
    module = MemoryFinetune(backbone=setup.backbone(), memory=setup.memory(kind), loss=loss,
                            chunk_frames=setup.chunk_frames, latent_size=(setup.frame_size, setup.frame_size),
                            trainable="all", lr=setup.lr, warmup_steps=min(20, setup.steps // 10), seed=setup.seed)
    data = ClipDataModule(setup.world(setup.train_videos, 240, setup.seed), frames=setup.clip_frames,
                          batch_size=setup.batch, prompt_len=setup.prompt_len, seed=setup.seed)
    trainer = L.Trainer(max_steps=setup.steps, max_epochs=10**6, accelerator="cpu" if not torch.cuda.is_available()
                        else "auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t0
    losses = trainer.callback_metrics
    final = float(losses.get("train/loss", float("nan")))
    world = WorldModel(setup.backbone(), setup.memory(kind), (setup.frame_size, setup.frame_size),
                       chunk_frames=setup.chunk_frames, prompt_len=setup.prompt_len, model=module.model)
    world.model.eval()
    return world, seconds, final


def evaluate(world, setup: QualitySetup, result: VariantResult) -> dict[int, torch.Tensor]:
    """Roll the model out on the held-out worlds; fill ``result``; return each video's generated frames."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    source = setup.world(setup.eval_videos, setup.eval_frames, setup.seed + 10_000)  # worlds never trained on
    size = (setup.frame_size, setup.frame_size)
    first = setup.chunk_frames
    per_frame_psnr, per_frame_ssim, masks, timings, videos = [], [], {"revisit": [], "new": []}, [], {}
    tf_psnr = []
    for i in range(len(source)):
        truth = source.read(i, 0, setup.eval_frames, size)["video"]
        out = world.rollout(truth[:, :first], source.actions(i), setup.eval_frames,
                            seed=setup.seed + i)
        forced = world.rollout(truth[:, :first], source.actions(i), setup.eval_frames, seed=setup.seed + i,
                               history=truth).video
        tf_psnr.append(peak_signal_noise_ratio(forced[:, first:].transpose(0, 1), truth[:, first:].transpose(0, 1),
                                               data_range=2.0, reduction="none", dim=(1, 2, 3)))
        videos[i] = out.video
        pred, target = out.video[:, first:].transpose(0, 1), truth[:, first:].transpose(0, 1)  # (F, 3, H, W)
        per_frame_psnr.append(peak_signal_noise_ratio(pred, target, data_range=2.0, reduction="none",
                                                      dim=(1, 2, 3)))
        per_frame_ssim.append(structural_similarity_index_measure(pred, target, data_range=2.0,
                                                                  reduction="none"))
        labels = source.labels(i, window=setup.window_frames, sink=setup.sink_frames)
        for name in masks:
            masks[name].append(labels[name][first:])
        timings.append(out.chunk_seconds)
        result.state_bytes = out.state_bytes
    psnr, ssim, forced = torch.stack(per_frame_psnr), torch.stack(per_frame_ssim), torch.stack(tf_psnr)
    for name, mask in (("revisit", torch.stack(masks["revisit"])), ("new", torch.stack(masks["new"])),
                       ("all", torch.ones_like(psnr, dtype=torch.bool))):
        result.psnr[name] = float(psnr[mask].mean()) if mask.any() else float("nan")
        result.ssim[name] = float(ssim[mask].mean()) if mask.any() else float("nan")
        result.psnr_tf[name] = float(forced[mask].mean()) if mask.any() else float("nan")
    result.drift = psnr.mean(dim=0).tolist()
    per_chunk = torch.tensor(timings)  # (videos, generated chunks)
    k = max(1, per_chunk.shape[1] // 5)
    result.chunk_ms = {"early": 1e3 * float(per_chunk[:, :k].median()),
                       "late": 1e3 * float(per_chunk[:, -k:].median())}
    return videos


def flat_baseline(setup: QualitySetup) -> dict[str, float]:
    """PSNR of a model-free reference on the same held-out frames: each true frame replaced by its own mean colour
    (it knows the colours, not the layout). A model below it has not learned the world beyond its colours."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    source = setup.world(setup.eval_videos, setup.eval_frames, setup.seed + 10_000)
    first, values, masks = setup.chunk_frames, [], {"revisit": [], "new": []}
    for i in range(len(source)):
        truth = source.read(i, 0, setup.eval_frames, (setup.frame_size, setup.frame_size))["video"][:, first:]
        flat = truth.mean(dim=(2, 3), keepdim=True).expand_as(truth)
        values.append(peak_signal_noise_ratio(flat.transpose(0, 1), truth.transpose(0, 1), data_range=2.0,
                                              reduction="none", dim=(1, 2, 3)))
        labels = source.labels(i, window=setup.window_frames, sink=setup.sink_frames)
        for name in masks:
            masks[name].append(labels[name][first:])
    psnr = torch.stack(values)
    out = {name: float(psnr[torch.stack(m)].mean()) for name, m in masks.items()}
    return {**out, "all": float(psnr.mean())}


def gap_closed(results: dict[str, VariantResult], metric: str = "revisit", forced: bool = False) -> dict[str, float]:
    """Per hybrid, the share of the revisited-frame PSNR gap between ``sink_window`` and ``full`` it closes
    (free rollouts, or with ``forced`` each chunk sampled from the true past)."""
    if "full" not in results or "sink_window" not in results:
        return {}

    def value(kind):
        return (results[kind].psnr_tf if forced else results[kind].psnr)[metric]

    low, high = value("sink_window"), value("full")
    if not high - low > 0:
        return {}
    return {k: (value(k) - low) / (high - low) for k in results if k in HYBRIDS}


def run_quality_bench(setup: QualitySetup, variants=VARIANTS, out_dir: str | None = None, export: str | None = None,
                      console=None, progress: bool = True) -> dict[str, VariantResult]:
    """Train and evaluate each variant in turn; with ``out_dir``, write the table and plots there."""
    torch.manual_seed(setup.seed)
    results, strips = {}, {}
    t_start = time.perf_counter()
    for kind in variants:
        if console is not None:
            console.print(f"[bold]{kind}[/bold]: training {setup.steps} steps ...")
        world, seconds, final = train_variant(setup, kind, progress=progress)
        result = VariantResult(kind, seconds, final)
        result.first_video = strips[kind] = evaluate(world, setup, result)[0]
        results[kind] = result
        if console is not None:
            console.print(f"  {kind}: {seconds:.0f} s, loss {final:.3f}, PSNR revisit {result.psnr['revisit']:.2f} "
                          f"new {result.psnr['new']:.2f} all {result.psnr['all']:.2f} dB; true past: revisit "
                          f"{result.psnr_tf['revisit']:.2f} new {result.psnr_tf['new']:.2f} dB")
        if export is not None:
            Path(export).mkdir(parents=True, exist_ok=True)
            world.save(Path(export) / f"world_{kind}.safetensors",
                       extra={"training": {"steps": setup.steps, "seconds": round(seconds, 1), "loss": final,
                                           "setup": asdict(setup)}})
    wall = time.perf_counter() - t_start
    if out_dir is not None:
        write_report(results, setup, strips, out_dir, wall)
    return results


# -- report ---------------------------------------------------------------------------------------------
def results_markdown(results: dict[str, VariantResult], setup: QualitySetup, wall_seconds: float,
                     command: str, baseline: dict[str, float] | None = None) -> str:
    gaps, gaps_tf = gap_closed(results), gap_closed(results, forced=True)

    def pct(table, kind):
        return f"{100 * table[kind]:.0f}%" if kind in table else "-"

    lines = [
        "| memory | PSNR revisited | PSNR new | PSNR all | SSIM revisited | SSIM new | gap closed | "
        "true-past PSNR revisited | true-past PSNR new | true-past gap closed | ms/chunk early | ms/chunk late | "
        "state KiB | train s | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        lines.append(
            f"| `{kind}` | {r.psnr['revisit']:.2f} | {r.psnr['new']:.2f} | {r.psnr['all']:.2f} | "
            f"{r.ssim['revisit']:.3f} | {r.ssim['new']:.3f} | {pct(gaps, kind)} | {r.psnr_tf['revisit']:.2f} | "
            f"{r.psnr_tf['new']:.2f} | {pct(gaps_tf, kind)} | {r.chunk_ms['early']:.1f} | "
            f"{r.chunk_ms['late']:.1f} | {r.state_bytes / 1024:.0f} | {r.train_seconds:.0f} | {r.final_loss:.3f} |")
    if baseline:
        lines.append(f"| each true frame's mean colour (no model) | {baseline['revisit']:.2f} | "
                     f"{baseline['new']:.2f} | {baseline['all']:.2f} | | | | | | | | | | | |")
    budget = (f"{setup.steps} steps x batch {setup.batch} clips of {setup.clip_frames} frames "
              f"({setup.frame_size}x{setup.frame_size} px, {setup.layers} layers, "
              f"{setup.heads}x{setup.head_dim} heads)")
    return "\n".join([
        f"Command: `{command}`  ",
        f"Budget per variant: {budget}; evaluation: {setup.eval_videos} held-out worlds x {setup.eval_frames} "
        f"frames ({setup.eval_frames // (setup.sink_frames + setup.window_frames)}x the local memory of "
        f"{setup.sink_frames} sink + {setup.window_frames} window frames), {setup.sampling_steps}-step sampling. "
        "PSNR in dB against the ground truth: free rollouts from the first chunk, and (true past) each chunk "
        "sampled from the true frames before it.  ",
        f"Wall time: {wall_seconds / 60:.1f} min.",
        "", *lines, ""])


def write_report(results, setup, strips, out_dir, wall_seconds, command: str | None = None,
                 baseline: dict[str, float] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memkit.outputs import atomic_output

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or "memkit bench quality"
    written = []
    path = out / "quality.md"
    with atomic_output(path) as tmp:
        Path(tmp).write_text(results_markdown(results, setup, wall_seconds, command, baseline))
    written.append(path)
    path = out / "quality.json"
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps({"setup": asdict(setup), "wall_seconds": wall_seconds,
                                         "baseline": baseline,
                                         "results": {k: {n: v for n, v in asdict(r).items() if n != "first_video"}
                                                     for k, r in results.items()}}, indent=1))
    written.append(path)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    frames = range(setup.chunk_frames, setup.eval_frames)
    for kind, r in results.items():
        smooth = torch.tensor(r.drift).unfold(0, setup.chunk_frames, setup.chunk_frames).mean(1)
        ax1.plot(list(frames)[:: setup.chunk_frames][: len(smooth)], smooth.tolist(), label=kind,
                 lw=2 if kind.startswith("hybrid") else 1.2)
    local = setup.sink_frames + setup.window_frames
    ax1.axvline(local, color="grey", ls=":", lw=1)
    ax1.set(xlabel="frame", ylabel="PSNR (dB), mean over held-out worlds", title="drift: PSNR against time")
    ax1.legend(fontsize=8)
    kinds = list(results)
    xs = torch.arange(len(kinds)).float()
    bars = (("revisited, rollout", "psnr", "revisit", "tab:blue"), ("new, rollout", "psnr", "new", "tab:orange"),
            ("revisited, true past", "psnr_tf", "revisit", "tab:green"))
    for off, (label, table, name, colour) in zip((-0.27, 0.0, 0.27), bars):
        ax2.bar((xs + off).tolist(), [getattr(results[k], table)[name] for k in kinds], width=0.27, color=colour,
                label=label)
    ax2.set_xticks(xs.tolist(), kinds, rotation=20, fontsize=8)
    low = min(min(getattr(r, t)[n] for _, t, n, _ in bars) for r in results.values())
    ax2.set_ylim(bottom=max(0.0, low - 2.0))
    ax2.set(ylabel="PSNR (dB)", title="revisited (left the local memory) vs new frames")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "quality.png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    written.append(path)
    if strips:
        path = out / "quality_strip.png"
        with atomic_output(path) as tmp:
            plot_strip(strips, setup, tmp)
        written.append(path)
    return written


def plot_strip(videos: dict[str, torch.Tensor], setup: QualitySetup, path) -> None:
    """Ground truth and each variant's frames at a few revisited frames of the first held-out world."""
    import matplotlib.pyplot as plt

    source = setup.world(setup.eval_videos, setup.eval_frames, setup.seed + 10_000)
    truth = source.read(0, 0, setup.eval_frames, (setup.frame_size, setup.frame_size))["video"]
    labels = source.labels(0, window=setup.window_frames, sink=setup.sink_frames)
    candidates = [t for t in range(setup.chunk_frames, setup.eval_frames) if labels["revisit"][t]]
    picks = (candidates[:: max(1, len(candidates) // 6)][:6]
             or list(range(setup.chunk_frames, setup.eval_frames, 12))[:6])
    rows = {"ground truth": truth, **videos}
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(1.6 * len(picks), 1.6 * len(rows)), squeeze=False)
    for r, (name, video) in enumerate(rows.items()):
        for c, t in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(((video[:, t].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def quick_setup(**changes) -> QualitySetup:
    """A budget for tests: every stage runs, nothing is learned."""
    tiny = dict(frame_size=16, patch=4, view_cells=4, world_cells=8, objects=4, layers=1, heads=2, head_dim=8, ffn=16,
                text_dim=8, train_videos=4, clip_frames=12, batch=1, steps=2, eval_videos=1, eval_frames=36,
                sink_frames=1, window_frames=2, blocks=2)
    return replace(QualitySetup(), **{**tiny, **changes})


REPORT_FILES = ["quality.md", "quality.json", "quality.png", "quality_strip.png"]


def add_quality_parser(bsub) -> None:
    from memkit.cli_args import nonnegative_int, positive_float, positive_int

    d = QualitySetup()
    q = bsub.add_parser("quality", help="train every memory variant on a procedural world under one budget and "
                                        "measure how well it reproduces places it saw long ago")
    q.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    q.add_argument("--steps", type=positive_int, default=d.steps, help=f"training steps per variant ({d.steps})")
    q.add_argument("--batch", type=positive_int, default=d.batch)
    q.add_argument("--clip-frames", type=positive_int, default=d.clip_frames, help="frames per training clip")
    q.add_argument("--lr", type=positive_float, default=d.lr)
    q.add_argument("--eval-videos", type=positive_int, default=d.eval_videos, help="held-out worlds")
    q.add_argument("--eval-frames", type=positive_int, default=d.eval_frames, help="frames per held-out rollout")
    q.add_argument("--seed", type=nonnegative_int, default=d.seed)
    q.add_argument("--quick", action="store_true", help="a tiny model and budget (checks the pipeline; learns nothing)")
    q.add_argument("--out", default="docs/results", help="folder for quality.md/.json/.png (default: docs/results)")
    q.add_argument("--export", default=None, help="also save each trained model here (world_<variant>.safetensors)")
    q.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--overwrite", action="store_true", help="replace existing report files")
    q.set_defaults(fn=run_quality_command)


def run_quality_command(args, console) -> int:
    import shlex
    import sys

    from memkit.errors import ConfigError
    from memkit.outputs import check_output_folder

    changes = dict(steps=args.steps, batch=args.batch, clip_frames=args.clip_frames, lr=args.lr,
                   eval_videos=args.eval_videos, eval_frames=args.eval_frames, seed=args.seed)
    base = quick_setup() if args.quick else QualitySetup()
    setup = replace(base, **{k: v for k, v in changes.items() if v != getattr(QualitySetup(), k)})
    if setup.clip_frames % setup.chunk_frames or setup.eval_frames % setup.chunk_frames:
        raise ConfigError(f"--clip-frames and --eval-frames must be whole chunks of {setup.chunk_frames} frames")
    if setup.eval_frames < 2 * setup.chunk_frames:
        raise ConfigError(f"--eval-frames must cover at least two chunks ({2 * setup.chunk_frames} frames)")
    folder = check_output_folder(args.out, "--out", REPORT_FILES, overwrite=args.overwrite)
    if args.export is not None:
        check_output_folder(args.export, "--export", [f"world_{k}.safetensors" for k in args.variants],
                            overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    console.print(f"memkit bench quality: {len(args.variants)} variants x {setup.steps} training steps")
    t0 = time.perf_counter()
    results, strips = {}, {}
    for kind in args.variants:
        part = run_quality_bench(setup, [kind], export=args.export, console=console, progress=sys.stderr.isatty())
        results.update(part)
        strips[kind] = part[kind].first_video
    command = "memkit bench quality " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if sys.argv[1:3] == [
        "bench", "quality"] else "memkit bench quality"
    wall = time.perf_counter() - t0
    baseline = flat_baseline(setup)
    written = write_report(results, setup, strips, folder, wall, command=command.strip(), baseline=baseline)
    console.print(results_markdown(results, setup, wall, command.strip(), baseline), markup=False, soft_wrap=True)
    for path in written:
        console.print(f"wrote {path}")
    return 0


__all__ = ["QualitySetup", "VariantResult", "run_quality_bench", "train_variant", "evaluate", "gap_closed",
           "write_report", "results_markdown", "quick_setup", "VARIANTS"]

