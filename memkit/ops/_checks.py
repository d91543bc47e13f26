"""Input checks shared by the ops and the memories."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memkit.errors import DeviceError, DTypeError, NonFiniteError, ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the dtypes memkit's commands and configs take, by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` now, or None when it is off (or the device has no autocast,
    as the meta device)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ShapeError(f"{name} must be {layout} ({rank}-D), got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None], layout: str) -> None:
    check_rank(name, t, len(expected), layout)
    for got, want in zip(t.shape, expected):
        if want is not None and got != want:
            want_txt = tuple("*" if w is None else w for w in expected)
            raise ShapeError(f"{name} must be {layout} = {want_txt}, got {tuple(t.shape)}")


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    dtype = items[0][1].dtype
    if dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{items[0][0]} has dtype {dtype}; memkit needs a floating dtype")
    for name, t in items[1:]:
        if t.dtype != dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but {items[0][0]} has {dtype}; they must match")
    return dtype


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise DeviceError(f"{name} is on {t.device} but {items[0][0]} is on {device}; move them to one device")
    return device


def check_finite(**tensors: torch.Tensor) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None and t.is_floating_point()]
    if not items:
        return
    flags = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()  # one device sync for all
    for (name, _), ok in zip(items, flags):
        if not ok:
            raise NonFiniteError(f"{name} contains NaN or Inf")
