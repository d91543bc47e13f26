"""Output files that are checked before any work and never half-written: every command validates the paths it
will write up front, and writes each one through a temporary file that is renamed into place when complete."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from memkit.errors import ConfigError


def check_output(path: str | os.PathLike, flag: str, *, overwrite: bool = False) -> Path:
    """Raise a ConfigError naming ``flag`` unless ``path`` can be written as a new file (or replaced, with
    ``overwrite``): not a folder, no file where a parent folder must go, and a file can be created there. The check
    creates the file (and the folders it needs) and removes them again: permission bits say nothing to root or on a
    read-only file system."""
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
    _try_creating(path, flag)
    return path


def _try_creating(path: Path, flag: str) -> None:
    """Create ``path``'s missing folders and a file where it goes (``path`` itself when new, else a temporary file
    beside it, as the writer will), then remove what was made."""
    made: list[Path] = []
    try:
        for folder in reversed([p for p in path.parents if not p.exists()]):
            if not folder.exists():  # "a/.." exists once "a" is made
                folder.mkdir()
                made.append(folder)
        probe = path if not path.exists() else path.with_name(f".{path.name}.{secrets.token_hex(4)}.probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise ConfigError(f"{flag} {path} cannot be created: {reason}") from None
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:  # something else wrote there meanwhile: leave it
                pass


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
    a rename within one folder is atomic. It is made with the mode a new file gets under the process's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished temporary file ``tmp`` onto ``path``, with the mode a new file gets under the umask
    (writers that replace the temporary file, as safetensors does, would leave theirs, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on failure it is deleted
    and ``path`` is left as it was."""
    tmp = temporary_beside(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["check_output", "check_outputs", "check_output_folder", "temporary_beside", "publish", "atomic_output"]
