"""Output files that are checked before any work and never half-written: every command validates the paths it
will write up front, and writes each one through a temporary file that is renamed into place when complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from memkit.errors import ConfigError


def check_output(path: str | os.PathLike, flag: str, *, overwrite: bool = False) -> Path:
    """Raise a ConfigError naming ``flag`` unless ``path`` can be written as a new file (or replaced, with
    ``overwrite``): not a folder, no file where a parent folder must go, and a writable folder to land in."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} {path} exists; pass --overwrite to replace it")
    parent = path.parent
    while not parent.exists():  # the folders that writing will create
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so the folder for it cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder {parent} is not writable")
    return path


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], *, overwrite: bool = False) -> dict[str, Path]:
    """:func:`check_output` for each ``flag -> path`` given (None: not written), and no two flags on one file."""
    checked = {flag: check_output(path, flag, overwrite=overwrite) for flag, path in outputs.items() if path}
    seen: dict[Path, str] = {}
    for flag, path in checked.items():
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"{seen[key]} and {flag} name the same file {path}; give each its own")
        seen[key] = flag
    return checked


def check_output_folder(path: str | os.PathLike, flag: str, names: list[str], *, overwrite: bool = False) -> Path:
    """A folder that will receive the files ``names``: not a file, and none of them there unless ``overwrite``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; give a folder")
    for name in names:
        check_output(folder / name, flag, overwrite=overwrite)
    return folder


def temporary_beside(path: str | os.PathLike) -> Path:
    """A new, empty, hidden file in ``path``'s folder (made if missing), to be renamed onto ``path`` when complete:
    a rename within one folder is atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on failure it is deleted
    and ``path`` is left as it was."""
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["check_output", "check_outputs", "check_output_folder", "temporary_beside", "atomic_output"]
