"""Lightning callbacks of memkit training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

log = logging.getLogger("memkit.train")


class ExportMemoryWeights(L.Callback):
    """At the end of training, write the memory weights (``memkit.save_memory``) to ``path``, and the LoRA weights,
    if LoRA trained, beside it (``<stem>.lora.safetensors``). Rank zero writes; an existing file is replaced only
    with ``overwrite``."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path, self.overwrite = Path(path), overwrite
        self.written: list[Path] = []

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from memkit.memory import save_memory
        from memkit.state import io

        from .trainable import lora_state_dict

        targets = [(self.path, lambda p: save_memory(pl_module.model, p))]
        if pl_module.trainable == "lora":
            lora_path = self.path.with_name(self.path.stem + ".lora.safetensors")
            meta = {"type": "LoraWeights", "options": vars(pl_module.lora_options)}
            targets.append((lora_path, lambda p: io.write(p, lora_state_dict(pl_module.model), meta)))
        for path, write in targets:
            if path.exists() and not self.overwrite:
                alt = path.with_name(f"{path.stem}.step{trainer.global_step}{path.suffix}")
                log.warning("%s exists; writing %s instead", path, alt)
                path = alt
            write(path)
            self.written.append(path)
            log.info("wrote %s", path)
