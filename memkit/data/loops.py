"""``LoopVideos``: a camera that cuts between places in a loop, so that places come back after they left a local
memory, with ground-truth revisit labels.

Each video shows a start place, then ``loop_places`` other places in a fixed order, round and round (A, B, C, A,
B, C, ...: LoopNav's A->B->C->A loops). Each visit is a static shot of ``shot_frames`` frames. A place is a
``mosaic x mosaic`` grid of flat colours drawn per video, so nothing but the video's own past tells what a place
looks like when the camera comes back, and nothing at all tells what a new place looks like. The prompt of each
frame is its place's id (:func:`place_embeddings`; ids are drawn per video from a vocabulary of ``places``).

With shots as long as a model's chunks and a local memory shorter than a loop, a revisited place has left the
local memory (sink and window) every time it comes back: only a long-term memory can show it as it was.
"""

from __future__ import annotations

import torch

from memkit.errors import ConfigError

from .sources import RenderedSource, check_index, check_positive_int, check_size, check_window, seed_of

COLOUR_RANGE = 0.8  # colours are uniform in [-0.8, 0.8] per channel (pixels in [-1, 1])


def place_embeddings(text_dim: int, tokens: int = 4, places: int = 16) -> torch.Tensor:
    """The prompt of each place id, ``(places, tokens, text_dim)``: one fixed standard-normal vector per place,
    repeated over the tokens (a prompt that says only where the camera is), the same in every process."""
    check_positive_int("text_dim", text_dim)
    check_positive_int("tokens", tokens)
    check_positive_int("places", places)
    rows = []
    for place in range(places):
        gen = torch.Generator().manual_seed(seed_of("loop place", place, text_dim))
        rows.append(torch.randn(text_dim, generator=gen).expand(tokens, text_dim))
    return torch.stack(rows)


class LoopVideos(RenderedSource):
    """``count`` videos of ``frames`` frames: a start place, then a loop of ``loop_places`` places, each visit a
    static shot of ``shot_frames`` frames. :meth:`read` returns the frames and each frame's place id (its prompt,
    under the key ``actions`` that per-frame prompts use); :meth:`labels` says which frames revisit a place that
    left a local memory. The same ``seed`` gives the same videos in every process."""

    label = "loop video"

    def __init__(self, count: int = 64, frames: int = 24, seed: int = 0, *, loop_places: int = 3,
                 shot_frames: int = 3, places: int = 16, mosaic: int = 1):
        super().__init__(count, frames, seed)
        self.loop_places = check_positive_int("loop_places", loop_places)
        self.shot_frames = check_positive_int("shot_frames", shot_frames)
        self.places = check_positive_int("places", places)
        self.mosaic = check_positive_int("mosaic", mosaic)
        if places < loop_places + 1:
            raise ConfigError(f"places ({places}) must be at least loop_places + 1 ({loop_places + 1}): the start "
                              f"place and the loop's places differ")
        # Per-frame prompts change only between shots: crops start on a shot (see ClipDataModule).
        self.action_frames = self.crop_step = self.shot_frames

    def prompt_table(self, text_dim: int, tokens: int) -> torch.Tensor:
        return place_embeddings(text_dim, tokens, self.places)

    def _plan(self, index: int) -> tuple[list[int], torch.Tensor]:
        """The place ids of the video's shots, and the colours of its places ``(places, 3, mosaic, mosaic)``."""
        gen = torch.Generator().manual_seed(seed_of(self.seed, index, "loop video"))
        ids = torch.randperm(self.places, generator=gen)[: self.loop_places + 1].tolist()
        start, loop = ids[0], ids[1:]
        shots = -(-self.frames // self.shot_frames)
        plan = [start] + [loop[(s - 1) % self.loop_places] for s in range(1, shots)]
        colours = (2 * torch.rand(self.places, 3, self.mosaic, self.mosaic, generator=gen) - 1) * COLOUR_RANGE
        return plan, colours

    def actions(self, index: int) -> torch.Tensor:
        """Each frame's place id, long ``(frames,)``."""
        check_index(self, index)
        return self._frame_places(self._plan(index)[0])

    def _frame_places(self, plan: list[int]) -> torch.Tensor:
        return torch.tensor(plan, dtype=torch.long).repeat_interleave(self.shot_frames)[: self.frames]

    def read(self, index: int, start: int, frames: int, size: tuple[int, int]) -> dict:
        """Frames ``[start, start + frames)`` as ``{"video": (3, F, H, W) in [-1, 1], "actions": long (F,)}``."""
        check_index(self, index)
        height, width = check_size(size)
        if height % self.mosaic or width % self.mosaic:
            raise ConfigError(f"frame size {height}x{width} must be divisible by mosaic ({self.mosaic})")
        check_window(self.describe(index), start, frames, self.frames)
        plan, colours = self._plan(index)
        ids = self._frame_places(plan)[start: start + frames]
        images = colours.repeat_interleave(height // self.mosaic, dim=2).repeat_interleave(width // self.mosaic, dim=3)
        return {"video": images[ids].permute(1, 0, 2, 3).contiguous(), "actions": ids}

    def labels(self, index: int, window: int | None = None, sink: int = 0, chunk: int = 1) -> dict[str, torch.Tensor]:
        """Per frame: ``revisit`` (its place was shown before its chunk, and no frame a local memory of the first
        ``sink`` frames and the ``window`` frames before the chunk holds shows it), ``new`` (its place was never
        shown before its chunk), ``seen_before``, and ``last_seen`` (the latest frame before its chunk that
        shows its place, else -1). Without ``window`` every earlier frame counts as held."""
        return loop_labels(self.actions(index), window, sink, chunk)


def loop_labels(places: torch.Tensor, window: int | None = None, sink: int = 0,
                chunk: int = 1) -> dict[str, torch.Tensor]:
    """Revisit labels of a sequence of per-frame place ids (see :meth:`LoopVideos.labels`)."""
    check_positive_int("chunk", chunk)
    for name, value in (("window", window), ("sink", sink)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    ids = places.tolist()
    seen, revisit, last = [], [], []
    for t, place in enumerate(ids):
        start = t - t % chunk  # a chunk's frames read the frames before the chunk, not each other
        before = ids[:start]
        held = before if window is None else ids[: min(sink, start)] + ids[max(0, start - window): start]
        seen.append(place in before)
        revisit.append(place in before and place not in held)
        last.append(max((s for s in range(start) if ids[s] == place), default=-1))
    seen_t = torch.tensor(seen, dtype=torch.bool)
    return {"seen_before": seen_t, "revisit": torch.tensor(revisit, dtype=torch.bool), "new": ~seen_t,
            "last_seen": torch.tensor(last, dtype=torch.long)}


__all__ = ["LoopVideos", "loop_labels", "place_embeddings"]
