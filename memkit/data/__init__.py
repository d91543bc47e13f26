"""Training data: clip sources (procedural videos, video folders, latent shards) and the Lightning data module."""

from importlib import import_module

_EXPORTS = {
    "ClipSource": "sources",
    "ProceduralVideos": "procedural",
    "WorldVideos": "world",
    "revisit_labels": "world",
    "ACTIONS": "world",
    "action_embeddings": "world",
    "LoopVideos": "loops",
    "loop_labels": "loops",
    "place_embeddings": "loops",
    "SceneVideos": "scenes",
    "VideoFolder": "video_folder",
    "LatentShards": "latent_shards",
    "ClipDataModule": "datamodule",
    "ClipSampler": "datamodule",
    "DataRequirements": "datamodule",
    "collate_clips": "datamodule",
    "encode_folder": "encode",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Lazy: the sources pull in PyAV and diffusers only when used.
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'memkit.data' has no attribute {name!r}")
