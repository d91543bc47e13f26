"""Adapter for diffusers ``WanTransformer3DModel`` (Wan2.1 and the AR models built on it:
CausVid, Self-Forcing, LongLive, VideoSSM).

Only what is Wan-specific lives here: where the attention modules are, how the stock processor
projects q, k, v (RMSNorm across heads, then split), the RoPE tables, a cross-attention processor
that caches the prompt's K/V, and how a per-frame timestep is passed to the model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from memkit.errors import ConfigError
from memkit.ops._checks import autocast_dtype

from .handle import AdapterHandle
from .registry import BackboneAdapter, Dims, register_backbone

# The stock processor of an image-conditioned (I2V) Wan model takes the last 512 context tokens as text.
TEXT_CONTEXT_LENGTH = 512

# Random-weight configs of the Wan2.1 shapes, for the built-in default backbone and for benchmarks.
WAN_CONFIGS = {
    # small enough to stream a minute of video on a laptop CPU
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=1024),
    "small": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
                  text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, rope_max_seq_len=1024),
    "1.3B": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024),
}


def random_wan(size: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
               model_class=None, overrides: dict | None = None):
    """A randomly initialised ``WanTransformer3DModel`` of one of :data:`WAN_CONFIGS` (no download).

    In ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` would load it: the modules diffusers keeps in
    float32 (norms, time embedder, modulation tables) stay float32. ``overrides`` changes config fields
    (``{"in_channels": 3, "out_channels": 3}``: a pixel-space model).
    """
    import inspect

    from diffusers import WanTransformer3DModel

    if size not in WAN_CONFIGS:
        raise ConfigError(f"unknown Wan size {size!r}; known: {', '.join(WAN_CONFIGS)}")
    cls = model_class or WanTransformer3DModel
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no config fields {unknown}; known: {', '.join(sorted(known))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**{**WAN_CONFIGS[size], **(overrides or {})})
    nn.Module.to(model, device=device, dtype=dtype)  # diffusers' own .to warns about its float32 modules
    keep = set(model._keep_in_fp32_modules or ())
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            nn.Module.to(module, dtype=torch.float32)
    return model.eval()


def _qkv(attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None = None):
    """The stock projections: fused or not, then RMSNorm of q and k across heads."""
    source = hidden_states if context is None else context
    if getattr(attn, "fused_projections", False):
        if context is None:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q = attn.to_q(hidden_states)
            k, v = attn.to_kv(source).chunk(2, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
    return attn.norm_q(q), attn.norm_k(k), v


def _heads(attn: nn.Module, *tensors: torch.Tensor):
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in tensors)


class CachedCrossAttention:
    """Wan's cross-attention with the prompt's keys and values computed once per prompt.

    The handle gives each prompt tensor an id; within a stream the same prompt is attended by every
    denoising and context pass, so its K/V projections (per block) are reused. Nothing is cached while
    gradients flow into the projections or when no id is given (the model called directly).
    """

    def __init__(self, handle: AdapterHandle, original):
        self.handle = handle
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        self._cache: OrderedDict = OrderedDict()
        # The pass in progress's K/V, looked up before it starts (WanAdapter.begin_fast_pass), so that a compiled
        # block finds them without running the cache's Python bookkeeping.
        self.prepared: tuple[torch.Tensor, ...] | None = None

    def _key_value(self, attn, text, image):
        def compute():
            k, v = _qkv(attn, text, text)[1:]
            kv = _heads(attn, k, v)
            if image is None:
                return kv
            if getattr(attn, "fused_projections", False):
                k_img, v_img = attn.to_added_kv(image).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(image), attn.add_v_proj(image)
            return kv + _heads(attn, attn.norm_added_k(k_img), v_img)

        key = self.handle.prompt_key()
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in attn.parameters())
        if key is None or trains:
            return compute()
        weights = tuple((p.data_ptr(), p._version) for p in attn.parameters())
        device = text.device.type
        autocast = autocast_dtype(device)
        full_key = (key, weights, text.dtype, text.device, torch.is_inference_mode_enabled(), autocast)
        if full_key not in self._cache:
            if len(self._cache) >= 2:
                self._cache.popitem(last=False)
            self._cache[full_key] = compute()
        self._cache.move_to_end(full_key)
        return self._cache[full_key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        image = None
        text = encoder_hidden_states
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - TEXT_CONTEXT_LENGTH
            image, text = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        kv = self.prepared if self.prepared is not None else self._key_value(attn, text, image)

        def attend(k, v, mask):
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend)
            return out.flatten(2, 3).type_as(q)

        out = attend(kv[0], kv[1], attention_mask)
        if image is not None:
            out = out + attend(kv[2], kv[3], None)
        return attn.to_out[1](attn.to_out[0](out))


@register_backbone
class WanAdapter(BackboneAdapter):
    name = "wan"
    default_latent_size = (60, 104)  # 480x832 video through the 8x spatial VAE

    @classmethod
    def matches(cls, model):
        from diffusers import WanTransformer3DModel

        return isinstance(model, WanTransformer3DModel)

    def attention_modules(self):
        return [(block.attn1, block.attn2) for block in self.model.blocks]

    def dims(self):
        c = self.model.config
        return Dims(num_heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                    dim=c.num_attention_heads * c.attention_head_dim, in_channels=c.in_channels,
                    patch_size=tuple(c.patch_size), text_dim=c.text_dim)

    def rope_tables(self):
        return self.model.rope.freqs_cos, self.model.rope.freqs_sin

    def blocks(self):
        return list(self.model.blocks)

    def begin_fast_pass(self, handle, encoder_hidden_states, kwargs):
        # The prompt's K/V per block (cached per prompt), looked up once per pass instead of inside every block,
        # from the context exactly as the model builds it ([image | text]) and each processor splits it.
        cond = self.model.condition_embedder
        context = cond.text_embedder(encoder_hidden_states)
        image = kwargs.get("encoder_hidden_states_image")
        if image is not None:
            context = torch.cat([cond.image_embedder(image), context], dim=1)
        for _, cross in self.attention_modules():
            proc = cross.processor
            if isinstance(proc, CachedCrossAttention):
                split = context.shape[1] - TEXT_CONTEXT_LENGTH if cross.add_k_proj is not None else 0
                img = context[:, :split] if cross.add_k_proj is not None else None
                proc.prepared = proc._key_value(cross, context[:, split:], img)

    def end_fast_pass(self, handle):
        for _, cross in self.attention_modules():
            if isinstance(cross.processor, CachedCrossAttention):
                cross.processor.prepared = None

    def self_attention_qkv(self, attn, hidden_states):
        return _heads(attn, *_qkv(attn, hidden_states))

    def self_attention_out(self, attn, y, like):
        return attn.to_out[1](attn.to_out[0](y.flatten(2, 3).type_as(like)))

    def cross_attention_processor(self, handle, original):
        return CachedCrossAttention(handle, original)

    def forward(self, latents, timestep, encoder_hidden_states, **kwargs):
        if timestep.dim() == 2:  # per frame: Wan takes per-token timesteps (its Wan2.2 TI2V path)
            _, ph, pw = self.model.config.patch_size
            tokens = (latents.shape[3] // ph) * (latents.shape[4] // pw)
            timestep = timestep.repeat_interleave(tokens, dim=1)
        return self.model(latents, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
