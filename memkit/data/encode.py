"""``memkit encode``: a folder of videos to latent shards (one safetensors file each) with a Wan VAE.

Training on shards skips the VAE at every step; :class:`~memkit.data.latent_shards.LatentShards` reads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memkit.errors import ConfigError, DataError
from memkit.ops._checks import DTYPES
from memkit.state.io import write_safetensors

from .sources import check_positive_int, check_size

SHARD_KIND = "latent shard"

# Captions are embedded this many videos at a time: each encode_prompts call loads the text encoder once.
CAPTION_BATCH = 16


@dataclass
class EncodeReport:
    """What :func:`encode_folder` did: shards written, shards already there, and the videos that failed."""

    written: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video path, message)
    captions_ignored: int = 0  # caption files found while no text encoder was given


def shard_name(relative: Path) -> str:
    """The shard file name of a video at ``relative`` (to the videos folder): ``sub/clip.mp4`` -> ``sub__clip``."""
    return "__".join(relative.with_suffix("").parts) + ".safetensors"


def encode_folder(
    videos: str | os.PathLike,
    out: str | os.PathLike,
    vae,
    *,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    text_encoder: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EncodeReport:
    """Encode every video of ``VideoFolder(videos)`` into ``out/<shard_name>.safetensors``.

    Each shard holds ``"latents"`` (C, F, h, w) float32, the normalised latents of
    :func:`memkit.rollout.vae.encode_video` (frames resized to ``size`` = (height, width) when given, at most
    ``max_frames`` pixel frames), and, when ``text_encoder`` is given and a caption ``<video stem>.txt`` sits beside
    the video, ``"prompt_embeds"`` (L, D) float32. Existing shards are kept unless ``overwrite``. A video that cannot
    be read is recorded in the report and the others go on.
    """
    from tqdm.auto import tqdm

    from .video_folder import VideoFolder

    if size is not None:
        size = check_size(size)
    if max_frames is not None:
        check_positive_int("max_frames", max_frames)
    folder = VideoFolder(videos)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    report = EncodeReport()
    pending: list[tuple[Path, Path]] = []
    owners: dict[str, Path] = {}
    for path in folder.files:
        name = shard_name(path.relative_to(folder.root))
        if name in owners:
            report.failed.append((str(path), f"{path}: its shard name {name} is taken by {owners[name]}; rename one"))
            continue
        owners[name] = path
        if (out / name).exists() and not overwrite:
            report.skipped_existing += 1
        else:
            pending.append((path, out / name))

    with tqdm(total=len(pending), disable=not progress, unit="video", desc="memkit encode") as bar:
        for group_start in range(0, len(pending), CAPTION_BATCH):
            group = pending[group_start : group_start + CAPTION_BATCH]
            captions = _caption_embeds([video for video, _ in group], text_encoder, vae, report)
            for video, shard in group:
                if captions.get(video, True) is None:  # its caption was unreadable: already reported
                    bar.update(1)
                    continue
                try:
                    _encode_one(video, shard, vae, size, max_frames, captions.get(video))
                    report.written += 1
                except DataError as exc:
                    report.failed.append((str(video), str(exc)))
                bar.update(1)
    return report


def _caption_embeds(videos: list[Path], text_encoder, vae, report: EncodeReport) -> dict[Path, torch.Tensor | None]:
    """(L, D) embeddings of the captions beside ``videos``, keyed by video; a video whose caption is unreadable maps
    to None and is recorded as failed."""
    texts: dict[Path, str] = {}
    unreadable: dict[Path, None] = {}
    for video in videos:
        caption = video.with_suffix(".txt")
        if not caption.is_file():
            continue
        if text_encoder is None:
            report.captions_ignored += 1
            continue
        try:
            texts[video] = caption.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.failed.append((str(video), f"{caption} is not a readable UTF-8 caption: {exc}"))
            unreadable[video] = None
    if not texts:
        return unreadable
    from memkit.rollout.prompts import encode_prompts

    device, dtype = _device_and_dtype(vae)
    embeds = encode_prompts(list(texts.values()), text_encoder, device=device, dtype=dtype)
    return {**unreadable, **{video: embeds[row].float().cpu() for row, video in enumerate(texts)}}


def _device_and_dtype(vae) -> tuple[torch.device, torch.dtype]:
    param = next(vae.parameters())
    return param.device, param.dtype


def _encode_one(video: Path, shard: Path, vae, size, max_frames, prompt_embeds: torch.Tensor | None) -> None:
    from memkit.rollout.vae import encode_video

    from .video_folder import decode_frames

    frames = decode_frames(video, 0, max_frames)
    if frames.shape[0] == 0:
        raise DataError(f"{video} has no frames")
    if size is None:
        factor = _spatial_factor(vae)
        height, width = frames.shape[1:3]
        if height % factor or width % factor:
            raise DataError(f"{video} is {height}x{width}, not a multiple of the VAE's {factor}; pass --height and "
                            f"--width")
    latents = encode_video(vae, frames, size)[0]
    tensors = {"latents": latents.float().cpu().contiguous()}
    if prompt_embeds is not None:
        tensors["prompt_embeds"] = prompt_embeds.contiguous()
    write_safetensors(shard, tensors, {"source": str(video), "memkit": SHARD_KIND})


def _spatial_factor(vae) -> int:
    factor = vae.config.get("scale_factor_spatial", None)
    return 8 if factor is None else int(factor)


# ---------------------------------------------------------------------------------------------- the command


def add_encode_parser(subparsers):
    """Add the ``encode`` subcommand to an argparse subparsers object; returns its parser."""
    from memkit.cli_args import default_device, positive_int

    parser = subparsers.add_parser(
        "encode", help="encode a folder of videos into latent shards with a Wan VAE (memkit.data.LatentShards)",
        description="Encode every video under VIDEOS with a Wan VAE into OUT/<path with / as __>.safetensors "
                    "(latents, and prompt_embeds from a caption <video>.txt beside the video when --text-encoder "
                    "is given).",
    )
    parser.add_argument("videos", metavar="VIDEOS", help="a folder of videos (searched recursively)")
    parser.add_argument("--vae", required=True, help="a diffusers AutoencoderKLWan folder")
    parser.add_argument("--out", required=True, help="the folder for the shards")
    parser.add_argument("--height", type=positive_int, help="resize frames to this height (with --width; default: "
                                                             "as is)")
    parser.add_argument("--width", type=positive_int, help="resize frames to this width (with --height)")
    parser.add_argument("--max-frames", type=positive_int, help="encode at most this many frames of each video")
    parser.add_argument("--text-encoder", help="a local UMT5 encoder folder, to embed captions (<video>.txt)")
    parser.add_argument("--overwrite", action="store_true", help="re-encode videos whose shard exists")
    parser.add_argument("--device", default=default_device(),
                        help="where the VAE runs (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="VAE (and text encoder) dtype; shards are float32 whatever this is")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(fn=run_encode)
    return parser


def run_encode(args, console) -> int:
    """Run ``memkit encode``: 0 when every video was encoded or already there, 1 when some failed."""
    from rich.markup import escape

    from memkit.cli_args import checked_device

    videos, out = Path(args.videos), Path(args.out)
    size = _checked_arguments(args)
    device = checked_device(args.device)
    vae = _load_vae(Path(args.vae), device, DTYPES[args.dtype])
    if size is not None:
        factor = _spatial_factor(vae)
        if size[0] % factor or size[1] % factor:
            raise ConfigError(f"--height and --width must be multiples of {factor} for this VAE, got {size[0]}x"
                              f"{size[1]}")
    report = encode_folder(videos, out, vae, size=size, max_frames=args.max_frames, text_encoder=args.text_encoder,
                           overwrite=args.overwrite, progress=not args.quiet)
    for _, message in report.failed:
        console.print(f"[red]failed:[/red] {escape(message)}", soft_wrap=True)
    shards = "shard" if report.written == 1 else "shards"
    summary = (f"memkit encode: {report.written} {shards} written to {escape(str(out))}, {report.skipped_existing} "
               f"already there{' (--overwrite re-encodes them)' if report.skipped_existing else ''}, "
               f"{len(report.failed)} failed")
    if report.captions_ignored:
        summary += f"; {report.captions_ignored} caption file(s) ignored (no --text-encoder)"
    console.print(summary, soft_wrap=True)
    return 1 if report.failed else 0


def _checked_arguments(args) -> tuple[int, int] | None:
    """Every check that needs no model, so a bad command fails before any work."""
    videos, vae, out = Path(args.videos), Path(args.vae), Path(args.out)
    if not videos.exists():
        raise FileNotFoundError(f"no video folder at {videos}")
    if not videos.is_dir():
        raise ConfigError(f"VIDEOS must be a folder of videos; {videos} is a file")
    if not vae.is_dir():
        raise FileNotFoundError(f"no VAE folder at {vae}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; it must be a folder")
    if args.text_encoder is not None and not Path(args.text_encoder).exists():
        raise FileNotFoundError(f"no text encoder folder at {args.text_encoder}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames must be a positive integer, got {args.max_frames}")
    if (args.height is None) != (args.width is None):
        raise ConfigError("--height and --width go together: give both or neither")
    if args.height is None:
        return None
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value < 8 or value % 8:
            raise ConfigError(f"{flag} must be a positive multiple of 8, got {value}")
    return args.height, args.width


def _load_vae(folder: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    config = folder / "config.json"
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"{folder} is not a diffusers model folder (no readable config.json)") from None
    if class_name != "AutoencoderKLWan":
        raise ConfigError(f"{folder} holds a {class_name}, not an AutoencoderKLWan")
    try:
        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load the VAE from {folder}: {str(exc).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)
