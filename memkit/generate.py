"""``memkit generate``: stream a long video from a retrofitted backbone, with prompt switches, a prefix,
saving and resuming, decoded chunk by chunk into an mp4.

Runs on a local checkpoint (a diffusers model folder, or an original Wan-format file such as
Self-Forcing's ``self_forcing_dmd.pt``), or by default on a small randomly initialised backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from memkit.errors import ConfigError
from memkit.ops._checks import DTYPES

VIDEO_FPS = 16  # Wan2.1's frame rate
PIXELS_PER_LATENT = 8


@dataclass
class Backbone:
    model: torch.nn.Module
    vae: object | None
    text_encoder: Path | None
    description: str
    random: bool

    @property
    def default_size(self) -> tuple[int, int]:
        """Video (height, width): Wan2.1's 480x832 for real-sized models, 64x64 for the small random configs."""
        small = self.model.config.num_layers < 8
        return (64, 64) if small else (480, 832)


def load_backbone(args, console: Console) -> Backbone:
    """The transformer (and a VAE and text encoder when the checkpoint folder has them)."""
    from adapters.loading import BackboneSpec
    from adapters.loading import load_backbone as build
    from memkit.rollout.vae import tiny_wan_vae

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    spec = BackboneSpec(family=args.backbone, checkpoint=args.checkpoint, size=args.size, seed=args.seed,
                        dtype=args.dtype)
    loaded = build(spec, device=device)
    model = loaded.model
    vae_path = Path(args.vae) if args.vae else None
    if spec.checkpoint is None:
        vae = None if args.no_decode else _load_vae(vae_path, dtype, device) if vae_path else \
            tiny_wan_vae(z_dim=model.config.in_channels).to(device=device, dtype=dtype)
        what = (f"a randomly initialised {args.backbone} backbone (size {args.size!r}, random weights: the video is "
                f"noise-like; pass --checkpoint for a real model)")
        return Backbone(model, vae, None, what, True)
    if loaded.report is not None:  # an original Wan-format file (or a folder of shards) into a model of --size
        console.print(str(loaded.report))
        encoder = None
    else:
        ckpt = Path(spec.checkpoint)
        root = ckpt if (ckpt / "transformer").is_dir() else ckpt.parent
        vae_path = vae_path or (root / "vae" if (root / "vae").is_dir() else None)
        encoder = root / "text_encoder" if (root / "text_encoder").is_dir() else None
    vae = None if args.no_decode or vae_path is None else _load_vae(vae_path, dtype, device)
    return Backbone(model, vae, Path(args.text_encoder) if args.text_encoder else encoder, loaded.description, False)


def _load_vae(path: Path, dtype, device):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device).eval()


def load_prompts(args, backbone: Backbone, console: Console) -> dict[str, torch.Tensor]:
    from memkit.rollout.prompts import encode_prompts, load_prompt_embeds, random_prompt_embeds

    if args.prompt_embeds and args.prompt:
        raise ConfigError("give prompts either as --prompt-embeds or as --prompt texts, not both")
    if args.prompt_embeds:
        return load_prompt_embeds(args.prompt_embeds)
    if args.prompt:
        if backbone.text_encoder is None:
            raise ConfigError("--prompt needs a text encoder: pass --text-encoder PATH (a local UMT5 folder), "
                              "or precomputed embeddings with --prompt-embeds")
        embeds = encode_prompts(args.prompt, backbone.text_encoder, device=args.device)
        return {f"{i}: {text[:40]}": e[None] for i, (text, e) in enumerate(zip(args.prompt, embeds))}
    if not backbone.random:
        raise ConfigError("a real checkpoint needs prompts: --prompt-embeds FILE or --prompt TEXT")
    n = len(args.switch) + 1
    console.print(f"no prompts given: using {n} random prompt embedding(s)")
    return random_prompt_embeds(n, 16, backbone.model.config.text_dim, seed=args.seed)


def run_generate(args, console: Console) -> int:
    import adapters
    import memkit
    from memkit.rollout import FlowSchedule, PromptSchedule, StreamingGenerator
    from memkit.rollout.vae import decoded_frames
    from memkit.rollout.video import VideoWriter

    backbone = load_backbone(args, console)
    console.print(f"backbone: {backbone.description}")
    model = backbone.model
    height = args.height or backbone.default_size[0]
    width = args.width or backbone.default_size[1]
    if height % PIXELS_PER_LATENT or width % PIXELS_PER_LATENT:
        raise ConfigError(f"--height and --width must be multiples of {PIXELS_PER_LATENT}, got {height}x{width}")
    cfg = memkit.MemoryConfig(kind=args.memory, sink_frames=args.sink_frames, window_frames=args.window_frames,
                              rope_mode=args.rope_mode)
    handle = adapters.inject(model, cfg, chunk_frames=args.chunk_frames,
                             latent_size=(height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT))
    if args.memory_weights:
        memkit.load_memory(model, args.memory_weights)
    keep_saved_prompt = args.resume and not (args.prompt or args.prompt_embeds)
    schedule = None if keep_saved_prompt else PromptSchedule(load_prompts(args, backbone, console), args.switch)
    latent_frames = math.ceil((args.seconds * VIDEO_FPS - 1) / 4) + 1
    num_chunks = math.ceil(latent_frames / args.chunk_frames)
    steps = None
    if args.steps is not None or args.shift is not None:
        default = FlowSchedule()
        shift = default.shift if args.shift is None else args.shift
        steps = FlowSchedule(tuple(args.steps or default.timesteps), shift)
    if args.resume:  # the saved stream's own schedule and context noise, unless given
        gen = StreamingGenerator.from_state(handle, args.resume, schedule, vae=backbone.vae, schedule=steps,
                                            context_noise=args.context_noise, progress=not args.quiet)
        console.print(f"resuming after chunk {gen.chunks_done} ({gen.cursor} latent frames)")
        num_chunks = max(0, num_chunks - gen.chunks_done)
    else:
        gen = StreamingGenerator(handle, schedule, schedule=steps, context_noise=args.context_noise or 0.0,
                                 seed=args.seed, vae=backbone.vae, progress=not args.quiet)
    if schedule is not None:
        schedule.check_range(gen.chunks_done + num_chunks)
    console.print(
        f"memory {args.memory} (sink {args.sink_frames} + window {args.window_frames} frames), {num_chunks} chunks "
        f"of {args.chunk_frames} latent frames at {height}x{width}, prompts: {schedule or 'as saved'}"
    )
    writer = VideoWriter(args.out, fps=VIDEO_FPS) if backbone.vae is not None else None
    kept = []
    try:
        if args.prefix:
            prefix = load_prefix(args.prefix, backbone.vae, handle, console)
            video = gen.prefill(prefix)
            if writer is not None:
                writer.write(video)
        for chunk in gen.stream(num_chunks):
            if writer is not None:
                writer.write(chunk.video)
            if args.save_latents:
                kept.append(chunk.latents.cpu())
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        console.print(f"wrote {writer.frames_written} frames ({writer.frames_written / VIDEO_FPS:.1f} s at "
                      f"{VIDEO_FPS} fps) to {args.out}")
    else:
        console.print(f"no VAE: decoded nothing ({decoded_frames(latent_frames)} frames would be made); "
                      f"use --save-latents to keep the latents")
    if args.save_latents:
        from safetensors.torch import save_file

        Path(args.save_latents).parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": torch.cat(kept, dim=2).contiguous()}, args.save_latents)
        console.print(f"latents saved to {args.save_latents}")
    if args.save_state:
        state = gen.state  # built once: it copies the decoder cache
        state.save(args.save_state)
        console.print(f"stream state ({state.nbytes / 2**20:.1f} MiB) saved to {args.save_state}; "
                      f"continue with --resume {args.save_state}")
    return 0


def load_prefix(path: str, vae, handle, console: Console) -> torch.Tensor:
    """Clean latents to commit before generating: a .safetensors of latents, or an image / video to encode."""
    from memkit.rollout.vae import encode_video
    from memkit.rollout.video import read_image, read_video

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(p)
        if "latents" not in tensors:
            raise ConfigError(f"{p} has no 'latents' tensor (got {sorted(tensors)})")
        latents = tensors["latents"]
    else:
        if vae is None:
            raise ConfigError("an image or video prefix must be encoded: it needs a VAE (drop --no-decode)")
        frames = read_image(p) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else read_video(p)[0]
        latents = encode_video(vae, frames, size=(handle.latent_size[0] * PIXELS_PER_LATENT,
                                                  handle.latent_size[1] * PIXELS_PER_LATENT))
    console.print(f"prefix: {latents.shape[2]} latent frames from {p}")
    return latents
