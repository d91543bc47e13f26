"""Prompt embeddings: a safetensors file of named embeddings, a local T5/UMT5 encoder, or random ones.

Every embedding is (1, L, text_dim), the layout the Wan transformer takes as ``encoder_hidden_states``.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import torch

from memkit._dist import install_hint
from memkit.errors import ConfigError, DTypeError, NonFiniteError, ShapeError, StateFormatError

PROMPTS_KIND = "prompt_embeds"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def load_prompt_embeds(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Named prompt embeddings from a safetensors file, each (1, L, text_dim), in the file's saved order.

    Tensors may be stored as (L, text_dim) or (1, L, text_dim). Files written by :func:`save_prompt_embeds` keep the
    order they were saved in; other safetensors files come back sorted by name.
    """
    from memkit.state import io

    path = Path(path)
    tensors, header = io.read_safetensors(path, "prompt embeddings")
    if not tensors:
        raise StateFormatError(f"{path} holds no prompt embeddings")
    order = _saved_order(header, path)
    if order is None:
        order = sorted(tensors)
    elif sorted(order) != sorted(tensors):
        raise StateFormatError(f"{path}: the saved prompt order {order} does not match its tensors {sorted(tensors)}")
    return _checked_embeds({name: tensors[name] for name in order}, str(path))


def save_prompt_embeds(path: str | os.PathLike, embeds: dict[str, torch.Tensor]) -> None:
    """Write named prompt embeddings ((L, text_dim) or (1, L, text_dim) each) to a safetensors file, keeping order."""
    from memkit.state import io

    if not isinstance(embeds, dict) or not embeds:
        raise ConfigError("embeds must be a non-empty dict of prompt name -> tensor")
    for name in embeds:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"prompt names must be non-empty strings, got {name!r}")
    checked = _checked_embeds(embeds, "embeds")
    io.write(path, checked, {"kind": PROMPTS_KIND, "order": list(checked)})


def random_prompt_embeds(n: int, length: int, text_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` standard-normal embeddings (1, length, text_dim), named ``prompt_0`` ... , the same for the same seed."""
    for label, value in (("n", n), ("length", length), ("text_dim", text_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    return {f"prompt_{i}": torch.randn(1, length, text_dim, generator=generator) for i in range(n)}


def encode_prompts(
    texts: str | list[str],
    text_encoder: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_length: int = 512,
) -> torch.Tensor:
    """Embed prompts with a local T5 / UMT5 encoder as diffusers' Wan pipeline does: (len(texts), max_length, dim).

    Each prompt is cleaned like the pipeline cleans it, padded to ``max_length`` (longer ones are truncated), encoded
    with its attention mask, and every position past its real tokens is set to zero.

    text_encoder: a folder holding the encoder (``config.json`` + weights) or a folder with a ``text_encoder``
        subfolder (a diffusers Wan checkpoint). The tokenizer is looked for in that folder, then in a ``tokenizer``
        folder beside it, then in a ``tokenizer`` subfolder. Nothing is downloaded.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must be a prompt string or a non-empty list of them")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(f"encoding prompts needs the transformers package: {install_hint('text')}") from None

    encoder_dir, tokenizer_dir = _locate_text_encoder(Path(text_encoder))
    tokenizer = _load_tokenizer(tokenizer_dir)
    model = _load_encoder(encoder_dir, dtype).to(device).eval()

    tokens = tokenizer(
        [clean_prompt(t) for t in texts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden = hidden.to(dtype=dtype, device=device)
    real = torch.arange(hidden.shape[1], device=device)[None, :] < mask.gt(0).sum(dim=1, keepdim=True)
    return torch.where(real[..., None], hidden, torch.zeros((), dtype=dtype, device=device))


def clean_prompt(text: str) -> str:
    """The Wan pipeline's prompt cleaning: ftfy (when installed), HTML unescaping, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _saved_order(header: dict, path: Path) -> list[str] | None:
    if "meta" not in header:
        return None
    try:
        meta = json.loads(header["meta"])
    except json.JSONDecodeError as exc:
        raise StateFormatError(f"{path}: memkit metadata is corrupt ({exc})") from None
    if not isinstance(meta, dict):
        return None
    if "kind" in meta and meta["kind"] != PROMPTS_KIND:
        raise StateFormatError(f"{path} is a memkit {meta['kind']!r} file, not prompt embeddings")
    order = meta.get("order")
    if order is None:
        return None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise StateFormatError(f"{path}: the saved prompt order is not a list of names")
    return order


def _checked_embeds(embeds: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out, text_dim = {}, None
    for name, tensor in embeds.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: prompt {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 3 or tensor.shape[0] != 1:
            raise ShapeError(f"{where}: prompt {name!r} has shape {tuple(tensor.shape)}; expected (L, text_dim) or "
                             f"(1, L, text_dim)")
        if not tensor.is_floating_point():
            raise DTypeError(f"{where}: prompt {name!r} is {tensor.dtype}; embeddings must be floating point")
        if tensor.shape[1] == 0 or tensor.shape[2] == 0:
            raise ShapeError(f"{where}: prompt {name!r} is empty (shape {tuple(tensor.shape)})")
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"{where}: prompt {name!r} holds NaN or Inf")
        if text_dim is not None and tensor.shape[2] != text_dim:
            raise ShapeError(f"{where}: prompt {name!r} has text_dim {tensor.shape[2]}, earlier prompts {text_dim}")
        text_dim = tensor.shape[2]
        out[name] = tensor
    return out


def _locate_text_encoder(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"no text encoder folder at {root}")
    encoder_dir = next((d for d in (root, root / "text_encoder") if (d / "config.json").is_file()), None)
    if encoder_dir is None:
        raise FileNotFoundError(f"{root} holds no text encoder (no config.json in it or in {root / 'text_encoder'}); "
                                f"point it at the text_encoder folder of a Wan checkpoint, or the checkpoint itself")
    candidates = (root, root.parent / "tokenizer", root / "tokenizer")
    tokenizer_dir = next((d for d in candidates if any((d / f).is_file() for f in _TOKENIZER_FILES)), None)
    if tokenizer_dir is None:
        raise FileNotFoundError(f"no tokenizer found for the text encoder at {root} (looked in "
                                f"{', '.join(str(d) for d in candidates)})")
    return encoder_dir, tokenizer_dir


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load a tokenizer from {folder}: {exc}") from None


def _load_encoder(folder: Path, dtype: torch.dtype):
    import transformers

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    model_class = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}.get(model_type, "AutoModel")
    # transformers renamed torch_dtype to dtype in 4.56.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        model = getattr(transformers, model_class).from_pretrained(
            str(folder), local_files_only=True, **{dtype_kwarg: dtype}
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load a text encoder from {folder}: {exc}") from None
    if model_class == "AutoModel" and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    return model
