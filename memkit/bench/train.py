"""``memkit bench train``: training throughput and peak memory of each loss on one stated shape, beside the
stock model's forward + backward over the same frames, measured side by side in one process.

Every loss runs through the real :class:`memkit.train.MemoryFinetune` and a Lightning ``Trainer`` (so the
figures include what a user's run pays), on a randomly initialised Wan backbone, one batch repeated.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from rich.table import Table

from memkit.ops._checks import DTYPES

LOSSES = ("teacher_forcing", "teacher_forcing_noisy", "rolling", "self_rollout")


@dataclass
class TrainResult:
    name: str
    frames: str
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    note: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _batch(model, batch: int, frames: int, latent_size, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    return {"latents": torch.randn(batch, c.in_channels, frames, *latent_size, generator=gen),
            "prompt_embeds": torch.randn(batch, 32, c.text_dim, generator=gen)}


def stock_step_times(model, batch: dict, device, dtype, steps: int, warmup: int) -> list[float]:
    """The un-injected model: forward + backward over the clip with every backbone parameter trained."""
    from memkit.train.callbacks import synchronize

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    x = batch["latents"].to(device, dtype)
    prompt = batch["prompt_embeds"].to(device, dtype)
    t = torch.full((x.shape[0],), 500.0, device=device)
    times = []
    try:
        for i in range(warmup + steps):
            synchronize(device)
            t0 = time.perf_counter()
            out = model(x, t, prompt, return_dict=False)[0]
            out.float().pow(2).mean().backward()
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return times


def _loss(name: str, size: str, seed: int, overrides: dict, chunk_frames: int, frames: int):
    from adapters.loading import BackboneSpec
    from memkit.train import RollingMemory, SelfRolloutDMD, TeacherForcing

    if name == "teacher_forcing":
        return TeacherForcing()
    if name == "teacher_forcing_noisy":
        return TeacherForcing(context="noisy")
    if name == "rolling":
        return RollingMemory(tbptt_chunks=max(1, frames // chunk_frames))
    chunks = max(1, frames // chunk_frames)
    teacher = BackboneSpec(size=size, seed=seed + 1, overrides=overrides)
    return SelfRolloutDMD(teacher=teacher, rollout_chunks=chunks, window_chunks=chunks, generator_every=1)


def run_train_bench(losses=LOSSES, size: str = "tiny", latent_size=(16, 16), frames: int = 12, batch: int = 1,
                    chunk_frames: int = 3, memory: str = "hybrid_gdn", sink_frames: int = 3, window_frames: int = 6,
                    steps: int = 5, warmup: int = 2, device="cpu", dtype=torch.float32,
                    activation_checkpointing: bool = False, seed: int = 0,
                    overrides: dict | None = None) -> dict[str, TrainResult]:
    import lightning as L

    import adapters
    import memkit
    from adapters.loading import BackboneSpec, load_backbone
    from memkit.train import MemoryFinetune
    from memkit.train.callbacks import StepTimer

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" lines per loss
    device = torch.device(device)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    overrides = dict(overrides or {})
    spec = BackboneSpec(size=size, seed=seed, overrides=overrides, dtype=dtype_name)
    model = load_backbone(spec, device=device).model
    data = _batch(model, batch, frames, latent_size, seed)
    results: dict[str, TrainResult] = {}

    _reset_peak(device)
    stock = TrainResult("stock fwd+bwd", f"{frames}, all weights")
    stock.step_s = stock_step_times(model, data, device, dtype, steps, warmup)
    stock.peak_bytes = _peak(device)
    results["stock"] = stock

    cfg = memkit.MemoryConfig(kind=memory, sink_frames=sink_frames, window_frames=window_frames, check_finite=False)
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "16-mixed" if dtype == torch.float16 else "32-true"
    for name in losses:
        loss = _loss(name, size, seed, overrides, chunk_frames, frames)
        module = MemoryFinetune(backbone=model, memory=cfg, loss=loss, chunk_frames=chunk_frames,
                                latent_size=tuple(latent_size), activation_checkpointing=activation_checkpointing)
        timer = StepTimer(warmup)
        trainer = L.Trainer(max_steps=10**9, limit_train_batches=warmup + steps, max_epochs=1,
                            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[timer])
        _reset_peak(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module, torch.utils.data.DataLoader(_Repeat(data), batch_size=None))
            results[name] = TrainResult(name, _frames_note(name, frames), timer.times, _peak(device))
        except torch.cuda.OutOfMemoryError:
            results[name] = TrainResult(name, _frames_note(name, frames), note="out of memory")
        finally:
            adapters.remove(model)
            del module, trainer
    return results


def _frames_note(name: str, frames: int) -> str:
    if name == "teacher_forcing":
        return f"{frames} clean + {frames} noisy"
    if name == "self_rollout":
        return f"rollout {frames}, 4 steps"
    return f"{frames}"


class _Repeat(torch.utils.data.IterableDataset):
    """One batch, forever (the Trainer's ``limit_train_batches`` ends the epoch)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def results_table(results: dict[str, TrainResult], title: str) -> Table:
    stock = results["stock"].median_s
    table = Table(title=title)
    for col in ("step", "frames", "s/step (median)", "steps/s", "x stock", "peak GiB"):
        table.add_column(col, justify="left" if col in ("step", "frames") else "right", no_wrap=col == "step")
    for r in results.values():
        if not r.step_s:
            table.add_row(r.name, r.frames, "-", "-", "-", r.note or "-")
            continue
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f}"
        table.add_row(r.name, r.frames, f"{r.median_s:.3f}", f"{1 / r.median_s:.2f}", f"{r.median_s / stock:.2f}", peak)
    return table


__all__ = ["run_train_bench", "results_table", "stock_step_times", "LOSSES", "TrainResult"]
