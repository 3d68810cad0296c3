"""Optical flow: quantisation round trip, and a known translation survives the whole pipeline."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines import shard_format as fmt
from pipelines.flow import FlowEstimator
from pipelines.sample_encoding import Processing, video_sample
from pipelines.sources import VideoEntry
from pipelines.synthetic import textured_background
from pipelines.video import write_video


def test_quantisation_round_trip_within_one_step():
    bound = 20.0
    step = 2 * bound / 255
    flow = np.random.default_rng(0).uniform(-bound, bound, 100_000).astype(np.float32)
    back = fmt.dequantize_flow(fmt.quantize_flow(flow, bound), bound)
    assert np.abs(back - flow).max() <= step / 2 + 1e-5
    # Outside the bound values clip to the ends; 0 maps to the middle (127.5 rounds to 128).
    q = fmt.quantize_flow(np.array([-100.0, -bound, 0.0, bound, 100.0]), bound)
    assert q.tolist() == [0, 0, 128, 255, 255]


def translating_frames(dx: float, dy: float, frames: int, height: int, width: int) -> np.ndarray:
    """A textured scene moving by (dx, dy) pixels per frame (x right, y down)."""
    margin = int(max(abs(dx), abs(dy)) * frames) + 4
    texture = textured_background(np.random.default_rng(1), height + 2 * margin, width + 2 * margin)
    out = []
    for t in range(frames):
        shift = np.float32([[1, 0, -margin + dx * t], [0, 1, -margin + dy * t]])
        out.append(cv2.warpAffine(texture, shift, (width, height), flags=cv2.INTER_LINEAR))
    return np.stack(out)


@pytest.mark.parametrize("method", ["tvl1", "farneback"])
def test_known_translation_survives_video_shard_encoding(tmp_path: Path, method: str):
    # 3 px right and 2 px up per frame; through H.264, flow, quantisation, JPEG and back.
    path = tmp_path / "move.mp4"
    write_video(path, translating_frames(3.0, -2.0, 6, 96, 128), 25.0)
    entry = VideoEntry("move", path, "move.mp4", 0, "move", "train")
    processing = Processing(None, 0, method, 0.01, 20.0, 90)
    sample = video_sample(entry, processing)
    decoded = []
    for i in range(5):
        name_x, name_y = fmt.flow_members(i)
        x = cv2.imdecode(np.frombuffer(sample[name_x], np.uint8), cv2.IMREAD_GRAYSCALE)
        y = cv2.imdecode(np.frombuffer(sample[name_y], np.uint8), cv2.IMREAD_GRAYSCALE)
        decoded.append(fmt.dequantize_flow(np.stack([x, y], axis=-1), 20.0))
    assert fmt.flow_members(5)[0] not in sample  # 6 frames -> 5 flow fields
    inner = np.stack(decoded)[:, 8:-8, 8:-8]  # borders see texture entering the frame
    assert np.median(inner[..., 0]) == pytest.approx(3.0, abs=0.5)
    assert np.median(inner[..., 1]) == pytest.approx(-2.0, abs=0.5)


def test_flow_alignment_field_i_goes_from_frame_i_to_i_plus_1():
    # The scene stands still, then moves right by 4 px once: only field 1 sees motion.
    still, moved = translating_frames(4.0, 0.0, 2, 64, 80)
    frames = np.stack([still, still, moved, moved])
    flow = np.stack(list(FlowEstimator("farneback").fields(frames)))
    assert flow.shape == (3, 64, 80, 2)
    medians = [float(np.median(f[8:-8, 8:-8, 0])) for f in flow]
    assert medians[0] == pytest.approx(0.0, abs=0.3)
    assert medians[1] == pytest.approx(4.0, abs=0.5)
    assert medians[2] == pytest.approx(0.0, abs=0.3)


def test_unknown_flow_method_is_an_error():
    with pytest.raises(ValueError, match="'raft'"):
        FlowEstimator("raft")
