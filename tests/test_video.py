"""Video decoding: frame-rate resampling and short-side resizing."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.video import decode_video, resample, resized_shape, write_video


def test_resize_keeps_aspect_and_resample_halves_frames(tmp_path):
    frames = np.zeros((10, 32, 48, 3), np.uint8)
    frames[:, :, :, 1] = (np.arange(10) * 20)[:, None, None]  # green = 20 x frame index
    write_video(tmp_path / "v.avi", frames, 25.0)
    video = decode_video(tmp_path / "v.avi", fps=12.5, short_side=16)
    assert video.fps == 12.5
    assert video.frames.shape == (5, 16, 24, 3)
    # Every second frame is kept: green levels 0, 40, 80, ... (within codec error).
    assert np.abs(video.frames[:, 8, 12, 1].astype(int) - [0, 40, 80, 120, 160]).max() <= 6


def test_resample_and_shape_rules():
    assert resample(np.arange(6), 30.0, 10.0).tolist() == [0, 3]
    assert resample(np.arange(4), 10.0, 20.0).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resized_shape(240, 320, 256) == (256, 341)
    assert resized_shape(320, 240, 256) == (341, 256)


def test_write_video_rejects_odd_sizes_and_unknown_extensions(tmp_path):
    with pytest.raises(ValueError, match="must be even"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 31, 40, 3), np.uint8), 25.0)
    with pytest.raises(ValueError, match="unsupported extension"):
        write_video(tmp_path / "a.mkv", np.zeros((2, 32, 40, 3), np.uint8), 25.0)



def test_h264_encoding_gives_the_same_bytes_every_time(tmp_path):
    # A synthetic 64x80 clip: with x264's SIMD paths its bytes varied from call to call.
    from pipelines.synthetic import render_video, synthetic_classes
    from pipelines.config import SyntheticConfig

    disc = synthetic_classes(SyntheticConfig())[0]
    frames = render_video(disc, np.random.default_rng([0, 0, 8]), 40, 64, 80)
    encoded = set()
    for i in range(12):
        write_video(tmp_path / f"v{i}.mp4", frames, 25.0)
        encoded.add((tmp_path / f"v{i}.mp4").read_bytes())
    assert len(encoded) == 1
