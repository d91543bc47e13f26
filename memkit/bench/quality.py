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
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from memkit.errors import ConfigError

REGISTRY_VARIANTS = ("full", "window", "sink_window", "hybrid_gdn", "hybrid_ssd", "hybrid_blockwise")
#: Designs the benchmark runs beside the registry's variants at their defaults: a name, the variant, and the
#: ``MemoryConfig`` options that make it. ``hybrid_layout``: the layout design of ``memkit bench recall --address
#: time`` (docs/memory.md): one state per block of about :data:`LAYOUT_BLOCK_TOKENS` tokens, every token written
#: at its own strength, keys that carry their place and their time.
DESIGNS = {"hybrid_layout": ("hybrid_blockwise", dict(evict_aggregate="token", global_position="learned",
                                                      global_time="learned", write_strength="token"))}
LAYOUT_BLOCK_TOKENS = 8
VARIANTS = REGISTRY_VARIANTS + tuple(DESIGNS)
HYBRIDS = tuple(v for v in VARIANTS if v.startswith("hybrid"))
TRAIN_FRAMES = 240  # frames per training video
ROPE_FRAMES = 1024  # positions in the backbone's RoPE table (WorldModel.load extends it for longer rollouts)


@dataclass(frozen=True)
class QualitySetup:
    """One run's sizes and budget. The defaults fit one sitting on a 2-core CPU (see docs/benchmarks.md)."""

    # "loops": LoopVideos (places that come back); "scenes": SceneVideos (scenes of shapes cut back to after a
    # varying lag); "camera": WorldVideos (a wandering camera)
    world_kind: str = "loops"
    frame_size: int = 32  # pixels per side; a token is a patch x patch pixel square
    patch: int = 8
    loop_places: int = 3  # loops: places in the loop (a place comes back every loop_places shots)
    places: int = 16  # loops: the place ids prompts can name
    mosaic: int = 1  # loops: a place is a mosaic x mosaic grid of flat colours
    min_lag: int = 2  # scenes: a return shows the scene of min_lag .. max_lag shots before
    max_lag: int = 4
    shapes: int = 3  # scenes: shapes per scene
    return_rate: float = 0.5  # scenes: the share of shots (once a return can reach past the first) that return
    view_cells: int = 8  # camera: the view and the world, in cells; objects in it
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
    window_frames: int = 3
    blocks: int = 4
    horizon_frames: int = 48  # the hybrids' router horizon (positions past it read as its end)
    train_videos: int = 1024
    clip_frames: int = 24
    batch: int = 4
    steps: int = 600
    lr: float = 5e-3
    eval_videos: int = 16
    eval_frames: int = 24
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
        from memkit.bench.recall_task import block_count
        from memkit.memory import MemoryConfig

        # `window` gets the sink's frames too: every bounded variant holds the same number of frames
        window = self.window_frames + (self.sink_frames if kind == "window" else 0)
        options = dict(blocks=self.blocks)
        if kind in DESIGNS:
            kind, design = DESIGNS[kind]
            grid = self.frame_size // self.patch
            options = dict(design, blocks=block_count(grid, grid, LAYOUT_BLOCK_TOKENS))
        return MemoryConfig(kind=kind, sink_frames=self.sink_frames, window_frames=window,
                            horizon_frames=self.horizon_frames, check_finite=False, **options)

    def world(self, count: int, frames: int, seed: int):
        if self.world_kind == "loops":
            from memkit.data.loops import LoopVideos

            return LoopVideos(count=count, frames=frames, seed=seed, loop_places=self.loop_places,
                              shot_frames=self.chunk_frames, places=self.places, mosaic=self.mosaic)
        if self.world_kind == "scenes":
            from memkit.data.scenes import SceneVideos

            return SceneVideos(count=count, frames=frames, seed=seed, shot_frames=self.chunk_frames,
                               min_lag=self.min_lag, max_lag=self.max_lag, shapes=self.shapes,
                               return_rate=self.return_rate)
        from memkit.data.world import WorldVideos

        return WorldVideos(count=count, frames=frames, seed=seed, view_cells=self.view_cells,
                           world_cells=self.world_cells, objects=self.objects, action_frames=self.chunk_frames)

    @classmethod
    def from_record(cls, record: dict) -> QualitySetup:
        """The setup a model's file recorded (``training.setup``), fields of other memkit versions left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})

    @property
    def prompts(self) -> str:
        """What the models' prompt ids name (``WorldModel``'s ``prompts``)."""
        if self.world_kind == "scenes":
            return f"places:{self.max_lag + 1}"  # 0: a new scene; k: the scene of k shots before
        return f"places:{self.places}" if self.world_kind == "loops" else "actions"

    @property
    def train_frames(self) -> int:
        """Frames per training video: a loop or scene video is one clip (it starts at its first shot); a camera's
        path is long, and clips are cut from it anywhere."""
        return TRAIN_FRAMES if self.world_kind == "camera" else self.clip_frames


@dataclass
class VariantResult:
    kind: str
    train_seconds: float = 0.0
    final_loss: float = float("nan")
    psnr: dict[str, float] = field(default_factory=dict)  # "revisit" / "new" / "all" -> dB, free rollouts
    ssim: dict[str, float] = field(default_factory=dict)
    psnr_tf: dict[str, float] = field(default_factory=dict)  # the same, each chunk sampled from the true past
    # per held-out world: "revisit" / "new" -> PSNR of that world's frames (free rollouts, and from the true past)
    psnr_worlds: dict[str, list[float]] = field(default_factory=dict)
    psnr_tf_worlds: dict[str, list[float]] = field(default_factory=dict)
    # free rollouts of a world of places: each return against the model's own frame of that place at its last
    # visit ("revisit"), and each new place against it too ("new": the control; a different place)
    psnr_self: dict[str, float] = field(default_factory=dict)
    # the same two at the level of each frame's mean colour (:func:`frame_means`): the place a frame shows, without
    # the texture a sample scatters around it
    psnr_tf_colour: dict[str, float] = field(default_factory=dict)
    psnr_self_colour: dict[str, float] = field(default_factory=dict)
    drift: list[float] = field(default_factory=list)  # PSNR per frame index (generated frames), mean over videos
    chunk_ms: dict[str, float] = field(default_factory=dict)  # "early" / "late" median per-chunk time
    state_bytes: int = 0
    global_bytes: int = 0  # the global memory's state (``global.*`` tensors) at the end of the timed rollout
    memory_bytes_per_frame: float = 0.0  # the memory layers' state per frame held then (full: its K/V per frame)
    first_video: torch.Tensor | None = field(default=None, repr=False)  # the first held-out rollout (for strips)
    lr: float = float("nan")  # the learning rate the model was trained with (the sweep's choice with --lrs)
    # with --lrs: each learning rate tried -> its validation score (true-past PSNR over all generated frames of the
    # validation worlds, dB)
    lr_sweep: dict[str, float] = field(default_factory=dict)


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
    data = ClipDataModule(setup.world(setup.train_videos, setup.train_frames, setup.seed), frames=setup.clip_frames,
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
                       chunk_frames=setup.chunk_frames, prompt_len=setup.prompt_len, prompts=setup.prompts,
                       model=module.model)
    world.model.eval()
    return world, seconds, final


def evaluate(world, setup: QualitySetup, result: VariantResult) -> dict[int, torch.Tensor]:
    """Roll the model out on the held-out worlds; fill ``result``; return each video's generated frames."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    first = setup.chunk_frames
    psnr, ssim, forced, forced_colour, masks, videos, own, own_colour = [], [], [], [], [], {}, [], []
    for i, actions, truth, labels in held_out(setup):
        out = world.rollout(truth[:, :first], actions, setup.eval_frames, seed=setup.seed + i)
        true_past = world.rollout(truth[:, :first], actions, setup.eval_frames, seed=setup.seed + i,
                                  history=truth).video
        videos[i] = out.video
        psnr.append(frame_psnr(out.video[:, first:], truth[:, first:]))
        forced.append(frame_psnr(true_past[:, first:], truth[:, first:]))
        forced_colour.append(frame_psnr(frame_means(true_past[:, first:]), frame_means(truth[:, first:])))
        ssim.append(structural_similarity_index_measure(out.video[:, first:].transpose(0, 1),
                                                        truth[:, first:].transpose(0, 1), data_range=2.0,
                                                        reduction="none"))
        masks.append(labels)
        if "last_seen" in labels:
            own.append((self_psnr(out.video, labels["last_seen"], first), labels))
            own_colour.append((self_psnr(frame_means(out.video), labels["last_seen"], first), labels))
    psnr = torch.stack(psnr)
    result.psnr, result.ssim = by_label(psnr, masks), by_label(torch.stack(ssim), masks)
    result.psnr_tf = by_label(torch.stack(forced), masks)
    result.psnr_tf_colour = by_label(torch.stack(forced_colour), masks)
    result.psnr_worlds, result.psnr_tf_worlds = per_world(psnr, masks), per_world(torch.stack(forced), masks)
    result.drift = psnr.mean(dim=0).tolist()
    if own:
        result.psnr_self, result.psnr_self_colour = labelled_mean(own), labelled_mean(own_colour)
    result.chunk_ms, timed = time_chunks(world, setup)
    result.state_bytes, result.global_bytes = timed.state_bytes, timed.global_bytes
    result.memory_bytes_per_frame = timed.memory_bytes / timed.video.shape[1]
    return videos


def validation_score(world, setup: QualitySetup) -> float:
    """What ``--lrs`` chooses a learning rate by: the mean PSNR of every generated frame of the validation worlds
    (never trained on, never reported), each chunk sampled from the true past."""
    first = setup.chunk_frames
    scores = []
    for i, actions, truth, _ in held_out(setup, VALIDATION_WORLDS):
        video = world.rollout(truth[:, :first], actions, setup.eval_frames, seed=setup.seed + i, history=truth).video
        scores.append(frame_psnr(video[:, first:], truth[:, first:]))
    return float(torch.cat(scores).mean())


def train_swept(setup: QualitySetup, kind: str, lrs, progress: bool = True, console=None):
    """Train ``kind`` at each learning rate of ``lrs`` and keep the model with the best :func:`validation_score`;
    return it, its seconds, final loss and learning rate, and every rate's score (an empty dict for one rate)."""
    if len(lrs) == 1:
        return (*train_variant(replace(setup, lr=lrs[0]), kind, progress, console), lrs[0], {})
    best, sweep = None, {}
    for lr in lrs:
        world, seconds, final = train_variant(replace(setup, lr=lr), kind, progress, console)
        sweep[f"{lr:g}"] = score = validation_score(world, setup)
        if console is not None:
            console.print(f"  {kind} at lr {lr:g}: loss {final:.3f}, validation PSNR {score:.2f} dB")
        if best is None or score > best[0]:
            best = (score, world, seconds, final, lr)
    return (*best[1:], sweep)


def frame_means(video: torch.Tensor) -> torch.Tensor:
    """Each frame of ``video (3, F, H, W)`` as its mean colour, ``(3, F, 1, 1)``: the PSNR of two such is the
    PSNR of the colours alone. Two samples of one flat place differ by their textures (independent noise of
    standard deviation s about the colour caps their pixel PSNR at 10 log10(4 / 2 s^2), 11.2 dB at s = 0.39)."""
    return video.mean(dim=(2, 3), keepdim=True)


def labelled_mean(scores: list[tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """The mean of per-frame scores over the frames each video's labels mark "revisit" and "new"."""
    return {name: float(torch.cat([v[m[name]] for v, m in scores]).mean()) for name in ("revisit", "new")}


def self_psnr(video: torch.Tensor, last_seen: torch.Tensor, first: int) -> torch.Tensor:
    """PSNR of each generated frame ``t >= first`` of ``video (3, F, H, W)`` against its own frame ``last_seen[t]``
    (the place's previous showing; for a new place, the frame before its chunk): ``(F - first,)``."""
    frames = torch.arange(first, video.shape[1])
    earlier = torch.where(last_seen[frames] >= 0, last_seen[frames], frames - frames % first - 1)
    return frame_psnr(video[:, frames], video[:, earlier])


#: Chunks timed in a row for the cost per chunk, from the first one that reads a global memory.
TIMED_CHUNKS = 24


def time_chunks(world, setup: QualitySetup):
    """The median time per chunk of a free rollout of the first held-out world, over the first 5 chunks that read
    a global memory ("early") and the last 5 of ``TIMED_CHUNKS`` chunks ("late"), and the rollout (its state's
    bytes at the end). Before the first eviction a hybrid skips its (empty) global read: those chunks are not
    compared."""
    from memkit.train.losses.rolling import global_read_frames

    F = setup.chunk_frames
    start = global_read_frames(setup.sink_frames, setup.window_frames, F) // F
    frames = F * (start + TIMED_CHUNKS)
    source = setup.world(1, frames, setup.seed + 10_000)
    truth = source.read(0, 0, F, (setup.frame_size, setup.frame_size))["video"]
    out = world.rollout(truth, source.actions(0), frames, seed=setup.seed)
    times = torch.tensor(out.chunk_seconds[start - 1:])  # chunk_seconds starts at the second chunk
    return {"early": 1e3 * float(times[:5].median()), "late": 1e3 * float(times[-5:].median())}, out


#: Seed offsets of the held-out worlds: the test worlds every table reports, and the validation worlds a learning
#: rate is chosen on (``--lrs``); training worlds use the setup's seed itself.
TEST_WORLDS, VALIDATION_WORLDS = 10_000, 20_000


def held_out(setup: QualitySetup, offset: int = TEST_WORLDS):
    """Per held-out world (seeds never trained on): its index, actions, true frames ``(3, F, H, W)`` and the
    ``revisit`` / ``new`` masks of its frames after the first chunk (the generated ones)."""
    source = setup.world(setup.eval_videos, setup.eval_frames, setup.seed + offset)
    for i in range(len(source)):
        truth = source.read(i, 0, setup.eval_frames, (setup.frame_size, setup.frame_size))["video"]
        labels = source.labels(i, window=setup.window_frames, sink=setup.sink_frames, chunk=setup.chunk_frames)
        masks = {n: labels[n][setup.chunk_frames:] for n in ("revisit", "new")}
        if "last_seen" in labels:  # a world of places: each frame's place at its last showing (all frames)
            masks["last_seen"] = labels["last_seen"]
        yield i, source.actions(i), truth, masks


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


def per_world(values: torch.Tensor, masks: list[dict[str, torch.Tensor]]) -> dict[str, list[float]]:
    """Per video (held-out world), the mean of its per-frame ``values`` over its revisited and its new frames
    (NaN where it has none)."""
    return {name: [float(v[m[name]].mean()) if m[name].any() else float("nan") for v, m in zip(values, masks)]
            for name in ("revisit", "new")}


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


def gap_spread(results: dict[str, VariantResult], forced: bool = True, resamples: int = 2000,
               seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per hybrid, the 5th and 95th percentiles of its gap closed on revisited frames when the held-out worlds are
    resampled with replacement (a bootstrap over worlds): how far the figure could move with other worlds."""
    if "full" not in results or "sink_window" not in results:
        return {}
    key = "psnr_tf_worlds" if forced else "psnr_worlds"
    table = {k: torch.tensor(getattr(r, key).get("revisit", [])) for k, r in results.items()}
    if any(len(v) == 0 for v in table.values()):
        return {}
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(table["full"]), (resamples, len(table["full"])), generator=gen)

    def means(kind):
        return table[kind][picks].nanmean(dim=1)

    low, high = means("sink_window"), means("full")
    out = {}
    for kind in results:
        if kind in HYBRIDS:
            share = ((means(kind) - low) / (high - low))[high - low > 0]
            if len(share):
                q = torch.quantile(share, torch.tensor([0.05, 0.95]))
                out[kind] = (float(q[0]), float(q[1]))
    return out


def run_quality_bench(setup: QualitySetup, variants=VARIANTS, out_dir: str | None = None, export: str | None = None,
                      console=None, progress: bool = True, command: str = "memkit bench quality",
                      from_models: str | None = None, lrs=None) -> dict[str, VariantResult]:
    """Train and evaluate each variant in turn; with ``out_dir``, write the table and plots there (with the
    model-free baseline and ``command``); with ``export``, save each trained model there. With ``lrs``, train
    each variant at each learning rate and keep the one with the best score on validation worlds
    (:func:`validation_score`). With ``from_models`` (a folder that ``export`` wrote), train nothing: evaluate the
    models there (their learning rate, training time and loss come from the files)."""
    check_setup(setup, variants)
    results = {}
    t_start = time.perf_counter()
    for kind in variants:
        sweep = {}
        if from_models is not None:
            world = load_exported(Path(from_models) / f"world_{kind}.safetensors", setup)
            training = world.meta["training"]
            seconds, final, lr = training["seconds"], training["loss"], training["setup"]["lr"]
            sweep = training.get("lr_sweep", {})
        else:
            rates = list(lrs or [setup.lr])
            if console is not None:
                console.print(f"[bold]{kind}[/bold]: training {setup.steps} steps at lr "
                              f"{', '.join(f'{r:g}' for r in rates)} ...")
            world, seconds, final, lr, sweep = train_swept(setup, kind, rates, progress=progress, console=console)
        result = VariantResult(kind, seconds, final, lr=lr, lr_sweep=sweep)
        result.first_video = evaluate(world, setup, result)[0]
        results[kind] = result
        if console is not None:
            console.print(f"  {kind}: {seconds:.0f} s, loss {final:.3f}, PSNR revisit {result.psnr['revisit']:.2f} "
                          f"new {result.psnr['new']:.2f} all {result.psnr['all']:.2f} dB; true past: revisit "
                          f"{result.psnr_tf['revisit']:.2f} new {result.psnr_tf['new']:.2f} dB"
                          + (f"; free, colour against its own last visit: return "
                             f"{result.psnr_self_colour['revisit']:.2f} new {result.psnr_self_colour['new']:.2f} dB"
                             if result.psnr_self_colour else ""))
        if export is not None and from_models is None:
            Path(export).mkdir(parents=True, exist_ok=True)
            world.save(Path(export) / f"world_{kind}.safetensors",
                       extra={"training": {"steps": setup.steps, "seconds": round(seconds, 1), "loss": final,
                                           "setup": asdict(replace(setup, lr=lr)), "lr_sweep": sweep}})
    wall = time.perf_counter() - t_start
    if out_dir is not None:
        # a flat place's own mean colour is the place itself: no reference there
        baseline = flat_baseline(setup) if setup.world_kind != "loops" or setup.mosaic > 1 else None
        written = write_report(results, setup, {k: r.first_video for k, r in results.items()}, out_dir, wall,
                               command=command, baseline=baseline)
        if console is not None:
            console.print(results_markdown(results, setup, wall, command, baseline), markup=False, soft_wrap=True)
            for path in written:
                console.print(f"wrote {path}")
    return results


#: Setup fields that only the evaluation reads: --from-models may change them.
EVAL_FIELDS = ("eval_videos", "eval_frames", "sampling_steps")
#: Setup fields each model may have of its own (a learning rate chosen per variant by --lrs).
MODEL_FIELDS = ("lr",)


def load_exported(path: Path, setup: QualitySetup):
    """A model ``--export`` wrote, checked to have been trained with ``setup`` (evaluation fields aside)."""
    from memkit.errors import CheckpointError
    from memkit.rollout.world import WorldModel

    world = WorldModel.load(path)
    saved = _training_setup(world.meta, path)
    mine = {k: v for k, v in asdict(setup).items() if k not in EVAL_FIELDS + MODEL_FIELDS}
    diffs = [f"{k}: file {saved.get(k)!r}, here {v!r}" for k, v in mine.items() if saved.get(k, v) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained with another setup: {'; '.join(diffs[:4])}")
    world.model.eval()
    return world


def saved_setup(folder: str, variants) -> QualitySetup:
    """The training setup recorded in the first model of ``folder`` (``--from-models``), read from its metadata
    alone."""
    from memkit.state import io

    path = Path(folder) / f"world_{variants[0]}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--from-models {folder}: no {path.name} in it (written by --export)")
    return QualitySetup.from_record(_training_setup(io.read_meta(path, "world model"), path))


def _training_setup(meta: dict, path) -> dict:
    from memkit.errors import CheckpointError

    saved = meta.get("training", {}).get("setup")
    if saved is None:
        raise CheckpointError(f"{path} records no training setup (not written by memkit bench quality --export)")
    return saved


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
    spread = gap_spread(results)

    def pct(table, kind):
        return f"{100 * table[kind]:.0f}%" if kind in table else "-"

    def pct_spread(kind):
        if kind not in gaps_tf or kind not in spread:
            return pct(gaps_tf, kind)
        return f"{pct(gaps_tf, kind)} ({100 * spread[kind][0]:.0f}-{100 * spread[kind][1]:.0f}%)"

    lines = [
        "| memory | PSNR revisited | PSNR new | PSNR all | SSIM revisited | SSIM new | gap closed | "
        "true-past PSNR revisited | true-past PSNR new | true-past gap closed | true-past colour revisited | "
        "true-past colour new | free: return vs own last visit | free: new vs frame before | free colour: return vs "
        "own last visit | free colour: new vs frame before | ms/chunk early | ms/chunk late | state KiB | global KiB | "
        "global / full's K/V at returns | lr | train s | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full_kv = kv_at_returns(results, setup)
    for kind, r in results.items():
        lines.append(
            f"| `{kind}` | {r.psnr['revisit']:.2f} | {r.psnr['new']:.2f} | {r.psnr['all']:.2f} | "
            f"{r.ssim['revisit']:.3f} | {r.ssim['new']:.3f} | {pct(gaps, kind)} | {r.psnr_tf['revisit']:.2f} | "
            f"{r.psnr_tf['new']:.2f} | {pct_spread(kind)} | {_db(r.psnr_tf_colour.get('revisit'))} | "
            f"{_db(r.psnr_tf_colour.get('new'))} | {_db(r.psnr_self.get('revisit'))} | "
            f"{_db(r.psnr_self.get('new'))} | {_db(r.psnr_self_colour.get('revisit'))} | "
            f"{_db(r.psnr_self_colour.get('new'))} | {r.chunk_ms['early']:.1f} | "
            f"{r.chunk_ms['late']:.1f} | {r.state_bytes / 1024:.0f} | {r.global_bytes / 1024:.0f} | "
            f"{f'{r.global_bytes / full_kv:.3f}' if full_kv and r.global_bytes else '-'} | {_lr(r)} | "
            f"{r.train_seconds:.0f} | {r.final_loss:.3f} |")
    if baseline:
        cells = ["each true frame's mean colour (no model)", *(f"{baseline[n]:.2f}" for n in ("revisit", "new", "all"))]
        columns = lines[0].count("|") - 1
        lines.append("| " + " | ".join(cells + [""] * (columns - len(cells))) + " |")
    budget = (f"{setup.steps} steps x batch {setup.batch} clips of {setup.clip_frames} frames "
              f"({setup.frame_size}x{setup.frame_size} px, {setup.layers} layers, "
              f"{setup.heads}x{setup.head_dim} heads)")
    return "\n".join([
        f"Command: `{command}`  ",
        f"Budget per variant: {budget}; evaluation: {setup.eval_videos} held-out worlds x {setup.eval_frames} "
        f"frames ({setup.eval_frames / (setup.sink_frames + setup.window_frames):.1f}x the local memory of "
        f"{setup.sink_frames} sink + {setup.window_frames} window frames), {setup.sampling_steps}-step sampling. "
        "PSNR in dB against the ground truth: free rollouts from the first chunk, and (true past) each chunk "
        "sampled from the true frames before it. Gap closed: the share of the revisited-frame PSNR gap between "
        "`sink_window` and `full` a hybrid closes; in brackets the 5th-95th percentiles over the held-out worlds "
        "resampled (bootstrap). Free: in a world of places, each frame of a free rollout against the model's own "
        "frame of that place at its last visit (a return shown as the model first showed it scores high), and "
        "each new place against the frame before it (a control). Colour: the same PSNR between the frames' mean "
        "colours, the place without the texture a sample scatters about it (two samples' independent textures cap "
        "their pixel PSNR near 11 dB). Cost per chunk: a free rollout of "
        f"{TIMED_CHUNKS} chunks from the first chunk that reads a global memory, median of its first and last "
        "5; state KiB: the stream's state (memories and held frames) at the end of that rollout; global KiB: the "
        "global memory's part of it, and its share of `full`'s K/V (every layer) when a return is sampled, on "
        f"average {return_frames(setup):.1f} frames in. lr: the learning rate (with a sweep, the one of those "
        "tried that scored best on validation worlds, true past, all frames).  ",
        f"Wall time: {wall_seconds / 60:.1f} min.",
        "", *lines, ""])


def _lr(result: VariantResult) -> str:
    if not result.lr_sweep:
        return f"{result.lr:g}"
    return f"{result.lr:g} (of {', '.join(result.lr_sweep)})"


def return_frames(setup: QualitySetup) -> float:
    """The frames a memory has committed when a return is sampled, on average over the test worlds' returns (each
    return's chunk start)."""
    starts = [t - t % setup.chunk_frames + setup.chunk_frames for _, _, _, m in held_out(setup)
              for t in torch.nonzero(m["revisit"]).flatten().tolist()]  # masks start after the first chunk
    return sum(starts) / len(starts) if starts else float("nan")


def kv_at_returns(results: dict[str, VariantResult], setup: QualitySetup) -> float | None:
    """``full``'s K/V bytes (every layer) at the average return (:func:`return_frames`): what a global state is
    weighed against. None without ``full`` or returns."""
    full = results.get("full")
    frames = return_frames(setup)
    if full is None or not full.memory_bytes_per_frame or math.isnan(frames):
        return None
    return full.memory_bytes_per_frame * frames


def _db(value) -> str:
    return "-" if value is None else f"{value:.2f}"


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
                                         "full_kv_bytes_at_returns": kv_at_returns(results, setup),
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
            ("revisited, true past", "psnr_tf", "revisit", "tab:green"),
            ("new, true past", "psnr_tf", "new", "tab:olive"))
    for off, (label, table, name, colour) in zip((-0.3, -0.1, 0.1, 0.3), bars):
        ax2.bar((xs + off).tolist(), [getattr(results[k], table)[name] for k in kinds], width=0.2, color=colour,
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


def camera_setup(**changes) -> QualitySetup:
    """The wandering-camera world (``WorldVideos``) at the budget its table in docs/benchmarks.md was made with."""
    camera = dict(world_kind="camera", patch=4, window_frames=6, blocks=2, horizon_frames=96, train_videos=256,
                  batch=2, steps=300, eval_videos=4, eval_frames=96)
    return replace(QualitySetup(), **{**camera, **changes})


def scenes_setup(**changes) -> QualitySetup:
    """The world of scenes (``SceneVideos``) at the budget its table in docs/benchmarks.md was made with: 4 x 4
    pixel patches, so that a frame is an 8 x 8 grid of tokens and a scene's layout spans many of them; three shots
    in four return once they can (at half, 300 steps did not teach even ``full`` to bring a scene back)."""
    scenes = dict(world_kind="scenes", patch=4, eval_frames=36, return_rate=0.75)
    return replace(QualitySetup(), **{**scenes, **changes})


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
    q.add_argument("--world", choices=["loops", "scenes", "camera"], default="loops",
                   help="loops (default): places that come back after they left the local memory (LoopVideos); "
                        "scenes: scenes of shapes cut back to after 2-4 shots, a layout to bring back "
                        "(SceneVideos, 8x8 tokens per frame); camera: a camera wandering over a 2-D world "
                        "(WorldVideos); scenes and camera at their own budgets")
    q.add_argument("--steps", type=positive_int, help=f"training steps per variant ({d.steps})")
    q.add_argument("--batch", type=positive_int, help=f"clips per step ({d.batch})")
    q.add_argument("--clip-frames", type=positive_int, help=f"frames per training clip ({d.clip_frames})")
    q.add_argument("--lr", type=positive_float, help=f"learning rate ({d.lr})")
    q.add_argument("--lrs", type=positive_float, nargs="+", default=None,
                   help="sweep: train each variant at each of these learning rates and keep the one that scores best "
                        "on validation worlds (true past, all frames; never the reported worlds)")
    q.add_argument("--head-dim", type=positive_int,
                   help=f"channels per attention head ({d.head_dim}); the token width is {d.heads} heads x this, and "
                        f"above a patch's {3 * d.patch ** 2} pixel values (64) the models sample clean frames")
    q.add_argument("--eval-videos", type=positive_int, help=f"held-out worlds ({d.eval_videos})")
    q.add_argument("--eval-frames", type=positive_int, help=f"frames per held-out rollout ({d.eval_frames})")
    q.add_argument("--seed", type=nonnegative_int, help=f"seed of weights, data and sampling ({d.seed})")
    q.add_argument("--quick", action="store_true", help="a tiny model and budget (checks the pipeline; learns "
                                                         "nothing); the flags above still apply")
    q.add_argument("--out", default="docs/results", help="folder for quality.md/.json/.png (default: docs/results)")
    q.add_argument("--export", default=None, help="also save each trained model here (world_<variant>.safetensors)")
    q.add_argument("--from-models", default=None,
                   help="train nothing: evaluate the models an --export wrote to this folder, with their own setup "
                        "(--eval-videos and --eval-frames may change)")
    q.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--overwrite", action="store_true", help="replace existing report files")
    q.set_defaults(fn=run_quality_command)


def run_quality_command(args, console) -> int:
    import shlex
    import sys

    from memkit.outputs import check_output_folder

    flags = dict(steps=args.steps, batch=args.batch, clip_frames=args.clip_frames, lr=args.lr,
                 head_dim=args.head_dim, eval_videos=args.eval_videos, eval_frames=args.eval_frames, seed=args.seed)
    if args.from_models is not None:
        training = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None and k not in EVAL_FIELDS]
        training += ["--lrs"] * bool(args.lrs)
        if training or args.quick or args.export:
            raise ConfigError(f"--from-models evaluates trained models with their own setup; drop "
                              f"{', '.join(training + ['--quick'] * args.quick + ['--export'] * bool(args.export))}")
        base = saved_setup(args.from_models, args.variants)
    else:
        worlds = {"loops": QualitySetup, "scenes": scenes_setup, "camera": camera_setup}
        base = quick_setup(world_kind=args.world) if args.quick else worlds[args.world]()
    if args.lr is not None and args.lrs:
        raise ConfigError("--lr and --lrs: give one learning rate or a sweep, not both")
    if args.lrs and len(set(args.lrs)) != len(args.lrs):
        raise ConfigError(f"--lrs lists a learning rate twice: {' '.join(f'{r:g}' for r in args.lrs)}")
    setup = replace(base, **{k: v for k, v in flags.items() if v is not None})
    check_setup(setup, args.variants)
    folder = check_output_folder(args.out, "--out", REPORT_FILES, overwrite=args.overwrite)
    if args.export is not None:
        check_output_folder(args.export, "--export", [f"world_{k}.safetensors" for k in args.variants],
                            overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    what = f"models from {args.from_models}" if args.from_models else f"{setup.steps} training steps"
    console.print(f"memkit bench quality: {len(args.variants)} variants x {what}")
    command = "memkit bench quality"
    if sys.argv[1:3] == ["bench", "quality"]:
        command = " ".join([command, *(shlex.quote(a) for a in sys.argv[3:])])
    run_quality_bench(setup, args.variants, out_dir=folder, export=args.export, console=console,
                      progress=sys.stderr.isatty(), command=command, from_models=args.from_models, lrs=args.lrs)
    return 0


__all__ = ["QualitySetup", "VariantResult", "run_quality_bench", "train_variant", "evaluate", "gap_closed",
           "write_report", "results_markdown", "quick_setup", "camera_setup", "gap_spread", "VARIANTS"]

