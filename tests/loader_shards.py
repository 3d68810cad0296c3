"""Tiny shards with known content for the loader tests (the samples are made here, independent
of the shard command, following pipelines/shard_format.py; the tars and their index files are
written by the shard writer's ``write_tar``).

Every video shows a horizontal sine pattern in the red channel that moves RIGHT by ``SPEED``
pixels per frame; the green channel is ``FRAME_STEP * frame index`` (so a decoded frame says which
frame it is) and blue is ``VIDEO_STEP * video number``. Flow field ``i`` has x = +SPEED pixels
(rightward) everywhere and a y byte of ``FLOW_Y_BASE + i`` (so a decoded field says which it is).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np

from pipelines.shard_format import (
    FORMAT_VERSION, flow_members, quantize_flow, rgb_member, shard_name,
)
from pipelines.shard_writer import write_tar
from cluster.config import RunConfig

HEIGHT, WIDTH = 32, 40
SPEED = 1.0  # pixels per frame, rightward
PERIOD = 16.0  # pixels
FRAME_STEP = 8
VIDEO_STEP = 20
FLOW_Y_BASE = 60
BOUND = 20.0


def frame(video: int, t: int) -> np.ndarray:
    """RGB frame ``t`` of video ``video`` (H, W, 3) uint8."""
    x = np.arange(WIDTH, dtype=np.float64)
    red = 128 + 100 * np.sin(2 * np.pi * (x - SPEED * t) / PERIOD)
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:, :, 0] = np.rint(red).astype(np.uint8)[None, :]
    image[:, :, 1] = (FRAME_STEP * t) % 256
    image[:, :, 2] = (VIDEO_STEP * video) % 256
    return image


def jpeg(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = image[:, :, ::-1]  # OpenCV writes BGR
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def sample(video: int, num_frames: int, label: int, split: str) -> dict:
    key = f"v{video:03d}"
    meta = {"video_id": key, "label": label, "class_name": f"class{label}", "split": split,
            "num_frames": num_frames, "fps": 25.0, "height": HEIGHT, "width": WIDTH,
            "flow_bound": BOUND, "flow_method": "synthetic", "source": f"{key}.avi"}
    out = {"__key__": key, "json": json.dumps(meta).encode()}
    flow_x = quantize_flow(np.full((HEIGHT, WIDTH), SPEED), BOUND)
    for t in range(num_frames):
        out[rgb_member(t)] = jpeg(frame(video, t))
    for i in range(num_frames - 1):
        name_x, name_y = flow_members(i)
        out[name_x] = jpeg(flow_x)
        out[name_y] = jpeg(np.full((HEIGHT, WIDTH), FLOW_Y_BASE + i, np.uint8))
    return out


def write_shards(folder: Path, lengths: dict[str, list[int]], per_shard: int = 4,
                 num_classes: int = 3) -> Path:
    """Shards + manifest: ``lengths[split]`` = frame counts of that split's videos."""
    folder.mkdir(parents=True, exist_ok=True)
    splits, video = {}, 0
    for split, frame_counts in lengths.items():
        shards = []
        for start in range(0, len(frame_counts), per_shard):
            name = shard_name(split, 0, len(shards))
            chunk = frame_counts[start : start + per_shard]
            samples = []
            for n in chunk:
                samples.append(sample(video, n, video % num_classes, split))
                video += 1
            write_tar(folder / name, samples)
            shards.append({"name": name, "samples": len(chunk)})
        splits[split] = {"samples": len(frame_counts), "shards": shards}
    manifest = {"format": FORMAT_VERSION, "dataset": "synthetic",
                "classes": [f"class{i}" for i in range(num_classes)], "splits": splits,
                "unused": 0, "params": {}, "versions": {}, "failures": [], "created": "now"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def replace_member(shard: Path, member: str, data: bytes) -> None:
    """Rewrite one member of a shard (to simulate a corrupt JPEG). Its index file no longer
    matches; the reader notices and scans the tar headers."""
    with tarfile.open(shard) as tar:
        entries = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, blob in entries:
            if m.name == member:
                blob = data
                m.size = len(data)
            tar.addfile(m, io.BytesIO(blob))


def config(shards: Path, **overrides) -> RunConfig:
    """A small run config over ``shards``: 24 px crops, T=3, L=2, batch 2."""
    from cluster.config import load_config

    items = {
        "data.shards": str(shards), "data.batch_size_per_worker": 2, "data.loader_workers": 0,
        "data.train_split": "train", "data.val_split": "test", "eval.batch_size_per_worker": 2,
        "sampling.input_size": 24, "sampling.train_positions": 3, "sampling.stride_min": 1,
        "sampling.stride_max": 3, "sampling.test_positions": 4, "model.flow_length": 2,
        "model.num_classes": 3, "seed": 7,
    }
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])
