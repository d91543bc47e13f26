"""Lightning callbacks of memkit training."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("memkit.train")


class StepTimer(L.Callback):
    """Wall time of each training batch after the first ``warmup`` ones (``times``, seconds), synchronised with
    the accelerator so that queued GPU work is counted in its own batch."""

    def __init__(self, warmup: int = 0):
        self.warmup, self.times, self._seen, self._t0 = warmup, [], 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        if self._seen >= self.warmup:
            self.times.append(time.perf_counter() - self._t0)
        self._seen += 1


class ProgressLines(L.Callback):
    """Progress for logs, where a progress bar cannot draw: about ``lines`` calls of ``emit`` over the run, each
    with the step, the mean training loss since the last line and the seconds per step."""

    def __init__(self, emit, lines: int = 20):
        self.emit, self.lines = emit, lines
        self._losses, self._t0 = [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0, self._since = time.perf_counter(), trainer.global_step
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._losses.append(float(loss))
        step, total = trainer.global_step, trainer.max_steps
        every = max(1, total // self.lines) if total and total > 0 else 50
        if step % every == 0 or step == total:
            now = time.perf_counter()
            per_step = (now - self._t0) / max(1, step - self._since)
            mean = sum(self._losses) / len(self._losses) if self._losses else float("nan")
            self.emit(f"step {step}/{total}: loss {mean:.4f}, {per_step:.2f} s/step")
            self._losses, self._t0, self._since = [], now, step


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExportMemoryWeights(L.Callback):
    """At the end of training, write the memory weights (``memkit.save_memory``) to ``path``, and the LoRA weights,
    if LoRA trained, beside it (``<stem>.lora.safetensors``). Rank zero writes; an existing file is replaced only
    with ``overwrite``."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path, self.overwrite = Path(path), overwrite
        self.written: dict[str, Path] = {}  # "memory" / "lora" -> the file written

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.export(pl_module, trainer.global_step)

    def export(self, pl_module, step: int) -> None:
        """Write the weights of ``pl_module`` now (``step`` names the file written beside an existing one)."""
        from memkit.state import io

        from .trainable import lora_state_dict

        spec = getattr(pl_module, "backbone_spec", None)
        built = {"trainable": pl_module.trainable, **({} if spec is None else {"backbone_spec": spec.to_dict()})}
        targets = [("memory", self.path, lambda p: pl_module.handle.save_memory(p, **built))]
        if pl_module.trainable == "lora":
            lora_path = self.path.with_name(self.path.stem + ".lora.safetensors")
            meta = {"type": "LoraWeights", "options": vars(pl_module.lora_options)}
            targets.append(("lora", lora_path, lambda p: io.write(p, lora_state_dict(pl_module.model), meta)))
        for kind, path, write in targets:
            if path.exists() and not self.overwrite:
                alt = path.with_name(f"{path.stem}.step{step}{path.suffix}")
                log.warning("%s exists; writing %s instead", path, alt)
                path = alt
            write(path)
            self.written[kind] = path
            log.info("wrote %s", path)
