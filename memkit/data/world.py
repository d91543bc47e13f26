"""``WorldVideos``: a static procedural 2-D world seen through a moving camera, with ground-truth revisit labels.

A benchmark of long-horizon memory: the camera wanders over a toroidal world of ``world_cells x world_cells`` cells
and often comes back to places it saw long ago. The world never changes, so a camera position always renders the
same frame, bit for bit, and :func:`revisit_labels` says exactly which frames show a place seen before, how long ago,
and how much of the view is content that left a local memory of recent frames (only a long-term memory has it).

The camera moves in whole cells, so every frame is an integer crop (with wrap-around) of one rendering of the whole
world. That rendering uses only +, -, *, /, sqrt, abs, floor and clamp per pixel (trigonometry runs in Python's
``math`` on 1-D lists), which IEEE rounds the same way in vectorised and scalar code: frames are bit-identical
across windows, thread counts and processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memkit.errors import ConfigError, ShapeError

from .procedural import _rgb, _Wave
from .sources import RenderedSource, check_index, check_positive_int, check_size, check_window, seed_of

ACTIONS = ("stay", "left", "right", "up", "down")
OBJECT_KINDS = ("disc", "square", "ring", "diamond", "cross")

# (row, col) step of each action, in cells per frame.
_DELTAS = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))
_OPPOSITE = (0, 2, 1, 4, 3)
# Background frequency pairs (cycles per world width / height); integers, so the texture wraps seamlessly.
_FREQUENCIES = [(fx, fy) for fx in range(-4, 5) for fy in range(0, 5) if (fy > 0 or fx > 0) and abs(fx) + fy <= 6]
# Path policy: the chance that a step is a one-way move (bringing new places) instead of an out-and-back excursion.
_ONE_WAY_CHANCE = 0.3
_MAX_ONE_WAY = 3  # segments
_MAX_PAUSE = 2  # segments of "stay" at an excursion's far end
_CACHED_WORLDS = 4


@dataclass(frozen=True)
class _Object:
    kind: str
    centre: tuple[float, float]  # (row, col) in cells, in [0, world_cells)
    radius: float  # in cells
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]  # the texture's two shades
    checker: bool  # a checker texture, else stripes
    direction: tuple[float, float]  # (cos, sin) of the texture's angle
    period: float  # of the texture, in cells


@dataclass(frozen=True)
class _World:
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    waves: tuple[_Wave, ...]
    objects: tuple[_Object, ...]


class WorldVideos(RenderedSource):
    """``count`` videos of ``frames`` frames, each a camera wandering over its own static toroidal world.

    The world has ``world_cells x world_cells`` cells: a softly textured background of a per-video hue, and
    ``objects`` distinct objects (disc, square, ring, diamond or cross; a saturated colour; striped or checkered),
    each 1-2.5 cells across. The camera sees ``view_cells x view_cells`` cells, so a frame of size (height, width)
    has cells of ``height // view_cells`` by ``width // view_cells`` pixels (both must divide exactly).

    The camera takes one of :data:`ACTIONS` per segment of ``action_frames`` frames and moves one cell per frame
    that way (frame 0 does not move). Its path is a run of out-and-back excursions (up to ``max_excursion``
    segments out) and one-way moves, so places come back at many lags. :meth:`read` returns the frames and their
    action ids; :meth:`labels` says which frames revisit a place (see :func:`revisit_labels`). Training crops should
    start at multiples of :attr:`crop_step` so that a chunk's frames share one action. The same ``seed`` gives the
    same videos in every process.
    """

    label = "world video"

    def __init__(self, count: int = 64, frames: int = 240, seed: int = 0, *, view_cells: int = 8,
                 world_cells: int = 24, objects: int = 24, action_frames: int = 3, max_excursion: int = 6):
        super().__init__(count, frames, seed)
        self.view_cells = check_positive_int("view_cells", view_cells)
        self.world_cells = check_positive_int("world_cells", world_cells)
        if world_cells < view_cells:
            raise ConfigError(f"world_cells ({world_cells}) must be at least view_cells ({view_cells})")
        if isinstance(objects, bool) or not isinstance(objects, int) or objects < 0:
            raise ConfigError(f"objects must be a non-negative integer, got {objects!r}")
        self.objects = objects
        self.action_frames = check_positive_int("action_frames", action_frames)
        self.max_excursion = check_positive_int("max_excursion", max_excursion)
        self.crop_step = self.action_frames
        self._worlds: dict[tuple[int, int, int], torch.Tensor] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_worlds"] = {}  # a cache: workers render their own rather than receive copies
        return state

    def actions(self, index: int) -> torch.Tensor:
        """Each frame's action id (an index into :data:`ACTIONS`), long (frames,)."""
        check_index(self, index)
        segments = _plan_path(self._generator("path", index), -(-self.frames // self.action_frames),
                              self.max_excursion)
        return torch.tensor(segments, dtype=torch.long).repeat_interleave(self.action_frames)[:self.frames]

    def positions(self, index: int) -> torch.Tensor:
        """Each frame's camera position, the (row, col) cell of the view's top-left corner: long (frames, 2)."""
        actions = self.actions(index)
        start = torch.randint(self.world_cells, (2,), generator=self._generator("start", index))
        steps = torch.tensor(_DELTAS, dtype=torch.long)[actions]
        steps[0] = 0  # frame 0 is the path's start
        return torch.remainder(start + steps.cumsum(0), self.world_cells)

    def read(self, index: int, start: int, frames: int, size: tuple[int, int]) -> dict:
        """Frames ``[start, start + frames)`` as ``{"video": (3, F, H, W) in [-1, 1], "actions": long (F,)}``."""
        check_index(self, index)
        height, width = check_size(size)
        if height % self.view_cells or width % self.view_cells:
            raise ConfigError(f"frame size {height}x{width} must be divisible by view_cells ({self.view_cells}) "
                              f"in both height and width")
        check_window(self.describe(index), start, frames, self.frames)
        window = slice(start, start + frames)
        world = self._world(index, height // self.view_cells, width // self.view_cells)
        video = _crop(world, self.positions(index)[window], height // self.view_cells, width // self.view_cells,
                      self.view_cells)
        return {"video": video, "actions": self.actions(index)[window]}

    def labels(self, index: int, window: int | None = None, sink: int = 0, chunk: int = 1) -> dict[str, torch.Tensor]:
        """Revisit labels of every frame of item ``index``: :func:`revisit_labels` of its camera path."""
        return revisit_labels(self.positions(index), self.view_cells, self.world_cells, window, sink, chunk)

    def _generator(self, purpose: str, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed_of(self.seed, index, purpose))

    def _world(self, index: int, cell_height: int, cell_width: int) -> torch.Tensor:
        """The whole world of item ``index`` rendered with cells of the given pixel size (cached, a few at once)."""
        key = (index, cell_height, cell_width)
        if key not in self._worlds:
            plan = _plan_world(self._generator("world", index), self.world_cells, self.objects)
            if len(self._worlds) >= _CACHED_WORLDS:
                del self._worlds[next(iter(self._worlds))]  # the oldest
            self._worlds[key] = render_world(plan, self.world_cells, cell_height, cell_width)
        return self._worlds[key]


def _plan_path(generator: torch.Generator, segments: int, max_excursion: int) -> list[int]:
    """The action id of each of ``segments`` segments.

    The policy starts still (so every excursion returns exactly to where it left), then repeats: with chance
    ``_ONE_WAY_CHANCE`` move 1-3 segments one way (the world keeps showing new places), else go out 1 to
    ``max_excursion`` segments in a random direction, pause 0-2 segments and come back the same way (revisits at
    lags from a few frames to several dozen).
    """

    def integer(low: int, high: int) -> int:  # in [low, high]
        return low + int(torch.randint(high - low + 1, (), generator=generator))

    plan = [0]
    while len(plan) < segments:
        direction = integer(1, len(ACTIONS) - 1)
        if float(torch.rand((), generator=generator)) < _ONE_WAY_CHANCE:
            plan += [direction] * integer(1, _MAX_ONE_WAY)
        else:
            out = integer(1, max_excursion)
            plan += [direction] * out + [0] * integer(0, _MAX_PAUSE) + [_OPPOSITE[direction]] * out
    return plan[:segments]


def _plan_world(generator: torch.Generator, world_cells: int, objects: int) -> _World:
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    def integer(high: int) -> int:
        return int(torch.randint(high, (), generator=generator))

    hue = uniform(0.0, 1.0)
    background = (_rgb(hue, uniform(0.3, 0.5), uniform(0.2, 0.28)), _rgb(hue + uniform(0.03, 0.08),
                                                                         uniform(0.3, 0.5), uniform(0.4, 0.5)))
    waves = tuple(_Wave(*_FREQUENCIES[integer(len(_FREQUENCIES))], amplitude, uniform(0.0, 2 * math.pi))
                  for amplitude in (1.0, 0.6, 0.35))

    first_hue = uniform(0.0, 1.0)
    planned = []
    for k in range(objects):
        # Hues spread evenly round the wheel (with jitter) so no two objects share a colour.
        object_hue = first_hue + (k + uniform(-0.3, 0.3)) / objects
        saturation, value = uniform(0.75, 1.0), uniform(0.85, 1.0)
        colours = (_rgb(object_hue, saturation, value), _rgb(object_hue, saturation, 0.45 * value))
        radius = uniform(0.5, 1.25)
        angle = uniform(0.0, math.pi)
        planned.append(_Object(
            kind=OBJECT_KINDS[integer(len(OBJECT_KINDS))],
            centre=(uniform(0.0, world_cells), uniform(0.0, world_cells)),
            radius=radius,
            colours=colours,
            checker=integer(2) == 1,
            direction=(math.cos(angle), math.sin(angle)),
            period=2 * radius / uniform(2.0, 4.0),  # 2-4 stripes across the object
        ))
    return _World(background, waves, tuple(planned))


def render_world(plan: _World, world_cells: int, cell_height: int, cell_width: int) -> torch.Tensor:
    """The whole planned world, float32 (3, world_cells * cell_height, world_cells * cell_width) in [-1, 1]."""
    world = _background(plan, world_cells * cell_height, world_cells * cell_width)
    for item in plan.objects:
        _draw(world, item, cell_height, cell_width)
    return world.clamp_(-1.0, 1.0)


def _background(plan: _World, height: int, width: int) -> torch.Tensor:
    """Two colours mixed by a sum of sinusoids fixed in world coordinates."""
    texture = torch.zeros(height, width)
    for wave in plan.waves:
        texture = texture + wave.amplitude * wave.space(height, width)[0]
    weight = 0.5 + (0.5 / sum(wave.amplitude for wave in plan.waves)) * texture  # in [0, 1]
    dark, light = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in plan.background)
    return dark + weight[None] * (light - dark)


def _pixel_span(centre: float, radius: float, cell: int, world_pixels: int) -> torch.Tensor:
    """Unwrapped pixel indices covering ``centre +- radius`` cells (plus a pixel each side), at most the world."""
    low = math.floor((centre - radius) * cell) - 1
    high = math.ceil((centre + radius) * cell) + 1
    if high - low > world_pixels:  # an object wider than the world: keep its middle
        low = round(centre * cell) - world_pixels // 2
        high = low + world_pixels
    return torch.arange(low, high)


def _draw(world: torch.Tensor, item: _Object, cell_height: int, cell_width: int) -> None:
    """Paint ``item`` over ``world`` in place, touching only the pixels near it (wrapping round the torus)."""
    rows = _pixel_span(item.centre[0], item.radius, cell_height, world.shape[1])
    cols = _pixel_span(item.centre[1], item.radius, cell_width, world.shape[2])
    dy = ((rows.float() + 0.5) / cell_height - item.centre[0])[:, None]  # in cells, (h, 1)
    dx = ((cols.float() + 0.5) / cell_width - item.centre[1])[None, :]  # (1, w)
    inside = _inside(item.kind, item.radius, dy, dx)
    alpha = (inside * min(cell_height, cell_width) + 0.5).clamp(0.0, 1.0)  # edges about one pixel soft

    cos, sin = item.direction
    u = torch.floor((dx * cos + dy * sin) / item.period)
    if item.checker:
        u = u + torch.floor((dy * cos - dx * sin) / item.period)
    odd = torch.remainder(u, 2.0) == 1.0
    first, second = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in item.colours)
    colour = torch.where(odd[None], second, first)

    rows, cols = torch.remainder(rows, world.shape[1])[:, None], torch.remainder(cols, world.shape[2])[None, :]
    patch = world[:, rows, cols]
    world[:, rows, cols] = patch + alpha[None] * (colour - patch)


def _inside(kind: str, radius: float, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """How far (in cells) each point lies inside the shape: positive inside, negative outside."""
    if kind == "disc":
        return radius - (dy * dy + dx * dx).sqrt()
    if kind == "square":
        return 0.85 * radius - torch.maximum(dy.abs(), dx.abs())
    if kind == "ring":
        return 0.35 * radius - ((dy * dy + dx * dx).sqrt() - 0.65 * radius).abs()
    if kind == "diamond":
        return radius - (dy.abs() + dx.abs())
    arm = 0.3 * radius  # a cross: the union of a vertical and a horizontal bar
    vertical = torch.minimum(radius - dy.abs(), arm - dx.abs())
    horizontal = torch.minimum(radius - dx.abs(), arm - dy.abs())
    return torch.maximum(vertical, horizontal)


def _crop(world: torch.Tensor, positions: torch.Tensor, cell_height: int, cell_width: int,
          view_cells: int) -> torch.Tensor:
    """The view from each camera position: (3, F, H, W), cut from ``world`` with wrap-around."""
    rows = positions[:, :1] * cell_height + torch.arange(view_cells * cell_height)  # (F, H)
    cols = positions[:, 1:] * cell_width + torch.arange(view_cells * cell_width)  # (F, W)
    rows, cols = torch.remainder(rows, world.shape[1]), torch.remainder(cols, world.shape[2])
    return world[:, rows[:, :, None], cols[:, None, :]]


def action_embeddings(text_dim: int, tokens: int = 4) -> torch.Tensor:
    """The prompt of each action, ``(len(ACTIONS), tokens, text_dim)``: fixed standard-normal embeddings, the same
    in every process, so that a model trained on them can be played with them."""
    check_positive_int("text_dim", text_dim)
    check_positive_int("tokens", tokens)
    rows = []
    for name in ACTIONS:
        gen = torch.Generator().manual_seed(seed_of("world action", name, text_dim, tokens))
        rows.append(torch.randn(tokens, text_dim, generator=gen))
    return torch.stack(rows)


def revisit_labels(positions: torch.Tensor, view_cells: int, world_cells: int, window: int | None = None,
                   sink: int = 0, chunk: int = 1) -> dict[str, torch.Tensor]:
    """Ground truth of what each frame of a camera path shows again, from its positions alone.

    positions: (frames, 2) integer camera positions, the (row, col) cell of the view's top-left corner; taken
        modulo ``world_cells`` (the world is a torus). The view of a position covers ``view_cells x view_cells``
        cells from it.
    window, sink: a local memory that holds the previous ``window`` frames and the first ``sink`` frames; adds
        the labels of where each cell's content can come from.
    chunk: frames generated together. A frame of a chunk starting at ``c`` reads the ``window`` frames before
        ``c`` (and the sink), not its own chunk's earlier frames, which are made with it.

    Returns, per frame ``t``:
        ``seen_before`` (bool): an earlier frame had exactly the same camera position (so the same frame).
        ``frames_since`` (long): ``t - s`` for the latest such frame ``s``, else -1.
        ``novel_fraction`` (float32): the share of the view's cells inside no earlier frame's view (frame 0: 1).
        With ``window``, each cell of the view gets an origin when it comes into the local memory's reach (it
        is in none of the held frames' views): *recalled* if an earlier frame saw it, *new* if none did. While
        it stays in reach a model copies it from frame to frame, so it keeps that origin:
        ``recalled_fraction`` / ``new_fraction`` (float32): the shares of the view's cells of each origin;
        ``revisit`` (bool): ``recalled_fraction >= 0.5``: most of the view is content that left the local
        memory long ago, which only a long-term memory can reproduce;
        ``new`` (bool): ``new_fraction >= 0.5``: most of the view was never seen (nothing to remember).
    """
    view_cells = check_positive_int("view_cells", view_cells)
    world_cells = check_positive_int("world_cells", world_cells)
    if world_cells < view_cells:
        raise ConfigError(f"world_cells ({world_cells}) must be at least view_cells ({view_cells})")
    check_positive_int("chunk", chunk)
    for name, value in (("window", window), ("sink", sink)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if positions.dim() != 2 or positions.shape[1] != 2 or positions.is_floating_point() or positions.is_complex():
        raise ShapeError(f"positions must be integer (frames, 2), got {positions.dtype} {tuple(positions.shape)}")

    path = [tuple(p) for p in torch.remainder(positions.cpu().long(), world_cells).tolist()]
    views = [_view_cells(row, col, view_cells, world_cells) for row, col in path]
    cells = float(view_cells * view_cells)

    frames_since, novel_fraction = [], []
    last_seen: dict[tuple[int, int], int] = {}
    seen = torch.zeros(world_cells * world_cells, dtype=torch.bool)
    for t, (position, view) in enumerate(zip(path, views)):
        frames_since.append(t - last_seen[position] if position in last_seen else -1)
        last_seen[position] = t
        novel_fraction.append(float((~seen[view]).sum()) / cells)
        seen[view] = True

    labels = {
        "seen_before": torch.tensor(frames_since, dtype=torch.long) >= 0,
        "frames_since": torch.tensor(frames_since, dtype=torch.long),
        "novel_fraction": torch.tensor(novel_fraction, dtype=torch.float32),
    }
    if window is not None:
        recalled, new = _origins(views, window, sink, chunk, world_cells)
        labels.update(recalled_fraction=recalled / cells, new_fraction=new / cells,
                      revisit=recalled >= cells / 2, new=new >= cells / 2)
    return labels


def _origins(views: list[torch.Tensor], window: int, sink: int, chunk: int, world_cells: int):
    """Per frame, how many of its view's cells are of recalled and of new origin (see :func:`revisit_labels`)."""
    RECALLED, NEW = 1, 2
    in_window = torch.zeros(world_cells * world_cells, dtype=torch.long)  # views among the window's frames
    in_sink = torch.zeros(world_cells * world_cells, dtype=torch.bool)
    seen = torch.zeros(world_cells * world_cells, dtype=torch.bool)  # by the frames before the chunk
    origin = torch.zeros(world_cells * world_cells, dtype=torch.long)
    recalled, new = [], []
    for c0 in range(0, len(views), chunk):
        c1 = min(len(views), c0 + chunk)
        for view in views[c0:c1]:
            out_of_reach = view[(in_window[view] == 0) & ~in_sink[view]]
            origin[out_of_reach] = torch.where(seen[out_of_reach], RECALLED, NEW)
            recalled.append(int((origin[view] == RECALLED).sum()))
            new.append(int((origin[view] == NEW).sum()))
        for t in range(c0, c1):  # the chunk is committed: the window now holds frames c1 - window .. c1 - 1
            seen[views[t]] = True
            if t < sink:
                in_sink[views[t]] = True
            in_window[views[t]] += 1
            if t - window >= 0:
                in_window[views[t - window]] -= 1
    return torch.tensor(recalled, dtype=torch.float32), torch.tensor(new, dtype=torch.float32)


def _view_cells(row: int, col: int, view_cells: int, world_cells: int) -> torch.Tensor:
    """The flat indices of the view's cells in a world map flattened row by row."""
    rows = torch.remainder(row + torch.arange(view_cells), world_cells)
    cols = torch.remainder(col + torch.arange(view_cells), world_cells)
    return (rows[:, None] * world_cells + cols[None, :]).flatten()
