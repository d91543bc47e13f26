"""Chunk-by-chunk decoding of Wan latents, bit-identical to decoding the whole video at once.

diffusers' ``AutoencoderKLWan.decode`` walks the latent frames one at a time through a causal decoder that keeps a
feature cache: one slot per ``WanCausalConv3d`` of the decoder, holding ``None`` (nothing seen yet), the string
``"Rep"`` (a temporal upsampler that has seen only the first frame, which it does not upsample in time) or a tensor
(the last input frames of that conv). ``decode`` clears the cache at every call; :class:`StreamingVAEDecoder` keeps it
between calls, so a rollout can decode each new chunk of latents as soon as it is denoised.
"""

from __future__ import annotations

import torch

from memkit.errors import ConfigError, DTypeError, ShapeError, StateFormatError

STATE_KIND = "wan_vae_stream"
STATE_VERSION = 1

_NONE, _REP, _TENSOR = "none", "rep", "tensor"


def decoded_frames(latent_frames: int, vae=None) -> int:
    """Video frames a causal Wan VAE makes from ``latent_frames`` latent frames: 1 for the first, the temporal
    factor (``vae.config.scale_factor_temporal``, 4 without a VAE) for each later one."""
    if latent_frames < 0:
        raise ConfigError(f"latent_frames must be >= 0, got {latent_frames}")
    factor = _temporal_factor(vae)
    return 0 if latent_frames == 0 else 1 + factor * (latent_frames - 1)


def tiny_wan_vae(z_dim: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small random ``AutoencoderKLWan`` (spatial factor 8, temporal factor 4) for tests and the built-in default.

    Its ``post_quant_conv`` is a scaled channel permutation plus a dyadic bias, so each output element is one exact
    product and one rounding whatever the call's shape. A dense 1x1x1 conv is not shape-invariant on CPU (MKL's
    float64 GEMM rounds some columns differently depending on the number of frames in the call), which would make
    "streamed == whole" depend on the machine rather than on the decoder's cache handling.
    """
    from diffusers import AutoencoderKLWan

    latents_mean = [round(0.1 * ((i % 5) - 2), 4) for i in range(z_dim)]
    latents_std = [round(0.5 + 0.25 * (i % 4), 4) for i in range(z_dim)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=latents_mean,
            latents_std=latents_std,
            scale_factor_temporal=4,
            scale_factor_spatial=8,
        )
        permutation = torch.randperm(z_dim)
    with torch.no_grad():
        weight = torch.zeros(z_dim, z_dim)
        weight[torch.arange(z_dim), permutation] = torch.tensor([2.0 ** ((i % 3) - 1) for i in range(z_dim)])
        vae.post_quant_conv.weight.copy_(weight.view(z_dim, z_dim, 1, 1, 1))
        vae.post_quant_conv.bias.copy_(torch.tensor([((i % 7) - 3) / 8 for i in range(z_dim)]))
    # ModelMixin.to warns about fp32-kept modules whenever a dtype is passed; this model has none.
    torch.nn.Module.to(vae, dtype=dtype)
    return vae.eval()


class StreamingVAEDecoder:
    """Decodes consecutive latent chunks of one video (any chunk sizes) as ``vae.decode`` would decode them joined.

    vae: a diffusers ``AutoencoderKLWan`` (Wan 2.1 or 2.2 layout). Tiling is not supported.
    denormalize: inputs are in the transformer's normalised latent space; map them back with the VAE config's
        ``latents_mean`` / ``latents_std`` exactly as diffusers' Wan pipeline does before ``vae.decode``.

    The decoder is stateful: ``decode`` advances it, :meth:`reset` starts a new video, and :meth:`state_dict` /
    :meth:`load_state_dict` save and restore it mid-video. Outputs are in [-1, 1], shape (B, 3, f, H, W).

    The decoder stages run exactly as in ``vae.decode`` (one latent frame per call, the same cache), so the frames
    are bit-identical to it whenever ``post_quant_conv`` rounds each position the same whatever the number of frames
    in its input; a dense 1x1x1 conv on some backends does not (see :func:`tiny_wan_vae`), and then they agree to
    that rounding.

    batch_frames: one decoder call per chunk for all its latent frames (the very first frame of a video alone), a
        few large convolutions instead of many small ones (what :class:`StreamingGenerator` uses on CUDA). The
        causal convolutions see the same frames with the same cache, so the result equals ``vae.decode``'s up to
        the backend's shape-dependent rounding (bit-identical in float64 on the CPU).

    offload_to: keep the VAE's weights and the causal cache where they are (say, on the CPU) between chunks and bring
        them to this device only while a chunk decodes (``memkit generate --low-vram``).
    """

    def __init__(self, vae, *, denormalize: bool = True, batch_frames: bool = False, offload_to=None):
        for attr in ("decoder", "post_quant_conv", "config"):
            if not hasattr(vae, attr):
                raise ConfigError(f"StreamingVAEDecoder needs a diffusers AutoencoderKLWan; {type(vae).__name__} "
                                  f"has no {attr!r}")
        _refuse_tiling(vae)
        self.vae = vae
        self.denormalize = bool(denormalize)
        self.batch_frames = bool(batch_frames)
        self.offload_to = None if offload_to is None else torch.device(offload_to)
        self._conv_class = _wan_causal_conv_class()
        self._num_slots = sum(isinstance(m, self._conv_class) for m in vae.decoder.modules())
        self.reset()

    # ------------------------------------------------------------------ stream position

    @property
    def frames_in(self) -> int:
        """Latent frames decoded since the last reset."""
        return self._frames_in

    @property
    def frames_out(self) -> int:
        """Video frames produced since the last reset."""
        return self._frames_out

    @property
    def num_cache_slots(self) -> int:
        return self._num_slots

    def reset(self) -> None:
        """Forget everything decoded so far; the next chunk starts a new video."""
        self._cache: list = [None] * self._num_slots
        self._frames_in = 0
        self._frames_out = 0
        self._batch: int | None = None
        self._latent_size: tuple[int, int] | None = None

    # ------------------------------------------------------------------ decoding

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next ``f_lat`` latent frames (B, z_dim, f_lat, h, w) into video frames (B, 3, f, H, W)."""
        self._check_chunk(latents)
        _refuse_tiling(self.vae)
        home = None
        if self.offload_to is not None:
            home = next(self.vae.parameters()).device
            self.vae.to(self.offload_to)
        try:
            video, cache = self._decode(latents)
        finally:
            if home is not None:
                self.vae.to(home)
        if home is not None:
            cache = [c.to(home) if isinstance(c, torch.Tensor) else c for c in cache]

        # Commit only after every frame decoded, so a failure mid-chunk leaves the stream where it was.
        self._cache = cache
        self._frames_in += latents.shape[2]
        self._frames_out += video.shape[2]
        self._batch = latents.shape[0]
        self._latent_size = (latents.shape[3], latents.shape[4])
        return video

    def _decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, list]:
        _run_offload_hook(self.vae)
        device, dtype = _execution_device(self.vae), self.vae.dtype
        z = latents.to(device=device, dtype=dtype)
        if self.denormalize:
            z = denormalize_latents(z, self.vae.config)
        cache = self._cache
        if self.offload_to is not None:
            cache = [c.to(device) if isinstance(c, torch.Tensor) else c for c in cache]
        with torch.no_grad():
            if self.vae.use_slicing and z.shape[0] > 1:
                # vae.decode decodes each sample on its own then; so do we, with that sample's rows of the cache.
                pieces = [self._decode_frames(z[b : b + 1], _cache_rows(cache, b)) for b in range(z.shape[0])]
                return torch.cat([p[0] for p in pieces]), _merge_cache_rows([p[1] for p in pieces])
            return self._decode_frames(z, cache)

    def _decode_frames(self, z: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        cache = list(cache)  # the decoder replaces slots, never writes into the cached tensors
        # post_quant_conv is 1x1x1, so applying it per frame equals applying it to the whole video (up to the
        # backend's shape-dependent rounding), and makes the result independent of how the stream is chunked.
        x = torch.cat([self.vae.post_quant_conv(z[:, :, i: i + 1]) for i in range(z.shape[2])], dim=2)
        if self.batch_frames:  # the first frame of a video alone (the decoder treats it apart), then all the rest
            calls = [(0, 1), (1, z.shape[2])] if self._frames_in == 0 else [(0, z.shape[2])]
        else:
            calls = [(i, i + 1) for i in range(z.shape[2])]
        frames = []
        for a, b in calls:
            if b > a:
                first = self._frames_in + a == 0
                frames.append(self.vae.decoder(x[:, :, a:b], feat_cache=cache, feat_idx=[0], first_chunk=first))
        video = torch.cat(frames, dim=2)
        patch_size = self.vae.config.get("patch_size", None)
        if patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=patch_size)
        return torch.clamp(video, min=-1.0, max=1.0), cache

    def _check_chunk(self, latents) -> None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim != 5:
            raise ShapeError(f"latents must be 5-D (batch, channels, frames, height, width), got shape "
                             f"{tuple(latents.shape)}")
        if not latents.is_floating_point():
            raise DTypeError(f"latents must be floating point, got {latents.dtype}")
        batch, channels, frames, height, width = latents.shape
        z_dim = self.vae.config.z_dim
        if channels != z_dim:
            raise ShapeError(f"latents have {channels} channels but this VAE's z_dim is {z_dim}")
        if frames == 0:
            raise ShapeError("latent chunk has no frames")
        if self._latent_size is not None and (height, width) != self._latent_size:
            raise ShapeError(f"latent chunk is {height}x{width} but earlier chunks of this stream were "
                             f"{self._latent_size[0]}x{self._latent_size[1]}; call reset() to start a new video")
        if self._batch is not None and batch != self._batch:
            raise ShapeError(f"latent chunk has batch {batch} but earlier chunks of this stream had batch "
                             f"{self._batch}; call reset() to start a new video")

    # ------------------------------------------------------------------ saving and restoring

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The decoder's cache as tensors (``cache.<slot>``) and JSON-able facts describing it."""
        tensors, slots = {}, []
        for index, entry in enumerate(self._cache):
            if entry is None:
                slots.append(_NONE)
            elif isinstance(entry, str):
                slots.append(_REP)
            else:
                slots.append(_TENSOR)
                tensors[f"cache.{index}"] = entry.detach().clone()
        meta = {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "slots": slots,
            "frames_in": self._frames_in,
            "frames_out": self._frames_out,
            "batch": self._batch,
            "latent_size": list(self._latent_size) if self._latent_size is not None else None,
            "z_dim": int(self.vae.config.z_dim),
            "dtype": str(self.vae.dtype).removeprefix("torch."),
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore a state from :meth:`state_dict` (of a decoder over this VAE or an identical one).

        Everything is checked before anything changes: on error the decoder is as it was.
        """
        slots, frames_in, frames_out, batch, latent_size = self._parse_meta(meta)
        expected = {f"cache.{i}" for i, kind in enumerate(slots) if kind == _TENSOR}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise StateFormatError(f"decoder state tensors do not match its slot list: missing {missing}, "
                                   f"unexpected {extra}")
        convs = [m for m in self.vae.decoder.modules() if isinstance(m, self._conv_class) and m.kernel_size[0] > 1]
        device, dtype = _execution_device(self.vae), self.vae.dtype
        cache: list = []
        for index, kind in enumerate(slots):
            if kind == _NONE:
                cache.append(None)
            elif kind == _REP:
                cache.append("Rep")
            else:
                cache.append(self._checked_slot(index, tensors[f"cache.{index}"], convs, batch, dtype).to(device))
        self._cache = cache
        self._frames_in, self._frames_out = frames_in, frames_out
        self._batch, self._latent_size = batch, latent_size

    def _parse_meta(self, meta) -> tuple[list[str], int, int, int | None, tuple[int, int] | None]:
        if not isinstance(meta, dict) or meta.get("kind") != STATE_KIND:
            raise StateFormatError(f"not a streaming Wan VAE decoder state (expected kind {STATE_KIND!r})")
        if meta.get("version") != STATE_VERSION:
            raise StateFormatError(f"decoder state version {meta.get('version')!r}; this memkit reads version "
                                   f"{STATE_VERSION}")
        slots = meta.get("slots")
        if not isinstance(slots, list) or any(kind not in (_NONE, _REP, _TENSOR) for kind in slots):
            raise StateFormatError("decoder state 'slots' must be a list of 'none' / 'rep' / 'tensor'")
        if len(slots) != self._num_slots:
            raise StateFormatError(f"decoder state has {len(slots)} cache slots but this VAE's decoder has "
                                   f"{self._num_slots}: it was saved from a different VAE architecture")
        if meta.get("z_dim") != self.vae.config.z_dim:
            raise StateFormatError(f"decoder state was saved for z_dim {meta.get('z_dim')}, this VAE has "
                                   f"{self.vae.config.z_dim}")
        frames_in, frames_out = meta.get("frames_in"), meta.get("frames_out")
        if not _is_count(frames_in) or not _is_count(frames_out):
            raise StateFormatError(f"decoder state frame counts are invalid: frames_in={frames_in!r}, "
                                   f"frames_out={frames_out!r}")
        batch, latent_size = meta.get("batch"), meta.get("latent_size")
        if frames_in == 0:
            if frames_out != 0 or batch is not None or latent_size is not None or any(k != _NONE for k in slots):
                raise StateFormatError("decoder state says no frames were decoded but holds a cache or sizes")
            return slots, 0, 0, None, None
        if frames_out != decoded_frames(frames_in, self.vae):
            raise StateFormatError(f"decoder state says {frames_in} latent frames made {frames_out} video frames; "
                                   f"this VAE makes {decoded_frames(frames_in, self.vae)} from that many")
        if not (_is_count(batch) and batch > 0):
            raise StateFormatError(f"decoder state batch is invalid: {batch!r}")
        if not (isinstance(latent_size, list) and len(latent_size) == 2 and all(_is_count(s) and s > 0
                                                                                 for s in latent_size)):
            raise StateFormatError(f"decoder state latent_size is invalid: {latent_size!r}")
        return slots, frames_in, frames_out, batch, (latent_size[0], latent_size[1])

    def _checked_slot(self, index: int, tensor, convs: list, batch: int, dtype: torch.dtype) -> torch.Tensor:
        name = f"cache.{index}"
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 5:
            raise StateFormatError(f"decoder state {name} must be a 5-D tensor")
        if tensor.dtype != dtype:
            raise DTypeError(f"decoder state {name} is {tensor.dtype} but the VAE runs in {dtype}; restore into a "
                             f"VAE of the dtype it was saved from")
        if tensor.shape[0] != batch:
            raise StateFormatError(f"decoder state {name} has batch {tensor.shape[0]}, its meta says {batch}")
        # Slots are filled in the order the decoder runs its temporal convs, which is their module order.
        if index >= len(convs):
            raise StateFormatError(f"decoder state slot {index} holds a tensor, but this VAE's decoder never caches "
                                   f"in that slot")
        if tensor.shape[1] != convs[index].in_channels:
            raise StateFormatError(f"decoder state {name} has {tensor.shape[1]} channels, this VAE's conv for that "
                                   f"slot takes {convs[index].in_channels}: it was saved from a different VAE")
        return tensor


def denormalize_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """Map latents from the transformer's normalised space to the VAE's, as diffusers' Wan pipeline does.

    The pipeline divides by the reciprocal of the std rather than multiplying by the std; the two round differently,
    so this keeps its exact formula.
    """
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
    recip_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / recip_std + mean


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _temporal_factor(vae) -> int:
    if vae is None:
        return 4
    factor = vae.config.get("scale_factor_temporal", None)
    return 4 if factor is None else int(factor)


def _refuse_tiling(vae) -> None:
    if getattr(vae, "use_tiling", False):
        raise ConfigError("VAE tiling is not supported for streaming decode (tiles are decoded with their own caches "
                          "and blended); call vae.disable_tiling() first")


def _wan_causal_conv_class():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return WanCausalConv3d


def _run_offload_hook(vae) -> None:
    # vae.decode runs accelerate's CPU-offload hook before decoding; calling the submodules directly would skip it.
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


def _execution_device(vae) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        return get_module_execution_device(vae)
    except ImportError:
        return next(vae.parameters()).device


def _cache_rows(cache: list, row: int) -> list:
    return [entry[row : row + 1] if isinstance(entry, torch.Tensor) else entry for entry in cache]


def _merge_cache_rows(caches: list[list]) -> list:
    merged = []
    for entries in zip(*caches):
        first = entries[0]
        merged.append(torch.cat(entries) if isinstance(first, torch.Tensor) else first)
    return merged


def normalize_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """The inverse of :func:`denormalize_latents`: VAE latents into the transformer's space, as the Wan pipelines
    normalise an encoded image or video (``(z - mean) * (1 / std)``)."""
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
    recip_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
    return (latents - mean) * recip_std


@torch.no_grad()
def encode_video(vae, frames: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Normalised latents ``(1, z_dim, F, h, w)`` of uint8 frames ``(T, H, W, 3)`` (an image is T=1).

    Frames are resized to ``size`` (height, width) when given, and cut to the longest ``1 + 4k`` prefix
    the causal VAE encodes whole. The posterior's mode is used, as the Wan image-to-video pipeline does.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ShapeError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    factor = _temporal_factor(vae)
    keep = 1 + factor * ((frames.shape[0] - 1) // factor)
    param = next(vae.parameters())
    x = frames[:keep].to(param.device).permute(0, 3, 1, 2).to(param.dtype) / 127.5 - 1.0  # (T, 3, H, W)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    x = x.permute(1, 0, 2, 3)[None]  # (1, 3, T, H, W)
    z = vae.encode(x).latent_dist.mode()
    return normalize_latents(z, vae.config)
