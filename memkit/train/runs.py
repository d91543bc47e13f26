"""A training run's model, rebuilt for generation: the backbone it trained on, its memory and every tensor it
trained, read from the run's Lightning checkpoint (``weights_only=True``) alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from memkit.errors import CheckpointError, ConfigError

from .module import CHECKPOINT_KEY


@dataclass
class TrainedRun:
    """What a run's checkpoint says: the file, the setup :class:`~memkit.train.MemoryFinetune` recorded
    (``spec``: the backbone spec; ``memory``: the memory config; ``chunk_frames``, ``latent_size``, ``trainable``,
    ``lora``) and the trained tensors (``state_dict``, the module's names)."""

    checkpoint: Path
    setup: dict
    state_dict: dict[str, torch.Tensor]
    step: int

    @property
    def spec(self) -> dict:
        return self.setup["spec"]

    @property
    def pixel_space(self) -> bool:
        """The backbone takes and makes RGB frames (3 channels) instead of VAE latents."""
        from adapters.loading import is_pixel_space

        return is_pixel_space(self.spec.get("overrides"))

    def build(self, device="cpu", dtype: torch.dtype | None = None):
        """The run's backbone with its memory injected and the trained tensors loaded; returns the adapter handle.
        The backbone's weights that did not train come from its spec (a checkpoint, or a seeded random init)."""
        import adapters
        from adapters.loading import BackboneSpec, load_backbone
        from memkit.memory import MemoryConfig

        model = load_backbone(BackboneSpec(**self.spec), device="cpu").model
        handle = adapters.inject(model, MemoryConfig.from_dict(self.setup["memory"]), self.setup["chunk_frames"],
                                 latent_size=tuple(self.setup["latent_size"]))
        self.load_into(model)
        model.to(device=device, dtype=dtype or next(model.parameters()).dtype).eval()
        return handle

    def load_into(self, model: torch.nn.Module) -> None:
        """Load the trained tensors into ``model``, the run's backbone with its memory injected (LoRA is added
        here if the run trained it). Everything is checked first: on error the model is unchanged."""
        from .trainable import LoraOptions, add_lora

        prefix = "model."
        tensors = {k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        added = self.setup.get("trainable") == "lora" and not getattr(model, "peft_config", None)
        if added:
            add_lora(model, LoraOptions(**self.setup["lora"]))
        own = model.state_dict()
        foreign = sorted(set(tensors) - set(own))
        wrong = sorted(k for k in set(tensors) & set(own) if own[k].shape != tensors[k].shape)
        if foreign or wrong or len(tensors) != len(self.state_dict):
            if added:
                model.unload_lora()
            raise CheckpointError(f"{self.checkpoint} does not fit the model its setup describes: unknown tensors "
                                  f"{foreign[:3]}, wrong shapes {wrong[:3]}")
        model.load_state_dict(tensors, strict=False)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint of a run: ``path`` itself if it is a file, else the run folder's ``checkpoints/last.ckpt``,
    else its newest ``checkpoints/*.ckpt``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--from-run {path}: no such run folder or checkpoint")
    folder = path / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"--from-run {path}: no checkpoints/*.ckpt in it (a run folder of memkit train, "
                                f"e.g. runs/NAME/version_0, with a ModelCheckpoint callback)")
    return found[-1]


def read_run(path: str | os.PathLike) -> TrainedRun:
    """The run at ``path`` (a run folder or a checkpoint file of ``memkit train``), checked."""
    from .cli import check_checkpoint_file, read_checkpoint

    ckpt_path = find_checkpoint(path)
    check_checkpoint_file(ckpt_path, "--from-run")
    ckpt = read_checkpoint(ckpt_path, "--from-run")
    setup = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(setup, dict) or not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"--from-run {ckpt_path} was not written by memkit train (no memkit setup in it)")
    if not setup.get("spec"):
        raise ConfigError(f"--from-run {ckpt_path}: the run trained a backbone built in Python, which the checkpoint "
                          f"cannot rebuild; load it yourself and use memkit.load_memory")
    missing = [k for k in ("memory", "chunk_frames", "latent_size", "trainable") if k not in setup]
    if missing:
        raise CheckpointError(f"--from-run {ckpt_path}: its setup lacks {missing} (written by an older memkit?)")
    return TrainedRun(ckpt_path, setup, ckpt["state_dict"], int(ckpt.get("global_step", 0)))


__all__ = ["TrainedRun", "read_run", "find_checkpoint"]
