"""The on-disk format of states and memory weights: safetensors plus memkit metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memkit.errors import StateFormatError
from memkit.outputs import atomic_output

SCHEMA_VERSION = 1
SCHEMA_KEY = "memkit_schema"


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write tensors and JSON-able ``meta`` atomically (a crash leaves the old file intact)."""
    header = {SCHEMA_KEY: str(SCHEMA_VERSION), "meta": json.dumps(meta, sort_keys=True)}
    write_safetensors(path, tensors, header)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    """Any safetensors file, written atomically: a hidden temporary file in the same folder, then a rename."""
    # safetensors refuses views that share storage; each saved tensor gets its own.
    flat = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(flat, str(tmp), metadata=header)


def looks_like_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte little-endian header length that fits the file,
    then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def read_safetensors(path: str | os.PathLike, what: str,
                     tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (none unless ``tensors``) and header metadata of any safetensors file; an unreadable one is a
    StateFormatError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            found = {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StateFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return found, header


def read(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write`; every way it can be wrong is a StateFormatError."""
    tensors, header = read_safetensors(path, what)
    return tensors, _meta(path, header, what)


def read_meta(path: str | os.PathLike, what: str) -> dict:
    """The metadata of a file written by :func:`write`, without reading its tensors (checked as :func:`read`
    checks it)."""
    _, header = read_safetensors(path, what, tensors=False)
    return _meta(path, header, what)


def _meta(path, header: dict[str, str], what: str) -> dict:
    if SCHEMA_KEY not in header:
        raise StateFormatError(f"{path} is a safetensors file but not a memkit {what} (no {SCHEMA_KEY!r} metadata)")
    version = header[SCHEMA_KEY]
    if version != str(SCHEMA_VERSION):
        raise StateFormatError(
            f"{path} has memkit schema version {version}; this memkit reads version {SCHEMA_VERSION}"
        )
    try:
        return json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"{path}: memkit metadata is missing or corrupt ({exc})") from None
