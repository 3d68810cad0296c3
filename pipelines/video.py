"""Read and write video files with PyAV (FFmpeg), as arrays of BGR frames.

Frames are ``uint8`` arrays of shape ``(N, H, W, 3)`` in BGR order, the order OpenCV (which
computes the flow and encodes the JPEGs) expects, so no colour conversion happens in between.
"""

from __future__ import annotations

import fractions
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np


# Colour conversion (swscale) settings: bit-exact, one thread. swscale's defaults (SIMD paths,
# slice threads) can round differently from call to call, and the same file must always decode
# to the same pixels (deterministic shards, reproducible tests).
EXACT = dict(interpolation=av.video.reformatter.Interpolation.BILINEAR
             | av.video.reformatter.Interpolation.ACCURATE_RND
             | av.video.reformatter.Interpolation.BITEXACT, threads=1)


class VideoError(Exception):
    """A video could not be decoded into frames; the message says why (recorded as a failure)."""


@dataclass
class Video:
    frames: np.ndarray  # (N, H, W, 3) uint8, BGR
    fps: float


def decode_video(path: str | Path, fps: float | None = None, short_side: int = 0) -> Video:
    """Decode every frame of ``path``; optionally resample to ``fps`` and resize.

    ``short_side > 0`` resizes so that the shorter side has that many pixels, keeping the aspect
    ratio. Raises ``VideoError`` for unreadable, corrupt, truncated or empty files.
    """
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            native_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            expected = stream.frames  # from the container header; 0 when it does not say
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="bgr24", **EXACT))
    except av.error.FFmpegError as err:
        where = f" after {len(frames)} frames" if frames else ""
        raise VideoError(f"decode error{where}: {err}") from None
    except (OSError, ValueError) as err:  # e.g. a file PyAV cannot even probe
        raise VideoError(f"cannot read: {err}") from None
    if not frames:
        raise VideoError("no frames decoded")
    # A file cut short often decodes "successfully" up to the cut; the header still knows the
    # real length. Allow a few frames of slack for containers whose count is approximate.
    if expected and len(frames) < expected - max(2, expected // 20):
        raise VideoError(f"truncated: decoded {len(frames)} of {expected} frames")
    if native_fps <= 0:
        raise VideoError("unknown frame rate")

    array = np.stack(frames)
    if fps is not None and abs(fps - native_fps) > 1e-6:
        array = resample(array, native_fps, fps)
        native_fps = fps
    if short_side > 0:
        array = resize_short_side(array, short_side)
    return Video(array, native_fps)


def resample(frames: np.ndarray, fps_in: float, fps_out: float) -> np.ndarray:
    """Pick the frame shown at each output time ``k / fps_out`` (nearest earlier input frame)."""
    duration = len(frames) / fps_in
    count = max(1, int(round(duration * fps_out)))
    index = np.minimum((np.arange(count) * fps_in / fps_out).astype(np.int64), len(frames) - 1)
    return frames[index]


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side scaled to ``short_side``, aspect kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    new_h, new_w = resized_shape(height, width, short_side)
    if (new_h, new_w) == (height, width):
        return frames
    # INTER_AREA avoids aliasing when shrinking; it equals bilinear-like quality when growing.
    interp = cv2.INTER_AREA if new_h < height else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (new_w, new_h), interpolation=interp) for f in frames])


# Codec settings per container: H.264 in MP4, MPEG-4 part 2 (the XviD family UCF101 uses) in AVI.
CODECS = {".mp4": "libx264", ".avi": "mpeg4"}


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Encode BGR ``frames`` (N, H, W, 3) to ``path``; the codec follows the extension.

    Frame height and width must be even (yuv420p). Encoding is single-threaded so that the same
    frames always give the same bytes.
    """
    path = Path(path)
    codec = CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"{path}: unsupported extension, expected one of {sorted(CODECS)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: frame size {width}x{height} must be even for yuv420p")
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            # asm=0: x264's SIMD paths read past the end of rows into uninitialised memory
            # at some frame sizes (e.g. 80 px wide), so the same frames gave different bytes
            # from call to call. Plain C is slower, but the synthetic videos are tiny.
            stream.options = {"crf": "18", "preset": "veryfast", "x264-params": "asm=0"}
        else:
            stream.bit_rate = 4_000_000  # high enough that compression artefacts stay small
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            frame = frame.reformat(format="yuv420p", **EXACT)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
