"""``WorldModel``: a small pixel-space Wan DiT with an injected memory, trained on ``memkit.data.WorldVideos`` or
``memkit.data.LoopVideos``, that plays the world forward from a first chunk and the prompt of each chunk; saved
whole in one safetensors file.

The prompt of each chunk is the camera's action (``memkit.data.world.action_embeddings``), or in a world of
places the id of the place it shows (``memkit.data.loops.place_embeddings``). A rollout commits the
given first chunk(s) of ground truth, then samples every further chunk with the few-step sampler, reading the
memory, and commits it: what the model shows when the camera comes back is what its memory kept.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from memkit.errors import CheckpointError, ConfigError, ShapeError
from memkit.memory import MemoryConfig
from memkit.state import io

from .sampler import commit_chunk, denoise_chunk
from .schedule import FlowSchedule

FORMAT = "WorldModel"


@dataclass
class Rollout:
    video: torch.Tensor  # (3, F, H, W) float32 in [-1, 1]: the given prefix, then the model's frames
    chunk_seconds: list[float] = field(default_factory=list)  # wall time of each generated chunk (sample + commit)
    state_bytes: int = 0  # the stream state's size at the end
    memory_bytes: int = 0  # of which the memory layers' states (a cache's K/V, a hybrid's local and global memory)
    global_bytes: int = 0  # of which the global memories' states (the ``global.*`` tensors)


class WorldModel:
    """A backbone with an injected memory, sized for world frames of ``frame_size`` pixels.

    backbone: an ``adapters.loading.BackboneSpec`` of a random Wan config with 3 input and output channels.
    memory: the memory config. chunk_frames: frames per chunk. prompt_len: tokens of an action's prompt.
    prompts: what the prompt ids of :meth:`rollout` name: ``"actions"`` (the camera's moves, ``WorldVideos``) or
    ``"places:N"`` (N place ids, ``LoopVideos``).
    """

    def __init__(self, backbone, memory: MemoryConfig, frame_size: tuple[int, int], *, chunk_frames: int = 3,
                 prompt_len: int = 4, prompts: str = "actions", device="cpu", model=None):
        import adapters
        from adapters.loading import load_backbone

        self.backbone_spec, self.memory, self.frame_size = backbone, memory, tuple(frame_size)
        self.chunk_frames, self.prompt_len = chunk_frames, prompt_len
        self.prompts = prompts
        self.meta: dict = {}  # what the file it was loaded from says (training budget, setup)
        self.model = model if model is not None else load_backbone(backbone, device=device).model
        if model is None or not hasattr(self.model, "_memkit_handle"):
            self.handle = adapters.inject(self.model, memory, chunk_frames, latent_size=self.frame_size,
                                          freeze_backbone=True)
        else:
            self.handle = self.model._memkit_handle
        self.prompt_table()  # an unknown kind of prompts is refused here

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"backbone": self.backbone_spec.to_dict(), "memory": self.memory.to_dict(),
                "frame_size": list(self.frame_size), "chunk_frames": self.chunk_frames,
                "prompt_len": self.prompt_len, "prompts": self.prompts}

    def prompt_table(self) -> torch.Tensor:
        """The prompt of each id, ``(ids, prompt_len, text_dim)``."""
        text_dim = self.handle.dims.text_dim
        if self.prompts == "actions":
            from memkit.data.world import action_embeddings

            return action_embeddings(text_dim, self.prompt_len)
        kind, _, count = self.prompts.partition(":")
        if kind == "places" and count.isdigit() and int(count) > 0:
            from memkit.data.loops import place_embeddings

            return place_embeddings(text_dim, self.prompt_len, int(count))
        raise ConfigError(f"prompts must be 'actions' or 'places:N', got {self.prompts!r}")

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Backbone and memory weights (float32) and what builds them, in one safetensors file."""
        tensors = {name: t.detach().float().contiguous() for name, t in self.model.state_dict().items()}
        io.write(path, tensors, {"type": FORMAT, **self.describe(), **(extra or {})})

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", *, max_frames: int | None = None) -> WorldModel:
        """A model saved by :meth:`save`. A truncated, foreign or mismatched file is a one-line error.

        max_frames: extend the backbone's RoPE table to streams of this many frames (the table is computed, not
        saved, and its first positions do not change with its length).
        """
        from adapters.loading import BackboneSpec

        tensors, meta = io.read(path, "world model")
        if meta.get("type") != FORMAT:
            raise CheckpointError(f"{path} holds a memkit {meta.get('type')!r}, not a world model")
        try:
            spec = BackboneSpec(**meta["backbone"])
            table = spec.overrides.get("rope_max_seq_len", 0)
            if max_frames is not None and max_frames > table:
                spec = BackboneSpec(**{**meta["backbone"], "overrides": {**spec.overrides,
                                                                          "rope_max_seq_len": max_frames}})
            memory = MemoryConfig.from_dict(meta["memory"])
            world = cls(spec, memory, tuple(meta["frame_size"]), chunk_frames=meta["chunk_frames"],
                        prompt_len=meta["prompt_len"], prompts=meta.get("prompts", "actions"), device=device)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: the world model's description is incomplete ({exc})") from None
        own = world.model.state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        wrong = [n for n in set(own) & set(tensors) if own[n].shape != tensors[n].shape]
        if missing or unexpected or wrong:
            raise CheckpointError(f"{path} does not fit the model it describes: missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}, wrong shape {sorted(wrong)[:3]}")
        world.model.load_state_dict({n: t.to(own[n].dtype) for n, t in tensors.items()})
        world.meta = meta
        return world

    # -- playing the world ---------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, first: torch.Tensor, actions: torch.Tensor, frames: int, *, schedule: FlowSchedule | None = None,
                seed: int = 0, history: torch.Tensor | None = None, progress=None) -> Rollout:
        """Frames ``[0, frames)`` of a world: ``first`` (3, n, H, W), whole chunks of ground truth, is committed as
        it is; every later chunk is sampled under its action (``actions`` (>= frames,): each chunk takes the action
        of its first frame) and committed.

        history: the true frames ``(3, >= frames, H, W)``; if given, each sampled chunk is returned but the true
        chunk is committed in its place, so every chunk is predicted from the true past (no drift: what the
        memory recalls, not how errors compound)."""
        F = self.chunk_frames
        if first.dim() != 4 or first.shape[0] != 3 or tuple(first.shape[2:]) != self.frame_size:
            raise ShapeError(f"first must be (3, n, {self.frame_size[0]}, {self.frame_size[1]}), "
                             f"got {tuple(first.shape)}")
        if first.shape[1] % F or first.shape[1] == 0 or frames % F or frames < first.shape[1]:
            raise ConfigError(f"first ({first.shape[1]} frames) and frames ({frames}) must be whole chunks of {F}, "
                              f"first <= frames")
        if actions.dim() != 1 or len(actions) < frames:
            raise ShapeError(f"actions must be one per frame, at least ({frames},); got {tuple(actions.shape)}")
        table = self.prompt_table()
        if actions.dtype != torch.long or actions.min() < 0 or actions.max() >= len(table):
            raise ConfigError(f"actions must be long prompt ids in [0, {len(table)}) ({self.prompts}); got "
                              f"{actions.dtype} in [{actions.min().item()}, {actions.max().item()}]")
        if history is not None and (history.dim() != 4 or history.shape[0] != 3 or history.shape[1] < frames
                                    or tuple(history.shape[2:]) != self.frame_size):
            raise ShapeError(f"history must be the true frames (3, >= {frames}, {self.frame_size[0]}, "
                             f"{self.frame_size[1]}), got {tuple(history.shape)}")
        schedule = schedule or FlowSchedule()
        device, dtype = self.device, next(self.model.parameters()).dtype
        table = table.to(device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def noise():
            return torch.randn(1, 3, F, *self.frame_size, generator=gen).to(device)

        state = self.handle.init_state(1, device=device, dtype=dtype)
        chunks, timings = [], []
        given = first.shape[1] // F
        for c in range(frames // F):
            prompt = table[actions[c * F]][None]
            t0 = time.perf_counter()
            if c < given:
                x0 = first[None, :, c * F: (c + 1) * F].to(device)
            else:
                x0 = denoise_chunk(self.handle, state, prompt, schedule, noise, dtype=dtype).clamp(-1, 1)
            context = x0 if history is None else history[None, :, c * F: (c + 1) * F].to(device)
            state = commit_chunk(self.handle, state, context, prompt, schedule, noise, dtype=dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if c >= given:
                timings.append(time.perf_counter() - t0)
            chunks.append(x0[0].float().cpu())
            if progress is not None:
                progress()
        global_bytes = sum(t.numel() * t.element_size() for layer in state.layers
                           for name, t in layer.tensors.items() if name.startswith("global."))
        return Rollout(torch.cat(chunks, dim=1), timings, state.nbytes, sum(layer.nbytes for layer in state.layers),
                       global_bytes)


__all__ = ["WorldModel", "Rollout"]
