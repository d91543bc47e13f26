"""``LatentShards``: precomputed latents (``memkit encode``), one safetensors file per video, read lazily."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from memkit.errors import DataError

from .sources import ClipSource, check_index, check_size, check_window, list_files

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class LatentShards(ClipSource):
    """The ``*.safetensors`` files under ``root`` (recursive, sorted by path), one video each.

    Each file holds ``"latents"`` (C, F, H, W) or (1, C, F, H, W), and optionally ``"prompt_embeds"`` (L, D) or
    (1, L, D). Only the header is parsed to count frames; :meth:`read` loads only the frames asked for.
    safetensors holds raw tensors, so nothing is ever unpickled.
    """

    modality = "latents"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.files = list_files(self.root, (".safetensors",))
        self._shapes: dict[int, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[check_index(self, index)])

    def num_frames(self, index: int) -> int:
        return self._latent_shape(index)[-3]

    def channels(self, index: int) -> int:
        """Latent channels of item ``index`` (from the header)."""
        return self._latent_shape(index)[-4]

    def read(self, index: int, start: int, frames: int, size: tuple[int, int]) -> dict:
        shape = self._latent_shape(index)
        path = self.files[index]
        height, width = check_size(size)
        if tuple(shape[-2:]) != (height, width):
            raise DataError(f"{path}: latents are {shape[-2]}x{shape[-1]} but {height}x{width} latents are needed")
        check_window(str(path), start, frames, shape[-3])
        prompt = None
        with _open(path) as f:
            try:
                latents = f.get_slice("latents")
                clip = latents[:, :, start : start + frames] if len(shape) == 5 else latents[:, start : start + frames]
                if "prompt_embeds" in f.keys():
                    prompt = f.get_tensor("prompt_embeds")
            except Exception as exc:  # safetensors raises its own error type and several built-ins for bad data
                raise DataError(f"{path} is not a readable latent shard: {exc}") from None
        item = {"latents": clip.reshape(shape[-4], frames, height, width).float()}
        if prompt is not None:
            item["prompt_embeds"] = _prompt_embeds(prompt, path)
        return item

    def _latent_shape(self, index: int) -> tuple[int, ...]:
        check_index(self, index)
        if index not in self._shapes:
            self._shapes[index] = _read_latent_shape(self.files[index])
        return self._shapes[index]


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError for a bad header, OSError for an unreadable file
        raise DataError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _read_latent_shape(path: Path) -> tuple[int, ...]:
    with _open(path) as f:
        if "latents" not in f.keys():
            raise DataError(f"{path} holds no 'latents' tensor (it has {sorted(f.keys())})")
        latents = f.get_slice("latents")
        shape, dtype = tuple(latents.get_shape()), latents.get_dtype()
    if not (len(shape) == 4 or (len(shape) == 5 and shape[0] == 1)):
        raise DataError(f"{path}: latents have shape {shape}; expected (C, F, H, W) or (1, C, F, H, W)")
    if dtype not in _FLOAT_DTYPES:
        raise DataError(f"{path}: latents are {dtype}; floating-point latents are expected")
    if 0 in shape:
        raise DataError(f"{path}: latents are empty (shape {shape})")
    return shape


def _prompt_embeds(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2 or 0 in tensor.shape or not tensor.is_floating_point():
        raise DataError(f"{path}: prompt_embeds are {tensor.dtype} {tuple(tensor.shape)}; expected float (L, D) or "
                        f"(1, L, D)")
    return tensor.float()
