"""``ProceduralVideos``: deterministic synthetic videos (a scrolling texture and moving shapes), made on the fly.

Everything that depends on time is a closed-form function of the frame number, so frame ``t`` is the same whichever
window it is read in. Trigonometry runs in Python's ``math`` on 1-D lists (pixel columns, pixel rows, frames) and the
per-pixel work is only +, -, *, sqrt, abs, round and clamp, which IEEE rounds the same way in vectorised and scalar
code: the frames are bit-identical across windows, thread counts and processes.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import torch

from .sources import RenderedSource, check_index, check_positive_int, check_size, check_window, seed_of

SHAPE_KINDS = ("disc", "square", "ring", "bar")

# Bouncing shapes keep their centres this far (in frame fractions) from the borders.
_MARGIN = 0.12
# Background frequency pairs (cycles per frame width / height); integers, so the texture wraps seamlessly.
_FREQUENCIES = [(fx, fy) for fx in range(-3, 4) for fy in range(0, 4) if (fy > 0 or fx > 0) and abs(fx) + fy <= 4]


def _rgb(hue: float, saturation: float, value: float) -> tuple[float, float, float]:
    """An HSV colour as RGB in [-1, 1]."""
    return tuple(2.0 * c - 1.0 for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


@dataclass(frozen=True)
class _Wave:
    """``amplitude sin(2 pi (fx x + fy y) + phase - omega t)`` over a frame's pixel centres ``(x, y)`` in [0, 1)."""

    fx: int
    fy: int
    amplitude: float
    phase: float
    omega: float = 0.0  # radians per frame, from the scroll velocity (0: fixed in place)

    def space(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sin, cos)`` of the wave's spatial angle, ``(height, width)`` each. By the angle-addition formulas,
        so that only 1-D lists need trigonometry."""
        a = [2 * math.pi * self.fx * x + self.phase for x in _pixel_centres(width)]
        b = [2 * math.pi * self.fy * y for y in _pixel_centres(height)]
        sin_a, cos_a = torch.tensor([math.sin(v) for v in a]), torch.tensor([math.cos(v) for v in a])
        sin_b, cos_b = torch.tensor([math.sin(v) for v in b]), torch.tensor([math.cos(v) for v in b])
        sin_space = cos_b[:, None] * sin_a[None, :] + sin_b[:, None] * cos_a[None, :]
        cos_space = cos_b[:, None] * cos_a[None, :] - sin_b[:, None] * sin_a[None, :]
        return sin_space, cos_space


@dataclass(frozen=True)
class _Shape:
    colour: tuple[float, float, float]
    radius: float  # in units of the frame's shorter side
    start: tuple[float, float]  # centre (y, x) at frame 0, in frame fractions
    velocity: tuple[float, float]  # frame fractions per frame
    vertical: bool  # bars only: a vertical bar (moving sideways) or a horizontal one


@dataclass(frozen=True)
class _Plan:
    family: int
    kind: str
    wraps: bool
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    waves: tuple[_Wave, ...]
    shapes: tuple[_Shape, ...]


class ProceduralVideos(RenderedSource):
    """``count`` deterministic videos of ``frames`` frames each, rendered on the fly at any size.

    Each video has a softly textured background scrolling slowly, and a few coloured shapes moving with constant
    velocities. Its family (``prompt_id``, in ``[0, kinds)``) picks the shape (disc, square, ring, bar), the motion
    (bouncing off the borders, or wrapping around, for families 4-7, ...) and the background's hue, so a model can
    learn to follow it. The same ``seed`` gives the same videos in every process.
    """

    label = "procedural video"

    def __init__(self, count: int = 64, frames: int = 240, seed: int = 0, kinds: int = 4):
        super().__init__(count, frames, seed)
        self.kinds = check_positive_int("kinds", kinds)
        self._family_offset = seed_of("family", seed) % self.kinds

    def family(self, index: int) -> int:
        """The pattern family of item ``index``; consecutive items cycle through all families."""
        return (check_index(self, index) + self._family_offset) % self.kinds

    def read(self, index: int, start: int, frames: int, size: tuple[int, int]) -> dict:
        check_index(self, index)
        height, width = check_size(size)
        check_window(self.describe(index), start, frames, self.frames)
        plan = self._plan(index)
        return {"video": render(plan, range(start, start + frames), height, width), "prompt_id": plan.family}

    def _plan(self, index: int) -> _Plan:
        generator = torch.Generator().manual_seed(seed_of(self.seed, index))

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

        def integer(high: int) -> int:
            return int(torch.randint(high, (), generator=generator))

        family = self.family(index)
        kind = SHAPE_KINDS[family % len(SHAPE_KINDS)]
        wraps = (family // len(SHAPE_KINDS)) % 2 == 1
        background_hue = family / self.kinds + uniform(-0.04, 0.04)
        background = (_rgb(background_hue, uniform(0.3, 0.5), uniform(0.15, 0.25)),
                      _rgb(background_hue + uniform(0.05, 0.12), uniform(0.3, 0.5), uniform(0.45, 0.6)))

        angle, speed = uniform(0.0, 2 * math.pi), uniform(0.002, 0.005)
        scroll_y, scroll_x = speed * math.sin(angle), speed * math.cos(angle)
        waves = []
        for amplitude in (1.0, 0.6, 0.35):
            fx, fy = _FREQUENCIES[integer(len(_FREQUENCIES))]
            omega = 2 * math.pi * (fx * scroll_x + fy * scroll_y)
            waves.append(_Wave(fx, fy, amplitude, uniform(0.0, 2 * math.pi), omega))

        count = 2 + integer(2 if kind == "bar" else 3)
        first_hue = uniform(0.0, 1.0)
        shapes = []
        for k in range(count):
            colour = _rgb(first_hue + k / count + uniform(-0.05, 0.05), uniform(0.75, 0.95), uniform(0.85, 1.0))
            direction, speed = uniform(0.0, 2 * math.pi), uniform(0.004, 0.012)
            velocity = (speed * math.sin(direction), speed * math.cos(direction))
            vertical = integer(2) == 1
            if kind == "bar":  # a bar moves only at right angles to itself: a vertical one sideways
                vy, vx = math.copysign(speed, velocity[0]), math.copysign(speed, velocity[1])
                velocity = (0.0, vx) if vertical else (vy, 0.0)
            shapes.append(_Shape(colour, uniform(0.07, 0.14), (uniform(0.0, 1.0), uniform(0.0, 1.0)), velocity,
                                 vertical))
        return _Plan(family, kind, wraps, background, tuple(waves), tuple(shapes))


def render(plan: _Plan, times: range, height: int, width: int) -> torch.Tensor:
    """Frames ``times`` of a planned video: float32 (3, len(times), height, width) in [-1, 1]."""
    video = _background(plan, times, height, width)
    shorter = min(height, width)
    ys = _pixel_centres(height)
    xs = _pixel_centres(width)
    for shape in plan.shapes:
        alpha = _coverage(plan, shape, times, ys, xs, height / shorter, width / shorter, shorter)
        colour = torch.tensor(shape.colour, dtype=torch.float32).view(3, 1, 1, 1)
        video = video + alpha * (colour - video)
    return video.clamp_(-1.0, 1.0)


def _pixel_centres(n: int) -> list[float]:
    return [(i + 0.5) / n for i in range(n)]


def _background(plan: _Plan, times: range, height: int, width: int) -> torch.Tensor:
    """Two colours mixed by a sum of sinusoids that scrolls with constant velocity."""
    texture = torch.zeros(len(times), height, width)
    for wave in plan.waves:
        # sin(space - omega t) = sin(space) cos(omega t) - cos(space) sin(omega t)
        sin_space, cos_space = wave.space(height, width)
        cos_time = torch.tensor([math.cos(wave.omega * t) for t in times]).view(-1, 1, 1)
        sin_time = torch.tensor([math.sin(wave.omega * t) for t in times]).view(-1, 1, 1)
        texture = texture + wave.amplitude * (sin_space[None] * cos_time - cos_space[None] * sin_time)
    total = sum(wave.amplitude for wave in plan.waves)
    weight = 0.5 + (0.5 / total) * texture  # in [0, 1]
    dark, light = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1, 1) for c in plan.background)
    return dark + weight[None] * (light - dark)


def _centres(plan: _Plan, shape: _Shape, times: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame's shape centre (y, x) in frame fractions, closed-form in t (float64, then float32)."""
    t = torch.tensor(list(times), dtype=torch.float64)
    centres = []
    for start, velocity in zip(shape.start, shape.velocity):
        if plan.wraps:
            centres.append(torch.remainder(start + velocity * t, 1.0))
        else:  # a triangle wave between the margins: bouncing off the borders
            span = 1.0 - 2 * _MARGIN
            phase = torch.remainder(2 * span * start + velocity * t, 2 * span)
            centres.append(_MARGIN + span - (phase - span).abs())
    return centres[0].float(), centres[1].float()


def _coverage(plan: _Plan, shape: _Shape, times: range, ys: list[float], xs: list[float], y_scale: float,
              x_scale: float, shorter: int) -> torch.Tensor:
    """How much of each pixel the shape covers, (F, H, W) in [0, 1], with edges about one pixel soft."""
    centre_y, centre_x = _centres(plan, shape, times)
    dy = torch.tensor(ys)[None, :, None] - centre_y[:, None, None]  # (F, H, 1)
    dx = torch.tensor(xs)[None, None, :] - centre_x[:, None, None]  # (F, 1, W)
    if plan.wraps:  # the shortest way round a torus, so shapes leaving one side show on the other
        dy, dx = dy - dy.round(), dx - dx.round()
    dy, dx = dy * y_scale, dx * x_scale  # in units of the shorter side, so discs stay round
    radius = shape.radius
    if plan.kind == "disc":
        inside = radius - (dy * dy + dx * dx).sqrt()
    elif plan.kind == "square":
        inside = radius - torch.maximum(dy.abs(), dx.abs())
    elif plan.kind == "ring":
        inside = 0.3 * radius - ((dy * dy + dx * dx).sqrt() - 0.7 * radius).abs()
    else:
        inside = 0.6 * radius - (dx.abs() if shape.vertical else dy.abs())
    return (inside * shorter + 0.5).clamp(0.0, 1.0).expand(len(times), len(ys), len(xs))
