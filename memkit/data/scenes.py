"""``SceneVideos``: a camera that cuts between scenes of shapes and cuts back to earlier ones, with ground-truth
return labels.

Each video is a sequence of static shots of ``shot_frames`` frames. A shot either shows a new scene (a textured
background with a few coloured shapes, drawn per video) or cuts back to the scene of the shot ``k`` shots earlier,
``k`` drawn from ``min_lag .. max_lag`` so that the lag of a return varies. What a scene looks like is known only
from the video's own past: when a return's lag is beyond a local memory (sink and window), only a long-term memory
can bring its layout back.

The prompt of each frame (under ``actions``, as per-frame prompts are) says only *when* the scene was shown: id 0
for a new scene, id ``k`` for "the scene of ``k`` shots ago" (:func:`memkit.data.loops.place_embeddings` gives
the prompt of each id). Nothing else tells the scenes apart: they share the frame's places, as the rooms of one
video do when the camera comes back.
"""

from __future__ import annotations

import math

import torch

from memkit.errors import ConfigError

from .loops import COLOUR_RANGE, loop_labels, place_embeddings
from .sources import RenderedSource, check_index, check_positive_int, check_size, check_window, seed_of

TEXTURE_AMPLITUDE = 0.25  # the background's stripes swing this much about its colour (pixels in [-1, 1])


class SceneVideos(RenderedSource):
    """``count`` videos of ``frames`` frames in static shots of ``shot_frames`` frames; each shot a new scene or,
    with probability ``return_rate`` once a lag of ``min_lag`` shots reaches past the first shot, the scene of
    ``k`` shots before (``k`` uniform in ``min_lag .. max_lag``; the first shot, which a sink holds, is never
    returned to). A scene is a background (a colour and soft stripes of a random period and direction) with
    ``shapes`` rectangles and discs of random colours, sizes and places. :meth:`read` returns the frames and each
    frame's prompt id (0 new, ``k`` a return of ``k`` shots); :meth:`labels` says which frames return to a scene
    that left a local memory. The same ``seed`` gives the same videos in every process."""

    label = "scene video"

    def __init__(self, count: int = 64, frames: int = 24, seed: int = 0, *, shot_frames: int = 3, min_lag: int = 2,
                 max_lag: int = 4, shapes: int = 3, return_rate: float = 0.5):
        super().__init__(count, frames, seed)
        self.shot_frames = check_positive_int("shot_frames", shot_frames)
        self.min_lag = check_positive_int("min_lag", min_lag)
        self.max_lag = check_positive_int("max_lag", max_lag)
        self.shapes = check_positive_int("shapes", shapes)
        if max_lag < min_lag:
            raise ConfigError(f"max_lag ({max_lag}) must be at least min_lag ({min_lag})")
        if not (isinstance(return_rate, (int, float)) and not isinstance(return_rate, bool)
                and 0.0 <= return_rate <= 1.0):
            raise ConfigError(f"return_rate must be a probability in [0, 1], got {return_rate!r}")
        self.return_rate = float(return_rate)
        # Per-frame prompts change only between shots: crops start on a shot (see ClipDataModule).
        self.action_frames = self.crop_step = self.shot_frames

    @property
    def prompt_ids(self) -> int:
        """How many prompt ids the videos use: 0 (a new scene) and each lag ``1 .. max_lag``."""
        return self.max_lag + 1

    def prompt_table(self, text_dim: int, tokens: int) -> torch.Tensor:
        return place_embeddings(text_dim, tokens, self.prompt_ids)

    def plan(self, index: int) -> tuple[list[int], list[int]]:
        """Per shot, its scene (numbered from 0 in order of first showing) and its prompt id (0 new, ``k`` the
        scene of ``k`` shots before)."""
        check_index(self, index)
        gen = torch.Generator().manual_seed(seed_of(self.seed, index, "scene plan"))
        shots = -(-self.frames // self.shot_frames)
        scenes, prompts, count = [], [], 0
        for shot in range(shots):
            lags = [k for k in range(self.min_lag, self.max_lag + 1) if shot - k >= 1]
            if lags and float(torch.rand((), generator=gen)) < self.return_rate:
                lag = lags[int(torch.randint(len(lags), (), generator=gen))]
                scenes.append(scenes[shot - lag])
                prompts.append(lag)
            else:
                scenes.append(count)
                prompts.append(0)
                count += 1
        return scenes, prompts

    def actions(self, index: int) -> torch.Tensor:
        """Each frame's prompt id, long ``(frames,)``."""
        return self._per_frame(self.plan(index)[1])

    def scenes(self, index: int) -> torch.Tensor:
        """Each frame's scene, long ``(frames,)``."""
        return self._per_frame(self.plan(index)[0])

    def _per_frame(self, per_shot: list[int]) -> torch.Tensor:
        return torch.tensor(per_shot, dtype=torch.long).repeat_interleave(self.shot_frames)[: self.frames]

    def render(self, index: int, scene: int, size: tuple[int, int]) -> torch.Tensor:
        """Scene ``scene`` of video ``index`` at ``size`` = (height, width): ``(3, H, W)`` in [-1, 1]."""
        height, width = check_size(size)
        gen = torch.Generator().manual_seed(seed_of(self.seed, index, scene, "scene"))
        colour = (2 * torch.rand(3, 1, 1, generator=gen) - 1) * COLOUR_RANGE
        angle, period, phase = (float(v) for v in torch.rand(3, generator=gen))
        angle, period, phase = math.pi * angle, 0.3 + 0.5 * period, 2 * math.pi * phase  # period: of the side
        y = torch.linspace(0, 1, height).view(height, 1)
        x = torch.linspace(0, 1, width).view(1, width)
        stripes = torch.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)
        image = colour + TEXTURE_AMPLITUDE * stripes
        for _ in range(self.shapes):
            fill = (2 * torch.rand(3, 1, 1, generator=gen) - 1) * COLOUR_RANGE
            disc, cy, cx, ry, rx = (float(v) for v in torch.rand(5, generator=gen))
            ry, rx = 0.12 + 0.16 * ry, 0.12 + 0.16 * rx  # half-sizes, as shares of the side
            cy, cx = ry + (1 - 2 * ry) * cy, rx + (1 - 2 * rx) * cx
            dy, dx = (y - cy) / ry, (x - cx) / rx
            inside = (dy ** 2 + dx ** 2 <= 1) if disc < 0.5 else (dy.abs() <= 1) & (dx.abs() <= 1)
            image = torch.where(inside, fill, image)
        return image.clamp(-1, 1)

    def read(self, index: int, start: int, frames: int, size: tuple[int, int]) -> dict:
        """Frames ``[start, start + frames)`` as ``{"video": (3, F, H, W) in [-1, 1], "actions": long (F,)}``."""
        check_index(self, index)
        size = check_size(size)
        check_window(self.describe(index), start, frames, self.frames)
        scenes, prompts = self.plan(index)
        ids = self._per_frame(scenes)[start: start + frames]
        images = torch.stack([self.render(index, s, size) for s in range(max(scenes) + 1)])
        return {"video": images[ids].permute(1, 0, 2, 3).contiguous(),
                "actions": self._per_frame(prompts)[start: start + frames]}

    def labels(self, index: int, window: int | None = None, sink: int = 0, chunk: int = 1) -> dict[str, torch.Tensor]:
        """Per frame: ``revisit`` (its scene was shown before its chunk and no frame of a local memory of the first
        ``sink`` frames and the ``window`` frames before the chunk shows it), ``new``, ``seen_before`` and
        ``last_seen``, as :func:`memkit.data.loops.loop_labels` gives them for the frames' scenes."""
        return loop_labels(self.scenes(index), window, sink, chunk)


__all__ = ["SceneVideos"]
