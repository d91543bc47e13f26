"""Adapter for diffusers ``SkyReelsV2Transformer3DModel``: a Wan2.1 layout whose per-frame timesteps
go through its diffusion-forcing path. Everything else is the Wan adapter's."""

from __future__ import annotations

import torch

from .registry import register_backbone
from .wan import WAN_CONFIGS, WanAdapter, random_wan


def random_skyreels_v2(size: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
                       overrides: dict | None = None):
    """A randomly initialised ``SkyReelsV2Transformer3DModel`` of one of the Wan sizes (no download)."""
    from diffusers import SkyReelsV2Transformer3DModel

    return random_wan(size, seed=seed, dtype=dtype, device=device, model_class=SkyReelsV2Transformer3DModel,
                      overrides=overrides)


@register_backbone
class SkyReelsV2Adapter(WanAdapter):
    name = "skyreels_v2"
    default_latent_size = (68, 120)  # 544x960 (SkyReels-V2 540P)

    @classmethod
    def matches(cls, model):
        from diffusers import SkyReelsV2Transformer3DModel

        return isinstance(model, SkyReelsV2Transformer3DModel)

    def forward(self, latents, timestep, encoder_hidden_states, **kwargs):
        if timestep.dim() == 2:
            kwargs.setdefault("enable_diffusion_forcing", True)
        return self.model(latents, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]


__all__ = ["SkyReelsV2Adapter", "random_skyreels_v2", "WAN_CONFIGS"]
