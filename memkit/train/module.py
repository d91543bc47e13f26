"""``MemoryFinetune``: fine-tune the memories injected into a video diffusion backbone, with Lightning.

The backbone is built (or given), a memory is injected into every block, and by default only the memories'
parameters train (float32 master weights beside a bf16 backbone under Lightning's ``bf16-mixed``).
Options: LoRA on the backbone through peft (``trainable="lora"``), or everything (``trainable="all"``).
The loss (:mod:`memkit.train.losses`) runs its own forward and backward passes and steps the optimisers
through :meth:`backward` / :meth:`step` (manual optimisation: truncated BPTT and a critic need it).
Checkpoints hold only what trains (and the optimiser and loop state), plus the backbone's identity, which
resuming checks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import asdict

import lightning as L
import torch
from torch import nn

import adapters
from adapters.loading import BackboneSpec, backbone_identity, load_backbone
from memkit.data.datamodule import DataRequirements
from memkit.errors import CheckpointError, ConfigError
from memkit.memory import Memory, MemoryConfig, list_memories, load_memory
from memkit.memory.config import LEGACY

from .losses import TeacherForcing, TrainingLoss
from .trainable import TRAINABLE, LoraOptions, add_lora, parameter_groups

log = logging.getLogger("memkit.train")
# The frozen backbone is put in eval mode on purpose (see on_train_start).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
CHECKPOINT_KEY = "memkit"
MAX_LOGGED_CHUNKS = 16
HALF = (torch.bfloat16, torch.float16)


class MemoryFinetune(L.LightningModule):
    """Train memories injected into a backbone.

    backbone: a :class:`~adapters.loading.BackboneSpec` (a diffusers folder, a Wan-format file or a random
        config), or an ``nn.Module`` from Python (it is injected in place).
    memory: the memory config (``kind`` must have parameters unless LoRA or everything trains).
    loss: a :class:`~memkit.train.losses.TrainingLoss` (default :class:`TeacherForcing`).
    chunk_frames / latent_size: as for ``adapters.inject``.
    trainable: "memory" (default), "lora" (memories + LoRA, see ``lora``) or "all".
    lr, weight_decay, betas, warmup_steps: AdamW and a linear warm-up.
    accumulate_grad_batches: backward passes per optimiser step (one per batch, or one per TBPTT segment).
    gradient_clip_val: clip the gradient norm of each optimiser's parameters (None: no clipping).
    activation_checkpointing: recompute each block's activations in the backward pass.
    memory_weights: start from these memory weights (``memkit.save_memory``; e.g. stage 1's export).
    seed: seeds the training noise (with the batch count and rank, so resuming draws the same noise).
    """

    def __init__(self, backbone: BackboneSpec | None = None, memory: MemoryConfig | None = None,
                 loss: TrainingLoss | None = None, chunk_frames: int = 3, latent_size: tuple[int, int] | None = None,
                 trainable: str = "memory", lora: LoraOptions | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 accumulate_grad_batches: int = 1, gradient_clip_val: float | None = 1.0,
                 activation_checkpointing: bool = False, memory_weights: str | None = None, seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only what trains; on_load_checkpoint checks it is all there
        if trainable not in TRAINABLE:
            raise ConfigError(f"model.trainable must be one of {TRAINABLE}, got {trainable!r}")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ConfigError(f"model.accumulate_grad_batches must be a positive int, got {accumulate_grad_batches!r}")
        memory = memory or MemoryConfig()
        if memory.kind not in list_memories():
            raise ConfigError(f"model.memory.kind: unknown memory {memory.kind!r}; known: {', '.join(list_memories())}")
        if isinstance(backbone, nn.Module):
            model, self.backbone_spec = backbone, None
        else:
            self.backbone_spec = backbone or BackboneSpec()
            model = load_backbone(self.backbone_spec).model
        self.backbone_dtype = next(model.parameters()).dtype
        if trainable == "all" and self.backbone_dtype in HALF:
            raise ConfigError(
                f"model.trainable='all' updates the backbone, which is {self.backbone_dtype}: small updates vanish "
                f"in half precision. Load it in float32 (backbone.dtype) and train with precision 'bf16-mixed'"
            )
        # float32 master weights beside a half-precision backbone (autocast runs them in bf16 where it pays)
        memory_dtype = torch.float32 if self.backbone_dtype in HALF else self.backbone_dtype
        self.lora_options = lora or LoraOptions()
        with torch.random.fork_rng(devices=[]):  # new weights (memories, LoRA) are initialised from `seed`
            torch.manual_seed(seed)
            self.handle = adapters.inject(model, memory, chunk_frames, latent_size=latent_size,
                                          freeze_backbone=trainable != "all", memory_dtype=memory_dtype)
            try:  # a model given from Python is left as it was if anything below fails
                self._setup(model, memory, trainable, loss, memory_weights, activation_checkpointing)
            except BaseException:
                if trainable == "lora" and getattr(model, "peft_config", None):
                    model.unload_lora()
                adapters.remove(model)
                raise
        # Plain values only, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "backbone": backbone_identity(model) if self.backbone_spec is None else self.backbone_spec.to_dict(),
            "memory": memory.to_dict(), "loss": type(self.loss).__name__, "chunk_frames": chunk_frames,
            "latent_size": list(self.handle.latent_size), "trainable": trainable, "lora": asdict(self.lora_options),
            "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "warmup_steps": warmup_steps,
            "accumulate_grad_batches": accumulate_grad_batches, "gradient_clip_val": gradient_clip_val,
            "activation_checkpointing": activation_checkpointing, "memory_weights": memory_weights, "seed": seed,
        })
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.accumulate = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.seed = seed
        self.batches_seen = 0  # this rank's training batches so far (seeds the noise; saved in checkpoints)
        self.skipped_samples = 0
        self._pending: dict[int, int] = {}  # backward passes since each optimiser's last step

    def _setup(self, model, memory, trainable, loss, memory_weights, activation_checkpointing) -> None:
        self.model = model
        self.trainable = trainable
        if trainable == "lora":
            add_lora(model, self.lora_options)
        if memory_weights is not None:
            load_memory(model, memory_weights)
        groups = parameter_groups(model)
        if not any(groups.values()):
            raise ConfigError(
                f"memory {memory.kind!r} has no parameters to train (model.trainable='memory'); choose a memory "
                f"with parameters ({', '.join(_trainable_kinds())}) or model.trainable: lora or all"
            )
        if activation_checkpointing:
            self.handle.set_activation_checkpointing(True)
        self.loss = loss if loss is not None else TeacherForcing()
        self.loss.attach(self)

    # -- what data the model takes -------------------------------------------------------------------
    def data_requirements(self) -> DataRequirements:
        d = self.handle.dims
        return DataRequirements(channels=d.in_channels, latent_size=self.handle.latent_size, text_dim=d.text_dim,
                                chunk_frames=self.handle.chunk_frames)

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype latents are fed in (the backbone's; autocast casts where it runs)."""
        return self.backbone_dtype

    def prepare_prompt(self, batch: dict) -> torch.Tensor:
        """``(B, L, D)``, or ``(B, chunks, L, D)``: one prompt per chunk (action-conditioned clips)."""
        return batch["prompt_embeds"].to(device=self.device, dtype=self.model_dtype)

    def prepare(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean latents (float32, cut to whole chunks) and prompt embeddings (in the model's dtype) of a batch."""
        x0 = batch["latents"].float()
        F = self.handle.chunk_frames
        frames = x0.shape[2] // F * F
        if frames == 0:
            raise ConfigError(f"the batch's clips have {x0.shape[2]} latent frames, fewer than one chunk ({F})")
        return x0[:, :, :frames].to(self.device), self.prepare_prompt(batch)

    # -- noise: a function of (seed, batch count, rank), so a resumed run draws what the uninterrupted one did --
    def _generator(self, *parts) -> torch.Generator:
        digest = hashlib.sha256(",".join(map(str, (self.seed, *parts))).encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def noise_generator(self) -> torch.Generator:
        return self._generator("noise", self.batches_seen, self.global_rank)

    def shared_generator(self) -> torch.Generator:
        """The same on every rank (choices all ranks must agree on)."""
        return self._generator("shared", self.batches_seen)

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = parameter_groups(self.model)
        params = [{"params": [p for _, p in members], "name": name} for name, members in groups.items() if members]
        opts = [torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)]
        opts += self.loss.extra_optimizers(self)
        warmup = self.warmup_steps
        if warmup <= 0:
            return opts
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: min(1.0, (step + 1) / warmup)) for o in opts]
        return opts, scheds

    def backward_term(self, loss: torch.Tensor, optimizer: int = 0) -> None:
        """Backward of one loss term, scaled for gradient accumulation."""
        self.manual_backward(loss / self.accumulate)
        self._pending[optimizer] = self._pending.get(optimizer, 0) + 1

    def step_optimizer(self, optimizer: int = 0) -> bool:
        """Step optimiser ``optimizer`` once ``accumulate_grad_batches`` backward passes have gathered; returns
        whether it stepped. Logs the gradient norms of what it steps (before clipping)."""
        if self._pending.get(optimizer, 0) < self.accumulate:
            return False
        self._pending[optimizer] = 0
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt = opts[optimizer]
        if optimizer == 0:
            for name, norm in self._grad_norms().items():
                self.log(f"grad_norm/{name}", norm)
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheds = self.lr_schedulers()
        if scheds:
            scheds = scheds if isinstance(scheds, list) else [scheds]
            scheds[optimizer].step()
        return True

    def _grad_norms(self) -> dict[str, float]:
        norms = {}
        for name, members in parameter_groups(self.model).items():
            grads = [p.grad.detach().float().norm() for _, p in members if p.grad is not None]
            if grads:
                norms[name] = float(torch.stack(grads).norm())
        return norms

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if self.backbone_dtype in HALF and "mixed" not in precision:
            raise ConfigError(
                f"the backbone is {self.backbone_dtype} and the memories train in float32: use trainer.precision "
                f"'bf16-mixed' (autocast), not {precision!r}"
            )
        self.loss.check_strategy(self.trainer)

    def on_train_start(self) -> None:
        # Lightning puts the whole module in train mode; the frozen backbone keeps its eval behaviour, what trains
        # (memories, LoRA layers and their dropout) stays in train mode.
        if self.trainable != "all":
            self.model.eval()
            for name, module in self.model.named_modules():
                if isinstance(module, Memory) or "lora_" in name:
                    module.train()
        teacher = getattr(self.loss, "teacher", None)
        if teacher is not None:
            teacher.eval()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        skipped = int(batch.get("skipped", 0))
        if skipped:
            self.skipped_samples += skipped
            self.log("data/skipped_total", float(self.skipped_samples))
        if "latents" not in batch and "prompt_embeds" not in batch:
            log.warning("batch %d had no usable sample; skipped", batch_idx)
            return
        self.loss.training_step(self, batch)
        self.batches_seen += 1

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "prompt_embeds" not in batch:
            return
        out = self.loss.evaluate(self, batch, self._generator("val", batch_idx, self.global_rank))
        for name, value in out.items():
            if value.dim() == 0:
                self.log(f"val/{name}", value, sync_dist=True, batch_size=batch["prompt_embeds"].shape[0])

    def log_losses(self, stage: str, loss: torch.Tensor, per_chunk: torch.Tensor) -> None:
        """The loss, and per chunk position: the first chunks one by one, and before/after the first eviction."""
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True)
        for i, value in enumerate(per_chunk[:MAX_LOGGED_CHUNKS]):
            self.log(f"{stage}/loss_chunk_{i:02d}", value)
        mem = self.handle.memories[0]
        window = getattr(mem, "window_frames", None)
        if window is None:
            return
        first = math.ceil((getattr(mem, "sink_frames", 0) + window + 1) / self.handle.chunk_frames)
        if 0 < first < len(per_chunk):
            self.log(f"{stage}/loss_local", per_chunk[:first].mean())
            self.log(f"{stage}/loss_after_eviction", per_chunk[first:].mean())

    # -- checkpoints: only what trains, and the identity of what does not ------------------------------
    def _trained_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def _identity(self) -> dict:
        spec = None if self.backbone_spec is None else self.backbone_spec.to_dict()
        return {"backbone": backbone_identity(self.model), "spec": spec, "memory": self.handle.cfg.to_dict(),
                "trainable": self.trainable, "chunk_frames": self.handle.chunk_frames,
                "latent_size": list(self.handle.latent_size), "loss": type(self.loss).__name__,
                "lora": asdict(self.lora_options) if self.trainable == "lora" else None}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trained_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_KEY] = {**self._identity(), "batches_seen": self.batches_seen,
                                      "skipped_samples": self.skipped_samples}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise CheckpointError("this checkpoint was not written by memkit.train.MemoryFinetune")
        diffs = setup_differences(saved, self._identity(), type(self.handle.memories[0]))
        if diffs:
            raise CheckpointError("the checkpoint was trained on another setup; " + "; ".join(diffs))
        missing = self._trained_names() - set(checkpoint["state_dict"])
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} trained tensors, e.g. {sorted(missing)[0]}")
        self.batches_seen = int(saved["batches_seen"])
        self.skipped_samples = int(saved.get("skipped_samples", 0))


def setup_differences(saved: dict, here: dict, memory_class: type[Memory]) -> list[str]:
    """``"field: checkpoint X, now Y"`` for each field of a training setup (``MemoryFinetune._identity``) that
    differs, nested fields by their dotted name (``memory.window_frames``). A memory config recorded before
    ``global_position`` (or ``global_time``) existed compares by the codes it wrote with (:meth:`Memory.key_codes`);
    a field recorded before it existed takes the value it meant then (:data:`memkit.memory.config.LEGACY`)."""
    out = []
    for key, now in here.items():
        if key == "spec":  # how the backbone was built; its identity is compared
            continue
        then = saved.get(key)
        if key == "memory" and isinstance(then, dict) and isinstance(now, dict):
            then = {**LEGACY, **then, **memory_class.key_codes(then)}
            now = {**LEGACY, **now, **memory_class.key_codes(now)}
        out += _differences(key, then, now)
    return out


def _differences(name: str, then, now) -> list[str]:
    if isinstance(then, dict) and isinstance(now, dict):
        return [d for k in sorted(set(then) | set(now), key=str) for d in _differences(f"{name}.{k}", then.get(k),
                                                                                      now.get(k))]
    if isinstance(then, (list, tuple)) and isinstance(now, (list, tuple)):
        then, now = list(then), list(now)
    return [] if then == now else [f"{name}: checkpoint {then!r}, now {now!r}"]


def _trainable_kinds() -> list[str]:
    """Registered memories that have parameters."""
    from memkit.memory import build_memory

    def has_params(kind: str) -> bool:
        mem = build_memory(MemoryConfig(kind=kind, blocks=1), num_heads=1, head_dim=2, dim=2, frame_tokens=1)
        return any(True for _ in mem.parameters())

    return [kind for kind in list_memories() if has_params(kind)]


__all__ = ["MemoryFinetune"]
