"""``memkit train``: Lightning's CLI over :class:`MemoryFinetune` and :class:`ClipDataModule`.

    memkit train --config examples/configs/tiny_cpu.yaml [--trainer.max_steps 50] [--resume ckpt] [--export f]
    memkit train --config examples/configs/tiny_cpu.yaml --resume ckpt --export-only [--export f]

Every init argument of the module (``--model.*``), the data module (``--data.*``) and the Trainer
(``--trainer.*``) is a flag or a YAML key. At the end the memory weights are exported with
``memkit.save_memory`` (default: ``memory.safetensors`` in the run's log folder). ``--export-only`` trains
nothing: it writes the weights of the ``--resume`` checkpoint (default: ``<checkpoint>.memory.safetensors``
beside it), as does a ``--resume`` from a run that had already reached ``max_steps``.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path

from memkit.errors import ConfigError

log = logging.getLogger("memkit.train")

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs",
                                                                                   "name": "memkit"}},
    "log_every_n_steps": 1,
}


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class MemkitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--resume", default=None, help="a Lightning checkpoint of this setup to continue from")
            parser.add_argument("--export", default=None,
                                help="file for the trained memory weights (default: <log dir>/memory.safetensors)")
            parser.add_argument("--overwrite", action="store_true", help="replace an existing --export file")
            parser.add_argument("--export-only", action="store_true",
                                help="train nothing: write the weights of the --resume checkpoint (default file: "
                                     "<checkpoint>.memory.safetensors beside it)")

    return MemkitCLI


def run_train(argv: list[str]) -> int:
    """Parse, build, train, export. Errors surface as exceptions (the ``memkit`` entry point prints one line)."""
    from jsonargparse import ArgumentError

    from memkit.data.datamodule import ClipDataModule
    from memkit.outputs import check_output

    from .callbacks import ExportMemoryWeights
    from .module import MemoryFinetune

    try:
        with warnings.catch_warnings():  # `memkit train` hands Lightning its own arguments, on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _cli_class()(MemoryFinetune, ClipDataModule, run=False, args=argv,
                               trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
                               parser_kwargs={"exit_on_error": False, "prog": "memkit train"})
    except ArgumentError as exc:
        raise ConfigError(_one_line(exc)) from None
    config = cli.config
    resume, export_only = config.get("resume"), bool(config.get("export_only"))
    if resume is not None:
        check_checkpoint_file(resume)
    elif export_only:
        raise ConfigError("--export-only writes the weights of a checkpoint: give it with --resume CKPT")
    default = (Path(resume).with_suffix(".memory.safetensors") if export_only
               else Path(cli.trainer.log_dir or ".") / "memory.safetensors")
    export = Path(config.get("export") or default)
    check_output(export, "--export", overwrite=bool(config.get("overwrite")))
    exporter = ExportMemoryWeights(str(export), overwrite=bool(config.get("overwrite")))
    if export_only:
        step = load_checkpoint(cli.model, resume)
        exporter.export(cli.model, step)
        _say_written(exporter)
        return 0
    for flag, default in (("gradient_clip_val", None), ("accumulate_grad_batches", 1)):
        value = getattr(cli.trainer, flag)
        if value != default:
            raise ConfigError(f"trainer.{flag}={value}: memkit trains with manual optimisation, set model.{flag} "
                              f"instead")
    cli.trainer.callbacks.append(exporter)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    run_dir = Path(cli.trainer.log_dir) if cli.trainer.log_dir else None
    new_folders = [] if run_dir is None else [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume, weights_only=True)
    except MisconfigurationException as exc:  # e.g. trainer.gradient_clip_val: the module clips (model.*)
        _remove_unused_run_folder(new_folders)
        raise ConfigError(_one_line(exc)) from None
    except BaseException:
        _remove_unused_run_folder(new_folders)
        raise
    if cli.trainer.is_global_zero:
        if not exporter.written and cli.trainer.state.finished:  # the checkpoint had reached max_steps: no loop ran
            print(f"{resume} had already reached max_steps={cli.trainer.max_steps}; nothing to train")
            exporter.export(cli.model, cli.trainer.global_step)
        _say_written(exporter)
    return 0


#: What the logger and LightningCLI write into a run's folder before any step: a folder holding nothing else kept
#: no work of the run.
_STARTUP_FILES = {"config.yaml", "hparams.yaml"}


def _remove_unused_run_folder(new_folders: list[Path]) -> None:
    """After a failed run, remove the run folder this run made (``new_folders``: it and the parents it created,
    innermost first) when it holds nothing but the startup files: no checkpoint, no logged step."""
    if not new_folders or not new_folders[0].is_dir():
        return
    run_dir = new_folders[0]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    if not all(p.parent == run_dir and (p.name in _STARTUP_FILES or _no_rows(p)) for p in files):
        return
    for p in files:
        p.unlink()
    for folder in (*sorted((p for p in run_dir.rglob("*") if p.is_dir()), reverse=True), *new_folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's folder), or gone
            break


def _no_rows(path: Path) -> bool:
    """A metrics file with a header at most: no step was logged."""
    return path.name == "metrics.csv" and len(path.read_text(errors="replace").strip().splitlines()) <= 1


def _say_written(exporter) -> None:
    for kind, path in exporter.written.items():
        print(f"{'LoRA' if kind == 'lora' else 'memory'} weights written to {path}")


def check_checkpoint_file(path, flag: str = "--resume") -> None:
    """A ``--resume`` (``flag``) file must be a checkpoint (torch's zip archive), not memory weights or a stream
    state."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} ({flag})")
    if zipfile.is_zipfile(path):
        return
    from memkit.state.io import looks_like_safetensors

    what = ": it is a safetensors file (memory weights, or a stream state?)" if looks_like_safetensors(path) else ""
    folder = ", or its run folder" if flag == "--from-run" else ""
    raise ConfigError(f"{flag} {path} is not a Lightning checkpoint{what}; {flag} takes a .ckpt that memkit "
                      f"train wrote{folder} (memory weights go to memkit generate --memory-weights)")


def load_checkpoint(module, path) -> int:
    """Load the trained tensors of checkpoint ``path`` into ``module`` (a MemoryFinetune), checked as a resume
    checks them; returns the checkpoint's step."""
    ckpt = read_checkpoint(path)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    return int(ckpt.get("global_step", 0))


def read_checkpoint(path, flag: str = "--resume") -> dict:
    """A Lightning checkpoint's contents, loaded safely (``weights_only=True``); an unreadable file, or one with no
    ``state_dict``, is a one-line error naming ``flag``."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged archive, or one holding objects a safe load refuses
        raise ConfigError(f"{flag} {path} cannot be read as a checkpoint: {_one_line(exc)[:200]}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{flag} {path} holds no state_dict: not a Lightning checkpoint")
    return ckpt


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 600 else text[:600] + " ..."


__all__ = ["run_train"]
