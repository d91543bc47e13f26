"""The identity of a backbone, as checkpoints, memory weights and streams record it: its class and a hash of its
config (weights aside)."""

from __future__ import annotations

import hashlib
import json

from torch import nn


def backbone_identity(model: nn.Module) -> dict:
    """What a training checkpoint records of the backbone it was made on: class and a hash of its config."""
    config = dict(getattr(model, "config", {}) or {})
    body = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return {"class": type(model).__name__, "config_hash": hashlib.sha256(body.encode()).hexdigest()[:16]}


__all__ = ["backbone_identity"]
