"""One video -> one WebDataset sample: decode, optical flow, JPEG encoding (in worker processes).

``process_videos`` runs ``video_sample`` over a list of videos, in order, in a pool of
``shards.processes`` processes; the shard writer consumes its results one shard at a time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import cv2
import numpy as np

from pipelines import shard_format as fmt
from pipelines.config import ShardsConfig
from pipelines.flow import FlowEstimator
from pipelines.sources import VideoEntry
from pipelines.video import VideoError, decode_video, resized_shape


@dataclass(frozen=True)
class Processing:
    """What a worker needs to turn one video into one sample."""

    fps: float | None
    short_side: int
    flow: str
    tvl1_epsilon: float
    flow_bound: float
    jpeg_quality: int

    @classmethod
    def from_config(cls, cfg: ShardsConfig) -> "Processing":
        return cls(cfg.fps, cfg.short_side, cfg.flow, cfg.tvl1_epsilon, cfg.flow_bound, cfg.jpeg_quality)


def process_videos(
    videos: list[VideoEntry], processing: Processing, processes: int | None
) -> Iterator[tuple[dict | None, str | None]]:
    """(sample, None) or (None, reason) per video, in order.

    A process pool when ``processes`` != 1 (``None``: one per core).
    """
    workers = min(processes or len(os.sched_getaffinity(0)), len(videos))
    jobs = iter([(entry, processing) for entry in videos])
    if workers <= 1:
        _init_worker()
        yield from map(_process_one, jobs)
        return
    # spawn: a clean interpreter per worker (fork after OpenCV/FFmpeg threads started can hang).
    # A pool whose worker dies raises BrokenProcessPool instead of waiting forever, and at most
    # 2 videos per worker are in flight, so finished samples never pile up in memory.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        in_flight = deque(pool.submit(_process_one, job) for job in islice(jobs, 2 * workers))
        while in_flight:
            result = in_flight.popleft().result()
            for job in islice(jobs, 1):
                in_flight.append(pool.submit(_process_one, job))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_ESTIMATORS: dict[tuple[str, float], FlowEstimator] = {}


def _init_worker() -> None:
    # One thread per process: the parallelism is across videos, and timings stay per core.
    cv2.setNumThreads(1)


def _process_one(job: tuple[VideoEntry, Processing]) -> tuple[dict | None, str | None]:
    entry, p = job
    try:
        return video_sample(entry, p), None
    except VideoError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - one bad video must not stop the run; its reason is recorded
        return None, f"{type(err).__name__}: {err}"


def video_sample(entry: VideoEntry, p: Processing) -> dict:
    """Decode one video, compute its flow and encode everything as one WebDataset sample.

    Flow is always computed on the video's native frames, so that its values are in the video's
    own pixels (the authors' TV-L1 flow of the 320x240 UCF101 videos, spec section 5). With
    ``short_side > 0`` the frames *and* the flow fields are resized afterwards for storage; the
    flow values are not rescaled: they stay in native pixels, like everything the loader's crop
    and resize does to them. The sample's json records the size the flow was computed at
    (``flow_height``, ``flow_width``).
    """
    video = decode_video(entry.path, fps=p.fps)
    frames = video.frames
    if len(frames) < 2:
        raise VideoError(f"only {len(frames)} frame: no optical flow")
    key = (p.flow, p.tvl1_epsilon)
    if key not in _ESTIMATORS:
        _ESTIMATORS[key] = FlowEstimator(p.flow, p.tvl1_epsilon)
    flow_height, flow_width = frames.shape[1:3]
    size = (flow_height, flow_width)
    if p.short_side > 0:
        size = resized_shape(flow_height, flow_width, p.short_side)

    params = [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality]
    rgb = [_jpeg(frame, params) for frame in _resized(frames, size)]
    flow = []
    for field in _ESTIMATORS[key].fields(frames):
        quantized = fmt.quantize_flow(field, p.flow_bound)
        flow_x, flow_y = _resized(np.stack([quantized[:, :, 0], quantized[:, :, 1]]), size)
        flow.append((_jpeg(flow_x, params), _jpeg(flow_y, params)))
    height, width = size
    meta = {
        "video_id": entry.video_id, "label": entry.label, "class_name": entry.class_name, "split": entry.split,
        "num_frames": len(frames), "fps": video.fps, "height": height, "width": width,
        "flow_height": flow_height, "flow_width": flow_width,
        "flow_bound": p.flow_bound, "flow_method": p.flow, "source": entry.source,
    }
    return sample_members(entry.video_id, rgb, flow, meta)


def sample_members(key: str, rgb: list[bytes], flow: list[tuple[bytes, bytes]], meta: dict) -> dict:
    """The WebDataset sample of one video from its encoded frames: ``rgb`` JPEG per frame,
    ``flow`` (x, y) JPEGs per field, ``meta`` the json member (``pipelines.shard_format``).
    Also what ``benchmarks/scale.py`` writes its synthetic sets with, so they keep this layout."""
    sample: dict = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
    for i, data in enumerate(rgb):
        sample[fmt.rgb_member(i)] = data
    for i, (data_x, data_y) in enumerate(flow):
        name_x, name_y = fmt.flow_members(i)
        sample[name_x] = data_x
        sample[name_y] = data_y
    return sample


def _resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``images`` (N, H, W[, C]) at (height, width) ``size`` (area when shrinking)."""
    if images.shape[1:3] == tuple(size):
        return images
    shrink = size[0] < images.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(image, (size[1], size[0]), interpolation=interp) for image in images])


def _jpeg(image: np.ndarray, params: list[int]) -> bytes:
    ok, data = cv2.imencode(".jpg", image, params)
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()
