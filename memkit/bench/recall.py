"""``memkit bench recall``: does a memory bring back what left its window? Measured on the memory layer alone.

A synthetic associative-recall task made of frames (:mod:`memkit.bench.recall_task`; in the spirit of Zoology's
MQAR, arXiv 2312.04927): scenes are shown, distractors stream past, and ``lag`` frames later a query frame names a
scene by its cue and asks for its content at every place. Each memory setting (variant, write granularity, RoPE
mode, place code) gets the same smallest model around one memory layer, trained from scratch under one budget with
a small learning-rate sweep (recurrent memories train in a narrow band, arXiv 2508.19029), and is then streamed
chunk by chunk on held-out streams:

* recall (the share of queried places whose symbol comes back, chance ``1 / vocab``) against the lag, from 1x to
  32x the local memory (sink + window), and against the scenes held at once (capacity);
* the bytes its state holds when the queries come (all of it, and the global state alone).

``full`` is the ceiling and ``window`` / ``sink_window`` the floor: beyond their reach they can only guess.

With ``--address time`` the scenes are told apart only by when they were shown (the same places, no cue of their
own; a query names its scene by its lag), as when a video returns to a place it showed before; ``--frame-tokens``
runs the task at several frame sizes (16, 64, 256 tokens) and the report adds recall against tokens per frame, and
what each design's state would take at 1,560 tokens per frame (a 480p Wan frame), computed, not run.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from memkit.errors import ConfigError

from .recall_task import (
    IGNORE,
    VARIANTS,
    RecallNet,
    RecallSetting,
    RecallSetup,
    RecallStreams,
    make_streams,
    reach,
    recall_of,
)

REPORT_FILES = ["recall.md", "recall.json", "recall.png"]
VALIDATION_SEED, TEST_SEED = 1, 2  # offsets from the setup's seed: training streams use the seed itself
BAND = 0.9  # learning rates whose validation recall is within this share of the best form the "band"
#: Tokens per block the per-block designs of ``--address time`` aim at (a ``blocks x blocks`` grid of states per
#: frame, so that each state holds a few scenes' tokens of its block whatever the frame size).
TOKENS_PER_BLOCK = 8
WAN_480P = (30, 52)  # the token grid of a 480p Wan2.1 frame: 1,560 tokens


def main_settings(variants=VARIANTS) -> list[RecallSetting]:
    """One setting per variant: the hybrids with per-token writes, keys that carry their place (learned codes) and
    cache-relative RoPE (the best of the designs tried, docs/benchmarks.md)."""
    return [RecallSetting(v) for v in variants]


def ablation_settings(variants=VARIANTS) -> list[RecallSetting]:
    """What each write design of the hybrids reaches: place codes, RoPE modes and write granularities."""
    out = []
    if "hybrid_gdn" in variants:
        out += [RecallSetting("hybrid_gdn", global_position="none"),
                RecallSetting("hybrid_gdn", global_position="rope"),
                RecallSetting("hybrid_gdn", rope_mode="absolute", global_position="none"),
                RecallSetting("hybrid_gdn", rope_mode="absolute"),
                RecallSetting("hybrid_gdn", evict_aggregate="block_mean", global_position="none"),
                RecallSetting("hybrid_gdn", evict_aggregate="block_mean"),
                RecallSetting("hybrid_gdn", evict_aggregate="block_mean", rope_mode="absolute"),
                RecallSetting("hybrid_gdn", evict_aggregate="frame_mean"),
                RecallSetting("hybrid_gdn", evict_aggregate="frame_mean", rope_mode="absolute")]
    if "hybrid_ssd" in variants:
        out += [RecallSetting("hybrid_ssd", global_position="none"),
                RecallSetting("hybrid_ssd", rope_mode="absolute"),
                RecallSetting("hybrid_ssd", evict_aggregate="block_mean"),
                RecallSetting("hybrid_ssd", evict_aggregate="frame_mean")]
    if "hybrid_blockwise" in variants:
        out += [RecallSetting("hybrid_blockwise", global_position="none"),
                RecallSetting("hybrid_blockwise", rope_mode="absolute"),
                RecallSetting("hybrid_blockwise", evict_aggregate="frame_mean"),
                RecallSetting("hybrid_blockwise", evict_aggregate="frame_mean", blocks=4)]
    return out


def time_settings(variants=VARIANTS, main: bool = False) -> list[RecallSetting]:
    """The settings of ``address="time"``: the ceiling and floors, today's best design on cued scenes (place-coded
    token writes, no time), and the designs that can address time: a time code on the keys, per-token write
    strength, one state per block of about :data:`TOKENS_PER_BLOCK` tokens whatever the frame size (and that design
    without its time code, to show what the code does). ``main``: one setting per variant, the hybrids with the time
    code."""
    timed = dict(global_time="learned", write_strength="token")
    per_block = dict(block_tokens=TOKENS_PER_BLOCK, write_strength="token")
    out = [RecallSetting(v) for v in ("full", "window", "sink_window") if v in variants]
    if "hybrid_gdn" in variants:  # each variant's time-coded design first: its main setting
        out.append(RecallSetting("hybrid_gdn", **timed))
        if not main:
            out.append(RecallSetting("hybrid_gdn"))
    if "hybrid_blockwise" in variants:
        out.append(RecallSetting("hybrid_blockwise", global_time="learned", **per_block))
        if not main:
            out.append(RecallSetting("hybrid_blockwise", **per_block))
    return out


@dataclass
class Measurement:
    lag: int
    scenes: int
    recall: float
    state_bytes: int
    global_bytes: int
    reach: float  # the share of the queried scenes local attention can see (see recall_task.reach)

    @property
    def beyond_reach(self) -> bool:
        return self.reach == 0


@dataclass
class SettingResult:
    setting: RecallSetting
    lr: float
    sweep: dict[float, float] = field(default_factory=dict)  # lr -> validation recall
    train_seconds: float = 0.0
    final_loss: float = float("nan")
    measurements: list[Measurement] = field(default_factory=list)

    def recall(self, lag: int, scenes: int) -> float:
        """Recall at ``lag`` with ``scenes`` held (NaN where not measured: a lag shorter than the scenes)."""
        m = self.at(lag, scenes)
        return float("nan") if m is None else m.recall

    def at(self, lag: int, scenes: int) -> Measurement | None:
        return next((m for m in self.measurements if m.lag == lag and m.scenes == scenes), None)

    @property
    def validation(self) -> float:
        """The validation recall of the learning rate kept."""
        return self.sweep[self.lr]

    def band(self) -> list[float]:
        """The learning rates whose validation recall is within ``BAND`` of the best one's."""
        best = max(self.sweep.values())
        return sorted(lr for lr, r in self.sweep.items() if r >= BAND * best)


# -- training and evaluation ------------------------------------------------------------------------------------
def _module(setup: RecallSetup, setting: RecallSetting, lr: float):
    import lightning as L
    import torch.nn.functional as F

    class RecallModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = RecallNet(setup, setting.config(setup))

        def training_step(self, batch, batch_idx):
            symbols, cues, lags, targets = batch
            logits = self.net(symbols, cues, lags)
            loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE)
            self.log("train/loss", loss, prog_bar=True, batch_size=symbols.shape[0])
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
            warm, total = setup.warmup_steps, setup.steps

            def scale(step):  # linear warm-up, then a cosine down to a tenth
                if step < warm:
                    return (step + 1) / warm
                done = min(1.0, (step - warm) / max(1, total - warm))
                return 0.1 + 0.45 * (1 + math.cos(math.pi * done))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, scale)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return RecallModule()


def train(setup: RecallSetup, setting: RecallSetting, lr: float, progress: bool = False, emit=None):
    """A fresh model with ``setting``'s memory trained for ``setup.steps`` steps at ``lr``: ``(net, seconds, loss)``.
    ``progress`` draws a bar; otherwise ``emit`` (if given) gets a line now and then."""
    import lightning as L

    from memkit.train.callbacks import ProgressLines

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(setup.seed)
    module = _module(setup, setting, lr)
    loader = torch.utils.data.DataLoader(RecallStreams(setup, setup.seed), batch_size=None)
    callbacks = [] if progress or emit is None else [ProgressLines(emit, lines=4)]
    trainer = L.Trainer(max_steps=setup.steps, max_epochs=-1, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                        callbacks=callbacks)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    net = module.net.eval()
    return net, time.perf_counter() - t0, loss


def measure(net: RecallNet, setup: RecallSetup, lag: int, scenes: int, seed: int) -> Measurement:
    """Recall of ``setup.eval_streams`` held-out streams committed chunk by chunk, and the memory's bytes then."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + lag * 101 + scenes)
    device = next(net.parameters()).device
    batch = make_streams(setup, gen, setup.eval_streams, scenes, lag)
    logits, state_bytes, global_bytes = net.stream(batch.symbols.to(device), batch.cues.to(device),
                                                   batch.lags.to(device), batch.query_frames[0])
    seen = reach(setup, net.layers[0].memory, scenes, lag)
    return Measurement(lag, scenes, recall_of(logits.cpu(), batch.targets), state_bytes, global_bytes, seen)


def validation_recall(net: RecallNet, setup: RecallSetup) -> float:
    """Mean recall over the evaluated lags and the trained scene counts, on streams of their own (the lr choice
    never sees the test streams)."""
    values = [measure(net, setup, lag, s, setup.seed + VALIDATION_SEED).recall for lag, s in grid(setup, setup.scenes)]
    return sum(values) / len(values)


def run_setting(setup: RecallSetup, setting: RecallSetting, lrs, console=None, progress: bool = False
                ) -> SettingResult:
    """Train ``setting`` at each of ``lrs``, keep the model with the best validation recall, measure it."""
    best = None
    result = SettingResult(setting, lr=lrs[0])
    for lr in lrs:
        emit = None if console is None else (lambda line, lr=lr: console.print(f"    lr {lr:g}: {line}", markup=False))
        net, seconds, loss = train(setup, setting, lr, progress=progress, emit=emit)
        result.sweep[lr] = validation_recall(net, setup)
        result.train_seconds += seconds
        if console is not None:
            console.print(f"    lr {lr:g}: {seconds:.0f} s, loss {loss:.3f}, validation recall "
                          f"{result.sweep[lr]:.3f}", markup=False)
        if best is None or result.sweep[lr] > result.sweep[best[0]]:
            best = (lr, net, loss)
    result.lr, net, result.final_loss = best
    result.measurements = [measure(net, setup, lag, s, setup.seed + TEST_SEED)
                           for lag, s in grid(setup, setup.eval_scenes)]
    return result


def grid(setup: RecallSetup, scenes) -> list[tuple[int, int]]:
    """The (lag, scenes) pairs measured: every evaluated lag with every scene count it can separate from its
    queries (``scenes`` consecutive scenes need a lag of at least ``scenes`` frames)."""
    return [(lag, s) for lag in setup.lags for s in scenes if lag >= s]


def run_recall_bench(setup: RecallSetup, settings: list[RecallSetting], *, console=None, progress: bool = False,
                     jobs: int = 1) -> dict[str, SettingResult]:
    """Every setting, each swept over ``setup.lrs`` (see :func:`run_setting`): in turn, or ``jobs`` settings at a
    time in processes of their own (each with ``torch.get_num_threads() // jobs`` threads; each setting trains from
    the same seed and streams as it would alone, though sums over fewer threads may round differently)."""
    if len({s.name for s in settings}) != len(settings):
        raise ConfigError("the settings list one setting twice")
    K = report_scenes(setup)

    def report(result: SettingResult, i: int) -> None:
        if console is not None:
            console.print(f"    {result.setting.name} ({i}/{len(settings)}): lr {result.lr:g}, "
                          f"{result.train_seconds:.0f} s; recall at lag ({K} scene{'s' if K > 1 else ''}): "
                          + ", ".join(f"{lag}: {result.recall(lag, K):.2f}" for lag in setup.lags),
                          markup=False, soft_wrap=True)

    if jobs > 1 and len(settings) > 1:
        return _run_in_processes(setup, settings, jobs, console, report)
    results = {}
    for i, setting in enumerate(settings, 1):
        if console is not None:
            console.print(f"[bold]{setting.name}[/bold] ({i}/{len(settings)}): {len(setup.lrs)} x {setup.steps} "
                          "steps")
        results[setting.name] = run_setting(setup, setting, setup.lrs, console=console, progress=progress)
        report(results[setting.name], i)
    return results


def _run_in_processes(setup, settings, jobs, console, report) -> dict[str, SettingResult]:
    import multiprocessing

    threads = max(1, torch.get_num_threads() // jobs)
    if console is not None:
        console.print(f"{len(settings)} settings, {jobs} at a time ({threads} thread{'s' if threads > 1 else ''} "
                      "each)")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of torch's thread pools
    done = {}
    # A Pool, not a ProcessPoolExecutor: leaving the block on an error or Ctrl-C terminates the workers at once
    # instead of waiting for the settings in flight.
    with context.Pool(jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        work = [(setup, s) for s in settings]
        for i, result in enumerate(pool.imap_unordered(_run_one, work), 1):
            done[result.setting.name] = result
            report(result, i)
    return {s.name: done[s.name] for s in settings}


def _run_one(work: tuple[RecallSetup, RecallSetting]) -> SettingResult:
    setup, setting = work
    return run_setting(setup, setting, setup.lrs)


# -- the verdicts the report and the CI test read -----------------------------------------------------------
def report_scenes(setup: RecallSetup) -> int:
    """The capacity the main table reports: the most scenes held at once in training."""
    return max(setup.scenes)


def verdicts(results: dict[str, SettingResult], setup: RecallSetup) -> dict:
    """What the benchmark shows, at the report's scene count: full's worst recall over the lags; the floors'
    best recall where no queried scene is within their reach; the best hybrid among those whose global state is
    under 1/8 of full's K/V at 8x the local memory (or the longest lag below it; all of them if none is), chosen
    by its validation recall (the test streams choose nothing), with its recall there, its share of full's and
    its bytes against full's."""
    K = report_scenes(setup)
    lag8 = max((lag for lag in setup.lags if lag <= 8 * setup.local_frames), default=setup.lags[0])
    out: dict = {"scenes": K, "lag_8x": lag8, "chance": setup.chance}
    full = results.get("full")
    if full is not None:
        out["full_min_recall"] = min(m.recall for m in full.measurements if m.scenes == K)
    for name in ("window", "sink_window"):
        if name in results:
            beyond = [m.recall for m in results[name].measurements if m.scenes == K and m.beyond_reach]
            out[f"{name}_max_beyond_reach"] = max(beyond) if beyond else None
    hybrids = {n: r for n, r in results.items() if r.setting.hybrid and r.at(lag8, K) is not None}
    if full is not None and full.at(lag8, K) is not None:  # the best of those whose global state is small
        small = {n: r for n, r in hybrids.items() if r.at(lag8, K).global_bytes < full.at(lag8, K).state_bytes / 8}
        hybrids = small or hybrids
    if hybrids:
        name = max(hybrids, key=lambda n: hybrids[n].validation)
        m = hybrids[name].at(lag8, K)
        out.update(best_hybrid=name, best_hybrid_recall=m.recall, best_hybrid_state_bytes=m.state_bytes,
                   best_hybrid_global_bytes=m.global_bytes)
        if full is not None:
            f = full.at(lag8, K)
            out.update(full_recall_8x=f.recall, full_kv_bytes_8x=f.state_bytes,
                       share_of_full=m.recall / f.recall if f.recall else float("nan"),
                       global_over_full_kv=m.global_bytes / f.state_bytes,
                       state_over_full_kv=m.state_bytes / f.state_bytes)
    return out


# -- report ---------------------------------------------------------------------------------------------------
#: One frame size's run: its setup and each setting's result.
Run = tuple[RecallSetup, dict[str, SettingResult]]


def primary_run(runs: list[Run]) -> Run:
    """The run the verdicts and the main table report: 64 tokens per frame where measured, else the first."""
    return next((run for run in runs if run[0].frame_tokens == 64), runs[0])


def at_video_resolution(runs: list[Run], grid: tuple[int, int] = WAN_480P) -> list[dict]:
    """What each setting of the primary run would hold per stream and layer at ``grid`` tokens per frame (a 480p
    Wan frame), computed, not run: ``full``'s K/V at the 8x lag scaled by the tokens per frame, each hybrid's
    global state as its memory builds it on that grid (per-block designs with their blocks for that grid)."""
    from memkit.memory import build_memory

    setup, results = primary_run(runs)
    big = replace(setup, rows=grid[0], cols=grid[1])
    K, lag8 = report_scenes(setup), verdicts(results, setup)["lag_8x"]
    full = results.get("full")
    full_kv = None
    if full is not None and full.at(lag8, K) is not None:
        full_kv = full.at(lag8, K).state_bytes * big.frame_tokens // setup.frame_tokens
    out = []
    for name, r in results.items():
        if not r.setting.hybrid:
            continue
        cfg = r.setting.config(big)
        mem = build_memory(cfg, num_heads=setup.heads, head_dim=setup.head_dim, dim=setup.dim,
                           frame_tokens=big.frame_tokens, frame_shape=grid)
        state = mem.init_state(1)
        global_bytes = sum(t.nbytes for n, t in state.tensors.items() if n.startswith("global."))
        out.append({"setting": name, "frame_tokens": big.frame_tokens, "blocks": cfg.blocks if mem.spatial else None,
                    "global_bytes": global_bytes, "full_kv_bytes": full_kv,
                    "global_over_full_kv": global_bytes / full_kv if full_kv else None})
    return out


def load_runs(path) -> list[Run]:
    """The runs a ``recall.json`` holds (every frame size of it), rebuilt from its rows and settings, so that a
    report can grow by a frame size without training the others again (``--add-to``)."""
    report = json.loads(Path(path).read_text())
    sizes = report.get("sizes") or [{"frame_tokens": report["setup"]["rows"] * report["setup"]["cols"],
                                     "setup": report["setup"], "settings": report["settings"]}]
    runs = []
    for size in sizes:
        setup = RecallSetup(**{k: tuple(v) if isinstance(v, list) else v for k, v in size["setup"].items()})
        results = {}
        for entry in size["settings"]:
            fields = {k: v for k, v in entry.items() if k in RecallSetting.__dataclass_fields__ and v is not None}
            setting = RecallSetting(**fields)
            measured = [Measurement(r["lag_frames"], r["scenes"], r["recall"], r["state_bytes"], r["global_bytes"],
                                    r["reach"]) for r in report["rows"]
                        if r["setting"] == entry["name"] and r.get("frame_tokens", setup.frame_tokens)
                        == setup.frame_tokens]
            results[setting.name] = SettingResult(
                setting, entry["lr"], {float(lr): v for lr, v in entry["sweep"].items()}, entry["train_seconds"],
                entry["final_loss"], measured)
        runs.append((setup, results))
    return runs


def _rows(results: dict[str, SettingResult], setup: RecallSetup) -> list[dict]:
    return [{**r.setting.to_dict(), "setting": r.setting.name, "frame_tokens": setup.frame_tokens,
             "address": setup.address, "lag_frames": m.lag, "lag_multiple": m.lag / setup.local_frames,
             "local_frames": setup.local_frames, "scenes": m.scenes, "recall": m.recall, "chance": setup.chance,
             "state_bytes": m.state_bytes, "global_bytes": m.global_bytes, "reach": m.reach,
             "beyond_reach": m.beyond_reach, "lr": r.lr}
            for r in results.values() for m in r.measurements]


def _settings(results: dict[str, SettingResult]) -> list[dict]:
    return [{**r.setting.to_dict(), "lr": r.lr, "sweep": {f"{lr:g}": v for lr, v in r.sweep.items()},
             "band": r.band(), "train_seconds": r.train_seconds, "final_loss": r.final_loss}
            for r in results.values()]


def results_json(runs: list[Run], wall_seconds: float, command: str) -> dict:
    """The report's data: the primary run's setup, verdicts and settings, every run's rows (each with its
    ``frame_tokens`` and ``address``); with several frame sizes, each size's own and the costs at a 480p frame."""
    setup, results = primary_run(runs)
    out = {"command": command, "setup": setup.to_dict(), "wall_seconds": wall_seconds,
           "verdicts": verdicts(results, setup), "settings": _settings(results),
           "rows": [row for s, r in runs for row in _rows(r, s)]}
    if len(runs) > 1:
        out["sizes"] = [{"frame_tokens": s.frame_tokens, "setup": s.to_dict(), "verdicts": verdicts(r, s),
                         "settings": _settings(r)} for s, r in runs]
        out["at_1560_tokens"] = at_video_resolution(runs)
    return out


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def sizes_markdown(runs: list[Run], wall_seconds: float, command: str) -> str:
    """The report of one run (:func:`results_markdown`), or of several frame sizes: recall at 8x the local memory
    against tokens per frame, the states at a 480p frame (computed), then each size's own report."""
    if len(runs) == 1:
        return results_markdown(runs[0][1], runs[0][0], wall_seconds, command)
    setup, primary = primary_run(runs)
    lag8, K = verdicts(primary, setup)["lag_8x"], report_scenes(setup)
    full = primary["full"].at(lag8, K) if "full" in primary else None
    names = list(dict.fromkeys(name for _, results in runs for name in results))
    head = " | ".join(f"{s.frame_tokens} ({s.rows}x{s.cols})" for s, _ in runs)
    table = [f"| memory | {head} | global / full's K/V at {setup.frame_tokens} |",
             "|---|" + "---|" * len(runs) + "---|"]
    for name in names:
        cells = ["-" if name not in results else _cell(results[name].recall(verdicts(results, s)["lag_8x"],
                                                                              report_scenes(s)))
                 for s, results in runs]
        m = primary[name].at(lag8, K) if name in primary else None
        ratio = f"{m.global_bytes / full.state_bytes:.3f}" if m is not None and m.global_bytes and full else "-"
        table.append(f"| `{name}` | " + " | ".join(cells) + f" | {ratio} |")
    video = ["| memory | blocks | global KiB | full's K/V KiB | global / full's K/V |", "|---|---|---|---|---|"]
    for row in at_video_resolution(runs):
        full_kv = "-" if row["full_kv_bytes"] is None else _kib(row["full_kv_bytes"])
        ratio = "-" if row["global_over_full_kv"] is None else f"{row['global_over_full_kv']:.3f}"
        blocks = "-" if row["blocks"] is None else f"{row['blocks']}x{row['blocks']}"
        video.append(f"| `{row['setting']}` | {blocks} | {_kib(row['global_bytes'])} | {full_kv} | {ratio} |")
    parts = [f"Command: `{command}`  ", f"Wall time: {wall_seconds / 60:.1f} min.", "",
             f"Recall at 8x the local memory ({lag8} frames), {K} scenes held, against tokens per frame; the last "
             f"column is each memory's global state against `full`'s K/V at that lag, at {setup.frame_tokens} "
             "tokens per frame:", "", *table, "",
             f"At {WAN_480P[0] * WAN_480P[1]} tokens per frame ({WAN_480P[0]}x{WAN_480P[1]}, a 480p Wan frame), "
             "computed, not run (this model's heads; bytes per stream and layer, `full` at the same lag):", "",
             *video, ""]
    for s, results in runs:
        parts += [f"## {s.frame_tokens} tokens per frame ({s.rows} x {s.cols})", "",
                  results_markdown(results, s, wall_seconds, command)]
    return "\n".join(parts)


def results_markdown(results: dict[str, SettingResult], setup: RecallSetup, wall_seconds: float,
                     command: str) -> str:
    K = report_scenes(setup)
    v = verdicts(results, setup)
    lag8 = v["lag_8x"]
    full = results.get("full")
    head = " | ".join(f"{lag} ({lag // setup.local_frames}x)" for lag in setup.lags)
    lines = [f"| memory | lr | {head} | state KiB at {lag8} | global KiB | global / full's K/V |",
             "|---|---|" + "---|" * len(setup.lags) + "---|---|---|"]
    full_bytes = full.at(lag8, K).state_bytes if full is not None and full.at(lag8, K) is not None else None
    for r in results.values():
        m = r.at(lag8, K)
        cells = []
        for lag in setup.lags:
            mm = r.at(lag, K)
            mark = "*" if mm is not None and mm.reach > 0 and r.setting.memory in ("window", "sink_window") else ""
            cells.append("-" if mm is None else f"{mm.recall:.2f}{mark}")
        if m is None:
            lines.append(f"| `{r.setting.name}` | {r.lr:g} | " + " | ".join(cells) + " | - | - | - |")
            continue
        ratio = f"{m.global_bytes / full_bytes:.3f}" if full_bytes and m.global_bytes else "-"
        lines.append(f"| `{r.setting.name}` | {r.lr:g} | " + " | ".join(cells)
                     + f" | {_kib(m.state_bytes)} | {_kib(m.global_bytes)} | {ratio} |")
    capacity = ["| memory | " + " | ".join(f"{s} scene{'s' if s > 1 else ''}" for s in setup.eval_scenes) + " |",
                "|---|" + "---|" * len(setup.eval_scenes)]
    for r in results.values():
        capacity.append(f"| `{r.setting.name}` | " + " | ".join(_cell(r.recall(lag8, s)) for s in setup.eval_scenes)
                        + " |")
    lrs = sorted({lr for r in results.values() for lr in r.sweep})
    sweep = ["| memory | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best | band (within 90% of best) |",
             "|---|" + "---|" * len(lrs) + "---|---|"]
    for r in results.values():
        if r.sweep:
            sweep.append(f"| `{r.setting.name}` | " + " | ".join(
                f"{r.sweep[lr]:.3f}" if lr in r.sweep else "" for lr in lrs)
                + f" | {r.lr:g} | {', '.join(f'{lr:g}' for lr in r.band())} |")
    summary = []
    if "full_min_recall" in v:
        summary.append(f"- `full` (the ceiling): worst recall over the lags {v['full_min_recall']:.3f}.")
    for name in ("window", "sink_window"):
        value = v.get(f"{name}_max_beyond_reach")
        if value is not None:
            summary.append(f"- `{name}` (a floor): at most {value:.3f} where no queried scene is within its reach "
                           f"(chance {setup.chance:.3f}).")
    if "best_hybrid" in v:
        line = (f"- Best hybrid (by validation recall, global state under 1/8 of `full`'s K/V): "
                f"`{v['best_hybrid']}`, recall {v['best_hybrid_recall']:.3f} at {lag8} frames")
        if "share_of_full" in v:
            line += (f" = {v['share_of_full']:.2f} of `full`'s; its global state is "
                     f"{v['global_over_full_kv']:.3f} of `full`'s K/V there (whole state, window included, "
                     f"{v['state_over_full_kv']:.3f}).")
        summary.append(line)
    budget = (f"{setup.steps} steps x batch {setup.batch} streams per learning rate; {setup.layers} memory "
              f"layer(s), {setup.heads} heads x {setup.head_dim}, width {setup.dim}")
    names_scenes = (f"cues from {setup.cues} codes" if setup.address == "cue" else
                     "scenes told apart by when they were shown (one mark for every scene, queries by lag)")
    return "\n".join([
        f"Command: `{command}`  ",
        f"Task: frames of {setup.rows}x{setup.cols} tokens, {setup.vocab} symbols (chance {setup.chance:.3f}), "
        f"{names_scenes}; local memory {setup.sink_frames} sink + {setup.window_frames} window "
        f"frames ({setup.local_frames}), chunks of {setup.chunk_frames} frames; training with "
        f"{'/'.join(map(str, setup.scenes))} scenes at lags drawn log-uniformly up to {setup.lags[-1]} frames.  ",
        f"Budget: {budget}. Evaluation: {setup.eval_streams} held-out streams per lag and capacity, committed "
        f"chunk by chunk.  ",
        f"Wall time: {wall_seconds / 60:.1f} min.",
        "",
        f"Recall at each lag (frames; multiple of the local memory), {K} scene{'s' if K > 1 else ''} held; "
        "* marks a lag at which a bounded memory's window still sees some queried scene. Bytes per stream and "
        "layer when the queries come:",
        "", *lines, "",
        f"Capacity: recall at {lag8} frames against the scenes held at once:", "", *capacity, "",
        "Learning-rate sweep (validation recall, on streams of their own; each setting keeps its best):", "",
        *sweep, "",
        *summary, ""])


def plot(runs: list[Run], path) -> None:
    """Recall against lag (one line per setting: the variants' main settings solid, the write designs dashed),
    against the scenes held at once, and against the state's bytes, at the primary frame size; with several
    sizes, also recall at 8x against tokens per frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    setup, results = primary_run(runs)
    K = report_scenes(setup)
    lag8 = verdicts(results, setup)["lag_8x"]
    panels = 3 if len(runs) == 1 else 4
    fig, axes = plt.subplots(1, panels, figsize=(17 if panels == 3 else 22, 6.5),
                             gridspec_kw={"width_ratios": [1.5, 1, 1, 1][:panels]})
    ax1, ax2, ax3 = axes[:3]
    main = {r.setting.memory: n for n, r in reversed(results.items())}  # the first setting of each variant
    base = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    others = iter(plt.get_cmap("tab20b").colors + plt.get_cmap("tab20c").colors)
    for name, r in results.items():
        is_main = main.get(r.setting.memory) == name
        colour = base.get(r.setting.memory) if is_main else next(others)
        style = dict(lw=2.4, marker="o", ms=5) if is_main else dict(lw=1.1, ls="--", marker=".", ms=5)
        ax1.plot(setup.lags, [r.recall(lag, K) for lag in setup.lags], color=colour, label=name, **style)
        ax2.plot(setup.eval_scenes, [r.recall(lag8, s) for s in setup.eval_scenes], color=colour, **style)
        m = r.at(lag8, K)
        if m is not None:
            ax3.scatter([m.state_bytes / 1024], [m.recall], color=colour, s=60 if is_main else 20, zorder=3)
        if panels == 4:
            sizes = [(s.frame_tokens, rs[name].recall(verdicts(rs, s)["lag_8x"], report_scenes(s)))
                     for s, rs in runs if name in rs]
            axes[3].plot(*zip(*sizes), color=colour, **style)
    if panels == 4:
        axes[3].set_xscale("log", base=2)
        axes[3].set_xticks([s.frame_tokens for s, _ in runs], [str(s.frame_tokens) for s, _ in runs])
        axes[3].minorticks_off()
        axes[3].set(xlabel="tokens per frame", ylabel="recall", title="recall at 8x against tokens per frame")
    for ax in axes:
        ax.axhline(setup.chance, color="grey", ls=":", lw=1)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax1.set_xscale("log")
    ax1.set_xticks(setup.lags, [f"{lag}\n{lag // setup.local_frames}x" for lag in setup.lags])
    ax1.minorticks_off()
    ax1.set(xlabel="lag: frames from a scene to its query (multiple of the local memory)", ylabel="recall",
            title=f"recall against lag ({K} scene{'s' if K > 1 else ''} held; dotted: chance)")
    ax2.set_xticks(list(setup.eval_scenes))
    ax2.set(xlabel="scenes held at once", ylabel="recall", title=f"capacity at lag {lag8}")
    ax3.set_xscale("log")
    ax3.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax3.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax3.set(xlabel="KiB the memory holds per stream when the queries come", ylabel="recall",
            title=f"recall against state bytes at lag {lag8}")
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    rows = -(-len(results) // 3)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(runs: list[Run], out_dir, wall_seconds, command) -> list[Path]:
    from memkit.outputs import atomic_output

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, write in (("recall.md", lambda p: p.write_text(sizes_markdown(runs, wall_seconds, command))),
                        ("recall.json", lambda p: p.write_text(json.dumps(
                            results_json(runs, wall_seconds, command), indent=1))),
                        ("recall.png", lambda p: plot(runs, p))):
        with atomic_output(out / name) as tmp:
            write(Path(tmp))
        written.append(out / name)
    return written


# -- command line -----------------------------------------------------------------------------------------------
def quick_setup(**changes) -> RecallSetup:
    """A budget for CI: a smaller task that ``full`` still learns; one hybrid design."""
    small = dict(rows=2, cols=4, vocab=8, cues=16, scenes=(1,), eval_scenes=(1, 2), heads=2, head_dim=16, dim=32,
                 steps=300, lrs=(3e-3, 1e-2), eval_streams=128)
    return replace(RecallSetup(), **{**small, **changes})


def time_setup(**changes) -> RecallSetup:
    """``--address time``: scenes told apart by when they were shown, 8 x 8 tokens per frame (64), lags up to 8x
    the local memory (where the verdicts are read), 1 or 2 scenes in training, up to 4 in evaluation."""
    base = dict(address="time", rows=8, cols=8, multiples=(1, 2, 4, 8), scenes=(1, 2), eval_scenes=(1, 2, 4),
                steps=600, lrs=(3e-3, 1e-2))
    return replace(RecallSetup(), **{**base, **changes})


def quick_time_setup(**changes) -> RecallSetup:
    """``--address time --quick``, the CI case: 8 x 8 tokens, 2 scenes at the same places, lags up to 8x the local
    memory (24 frames, where a global state of 3 x 3 blocks is under 1/8 of ``full``'s K/V), ``full`` and the
    per-block time-coded design, one learning rate (minutes on 2 CPU cores)."""
    small = dict(scenes=(2,), eval_scenes=(2,), steps=400, lrs=(3e-3,), eval_streams=32)
    return time_setup(**{**small, **changes})


def square_grid(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens or side < 2:
        raise ConfigError(f"--frame-tokens takes square token grids of at least 2x2 (16, 64, 256, ...), got {tokens}")
    return side


def add_recall_parser(bsub) -> None:
    from memkit.cli_args import nonnegative_int, positive_float, positive_int

    d = RecallSetup()
    p = bsub.add_parser("recall", help="train every memory variant on a synthetic recall task (scenes, distractors, "
                                       "queries) and measure recall against lag, capacity and state bytes")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--settings", choices=["main", "all"], default="all",
                   help="main: one setting per variant; all: also the hybrids' write designs (default)")
    p.add_argument("--steps", type=positive_int, help=f"training steps per learning rate ({d.steps})")
    p.add_argument("--lrs", type=positive_float, nargs="+", help=f"learning rates swept ({' '.join(map(str, d.lrs))})")
    p.add_argument("--batch", type=positive_int, help=f"streams per step ({d.batch})")
    p.add_argument("--eval-streams", type=positive_int, help=f"held-out streams per lag and capacity "
                                                             f"({d.eval_streams})")
    p.add_argument("--seed", type=nonnegative_int, help=f"seed of weights and streams ({d.seed})")
    p.add_argument("--quick", action="store_true", help="a small task and budget for CI (minutes on 2 CPU cores; "
                                                         "main settings only); the flags above still apply")
    p.add_argument("--address", choices=["cue", "time"], default="cue",
                   help="how a query names its scene: by the scene's own cue (default), or by its lag alone, the "
                        "scenes shown at the same places (a video's return: the layout benchmark)")
    p.add_argument("--frame-tokens", type=positive_int, nargs="+", metavar="N",
                   help="tokens per frame, square grids (16 = 4x4, 64 = 8x8, 256 = 16x16); several sizes add "
                        "recall against tokens per frame (default: 16 for cue, 64 for time)")
    p.add_argument("--add-to", metavar="DIR", nargs="+",
                   help="folders with a recall.json of this task: their frame sizes are kept (not trained again), "
                        "only the sizes of --frame-tokens they lack are trained, and the report written to --out "
                        "holds them all")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="settings trained at once, each in its own process with threads / jobs torch threads "
                        "(default 1)")
    p.add_argument("--out", default="docs/results", help="folder for recall.md/.json/.png (default: docs/results)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.set_defaults(fn=run_recall_command)


def run_recall_command(args, console) -> int:
    import shlex
    import sys

    from memkit.outputs import check_output_folder

    flags = dict(steps=args.steps, lrs=tuple(args.lrs) if args.lrs else None, batch=args.batch,
                 eval_streams=args.eval_streams, seed=args.seed)
    if args.address == "time":
        base = quick_time_setup() if args.quick else time_setup()
    else:
        base = quick_setup() if args.quick else RecallSetup()
    setup = replace(base, **{k: v for k, v in flags.items() if v is not None})
    sides = [square_grid(n) for n in args.frame_tokens] if args.frame_tokens else [setup.rows]
    if args.frame_tokens and len(set(args.frame_tokens)) != len(args.frame_tokens):
        raise ConfigError(f"--frame-tokens lists a size twice: {' '.join(map(str, args.frame_tokens))}")
    if len(set(args.variants)) != len(args.variants):
        raise ConfigError(f"--variants lists a variant twice: {' '.join(args.variants)}")
    if args.address == "time":
        variants = [v for v in args.variants if v in ("full", "hybrid_blockwise")] if args.quick else args.variants
        settings = time_settings(variants, main=args.settings == "main" or args.quick)
    else:
        settings = main_settings(args.variants)
        settings += ablation_settings(args.variants) if args.settings == "all" and not args.quick else []
    setups = [replace(setup, rows=side, cols=side) if args.frame_tokens else setup for side in sides]
    kept = _kept_runs(args.add_to, setups[0]) if args.add_to else []
    setups = [s for s in setups if s.frame_tokens not in {k.frame_tokens for k, _ in kept}]
    folder = check_output_folder(args.out, "--out", REPORT_FILES, overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "memkit bench recall"
    if sys.argv[1:3] == ["bench", "recall"]:
        command = " ".join([command, *(shlex.quote(a) for a in sys.argv[3:])])
    t0 = time.perf_counter()
    runs = list(kept)
    for s in setups:
        console.print(f"memkit bench recall ({s.address}, {s.frame_tokens} tokens per frame): {len(settings)} "
                      f"settings x {len(s.lrs)} learning rates, {s.steps} steps each")
        runs.append((s, run_recall_bench(s, settings, console=console, progress=sys.stderr.isatty() and
                                         args.jobs == 1, jobs=args.jobs)))
    wall = time.perf_counter() - t0
    runs.sort(key=lambda run: run[0].frame_tokens)
    console.print(sizes_markdown(runs, wall, command), markup=False, soft_wrap=True)
    for path in write_report(runs, folder, wall, command):
        console.print(f"wrote {path}")
    return 0


def _kept_runs(folders, setup: RecallSetup) -> list[Run]:
    """The runs of each ``folder/recall.json`` for ``--add-to``: of the task of ``setup`` (every field but the grid
    and the training budget, which each size records), each frame size from one folder."""
    grid = ("rows", "cols", "steps", "lrs", "batch", "warmup_steps", "eval_streams")  # a size's own budget may differ
    ours = {k: v for k, v in setup.to_dict().items() if k not in grid}
    kept: dict[int, Run] = {}
    for folder in folders:
        path = Path(folder) / "recall.json"
        if not path.is_file():
            raise ConfigError(f"--add-to {folder}: no recall.json there")
        try:
            runs = load_runs(path)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--add-to {folder}: {path} is not a recall report this memkit reads ({e})") from None
        for s, results in runs:
            theirs = {k: v for k, v in s.to_dict().items() if k not in grid}
            diffs = [f"{k}: {theirs[k]!r} there, {ours[k]!r} now" for k in ours if theirs.get(k) != ours[k]]
            if diffs:
                raise ConfigError(f"--add-to {folder}: its report is of another task ({'; '.join(diffs)})")
            if s.frame_tokens in kept:
                raise ConfigError(f"--add-to: two reports hold {s.frame_tokens} tokens per frame")
            kept[s.frame_tokens] = (s, results)
    return list(kept.values())


__all__ = ["RecallSetup", "RecallSetting", "SettingResult", "Measurement", "run_recall_bench", "run_setting",
           "train", "measure", "verdicts", "results_json", "results_markdown", "sizes_markdown", "write_report",
           "quick_setup", "time_setup", "quick_time_setup", "main_settings", "ablation_settings", "time_settings",
           "at_video_resolution", "primary_run"]
