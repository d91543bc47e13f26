"""``memkit train``: Lightning's CLI over :class:`MemoryFinetune` and :class:`ClipDataModule`.

    memkit train --config examples/configs/tiny_cpu.yaml [--trainer.max_steps 50] [--resume ckpt] [--export f]

Every init argument of the module (``--model.*``), the data module (``--data.*``) and the Trainer
(``--trainer.*``) is a flag or a YAML key. At the end the memory weights are exported with
``memkit.save_memory`` (default: ``memory.safetensors`` in the run's log folder).
"""

from __future__ import annotations

import logging
import warnings
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
    resume = config.get("resume")
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"no checkpoint at {resume} (--resume)")
    export = Path(config.get("export") or Path(cli.trainer.log_dir or ".") / "memory.safetensors")
    check_output(export, "--export", overwrite=bool(config.get("overwrite")))
    for flag, default in (("gradient_clip_val", None), ("accumulate_grad_batches", 1)):
        value = getattr(cli.trainer, flag)
        if value != default:
            raise ConfigError(f"trainer.{flag}={value}: memkit trains with manual optimisation, set model.{flag} "
                              f"instead")
    exporter = ExportMemoryWeights(str(export), overwrite=bool(config.get("overwrite")))
    cli.trainer.callbacks.append(exporter)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume, weights_only=True)
    except MisconfigurationException as exc:  # e.g. trainer.gradient_clip_val: the module clips (model.*)
        raise ConfigError(_one_line(exc)) from None
    if cli.trainer.is_global_zero:
        for kind, path in exporter.written.items():
            print(f"{'LoRA' if kind == 'lora' else 'memory'} weights written to {path}")
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 600 else text[:600] + " ..."


__all__ = ["run_train"]
