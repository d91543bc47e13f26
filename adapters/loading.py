"""Build a backbone from a description: a diffusers model folder, an original Wan-format checkpoint, or a
randomly initialised config. Shared by ``memkit generate``, ``memkit train`` and the training teachers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from memkit.errors import ConfigError
from memkit.ops._checks import DTYPES

from .identity import backbone_identity

FAMILIES = ("wan", "skyreels_v2")


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone to build.

    family: "wan" (diffusers ``WanTransformer3DModel``) or "skyreels_v2".
    checkpoint: a diffusers folder (with ``transformer/`` or a ``config.json``), an original Wan-format file
        or folder of shards (Self-Forcing, CausVid, LongLive, Wan-AI), or None for random weights.
    size: the Wan config of a random model or of a Wan-format file: "tiny", "small" or "1.3B".
    seed: initialisation seed of a random model (and of the config a Wan-format file is loaded into).
    overrides: config fields changed from ``size`` (random models only), e.g. ``{"in_channels": 3,
        "out_channels": 3}`` for a pixel-space model.
    dtype: "float32", "bfloat16", "float16" or "float64".
    """

    family: str = "wan"
    checkpoint: str | None = None
    size: str = "tiny"
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"backbone family must be one of {FAMILIES}, got {self.family!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"backbone dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.overrides and self.checkpoint and _is_diffusers_folder(Path(self.checkpoint)):
            raise ConfigError("backbone overrides apply to random or Wan-format backbones, not to a diffusers folder")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


def is_pixel_space(overrides: dict | None) -> bool:
    """Config overrides that make a backbone take and make RGB frames (3 channels in and out) instead of VAE
    latents: a pixel-space model, as ``memkit train`` and ``memkit bench quality`` build them."""
    overrides = overrides or {}
    return overrides.get("in_channels") == 3 and overrides.get("out_channels", 3) == 3


@dataclass
class LoadedBackbone:
    model: nn.Module
    description: str
    report: object | None = None  # a WanLoadReport for Wan-format files


def load_backbone(spec: BackboneSpec, device="cpu") -> LoadedBackbone:
    """The transformer that ``spec`` describes, on ``device``, in eval mode."""
    from .skyreels_v2 import random_skyreels_v2
    from .wan import random_wan

    random_model = {"wan": random_wan, "skyreels_v2": random_skyreels_v2}[spec.family]
    dtype = spec.torch_dtype
    if spec.checkpoint is None:
        model = random_model(spec.size, seed=spec.seed, dtype=dtype, device=device, overrides=spec.overrides)
        return LoadedBackbone(model, f"a randomly initialised {spec.family} backbone (size {spec.size!r}, "
                                     f"seed {spec.seed})")
    ckpt = Path(spec.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    if _is_diffusers_folder(ckpt):
        cls = model_class(spec.family)
        sub = "transformer" if (ckpt / "transformer").is_dir() else None
        model = cls.from_pretrained(ckpt, subfolder=sub, torch_dtype=dtype, local_files_only=True)
        return LoadedBackbone(model.to(device).eval(), f"the {cls.__name__} in {ckpt}")
    from .wan_checkpoint import load_wan_checkpoint

    model = random_model(spec.size, seed=spec.seed, dtype=dtype, device=device, overrides=spec.overrides)
    report = load_wan_checkpoint(model, ckpt)
    return LoadedBackbone(model, f"{spec.family} {spec.size} with the weights of {ckpt}", report)


def model_class(family: str):
    from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel

    return {"wan": WanTransformer3DModel, "skyreels_v2": SkyReelsV2Transformer3DModel}[family]


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "transformer").is_dir() or (path / "config.json").is_file())


__all__ = ["BackboneSpec", "LoadedBackbone", "load_backbone", "is_pixel_space", "backbone_identity", "model_class",
           "DTYPES"]
