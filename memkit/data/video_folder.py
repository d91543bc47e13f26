"""``VideoFolder``: the video files under a folder, decoded with PyAV, resized by resize-then-centre-crop."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from memkit.errors import DataError

from .sources import (
    ClipSource,
    check_index,
    check_positive_int,
    check_size,
    check_window,
    list_files,
    normalize_extensions,
)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv")


class VideoFolder(ClipSource):
    """Every video file under ``root`` (recursive, sorted by path), as RGB clips in [-1, 1].

    stride: keep every ``stride``-th frame; frame ``k`` of an item is frame ``k * stride`` of its file, and
        :meth:`num_frames` counts the kept frames.

    Clips are decoded from the start of the file up to the last frame asked for (no seeking), so a late window of a
    long file costs its whole prefix.
    """

    modality = "video"

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] | str = VIDEO_EXTENSIONS, stride: int = 1):
        self.root = Path(root)
        self.extensions = normalize_extensions(extensions)
        self.stride = check_positive_int("stride", stride)
        self.files = list_files(self.root, self.extensions)
        self._raw_frame_counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[check_index(self, index)])

    def num_frames(self, index: int) -> int:
        check_index(self, index)
        if index not in self._raw_frame_counts:
            self._raw_frame_counts[index] = count_frames(self.files[index])
        return math.ceil(self._raw_frame_counts[index] / self.stride)

    def read(self, index: int, start: int, frames: int, size: tuple[int, int]) -> dict:
        path = self.files[check_index(self, index)]
        size = check_size(size)
        where = str(path) if self.stride == 1 else f"{path} (every {self.stride}th frame)"
        if start < 0 or frames < 1:
            check_window(where, start, frames, self.num_frames(index))
        decoded = decode_frames(path, start * self.stride, frames, self.stride)
        if decoded.shape[0] < frames:
            available = self.num_frames(index)
            if available >= start + frames:  # the container's count was wrong; trust the decoder
                available = start + decoded.shape[0]
            check_window(where, start, frames, available)
        return {"video": resize_center_crop(decoded, size)}


def _ffmpeg_message(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def count_frames(path: Path) -> int:
    """Frames of a video file: the stream's count when the container records one, else counted by decoding."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            if stream.frames > 0:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as exc:
        raise DataError(f"{path} is not a readable video: {_ffmpeg_message(exc)}") from None


def decode_frames(path: Path, first: int, count: int | None, stride: int = 1) -> torch.Tensor:
    """uint8 RGB frames (n, H, W, 3): file frames ``first``, ``first + stride``, ... , ``count`` of them (all to the
    end when ``count`` is None). Decoding stops at the last one; fewer come back when the file ends first."""
    import av
    import numpy as np

    frames = []
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            for number, frame in enumerate(container.decode(stream)):
                if number >= first and (number - first) % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if count is not None and len(frames) == count:
                        break
    except av.error.FFmpegError as exc:
        raise DataError(f"{path} is not a readable video: {_ffmpeg_message(exc)}") from None
    if not frames:
        return torch.zeros(0, 0, 0, 3, dtype=torch.uint8)
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise DataError(f"{path}: its frame size changes mid-stream ({', '.join(str(s[:2]) for s in sorted(sizes))})")
    return torch.from_numpy(np.stack(frames))


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise DataError(f"{path} has no video stream")
    return container.streams.video[0]


def resize_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) as float32 (3, F, h, w) in [-1, 1], scaled to cover ``size`` (aspect kept, bilinear
    with antialiasing) and centre-cropped to it."""
    height, width = size
    video = frames.permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    source_height, source_width = video.shape[-2:]
    if (source_height, source_width) != (height, width):
        scale = max(height / source_height, width / source_width)
        scaled = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
        if scaled != (source_height, source_width):
            video = torch.nn.functional.interpolate(video, size=scaled, mode="bilinear", align_corners=False,
                                                    antialias=True)
        top, left = (scaled[0] - height) // 2, (scaled[1] - width) // 2
        video = video[:, :, top : top + height, left : left + width]
    video = (video / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return video.permute(1, 0, 2, 3).contiguous()
