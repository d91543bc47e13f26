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
TRAIN_FRAMES = 240  # frames per training video
ROPE_FRAMES = 1024  # positions in the backbone's RoPE table (WorldModel.load extends it for longer rollouts)


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
    horizon_frames: int = 96  # the hybrids' router horizon (positions past it read as its end)
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
                     "freq_dim": 32, "rope_max_seq_len": ROPE_FRAMES}
        return BackboneSpec(size="tiny", seed=self.seed, overrides=overrides)

    def memory(self, kind: str):
        from memkit.memory import MemoryConfig

        # `window` gets the sink's frames too: every bounded variant holds the same number of frames
        window = self.window_frames + (self.sink_frames if kind == "window" else 0)
        return MemoryConfig(kind=kind, sink_frames=self.sink_frames, window_frames=window, blocks=self.blocks,
                            horizon_frames=self.horizon_frames, check_finite=False)

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


def train_variant(setup: QualitySetup, kind: str, progress: bool = True, console=None):
    """Train a fresh backbone with memory ``kind`` for ``setup.steps`` steps; return the WorldModel, the seconds
    and the final loss. ``progress`` draws a bar; otherwise ``console`` (if given) gets a line now and then."""
    import lightning as L

    from memkit.data import ClipDataModule
    from memkit.rollout.world import WorldModel
    from memkit.train import MemoryFinetune, RollingMemory
    from memkit.train.callbacks import ProgressLines
    from memkit.train.flow import NoiseLevels

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(setup.seed)
    chunks = setup.clip_frames // setup.chunk_frames
    loss = RollingMemory(tbptt_chunks=chunks, noise=NoiseLevels(distribution="schedule"))
    module = MemoryFinetune(backbone=setup.backbone(), memory=setup.memory(kind), loss=loss,
                            chunk_frames=setup.chunk_frames, latent_size=(setup.frame_size, setup.frame_size),
                            trainable="all", lr=setup.lr, warmup_steps=min(20, setup.steps // 10), seed=setup.seed)
    data = ClipDataModule(setup.world(setup.train_videos, TRAIN_FRAMES, setup.seed), frames=setup.clip_frames,
                          batch_size=setup.batch, prompt_len=setup.prompt_len, seed=setup.seed)
    trainer = L.Trainer(max_steps=setup.steps, max_epochs=10**6, accelerator="cpu" if not torch.cuda.is_available()
                        else "auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False,
                        callbacks=[] if progress or console is None else
                        [ProgressLines(lambda line: console.print(f"  {kind}: {line}", markup=False))])
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
    from torchmetrics.functional.image import structural_similarity_index_measure

    first = setup.chunk_frames
    psnr, ssim, forced, masks, timings, videos = [], [], [], [], [], {}
    for i, actions, truth, labels in held_out(setup):
        out = world.rollout(truth[:, :first], actions, setup.eval_frames, seed=setup.seed + i)
        true_past = world.rollout(truth[:, :first], actions, setup.eval_frames, seed=setup.seed + i,
                                  history=truth).video
        videos[i] = out.video
        psnr.append(frame_psnr(out.video[:, first:], truth[:, first:]))
        forced.append(frame_psnr(true_past[:, first:], truth[:, first:]))
        ssim.append(structural_similarity_index_measure(out.video[:, first:].transpose(0, 1),
                                                        truth[:, first:].transpose(0, 1), data_range=2.0,
                                                        reduction="none"))
        masks.append(labels)
        timings.append(out.chunk_seconds)
        result.state_bytes = out.state_bytes
    psnr = torch.stack(psnr)
    result.psnr, result.ssim = by_label(psnr, masks), by_label(torch.stack(ssim), masks)
    result.psnr_tf = by_label(torch.stack(forced), masks)
    result.drift = psnr.mean(dim=0).tolist()
    per_chunk = torch.tensor(timings)  # (videos, generated chunks)
    k = max(1, per_chunk.shape[1] // 5)
    result.chunk_ms = {"early": 1e3 * float(per_chunk[:, :k].median()),
                       "late": 1e3 * float(per_chunk[:, -k:].median())}
    return videos


def held_out(setup: QualitySetup):
    """Per held-out world (seeds never trained on): its index, actions, true frames ``(3, F, H, W)`` and the
    ``revisit`` / ``new`` masks of its frames after the first chunk (the generated ones)."""
    source = setup.world(setup.eval_videos, setup.eval_frames, setup.seed + 10_000)
    for i in range(len(source)):
        truth = source.read(i, 0, setup.eval_frames, (setup.frame_size, setup.frame_size))["video"]
        labels = source.labels(i, window=setup.window_frames, sink=setup.sink_frames, chunk=setup.chunk_frames)
        yield i, source.actions(i), truth, {n: labels[n][setup.chunk_frames:] for n in ("revisit", "new")}


def frame_psnr(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, torchmetrics) of each frame of ``(3, F, H, W)`` videos in [-1, 1]: ``(F,)``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(pred.transpose(0, 1), truth.transpose(0, 1), data_range=2.0, reduction="none",
                                   dim=(1, 2, 3))


def by_label(values: torch.Tensor, masks: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The mean of per-frame ``values (videos, F)`` over revisited, new and all frames (NaN where none)."""
    out = {}
    for name in ("revisit", "new"):
        mask = torch.stack([m[name] for m in masks])
        out[name] = float(values[mask].mean()) if mask.any() else float("nan")
    return {**out, "all": float(values.mean())}


def flat_baseline(setup: QualitySetup) -> dict[str, float]:
    """PSNR of a model-free reference on the same held-out frames: each true frame replaced by its own mean colour
    (it knows the colours, not the layout). A model below it has not learned the world beyond its colours."""
    values, masks = [], []
    for _, _, truth, labels in held_out(setup):
        truth = truth[:, setup.chunk_frames:]
        values.append(frame_psnr(truth.mean(dim=(2, 3), keepdim=True).expand_as(truth), truth))
        masks.append(labels)
    return by_label(torch.stack(values), masks)


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
                      console=None, progress: bool = True, command: str = "memkit bench quality"
                      ) -> dict[str, VariantResult]:
    """Train and evaluate each variant in turn; with ``out_dir``, write the table and plots there (with the
    model-free baseline and ``command``); with ``export``, save each trained model there."""
    check_setup(setup, variants)
    results = {}
    t_start = time.perf_counter()
    for kind in variants:
        if console is not None:
            console.print(f"[bold]{kind}[/bold]: training {setup.steps} steps ...")
        world, seconds, final = train_variant(setup, kind, progress=progress, console=console)
        result = VariantResult(kind, seconds, final)
        result.first_video = evaluate(world, setup, result)[0]
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
        baseline = flat_baseline(setup)
        written = write_report(results, setup, {k: r.first_video for k, r in results.items()}, out_dir, wall,
                               command=command, baseline=baseline)
        if console is not None:
            console.print(results_markdown(results, setup, wall, command, baseline), markup=False, soft_wrap=True)
            for path in written:
                console.print(f"wrote {path}")
    return results


def check_setup(setup: QualitySetup, variants) -> None:
    """Refuse, before any training, a setup whose training or evaluation cannot do what the benchmark needs."""
    from memkit.errors import ConfigError
    from memkit.train.losses.rolling import global_read_frames

    F = setup.chunk_frames
    if setup.clip_frames % F or setup.eval_frames % F:
        raise ConfigError(f"--clip-frames and --eval-frames must be whole chunks of {F} frames")
    if setup.eval_frames < 2 * F:
        raise ConfigError(f"--eval-frames must cover at least two chunks ({2 * F} frames)")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"--variants lists a variant twice: {' '.join(variants)}")
    if setup.clip_frames > TRAIN_FRAMES:
        raise ConfigError(f"--clip-frames must be at most the training videos' {TRAIN_FRAMES} frames, "
                          f"got {setup.clip_frames}")
    if setup.eval_frames > ROPE_FRAMES:
        raise ConfigError(f"--eval-frames must be at most {ROPE_FRAMES} (the backbone's RoPE table), "
                          f"got {setup.eval_frames}")
    needed = global_read_frames(setup.sink_frames, setup.window_frames, F)
    if any(v.startswith("hybrid") for v in variants) and setup.clip_frames < needed:
        raise ConfigError(f"--clip-frames {setup.clip_frames}: a hybrid's global memory is first read by frame "
                          f"{needed - F} (sink {setup.sink_frames} + window {setup.window_frames}, chunks of {F}), "
                          f"so training clips need at least {needed} frames or it never learns")


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
        f"frames ({setup.eval_frames / (setup.sink_frames + setup.window_frames):.1f}x the local memory of "
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
    labels = source.labels(0, window=setup.window_frames, sink=setup.sink_frames, chunk=setup.chunk_frames)
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
    q.add_argument("--steps", type=positive_int, help=f"training steps per variant ({d.steps})")
    q.add_argument("--batch", type=positive_int, help=f"clips per step ({d.batch})")
    q.add_argument("--clip-frames", type=positive_int, help=f"frames per training clip ({d.clip_frames})")
    q.add_argument("--lr", type=positive_float, help=f"learning rate ({d.lr})")
    q.add_argument("--eval-videos", type=positive_int, help=f"held-out worlds ({d.eval_videos})")
    q.add_argument("--eval-frames", type=positive_int, help=f"frames per held-out rollout ({d.eval_frames})")
    q.add_argument("--seed", type=nonnegative_int, help=f"seed of weights, data and sampling ({d.seed})")
    q.add_argument("--quick", action="store_true", help="a tiny model and budget (checks the pipeline; learns "
                                                         "nothing); the flags above still apply")
    q.add_argument("--out", default="docs/results", help="folder for quality.md/.json/.png (default: docs/results)")
    q.add_argument("--export", default=None, help="also save each trained model here (world_<variant>.safetensors)")
    q.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--overwrite", action="store_true", help="replace existing report files")
    q.set_defaults(fn=run_quality_command)


def run_quality_command(args, console) -> int:
    import shlex
    import sys

    from memkit.outputs import check_output_folder

    flags = dict(steps=args.steps, batch=args.batch, clip_frames=args.clip_frames, lr=args.lr,
                 eval_videos=args.eval_videos, eval_frames=args.eval_frames, seed=args.seed)
    base = quick_setup() if args.quick else QualitySetup()
    setup = replace(base, **{k: v for k, v in flags.items() if v is not None})
    check_setup(setup, args.variants)
    folder = check_output_folder(args.out, "--out", REPORT_FILES, overwrite=args.overwrite)
    if args.export is not None:
        check_output_folder(args.export, "--export", [f"world_{k}.safetensors" for k in args.variants],
                            overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    console.print(f"memkit bench quality: {len(args.variants)} variants x {setup.steps} training steps")
    command = "memkit bench quality"
    if sys.argv[1:3] == ["bench", "quality"]:
        command = " ".join([command, *(shlex.quote(a) for a in sys.argv[3:])])
    run_quality_bench(setup, args.variants, out_dir=folder, export=args.export, console=console,
                      progress=sys.stderr.isatty(), command=command)
    return 0


__all__ = ["QualitySetup", "VariantResult", "run_quality_bench", "train_variant", "evaluate", "gap_closed",
           "write_report", "results_markdown", "quick_setup", "VARIANTS"]

