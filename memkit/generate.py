"""``memkit generate``: stream a long video from a retrofitted backbone, with prompt switches, a prefix,
saving, resuming and forking, decoded chunk by chunk into an mp4.

Runs on a local checkpoint (a diffusers model folder, or an original Wan-format file such as
Self-Forcing's ``self_forcing_dmd.pt``), or by default on a small randomly initialised backbone.

A saved stream describes itself: besides the memories it records the backbone (how to rebuild it), the memory
config, sizes, sampling, prompts and noise seed, so ``--resume FILE`` alone continues it. Every input and output
is checked before any work; outputs are written whole or not at all, and never over an existing file without
``--overwrite``.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from memkit.cli_args import checked_device
from memkit.errors import ConfigError, StateFormatError
from memkit.memory import list_memories
from memkit.ops._checks import DTYPES
from memkit.outputs import check_outputs
from memkit.rollout.vae import decoded_frames

VIDEO_FPS = 16  # Wan2.1's frame rate
LONG_RUN_CHUNKS = 1000  # a run of more chunks says up front how long its video is, and after two chunks how long
#                         the run will take
PIXELS_PER_LATENT = 8
FRAMES_PER_LATENT = 4  # Wan's VAE: one latent frame is 4 video frames (the first of a stream is 1)

#: Settings a stream is made with, their flags and defaults. On --resume they come from the file; a flag that
#: contradicts the file is an error.
FIXED = {
    "backbone": ("--backbone", "wan"), "checkpoint": ("--checkpoint", None), "size": ("--size", "tiny"),
    "dtype": ("--dtype", None), "vae": ("--vae", None), "memory": ("--memory", "hybrid_gdn"),
    "sink_frames": ("--sink-frames", 3), "window_frames": ("--window-frames", 6),
    "rope_mode": ("--rope-mode", "relative"), "memory_weights": ("--memory-weights", None),
    "chunk_frames": ("--chunk-frames", 3), "height": ("--height", None), "width": ("--width", None),
    "from_run": ("--from-run", None),
}
#: Sampling settings, which a fork (--resume FILE --fork) may change.
FORKABLE = {"seed": ("--seed", 0), "steps": ("--steps", [1000.0, 750.0, 500.0, 250.0]), "shift": ("--shift", 5.0),
            "context_noise": ("--context-noise", 0.0)}
#: Files a resumed stream may find at another path.
MOVABLE = ("checkpoint", "vae", "memory_weights", "from_run")
#: Recorded under the stream's "recipe" (the rest the generator records itself).
RECIPE = ("checkpoint", "size", "backbone_seed", "backbone_overrides", "dtype", "vae", "memory_weights",
          "memory_weights_sha256", "from_run", "from_run_sha256", "height", "width")
#: Flags that build the backbone or the memory, which --from-run takes from the run.
RUN_DEFINES = ("backbone", "checkpoint", "size", "vae", "memory_weights")


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


@dataclass
class Plan:
    """Everything ``memkit generate`` will do, settled and checked before any model is loaded."""

    settings: dict
    device: torch.device
    outputs: dict[str, Path]
    resume: object | None   # the StreamState to continue
    fork: bool
    weights: dict | None = None  # memory_weights_info of --memory-weights, read once
    run: object | None = None  # the memkit.train.runs.TrainedRun of --from-run

    @property
    def pixel_space(self) -> bool:
        return pixel_space(self.settings)


def pixel_space(settings: dict) -> bool:
    """A backbone that takes and makes RGB frames (3 channels, a pixel-space model trained by memkit train): no
    VAE; its frames are the video, one per latent frame, at the latent size."""
    from adapters.loading import is_pixel_space

    return is_pixel_space(settings.get("backbone_overrides"))


def _pixels_per_latent(settings: dict) -> int:
    return 1 if pixel_space(settings) else PIXELS_PER_LATENT


def _frames_per_latent(pixels: bool) -> int:
    return 1 if pixels else FRAMES_PER_LATENT


def add_generate_parser(sub) -> None:
    from memkit.cli_args import default_device, finite_float, nonnegative_int, positive_float, positive_int

    gen = sub.add_parser("generate", help="stream a long video from a retrofitted backbone into an mp4")
    what = gen.add_argument_group("the stream (recorded in --save-state; --resume reads them from the file)")
    what.add_argument("--backbone", choices=["wan", "skyreels_v2"], help="backbone family (default: wan)")
    what.add_argument("--checkpoint", help="a diffusers model folder (with transformer/, vae/, text_encoder/) or an "
                                           "original Wan-format file (Self-Forcing, CausVid, LongLive); default: a "
                                           "small randomly initialised backbone")
    what.add_argument("--size", help="Wan config for the random backbone or a Wan-format file: tiny, small, 1.3B "
                                     "(default: tiny)")
    what.add_argument("--vae", help="a diffusers AutoencoderKLWan folder (default: the checkpoint's vae/)")
    what.add_argument("--memory", help="memory variant (memkit.list_memories(); default: hybrid_gdn)")
    what.add_argument("--sink-frames", type=nonnegative_int, help="default: 3")
    what.add_argument("--window-frames", type=positive_int, help="default: 6")
    what.add_argument("--rope-mode", choices=["absolute", "relative"],
                      help="relative (default) keeps RoPE positions bounded however long the stream")
    what.add_argument("--memory-weights", help="trained memory weights (memkit.save_memory, memkit train)")
    what.add_argument("--from-run", help="a run of memkit train (its folder, e.g. runs/NAME/version_0, or one of its "
                                         "checkpoints): its backbone, memory and trained weights, pixel-space or "
                                         "latent")
    what.add_argument("--chunk-frames", type=positive_int, help="latent frames per chunk (default: 3)")
    what.add_argument("--height", type=positive_int, help="video height (default: 480; 64 for tiny and small)")
    what.add_argument("--width", type=positive_int, help="video width (default: 832; 64 for tiny and small)")
    what.add_argument("--dtype", choices=list(DTYPES),
                      help="default: bfloat16 with CUDA, float32 without")
    how = gen.add_argument_group("sampling (a --fork may change them)")
    how.add_argument("--seed", type=nonnegative_int,
                     help="noise seed, and the random backbone's and random prompts' seed (default: 0)")
    how.add_argument("--steps", type=positive_float, nargs="+", help="denoising timesteps (default: 1000 750 500 250)")
    how.add_argument("--shift", type=positive_float, help="sampling shift (default: 5)")
    how.add_argument("--context-noise", type=finite_float,
                     help="noise level of the context pass, 0-1000 (default: 0)")
    prompts = gen.add_argument_group("prompts")
    prompts.add_argument("--prompt-embeds", help="a safetensors file of prompt embeddings (1, L, text_dim), in order")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt text (repeat for a schedule)")
    prompts.add_argument("--text-encoder", help="a local UMT5 encoder folder for --prompt")
    prompts.add_argument("--switch", type=positive_int, action="append", default=[],
                         help="chunk at which the next prompt takes over (repeat; one fewer than the prompts)")
    length = gen.add_argument_group("length, start and continuation")
    length.add_argument("--seconds", type=positive_float,
                        help="seconds of new video this run generates, at 16 fps (default: 10)")
    length.add_argument("--total-seconds", type=positive_float,
                        help="generate until the stream (prefix or resumed part included) is this long")
    length.add_argument("--prefix", help="clean start: latents (.safetensors with 'latents'), an image "
                                         "(image-to-video) or a video to extend")
    length.add_argument("--resume", help="continue a stream saved with --save-state (its settings come from it)")
    length.add_argument("--fork", action="store_true",
                        help="with --resume: fork the stream, e.g. with another --seed (the file is not changed)")
    out = gen.add_argument_group("outputs (checked before any work; never replaced without --overwrite)")
    out.add_argument("--out", help="the mp4 (default: out/video.mp4)")
    out.add_argument("--crf", type=nonnegative_int, default=18, help="H.264 quality: 0 lossless, 18 default, 51 worst")
    out.add_argument("--no-decode", action="store_true", help="do not decode: latents only, no mp4")
    out.add_argument("--save-latents", help="also save the generated latents (safetensors)")
    out.add_argument("--save-state", help="save the stream at the end (continue it with --resume)")
    out.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.add_argument("--low-vram", action="store_true",
                     help="bounded GPU memory: the VAE waits on the CPU and comes to the GPU per chunk, the text "
                          "encoder's memory is released once the prompts are encoded; peak memory per part is reported")
    gen.add_argument("--device", default=default_device(), help="default: cuda when available, else cpu")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(fn=run_generate)


# -- planning: everything that needs no model ----------------------------------------------------------------
def plan_generate(args) -> Plan:
    """Settle the stream's settings (from the flags, or the --resume file and the flags that agree with it) and
    check every input and output path, before anything is loaded."""
    _check_flag_combinations(args)
    device = checked_device(args.device)
    _check_inputs(args)
    given = _given(args)
    resume = None
    if args.resume:
        from memkit.state import StreamState

        resume = StreamState.load(args.resume)
        settings = _merge_with_saved(args, resume, given)
    else:
        settings = {**{k: d for k, (_, d) in {**FIXED, **FORKABLE}.items()}, **given}
        settings["backbone_seed"] = settings["seed"]
    for key in MOVABLE:
        if resume is not None and settings[key] and key not in given and not Path(settings[key]).exists():
            raise FileNotFoundError(f"--resume {args.resume}: the stream's {key} {settings[key]} is gone; give "
                                    f"its new place with {FIXED[key][0]} (it must be the same file)")
    if settings["memory"] not in list_memories():
        raise ConfigError(f"--memory: unknown memory {settings['memory']!r}; known: {', '.join(list_memories())}")
    if settings["dtype"] is None:
        settings["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    run = _read_run(settings, resume, saving=bool(args.save_state)) if settings["from_run"] else None
    if run is not None and resume is None:
        _settings_from_run(settings, given, run)
    weights = None
    if settings["memory_weights"]:
        settings["memory_weights_sha256"] = _sha256(settings["memory_weights"])
        _check_same_weights(resume, settings)
        from memkit.memory import memory_weights_info

        weights = memory_weights_info(settings["memory_weights"])
        if resume is None:
            _settings_from_weights(settings, given, weights)
    scale = _pixels_per_latent(settings)
    for flag, key in (("--height", "height"), ("--width", "width")):
        if settings[key] is not None and settings[key] % scale:
            raise ConfigError(f"{flag} must be a multiple of {scale}, got {settings[key]}")
    if args.total_seconds is None and args.seconds is None:
        args.seconds = 10.0
    if resume is not None and _chunks_to_generate(args, resume.cursor, settings["chunk_frames"],
                                                  decoder_fresh=False, pixels=pixel_space(settings)) == 0:
        have = _stream_seconds(resume.cursor, pixel_space(settings))
        raise ConfigError(f"--total-seconds {args.total_seconds:g}: the saved stream is already {have:.2f} s long; "
                          f"nothing to generate (nothing was written)")
    decode = not args.no_decode
    outputs = check_outputs({"--out": (args.out or "out/video.mp4") if decode else None,
                             "--save-latents": args.save_latents, "--save-state": args.save_state},
                            overwrite=args.overwrite)
    return Plan(settings, device, outputs, resume, args.fork, weights, run)


def _check_flag_combinations(args) -> None:
    if args.seconds is not None and args.total_seconds is not None:
        raise ConfigError("give --seconds (new video) or --total-seconds (the whole stream), not both")
    if args.fork and not args.resume:
        raise ConfigError("--fork forks a saved stream: it needs --resume FILE")
    if args.prefix and args.resume:
        raise ConfigError("--prefix starts a new stream; --resume continues a saved one: give one of them")
    if args.prompt and args.prompt_embeds:
        raise ConfigError("give prompts either as --prompt-embeds or as --prompt texts, not both")
    if args.prompt and len(args.switch) != len(args.prompt) - 1:
        raise ConfigError(f"{len(args.prompt)} --prompt texts need {len(args.prompt) - 1} --switch chunks, "
                          f"got {len(args.switch)}")
    if args.from_run:
        clash = [FIXED[key][0] for key in RUN_DEFINES if getattr(args, key) is not None]
        if clash:
            raise ConfigError(f"--from-run brings the run's backbone and trained memory; drop {', '.join(clash)}")
    if args.no_decode and args.out:
        raise ConfigError("--out has nothing to write with --no-decode; drop one (--save-latents keeps the latents)")
    if not 0 <= args.crf <= 51:
        raise ConfigError(f"--crf must lie in [0, 51], got {args.crf}")
    if not 0 <= (args.context_noise or 0.0) < 1000:
        raise ConfigError(f"--context-noise must lie in [0, 1000), got {args.context_noise}")


def _check_inputs(args) -> None:
    for flag, path in (("--checkpoint", args.checkpoint), ("--vae", args.vae), ("--prompt-embeds", args.prompt_embeds),
                       ("--memory-weights", args.memory_weights), ("--prefix", args.prefix),
                       ("--text-encoder", args.text_encoder), ("--resume", args.resume),
                       ("--from-run", args.from_run)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    for flag, path in (("--prompt-embeds", args.prompt_embeds), ("--memory-weights", args.memory_weights),
                       ("--prefix", args.prefix), ("--resume", args.resume)):
        if path is not None and Path(path).is_dir():
            raise ConfigError(f"{flag} {path} is a folder; give a file")


#: Stream settings a memory-weights file records: the memory config's fields of the flags, and the adapter's.
WEIGHTS_SETTINGS = {"memory": "kind", "sink_frames": "sink_frames", "window_frames": "window_frames",
                    "rope_mode": "rope_mode"}


def _settings_from_weights(settings: dict, given: dict, info: dict) -> None:
    """A new stream with ``--memory-weights`` takes the memory settings the weights were trained with, and
    their chunk frames and frame size where the file records them, unless a flag gives them. A memory flag that
    contradicts the file is an error naming both values; another chunk or frame size is the user's choice (the
    weights' shapes are checked when they load)."""
    path = settings["memory_weights"]
    record = info["record"]
    spec = record.get("backbone_spec")
    if record.get("trainable") in ("all", "lora"):
        raise ConfigError(f"--memory-weights {path} was trained together with its backbone (trainable: "
                          f"{record['trainable']}), whose trained weights are not in this file; generate from the run "
                          f"with --from-run RUN_FOLDER")
    _take_recorded(settings, given, info["config"], record, f"--memory-weights {path}", spec, "weights")
    if spec and not any(key in given for key in ("checkpoint", "size", "backbone")):
        _backbone_from_spec(settings, spec, f"--memory-weights {path}", "; give its place with --checkpoint")


def _settings_from_run(settings: dict, given: dict, run) -> None:
    """A new stream with ``--from-run``: the run's backbone, memory settings, chunk frames and frame size (a memory
    flag that contradicts the run is an error; another chunk or frame size is the user's choice)."""
    source = f"--from-run {run.checkpoint}"
    _take_recorded(settings, given, run.setup["memory"], run.setup, source, run.spec, "run")
    _backbone_from_spec(settings, run.spec, source)


def _take_recorded(settings: dict, given: dict, memory: dict, record: dict, source: str, spec: dict | None,
                   label: str) -> None:
    """Settings from a recorded memory config and training record (chunk frames, latent size), unless a flag gives
    them; a memory flag that contradicts the record is an error naming both values."""
    recorded = {key: memory[field] for key, field in WEIGHTS_SETTINGS.items() if field in memory}
    if "chunk_frames" in record:
        recorded["chunk_frames"] = record["chunk_frames"]
    if "latent_size" in record:
        scale = _pixels_per_latent({"backbone_overrides": (spec or {}).get("overrides")})
        recorded["height"], recorded["width"] = (scale * n for n in record["latent_size"])
    clash = [f"{FIXED[key][0]} {given[key]} (the {label}: {value})"
             for key, value in recorded.items() if key in WEIGHTS_SETTINGS and key in given and given[key] != value]
    if clash:
        own = f"{label}' own" if label.endswith("s") else f"{label}'s own"
        raise ConfigError(f"{source} was trained with other settings: {'; '.join(clash)}; leave these flags out to "
                          f"use the {own}")
    settings.update({key: value for key, value in recorded.items() if key not in given})


def _read_run(settings: dict, resume, saving: bool) -> object:
    """The --from-run run, checked against the one a resumed stream was made from (by content). The checkpoint is
    hashed only when a stream records it or was made from it: a whole-model checkpoint is gigabytes to read."""
    from memkit.train.runs import read_run

    run = read_run(settings["from_run"])
    settings["from_run"] = str(run.checkpoint.resolve())
    if resume is None and not saving:
        return run
    digest = _sha256(run.checkpoint)
    recorded = None if resume is None else resume.settings.get("from_run_sha256")
    if recorded and recorded != digest:
        raise ConfigError(f"--from-run {run.checkpoint} changed since the stream was saved (sha256 {recorded[:12]}... "
                          f"then, {digest[:12]}... now)")
    settings["from_run_sha256"] = digest
    return run


def _backbone_from_spec(settings: dict, spec: dict, source: str, hint: str = "") -> None:
    """The backbone memkit built for training (``model.backbone``), rebuilt: its family, checkpoint, size, config
    overrides (a pixel-space model's channels) and seed (of a random init, and of the config a Wan-format file is
    loaded into; ``--seed`` then seeds the sampling alone)."""
    from adapters.loading import BackboneSpec

    try:
        spec = BackboneSpec(**spec)
    except TypeError as e:  # a field this memkit does not know
        raise ConfigError(f"{source}: its backbone {spec} is not one this memkit can build ({e})") from None
    if spec.checkpoint is not None and not Path(spec.checkpoint).exists():
        raise ConfigError(f"{source} was trained on the backbone {spec.checkpoint}, which is not here{hint}")
    settings.update(backbone=spec.family, size=spec.size, backbone_seed=int(spec.seed),
                    checkpoint=None if spec.checkpoint is None else str(Path(spec.checkpoint).resolve()),
                    backbone_overrides=dict(spec.overrides or {}))


def memory_config(settings: dict, saved: dict | None = None, recorded: dict | None = None):
    """The memory config of a stream: the flags' fields from ``settings``; the rest (write granularity, place
    codes, horizon, ...) from the saved stream's record (``saved``), else from the memory config the weights or
    the run recorded (``recorded``), else the defaults. The backends and checks are this machine's (the
    defaults)."""
    import memkit
    from memkit.memory.weights import RUNTIME_FIELDS

    fields = set(memkit.MemoryConfig().to_dict())
    base = saved if saved is not None else recorded if recorded is not None else {}
    base = {k: v for k, v in base.items() if k in fields and k not in RUNTIME_FIELDS}
    flags = {field: settings[key] for key, field in WEIGHTS_SETTINGS.items()}
    return memkit.MemoryConfig.from_dict({**base, **flags})


def _check_weights_backbone(path, record: dict, model) -> None:
    """Memory weights that record the backbone they were trained on load only into that backbone."""
    from adapters.identity import backbone_identity

    if "backbone_class" not in record:  # a file that records no backbone: the layers' dims are checked on load
        return
    mine = backbone_identity(model)
    diffs = [f"{name}: weights {record[key]}, model {mine[field]}" for name, key, field in (
        ("backbone class", "backbone_class", "class"), ("backbone config hash", "backbone_config_hash", "config_hash"))
        if record.get(key) != mine[field]]
    if diffs:
        spec = record.get("backbone_spec")
        built = f"; it was trained on the backbone built from {spec}" if spec else ""
        raise ConfigError(f"--memory-weights {path} was trained on another backbone: {'; '.join(diffs)}{built} "
                          f"(give that backbone with --checkpoint / --size)")


def _given(args) -> dict:
    """The stream settings given on the command line, as they would be recorded (absolute paths, lists)."""
    given = {}
    for key, (flag, _) in {**FIXED, **FORKABLE}.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if key in MOVABLE:
            value = str(Path(value).resolve())
        elif key == "steps":
            value = [float(t) for t in value]
        elif key in ("shift", "context_noise"):
            value = float(value)
        given[key] = value
    return given


def _merge_with_saved(args, state, given: dict) -> dict:
    saved = state.settings
    if "chunk_frames" not in saved:
        raise StateFormatError(f"--resume {args.resume} records no stream settings (saved by an older memkit?); "
                               f"it cannot be continued from the command line")
    # A moved file is checked by content (the model's config, the weights' sha256), not by path.
    comparable = {key: value for key, value in given.items()
                  if key in saved and not (key in MOVABLE and saved[key] is not None)}
    fixed, forked = [], []
    for key, recorded, value in state.differences(comparable):
        (forked if key in FORKABLE else fixed).append(f"{key}: file {recorded}, flag {value}")
    if fixed or (forked and not args.fork):
        hint = ("; --seed, --steps, --shift and --context-noise may differ with --fork" if forked and not fixed else
                "; drop these flags (the file has the stream's own) or start a new stream")
        raise ConfigError(f"--resume {args.resume}: flags contradict the saved stream: "
                          + "; ".join(fixed + forked) + hint)
    if args.switch and not (args.prompt or args.prompt_embeds) and args.switch != saved.get("switches"):
        raise ConfigError(f"--switch {args.switch} without new prompts contradicts the saved stream's switches "
                          f"{saved.get('switches')}; give the prompts it switches between (--prompt or "
                          f"--prompt-embeds)")
    defaults = {k: d for k, (_, d) in {**FIXED, **FORKABLE}.items()}
    known = {k: saved[k] for k in (*FIXED, *FORKABLE, "backbone_seed", "backbone_overrides") if k in saved}
    settings = {**defaults, **known, **given}
    settings.setdefault("backbone_seed", settings["seed"])
    if "latent_size" in saved and settings["height"] is None:  # a stream saved from Python: its latent size
        settings["height"], settings["width"] = (s * _pixels_per_latent(settings) for s in saved["latent_size"])
    return settings


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_same_weights(resume, settings: dict) -> None:
    if resume is None:
        return
    recorded = resume.settings.get("memory_weights_sha256")
    if recorded and recorded != settings["memory_weights_sha256"]:
        raise ConfigError(f"--memory-weights {settings['memory_weights']} changed since the stream was saved "
                          f"(sha256 {recorded[:12]}... then, {settings['memory_weights_sha256'][:12]}... now)")


def _video_frames(latent_frames: int, pixels: bool) -> int:
    """Video frames of a stream of ``latent_frames`` frames: the VAE's, or the frames themselves in pixel space."""
    return latent_frames if pixels else decoded_frames(latent_frames)


def _stream_seconds(cursor: int, pixels: bool) -> float:
    return _video_frames(cursor, pixels) / VIDEO_FPS


def _duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps it readable: "42 s", "3.5 min", "2.1 h", "4.0 days", "31.7 years"."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} s"


def _chunks_to_generate(args, cursor: int, chunk_frames: int, decoder_fresh: bool, pixels: bool) -> int:
    """The fewest chunks that make --seconds of new video, or bring the stream to --total-seconds."""
    if args.total_seconds is not None:
        wanted = args.total_seconds * VIDEO_FPS - _video_frames(cursor, pixels)
    else:
        wanted = args.seconds * VIDEO_FPS
    wanted = math.ceil(round(wanted, 6))
    if wanted <= 0:
        return 0
    per_latent = _frames_per_latent(pixels)
    per_chunk = per_latent * chunk_frames
    extra = per_latent - 1 if decoder_fresh else 0
    return math.ceil((wanted + extra) / per_chunk)


# -- building: the backbone, the adapter and the generator ----------------------------------------------------------
def load_backbone(settings: dict, device: torch.device, decode: bool, text_encoder: str | None,
                  console: Console, vae_device: torch.device | None = None) -> Backbone:
    """The transformer (and a VAE, on ``vae_device`` or ``device``, and text encoder when the checkpoint folder has
    them)."""
    from adapters.loading import BackboneSpec
    from adapters.loading import load_backbone as build
    from memkit.rollout.vae import tiny_wan_vae

    dtype = DTYPES[settings["dtype"]]
    spec = BackboneSpec(family=settings["backbone"], checkpoint=settings["checkpoint"], size=settings["size"],
                        seed=settings["backbone_seed"], dtype=settings["dtype"],
                        overrides=dict(settings.get("backbone_overrides") or {}))
    loaded = build(spec, device=device)
    model = loaded.model
    vae_device = vae_device or device
    vae_path = Path(settings["vae"]) if settings["vae"] else None
    if pixel_space(settings):  # its frames are the video: nothing to decode
        what = (f"the pixel-space {spec.family} backbone (size {spec.size!r}, {spec.overrides}) "
                f"{'of ' + str(spec.checkpoint) if spec.checkpoint else f'with seed {spec.seed}'}")
        return Backbone(model, None, Path(text_encoder) if text_encoder else None, what, spec.checkpoint is None)
    if spec.checkpoint is None:
        vae = None if not decode else _load_vae(vae_path, dtype, vae_device) if vae_path else \
            tiny_wan_vae(z_dim=model.config.in_channels, dtype=dtype).to(vae_device)
        what = (f"a randomly initialised {spec.family} backbone (size {spec.size!r}, seed {spec.seed}; random "
                f"weights: the video is noise-like; pass --checkpoint for a real model)")
        return Backbone(model, vae, Path(text_encoder) if text_encoder else None, what, True)
    encoder = None
    if loaded.report is not None:  # an original Wan-format file (or a folder of shards) into a model of --size
        console.print(str(loaded.report))
    else:
        ckpt = Path(spec.checkpoint)
        root = ckpt if (ckpt / "transformer").is_dir() else ckpt.parent
        vae_path = vae_path or (root / "vae" if (root / "vae").is_dir() else None)
        encoder = root / "text_encoder" if (root / "text_encoder").is_dir() else None
    vae = None if not decode or vae_path is None else _load_vae(vae_path, dtype, vae_device)
    return Backbone(model, vae, Path(text_encoder) if text_encoder else encoder, loaded.description, False)


def _load_vae(path: Path, dtype, device):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device).eval()


def load_prompts(args, backbone: Backbone, seed: int, console: Console) -> dict[str, torch.Tensor]:
    from memkit.rollout.prompts import encode_prompts, load_prompt_embeds, random_prompt_embeds

    if args.prompt_embeds:
        return load_prompt_embeds(args.prompt_embeds)
    if args.prompt:
        if backbone.text_encoder is None:
            raise ConfigError("--prompt needs a text encoder: pass --text-encoder PATH (a local UMT5 folder), "
                              "or precomputed embeddings with --prompt-embeds")
        param = next(backbone.model.parameters())
        # --low-vram: the encoder in the model's dtype (UMT5-XXL: 11 GB in bf16, 23 GB in float32); its embeddings
        # then differ slightly from float32 ones. It runs once and its memory goes back before the stream starts.
        dtype = param.dtype if args.low_vram else torch.float32
        embeds = encode_prompts(args.prompt, backbone.text_encoder, device=str(param.device), dtype=dtype)
        if param.device.type == "cuda":
            torch.cuda.empty_cache()
        return {f"{i}: {text[:40]}": e[None] for i, (text, e) in enumerate(zip(args.prompt, embeds))}
    if not backbone.random:
        raise ConfigError("a real checkpoint needs prompts: --prompt-embeds FILE or --prompt TEXT")
    n = len(args.switch) + 1
    console.print(f"no prompts given: using {n} random prompt embedding(s)")
    return random_prompt_embeds(n, 16, backbone.model.config.text_dim, seed=seed)


def run_generate(args, console: Console) -> int:
    import adapters
    import memkit
    from memkit.rollout import FlowSchedule, PromptSchedule, StreamingGenerator
    from memkit.rollout.generator import PeakMemory
    from memkit.rollout.video import VideoWriter

    plan = plan_generate(args)
    s = plan.settings
    backbone = load_backbone(s, plan.device, decode=not args.no_decode, text_encoder=args.text_encoder,
                             console=console, vae_device=torch.device("cpu") if args.low_vram else None)
    console.print(f"backbone: {backbone.description}")
    model = backbone.model
    s["height"] = s["height"] or backbone.default_size[0]
    s["width"] = s["width"] or backbone.default_size[1]
    if plan.weights is not None:
        _check_weights_backbone(s["memory_weights"], plan.weights["record"], model)
    recorded = plan.weights["config"] if plan.weights is not None else \
        plan.run.setup["memory"] if plan.run is not None else None
    cfg = memory_config(s, None if plan.resume is None else plan.resume.settings, recorded)
    scale = _pixels_per_latent(s)
    handle = adapters.inject(model, cfg, chunk_frames=s["chunk_frames"],
                             latent_size=(s["height"] // scale, s["width"] // scale))
    if s["memory_weights"]:
        memkit.load_memory(model, s["memory_weights"])
    if plan.run is not None:
        plan.run.load_into(model)
        console.print(f"trained weights: {plan.run.checkpoint} (step {plan.run.step}, trainable: "
                      f"{plan.run.setup['trainable']})")
    new_prompts = bool(args.prompt or args.prompt_embeds or not plan.resume)
    peaks = PeakMemory(plan.device)
    with peaks.measure("text encoder"):
        schedule = PromptSchedule(load_prompts(args, backbone, s["seed"], console), args.switch) \
            if new_prompts else None
    steps = FlowSchedule(tuple(s["steps"]), s["shift"])
    if plan.resume is not None:
        _check_backbone(plan.resume, handle, args.resume)
        gen = StreamingGenerator.from_state(handle, plan.resume.to(plan.device), schedule, switches=(),
                                            seed=s["seed"], vae=backbone.vae, schedule=steps,
                                            context_noise=s["context_noise"], progress=not args.quiet,
                                            vae_offload=args.low_vram, track_peak_memory=True)
        verb = "forking" if plan.fork else "resuming"
        console.print(f"{verb} after chunk {gen.chunks_done} ({gen.cursor} latent frames, "
                      f"{_stream_seconds(gen.cursor, plan.pixel_space):.2f} s) of {args.resume}")
        decoder_fresh = backbone.vae is not None and "decoder" not in plan.resume.info  # decoding restarts
    else:
        gen = StreamingGenerator(handle, schedule, schedule=steps, context_noise=s["context_noise"], seed=s["seed"],
                                 vae=backbone.vae, progress=not args.quiet, vae_offload=args.low_vram,
                                 track_peak_memory=True)
        decoder_fresh = False  # fresh only at cursor 0: after a prefix the decoder goes on from it
    prefix = load_prefix(args.prefix, backbone.vae, handle, console, plan.pixel_space) if args.prefix else None
    cursor = gen.cursor + (0 if prefix is None else prefix.shape[2])
    num_chunks = _chunks_to_generate(args, cursor, s["chunk_frames"], decoder_fresh=cursor == 0 or decoder_fresh,
                                     pixels=plan.pixel_space)
    if num_chunks == 0:
        raise ConfigError(f"--total-seconds {args.total_seconds:g}: the prefix is already "
                          f"{_stream_seconds(cursor, plan.pixel_space):.2f} s long; nothing to generate (nothing was "
                          f"written)")
    gen.prompts.check_range(gen.chunks_done + num_chunks)
    console.print(
        f"memory {s['memory']} (sink {s['sink_frames']} + window {s['window_frames']} frames), {num_chunks} chunks "
        f"of {s['chunk_frames']} latent frames at {s['height']}x{s['width']}, seed {s['seed']}, prompts: "
        f"{gen.prompts if new_prompts else 'as saved'}"
    )
    long_run = num_chunks >= LONG_RUN_CHUNKS
    if long_run:
        frames = num_chunks * s["chunk_frames"] * _frames_per_latent(plan.pixel_space)
        console.print(f"a long run: {num_chunks:,} chunks make about {frames:,} frames, "
                      f"{_duration(frames / VIDEO_FPS)} of video; the time it takes follows its first chunks")
    writes = backbone.vae is not None or (plan.pixel_space and not args.no_decode)
    writer = VideoWriter(plan.outputs["--out"], fps=VIDEO_FPS, crf=args.crf) if writes else None

    def frames_of(video, latents):  # a pixel-space model's frames are its output
        return video if video is not None else latents.float().clamp(-1, 1)

    kept = []
    try:
        if prefix is not None:
            video = gen.prefill(prefix)
            if writer is not None:
                writer.write(frames_of(video, prefix))
        started = None
        for done, chunk in enumerate(gen.stream(num_chunks), 1):
            if writer is not None:
                writer.write(frames_of(chunk.video, chunk.latents))
            if args.save_latents:
                kept.append(chunk.latents.cpu())
            if long_run and done == 1:  # the first chunk includes warm-up: time the ones after it
                started = time.perf_counter()
            elif long_run and done == 3:
                per_chunk = (time.perf_counter() - started) / 2
                console.print(f"about {per_chunk:.2f} s per chunk: {num_chunks:,} chunks take about "
                              f"{_duration(per_chunk * num_chunks)} here (Ctrl-C stops; nothing is written then)")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    _write_outputs(args, plan, gen, writer, kept, console)
    peaks.peaks.update(gen.peak_memory.peaks)
    if peaks.peaks:
        console.print(f"peak GPU memory: {peaks.describe()}")
    return 0


def _check_backbone(state, handle, path) -> None:
    """The model must be the one the stream was made on (its class and config; weights are the recipe's)."""
    saved, mine = state.settings, handle.describe()
    diffs = [f"{key}: file {saved[key]}, model {mine[key]}" for key in ("backbone", "backbone_class",
                                                                         "backbone_config_hash")
             if key in saved and saved[key] != mine[key]]
    if diffs:
        raise ConfigError(f"--resume {path} was made on another backbone: " + "; ".join(diffs))


def _write_outputs(args, plan: Plan, gen, writer, kept: list, console: Console) -> None:
    from memkit.state.io import write_safetensors

    if writer is not None:
        writer.close()
        console.print(f"wrote {writer.frames_written} frames ({writer.frames_written / VIDEO_FPS:.2f} s at "
                      f"{VIDEO_FPS} fps) to {writer.path}")
    else:
        if plan.pixel_space:
            console.print(f"--no-decode: no mp4 written{'; the frames are saved' if args.save_latents else ''}")
        else:
            frames = decoded_frames(sum(k.shape[2] for k in kept))
            console.print(f"no VAE: decoded nothing{f' ({frames} frames would be made)' if frames else ''}; "
                          f"{'the latents are saved' if args.save_latents else 'use --save-latents to keep them'}")
    if args.save_latents:
        write_safetensors(plan.outputs["--save-latents"], {"latents": torch.cat(kept, dim=2)}, {})
        console.print(f"latents saved to {plan.outputs['--save-latents']}")
    if args.save_state:
        state = gen.state  # built once: it copies the decoder cache
        recipe = {key: plan.settings.get(key) for key in RECIPE}
        state = state.replace(info={**state.info, "recipe": recipe})
        state.save(plan.outputs["--save-state"])
        console.print(f"stream state ({state.nbytes / 2**20:.1f} MiB) saved to {plan.outputs['--save-state']}; "
                      f"continue with: memkit generate --resume {plan.outputs['--save-state']}")


def load_prefix(path: str, vae, handle, console: Console, pixels: bool = False) -> torch.Tensor:
    """Clean latents to commit before generating: a .safetensors of latents, or an image / video to encode (for a
    pixel-space model, its frames resized to the model's frame size)."""
    from memkit.rollout.vae import encode_video
    from memkit.rollout.video import read_image, read_video
    from memkit.state.io import read_safetensors

    p = Path(path)
    if p.suffix == ".safetensors":
        tensors, _ = read_safetensors(p, "--prefix latents")
        if "latents" not in tensors:
            raise ConfigError(f"--prefix {p} has no 'latents' tensor (it holds {sorted(tensors)})")
        latents = tensors["latents"]
    else:
        if vae is None and not pixels:
            raise ConfigError("an image or video --prefix must be encoded: it needs a VAE (drop --no-decode)")
        frames = read_image(p) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else read_video(p)[0]
        if pixels:
            x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
            if tuple(x.shape[-2:]) != tuple(handle.latent_size):
                x = torch.nn.functional.interpolate(x, size=tuple(handle.latent_size), mode="bilinear",
                                                    align_corners=False, antialias=True)
            latents = x.clamp(-1, 1).permute(1, 0, 2, 3)[None]
        else:
            latents = encode_video(vae, frames, size=(handle.latent_size[0] * PIXELS_PER_LATENT,
                                                      handle.latent_size[1] * PIXELS_PER_LATENT))
    console.print(f"prefix: {latents.shape[2]} {'frames' if pixels else 'latent frames'} from {p}")
    return latents


__all__ = ["add_generate_parser", "plan_generate", "run_generate", "load_prefix", "VIDEO_FPS"]
