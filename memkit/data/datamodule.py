"""``ClipDataModule``: training clips from any :class:`ClipSource`, cut to whole chunks, with prompts.

Each sample is a clip of up to ``frames`` latent frames (whole chunks) taken at a seeded random offset of a
source item, with its prompt embeddings (the source's own, a per-family embedding for procedural videos, or a
default prompt). RGB video sources feed a pixel-space backbone as they are, or are encoded on the device by a
Wan VAE (``vae=``). Bad samples raise a :class:`~memkit.errors.DataError` naming the file, or, with
``skip_bad_samples``, are dropped and counted (``batch["skipped"]``). The loader's position is saved in
Lightning checkpoints, so a run resumed mid-epoch sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from memkit.errors import ConfigError, DataError

from .sources import ClipSource, seed_of

log = logging.getLogger("memkit.data")


CHECK_BAR_FROM = 500  # samples from which the data check shows a progress bar


@dataclass(frozen=True)
class DataRequirements:
    """What the model being trained takes: latent channels, latent frame size, text width, chunk length."""

    channels: int
    latent_size: tuple[int, int]
    text_dim: int
    chunk_frames: int


class ClipSampler(DistributedSampler):
    """A distributed sampler that yields ``(index, epoch)`` and can start mid-epoch (for exact resumption).

    Lightning leaves a ``DistributedSampler`` in place, so this one shards the data across ranks itself.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already consumed)

    def resume_at(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1]:]
            self._resume = None
        return iter([(i, self.epoch) for i in indices])


class ClipDataset(Dataset):
    """Clips of a source for one model; items are keyed ``(index, epoch)`` (the epoch seeds the crop)."""

    def __init__(self, source: ClipSource, module: ClipDataModule, *, random_crop: bool):
        self.source, self.dm, self.random_crop = source, module, random_crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            return self._load(index, epoch)
        except DataError as exc:
            if not self.dm.skip_bad_samples:
                raise
            log.warning("skipping a bad sample: %s", exc)
            return None

    def usable_frames(self, index: int) -> tuple[int, int]:
        """``(available, usable)``: the sample's frames in the source's unit, and the latent frames a clip of it
        takes (whole chunks, at most ``data.frames``); a DataError when it is unreadable or shorter than a chunk."""
        dm, src = self.dm, self.source
        available = src.num_frames(index)
        chunk = dm.requirements.chunk_frames
        usable = min(dm.frames, dm.latent_frames_of(available)) // chunk * chunk
        if usable < chunk:
            raise DataError(
                f"{src.describe(index)} has {available} frames, shorter than one chunk of {chunk} latent frames "
                f"({dm.source_frames_of(chunk)} {dm.unit})"
            )
        return available, usable

    def _load(self, index: int, epoch: int) -> dict:
        dm, src = self.dm, self.source
        reqs = dm.requirements
        chunk = reqs.chunk_frames
        available, usable = self.usable_frames(index)
        need = dm.source_frames_of(usable)
        start = 0
        if self.random_crop and available > need:
            gen = torch.Generator().manual_seed(seed_of(dm.seed, epoch, index))
            start = int(torch.randint(available - need + 1, (), generator=gen))
            start -= start % getattr(src, "crop_step", 1)  # e.g. a world's action segments stay whole
        item = src.read(index, start, need, dm.source_size)
        sample = {"index": index}
        key = "video" if src.modality == "video" else "latents"
        if key not in item:
            raise DataError(f"{src.describe(index)}: the source returned no {key!r}")
        clip = item[key]
        if clip.dim() != 4 or clip.shape[1] != need or tuple(clip.shape[2:]) != dm.source_size:
            raise DataError(f"{src.describe(index)}: expected a clip (C, {need}, {dm.source_size[0]}, "
                            f"{dm.source_size[1]}), got {tuple(clip.shape)}")
        if key == "latents" or dm.vae_path is None:  # latents, or RGB for a pixel-space backbone
            if clip.shape[0] != reqs.channels:
                raise DataError(f"{src.describe(index)}: {clip.shape[0]} channels, but the backbone takes "
                                f"{reqs.channels}")
            sample["latents"] = clip.float()
        else:
            sample["video"] = clip.float()
        sample["prompt_embeds"] = dm.prompt_for(item, src.describe(index), chunks=usable // chunk)
        if not torch.isfinite(sample.get("latents", sample.get("video"))).all():
            raise DataError(f"{src.describe(index)}: the clip holds NaN or Inf")
        return sample


def collate_clips(items: list[dict | None]) -> dict:
    """Stack good samples, cut to the shortest clip, prompts zero-padded to the longest; count the skipped."""
    good = [x for x in items if x is not None]
    batch: dict = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    key = "latents" if "latents" in good[0] else "video"
    frames = min(x[key].shape[1] for x in good)
    batch[key] = torch.stack([x[key][:, :frames] for x in good])
    prompts = [x["prompt_embeds"] for x in good]
    if prompts[0].dim() == 3:  # one prompt per chunk (chunks, L, D): cut to the clip's chunks
        chunks = min(p.shape[0] for p in prompts)
        prompts = [p[:chunks] for p in prompts]
    length = max(p.shape[-2] for p in prompts)
    batch["prompt_embeds"] = torch.stack(
        [torch.nn.functional.pad(p, (0, 0, 0, length - p.shape[-2])) for p in prompts]
    )
    batch["index"] = torch.tensor([x["index"] for x in good])
    return batch


class ClipDataModule(L.LightningDataModule):
    """Training (and optionally validation) clips for :class:`memkit.train.MemoryFinetune`.

    source / val_source: where clips come from (``memkit.data.ProceduralVideos``, ``VideoFolder``,
        ``LatentShards``, or your own :class:`ClipSource`).
    frames: latent frames per clip (cut down to whole chunks; shorter items give shorter clips).
    vae: a diffusers ``AutoencoderKLWan`` folder that encodes RGB sources on the device (otherwise RGB feeds a
        pixel-space backbone with 3 input channels).
    prompt_embeds: a safetensors file whose first prompt conditions items that have none (default: a fixed
        random embedding of ``prompt_len`` tokens).
    skip_bad_samples: drop unreadable or unusable samples (counted and logged) instead of stopping.
    """

    def __init__(self, source: ClipSource, frames: int = 12, batch_size: int = 1, num_workers: int = 0,
                 val_source: ClipSource | None = None, vae: str | None = None, prompt_embeds: str | None = None,
                 prompt_len: int = 16, skip_bad_samples: bool = False, shuffle: bool = True, seed: int = 0):
        super().__init__()
        for name, value in (("frames", frames), ("batch_size", batch_size), ("prompt_len", prompt_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"data.{name} must be a positive int, got {value!r}")
        if not isinstance(source, ClipSource):
            raise ConfigError(f"data.source must be a memkit.data.ClipSource, got {type(source).__name__}")
        self.source, self.val_source = source, val_source
        self.frames, self.batch_size, self.num_workers = frames, batch_size, num_workers
        self.vae_path, self.prompt_path, self.prompt_len = vae, prompt_embeds, prompt_len
        self.skip_bad_samples, self.shuffle, self.seed = skip_bad_samples, shuffle, seed
        self.requirements: DataRequirements | None = None
        self._vae = None
        self._default_prompt: torch.Tensor | None = None
        self._family_prompts: dict[int, torch.Tensor] = {}
        self._resume: tuple[int, int] | None = None

    # -- binding to a model ------------------------------------------------------------------
    def bind(self, requirements: DataRequirements) -> ClipDataModule:
        """Say what the model takes (done by ``setup`` from the Trainer's module; call it when used alone)."""
        self.requirements = requirements
        return self

    @property
    def unit(self) -> str:
        return "video frames" if self._encodes else "frames"

    @property
    def _encodes(self) -> bool:
        return self.source.modality == "video" and self.vae_path is not None

    def latent_frames_of(self, source_frames: int) -> int:
        """Latent frames made from ``source_frames`` frames of the source (the Wan VAE keeps 1 + 4k)."""
        if not self._encodes:
            return source_frames
        return 0 if source_frames < 1 else (source_frames - 1) // self._temporal + 1

    def source_frames_of(self, latent_frames: int) -> int:
        return latent_frames if not self._encodes else self._temporal * (latent_frames - 1) + 1

    @property
    def source_size(self) -> tuple[int, int]:
        h, w = self.requirements.latent_size
        return (h * self._spatial, w * self._spatial) if self._encodes else (h, w)

    def setup(self, stage: str | None = None) -> None:
        if self.requirements is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            if module is None or not hasattr(module, "data_requirements"):
                raise ConfigError("ClipDataModule is not bound to a model: dm.bind(module.data_requirements())")
            self.requirements = module.data_requirements()
        reqs = self.requirements
        self._temporal, self._spatial = 1, 1
        self._check_action_source()
        if self._encodes:
            self._load_vae()
        elif self.source.modality == "video" and reqs.channels != 3:
            raise ConfigError(
                f"data.source gives RGB video but the backbone takes {reqs.channels} latent channels: set data.vae "
                f"to a Wan VAE folder, or encode the videos first (memkit encode) and use memkit.data.LatentShards"
            )
        self._default_prompt = self._load_default_prompt()
        if len(self.source) == 0:
            raise DataError("data.source holds no videos")
        if not self.skip_bad_samples:  # fail now, naming every bad sample, not after the first training steps
            self._check_samples()

    def _check_samples(self, shown: int = 5) -> None:
        """Every sample's length (a header read each), and the first sample whole; a DataError names each bad
        sample (the first ``shown``, and how many more)."""
        from tqdm.auto import tqdm

        dataset = ClipDataset(self.source, self, random_crop=False)
        bad = []
        # a header read per sample: seconds for thousands of files, so a bar only for big sources
        for index in tqdm(range(len(self.source)), desc="checking data.source", unit="sample", leave=False,
                          disable=len(self.source) < CHECK_BAR_FROM or None):
            try:
                dataset.usable_frames(index)
            except DataError as exc:
                bad.append(str(exc))
        if not bad:
            try:
                dataset[0]
            except DataError as exc:
                bad.append(str(exc))
        if bad:
            more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
            raise DataError(f"{len(bad)} of {len(self.source)} samples of data.source cannot be used: "
                            f"{'; '.join(bad[:shown])}{more}. Fix or remove them, or set data.skip_bad_samples: true "
                            f"to train on the others")

    def _check_action_source(self) -> None:
        """A source whose prompts are per-frame actions (``WorldVideos``): each chunk must hold one action."""
        action_frames = getattr(self.source, "action_frames", None)
        if action_frames is None:
            return
        if self.vae_path is not None:  # 4 video frames make one latent frame: a chunk's action is ambiguous
            raise ConfigError("data.source conditions on per-frame actions, which need a pixel-space backbone; "
                              "data.vae is set")
        if self.prompt_path is not None:
            raise ConfigError("data.source gives each chunk its action as the prompt; data.prompt_embeds would be "
                              "ignored, so leave it unset")
        chunk = self.requirements.chunk_frames
        if action_frames % chunk:
            raise ConfigError(f"data.source changes action every {action_frames} frames, which is not a whole "
                              f"number of the model's {chunk}-frame chunks: a chunk would straddle two actions")

    def _load_vae(self) -> None:
        from diffusers import AutoencoderKLWan

        try:
            vae = AutoencoderKLWan.from_pretrained(self.vae_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.vae={self.vae_path!r} is not a diffusers AutoencoderKLWan folder: {exc}") from None
        if vae.config.z_dim != self.requirements.channels:
            raise ConfigError(f"data.vae makes {vae.config.z_dim}-channel latents; the backbone takes "
                              f"{self.requirements.channels}")
        self._vae = vae.eval().requires_grad_(False)
        downs = list(vae.config.temperal_downsample)
        self._temporal, self._spatial = 2 ** sum(downs), 2 ** len(downs)

    def _load_default_prompt(self) -> torch.Tensor:
        from memkit.rollout.prompts import load_prompt_embeds, random_prompt_embeds

        dim = self.requirements.text_dim
        if self.prompt_path is None:
            return random_prompt_embeds(1, self.prompt_len, dim, seed=self.seed)["prompt_0"][0]
        embeds = next(iter(load_prompt_embeds(self.prompt_path).values()))[0]
        if embeds.shape[-1] != dim:
            raise ConfigError(f"data.prompt_embeds {self.prompt_path} has width {embeds.shape[-1]}; the backbone's "
                              f"text width is {dim}")
        return embeds.float()

    def prompt_for(self, item: dict, where: str, chunks: int = 1) -> torch.Tensor:
        """The item's prompt ``(L, D)``, or with per-frame ``actions`` (a world's camera moves) one prompt per
        chunk ``(chunks, L, D)``: the action of the chunk's first frame."""
        dim = self.requirements.text_dim
        if "actions" in item:
            from .world import action_embeddings

            if self.vae_path is not None:  # 4 video frames make one latent frame: a chunk's action is ambiguous
                raise ConfigError(f"{where}: per-frame actions condition a pixel-space backbone; data.vae is set")

            first = item["actions"][:: self.requirements.chunk_frames][:chunks]
            table = getattr(self.source, "prompt_table", None)  # a source with prompts of its own (places)
            table = table(dim, self.prompt_len) if table is not None else action_embeddings(dim, self.prompt_len)
            return table[first.long()]
        if "prompt_embeds" in item:
            p = item["prompt_embeds"]
            p = p[0] if p.dim() == 3 and p.shape[0] == 1 else p
            if p.dim() != 2 or p.shape[1] != dim:
                raise DataError(f"{where}: prompt_embeds {tuple(item['prompt_embeds'].shape)} do not fit the "
                                f"backbone's text width {dim} (expected (L, {dim}))")
            return p.float()
        if "prompt_id" in item:  # a procedural family: one fixed embedding per family
            family = int(item["prompt_id"])
            if family not in self._family_prompts:
                gen = torch.Generator().manual_seed(seed_of(self.seed, "family", family))
                self._family_prompts[family] = torch.randn(self.prompt_len, dim, generator=gen)
            return self._family_prompts[family]
        return self._default_prompt

    # -- loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = ClipDataset(self.source, self, random_crop=True)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = ClipSampler(dataset, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed)
        if self._resume is not None:
            epoch, batches = self._resume
            sampler.resume_at(epoch, batches * self.batch_size)
            self._resume = None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_clips, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        if self.val_source is None:
            return []
        dataset = ClipDataset(self.val_source, self, random_crop=False)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=collate_clips)

    @torch.no_grad()
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Encode RGB clips into latents with the VAE, on the device the batch is on."""
        if "video" not in batch:
            return batch
        from memkit.rollout.vae import normalize_latents

        video = batch.pop("video")
        vae = self._vae.to(video.device)
        z = vae.encode(video.to(next(vae.parameters()).dtype)).latent_dist.mode()
        batch["latents"] = normalize_latents(z, vae.config).float()
        return batch

    # -- resuming mid-epoch -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        return {"epoch": self.trainer.current_epoch,
                "batches": loop.epoch_loop.batch_progress.current.processed,
                "batch_size": self.batch_size, "world_size": self.trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("batch_size") != self.batch_size or state.get("world_size") != self.trainer.world_size:
            log.warning("resuming with another batch size or number of devices: the epoch restarts its data order")
            return
        self._resume = (int(state["epoch"]), int(state["batches"]))


__all__ = ["ClipDataModule", "ClipDataset", "ClipSampler", "DataRequirements", "collate_clips"]
