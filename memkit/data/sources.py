"""The interface every training data source implements, and helpers the built-in sources share."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from memkit.errors import ConfigError, DataError


class ClipSource(ABC):
    """Random access to a collection of videos for training. Map-style; cheap to construct (no decoding).

    ``modality`` says what :meth:`read` returns: ``"video"`` is RGB float32 in [-1, 1] shaped (3, F, H, W),
    ``"latents"`` is float32 (C, F, H, W). Sources must be picklable (data loader workers get a copy).
    """

    modality: ClassVar[str]

    @abstractmethod
    def __len__(self) -> int:
        """How many videos the source holds."""

    @abstractmethod
    def describe(self, index: int) -> str:
        """What item ``index`` is, for messages: a file path, or e.g. ``"procedural video #3 (seed 0)"``."""

    @abstractmethod
    def num_frames(self, index: int) -> int:
        """Frames of item ``index`` (cheap: headers). Raises DataError naming the file if it is unreadable."""

    @abstractmethod
    def read(self, index: int, start: int, frames: int, size: tuple[int, int]) -> dict:
        """Frames ``[start, start + frames)`` of item ``index`` at spatial size ``size`` = (height, width).

        Returns ``{"video": tensor}`` or ``{"latents": tensor}`` (per :attr:`modality`), optionally also
        ``"prompt_embeds"`` (float32 (L, D)) or ``"prompt_id"`` (int). Raises DataError naming the item on any problem.
        """


class RenderedSource(ClipSource):
    """A source of ``count`` videos of ``frames`` frames each, rendered from ``seed`` (no files). Subclasses name
    their items with :attr:`label` and implement :meth:`read`."""

    modality = "video"
    label: ClassVar[str]

    def __init__(self, count: int, frames: int, seed: int):
        self.count = check_positive_int("count", count)
        self.frames = check_positive_int("frames", frames)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def describe(self, index: int) -> str:
        return f"{self.label} #{index} (seed {self.seed})"

    def num_frames(self, index: int) -> int:
        check_index(self, index)
        return self.frames


def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (seed, index, epoch, a label): the same in every process and platform."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_index(source: ClipSource, index: int) -> int:
    """``index`` as an int in range, or an IndexError (what map-style datasets raise)."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not 0 <= index < len(source):
        raise IndexError(f"index {index} is out of range for a source of {len(source)} videos")
    return index


def check_window(where: str, start: int, frames: int, available: int) -> None:
    """A DataError unless frames ``[start, start + frames)`` lie within the ``available`` ones."""
    if start < 0 or frames < 1 or start + frames > available:
        raise DataError(f"{where}: frames [{start}, {start + frames}) asked for, but it has {available} frames")


def check_size(size) -> tuple[int, int]:
    """``size`` as a (height, width) pair of positive ints, or a ConfigError."""
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ConfigError(f"size must be (height, width), two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def normalize_extensions(extensions) -> tuple[str, ...]:
    """Extensions as lower-case ``.ext`` strings; a single string is one extension."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        items = tuple(extensions)
    except TypeError:
        raise ConfigError(f"extensions must be a list of file suffixes, got {extensions!r}") from None
    if not items or not all(isinstance(e, str) and e.strip(".") for e in items):
        raise ConfigError(f"extensions must be a non-empty list of file suffixes like '.mp4', got {extensions!r}")
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in items)


def list_files(root: str | os.PathLike, extensions: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` (recursive) whose suffix is one of ``extensions``, sorted by relative path.

    Hidden files and folders (a leading dot: macOS ``._`` forks, half-written temp files, ``.git``) are left out.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no folder at {root}")
    if not root.is_dir():
        raise ConfigError(f"{root} is a file; a folder of files is expected")
    files = [
        path for path in root.rglob("*")
        if path.suffix.lower() in extensions and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    if not files:
        raise DataError(f"{root} holds no {', '.join(extensions)} files")
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())
