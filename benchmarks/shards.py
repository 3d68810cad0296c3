"""Shard-writing speed per core: flow fields/s and whole videos/s, TV-L1 vs Farneback.

Two frame sizes: the synthetic dataset's 64x80 and UCF101-like 320x240 resized to a 256 px short
side (256x341, what `configs/shards/ucf101.yaml` writes). Everything runs in this one process with
OpenCV limited to one thread and is timed in CPU seconds (``time.process_time``), so the numbers
are per core and hold on a busy machine; a machine with C cores and `shards.processes=C` does about
C times as much. Also reports the flow error on a textured scene
translating 3 px right and 2 px up per frame, to show what the faster settings cost.

    .venv/bin/python benchmarks/shards.py          # writes section "shards" of RESULTS.md
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import markdown_table, write_section  # noqa: E402
from pipelines.flow import FlowEstimator  # noqa: E402
from pipelines.sample_encoding import Processing, video_sample  # noqa: E402
from pipelines.sources import VideoEntry  # noqa: E402
from pipelines.synthetic import FAMILY_CLASSES, render_video, textured_background  # noqa: E402
from pipelines.video import decode_video, write_video  # noqa: E402

UCF101_VIDEOS, UCF101_MEAN_FRAMES = 13_320, 186  # 7.2 s at 25 fps on average
METHODS = [("tvl1", 0.01), ("tvl1", 0.05), ("farneback", 0.0)]


def translation_error(estimator: FlowEstimator, height: int, width: int) -> float:
    """Mean endpoint error (px) away from the borders for a 3 px right, 2 px up translation."""
    texture = textured_background(np.random.default_rng(1), height + 16, width + 16)
    a = cv2.warpAffine(texture, np.float32([[1, 0, -8], [0, 1, -8]]), (width, height))
    b = cv2.warpAffine(texture, np.float32([[1, 0, -5], [0, 1, -10]]), (width, height))
    flow = estimator.pair(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY), cv2.cvtColor(b, cv2.COLOR_BGR2GRAY))
    inner = flow[16:-16, 16:-16] - np.array([3.0, -2.0])
    return float(np.linalg.norm(inner, axis=-1).mean())


def measure(name: str, path: Path, short_side: int) -> list[list]:
    frames = decode_video(path, short_side=short_side).frames
    height, width = frames.shape[1:3]
    rows = []
    for method, epsilon in METHODS:
        estimator = FlowEstimator(method, epsilon)
        list(estimator.fields(frames[:2]))  # warm-up (buffers, first-call costs)
        start = time.process_time()
        for _ in estimator.fields(frames):
            pass
        flow_fps = (len(frames) - 1) / (time.process_time() - start)
        entry = VideoEntry("bench", path, path.name, 0, "bench", "train")
        start = time.process_time()
        video_sample(entry, Processing(None, short_side, method, epsilon, 20.0, 90))
        video_s = time.process_time() - start
        label = method if method == "farneback" else f"tvl1 (epsilon {epsilon})"
        row = [name, f"{width}x{height}", len(frames), label, f"{flow_fps:.1f}", f"{1 / video_s:.3f}",
               f"{translation_error(estimator, height, width):.3f}"]
        if short_side:
            hours = UCF101_VIDEOS * (UCF101_MEAN_FRAMES - 1) / flow_fps / 3600
            row.append(f"{hours:.0f}")
        else:
            row.append("")
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)
    return rows


def main() -> None:
    cv2.setNumThreads(1)
    cls = FAMILY_CLASSES["motion"][1]
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "synthetic.mp4"
        write_video(small, render_video(cls, np.random.default_rng(0), 40, 64, 80), 25.0)
        ucf_like = Path(tmp) / "ucf_like.avi"
        write_video(ucf_like, render_video(cls, np.random.default_rng(0), 12, 240, 320), 25.0)
        rows = measure("synthetic", small, 0) + measure("320x240 -> 256 px", ucf_like, 256)
    header = ["video", "size", "frames", "flow", "flow fields/s per core",
              "videos/s per core (decode+flow+JPEG)", "flow error px (3,-2 translation)",
              "UCF101 core-hours (flow only)"]
    text = (
        "Shard writing per core: one process, one OpenCV thread, rates in CPU seconds "
        "(`time.process_time`, so other jobs on the machine do not inflate them). Videos/s is for "
        "a video of the listed length; a UCF101 video averages ~186 frames. Core-hours extrapolate "
        "the flow rate to all 13,320 UCF101 videos at 256 px. Flow error: mean endpoint error on a "
        "textured scene moving 3 px right, 2 px up.\n\n" + markdown_table(header, rows)
    )
    write_section("shards", text)


if __name__ == "__main__":
    main()
