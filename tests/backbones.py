"""Tiny random diffusers backbones (float64) and their stock references, for adapter and rollout tests."""

import torch
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import adapters
import memkit

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
LATENT = (4, 6)  # latent frame: 2x3 tokens after patching
FRAME_TOKENS = 6
CLASSES = {"wan": WanTransformer3DModel, "skyreels_v2": SkyReelsV2Transformer3DModel}


def tiny_model(backbone="wan", seed=0, dtype=torch.float64, **overrides):
    """A tiny random model with every parameter moved off its init (so no output is trivially zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLASSES[backbone](**{**TINY, **overrides})
    torch.nn.Module.to(model, dtype=dtype)  # diffusers' .to warns about its fp32-kept modules
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def clip(frames=6, batch=2, seed=0, dtype=torch.float64, text_len=5, text_dim=16, channels=4):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, channels, frames, *LATENT, generator=gen, dtype=dtype)
    prompt = torch.randn(batch, text_len, text_dim, generator=gen, dtype=dtype)
    return latents, prompt


def inject(model, kind="full", chunk_frames=3, freeze_backbone=False, **cfg):
    return adapters.inject(model, memkit.MemoryConfig(kind=kind, **cfg), chunk_frames=chunk_frames,
                           latent_size=LATENT, freeze_backbone=freeze_backbone)


class _MaskedProcessor:
    """The stock Wan processor with a given self-attention mask."""

    def __init__(self, mask):
        self.stock, self.mask = WanAttnProcessor(), mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.stock(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def chunk_causal_reference(model, latents, timestep, prompt, chunk_frames):
    """The stock model over the whole clip with chunk-causal self-attention.

    SkyReels-V2 has it built in (``num_frame_per_block``); for Wan the stock processor gets the mask.
    """
    frames = latents.shape[2]
    with torch.no_grad():
        if isinstance(model, SkyReelsV2Transformer3DModel):
            before = model.config.num_frame_per_block
            model._set_ar_attention(chunk_frames)
            try:
                kwargs = {"enable_diffusion_forcing": True} if timestep.dim() == 2 else {}
                return model(latents, timestep, prompt, return_dict=False, **kwargs)[0]
            finally:
                model.register_to_config(num_frame_per_block=before)
        if timestep.dim() == 2:  # per frame: the stock Wan model takes it per token
            timestep = timestep.repeat_interleave(FRAME_TOKENS, dim=1)
        chunk_of = (torch.arange(frames) // chunk_frames).repeat_interleave(FRAME_TOKENS)
        mask = chunk_of[None, :] <= chunk_of[:, None]
        originals = [block.attn1.processor for block in model.blocks]
        for block in model.blocks:
            block.attn1.set_processor(_MaskedProcessor(mask))
        try:
            return model(latents, timestep, prompt, return_dict=False)[0]
        finally:
            for block, proc in zip(model.blocks, originals):
                block.attn1.set_processor(proc)


def stream_commits(handle, latents, timestep, prompt, state=None):
    """Commit a clip chunk by chunk; (concatenated predictions, final state)."""
    F = handle.chunk_frames
    state = state or handle.init_state(latents.shape[0])
    outs = []
    for f0 in range(0, latents.shape[2], F):
        t = timestep[:, f0: f0 + F] if timestep.dim() == 2 else timestep
        y, state = handle.commit(state, latents[:, :, f0: f0 + F], t, prompt)
        outs.append(y)
    return torch.cat(outs, dim=2), state


def rel_err(a, b):
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
