"""Video and image files: decoded VAE output to uint8 frames, an incremental mp4 writer, and readers."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import torch

from memkit.errors import ConfigError, DTypeError, MemkitError, NonFiniteError, ShapeError, StateFormatError
from memkit.outputs import publish, temporary_beside


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """A float video in [-1, 1], (3, f, H, W) or (1, 3, f, H, W), as uint8 RGB frames (f, H, W, 3) on the CPU.

    Values outside [-1, 1] are clamped; each value is rounded to the nearest of the 256 levels.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ShapeError(f"video has batch {video.shape[0]}; write one video at a time (one VideoWriter each)")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ShapeError(f"video must be (3, frames, H, W) or (1, 3, frames, H, W), got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise DTypeError(f"a float video in [-1, 1] is expected, got {video.dtype}; pass uint8 frames as "
                         f"(frames, H, W, 3)")
    video = video.detach().to("cpu", torch.float32)
    if not torch.isfinite(video).all():
        raise NonFiniteError("video holds NaN or Inf")
    levels = ((video.clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return levels.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def _as_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ShapeError(f"uint8 frames must be (frames, H, W, 3), got shape {tuple(video.shape)}")
        return video.detach().cpu().contiguous()
    return to_uint8_frames(video)


class VideoWriter:
    """Writes frames to an H.264 mp4 (yuv420p) as they come; use as a context manager.

    Odd frame sizes are padded to even by repeating the last row / column (yuv420p needs even sizes). Frames go to a
    hidden temporary file beside ``path`` (created at the first :meth:`write`, with its parent folders) that
    :meth:`close` renames to ``path``: a file at ``path`` is replaced only by a finished video. A writer closed before
    any frame writes no file; :meth:`abort` (or leaving the ``with`` block by an exception) deletes the partial one.
    ``crf`` is libx264's quality (0: lossless, 18: the default, 51: worst).
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16, *, crf: int = 18):
        if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
            raise ConfigError(f"fps must be a positive number, got {fps!r}")
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise ConfigError(f"crf must be an integer in [0, 51], got {crf!r}")
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self._rate = Fraction(fps).limit_denominator(1_000_000)
        self._container = None
        self._stream = None
        self._frame_size: tuple[int, int] | None = None
        self._frames_written = 0
        self._closed = False
        self._tmp: Path | None = None

    @property
    def frames_written(self) -> int:
        return self._frames_written

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """(H, W) of the frames given (before any padding), once the first frame is written."""
        return self._frame_size

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, video: torch.Tensor) -> None:
        """Append frames: a float video in [-1, 1] ((1, 3, f, H, W) or (3, f, H, W)) or uint8 (f, H, W, 3)."""
        if self._closed:
            raise MemkitError(f"VideoWriter for {self.path} is closed")
        frames = _as_uint8_frames(video)
        if frames.shape[0] == 0:
            return
        size = (frames.shape[1], frames.shape[2])
        if self._frame_size is None:
            self._open(size)
        elif size != self._frame_size:
            raise ShapeError(f"frames are {size[0]}x{size[1]} but this video's frames are "
                             f"{self._frame_size[0]}x{self._frame_size[1]}")
        frames = _pad_to_even(frames)
        import av

        for array in frames.numpy():
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = self._frames_written
            frame.time_base = self._stream.codec_context.time_base
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self._frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            publish(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Stop without writing ``path``: the partial video is deleted. Safe after :meth:`close`."""
        if self._closed:
            return
        self._closed = True
        if self._container is not None:
            self._discard()

    def _discard(self) -> None:
        try:
            self._container.close()
        except Exception:  # an encoder that failed may fail again on close; the file goes anyway
            pass
        self._tmp.unlink(missing_ok=True)

    def _open(self, size: tuple[int, int]) -> None:
        import av

        height, width = size
        self._tmp = temporary_beside(self.path)
        try:
            container = av.open(str(self._tmp), mode="w", format="mp4")
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        try:
            stream = container.add_stream(_h264_encoder(), rate=self._rate)
            stream.width, stream.height = width + width % 2, height + height % 2
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = 1 / self._rate
            if stream.codec_context.name == "libx264":
                stream.options = {"crf": str(self.crf)}
        except BaseException:
            container.close()
            self._tmp.unlink(missing_ok=True)
            raise
        self._container, self._stream, self._frame_size = container, stream, size


def _h264_encoder() -> str:
    import av

    if "libx264" in av.codecs_available:
        return "libx264"
    try:
        return av.codec.Codec("h264", "w").name  # whichever H.264 encoder this FFmpeg build has
    except Exception:  # PyAV raises several types for an unknown codec across versions
        raise ConfigError(
            "this PyAV / FFmpeg build has no H.264 encoder; install a PyAV wheel (pip install av)"
        ) from None


def _pad_to_even(frames: torch.Tensor) -> torch.Tensor:
    if frames.shape[1] % 2:
        frames = torch.cat([frames, frames[:, -1:]], dim=1)
    if frames.shape[2] % 2:
        frames = torch.cat([frames, frames[:, :, -1:]], dim=2)
    return frames


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """All frames of a video file as uint8 RGB (T, H, W, 3), and its frame rate."""
    import av
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise StateFormatError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            height, width = stream.codec_context.height, stream.codec_context.width
    except av.error.FFmpegError as exc:
        raise StateFormatError(f"{path} is not a readable video: {exc}") from None
    fps = float(rate) if rate else 0.0
    if not frames:
        return torch.zeros(0, height, width, 3, dtype=torch.uint8), fps
    return torch.from_numpy(np.stack(frames)), fps


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file (PNG, JPEG, ... anything Pillow reads) as uint8 RGB (1, H, W, 3)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise StateFormatError(f"{path} is not a readable image: {exc}") from None
    return torch.from_numpy(array.copy()).unsqueeze(0)
