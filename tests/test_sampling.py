"""Clip sampling rules (spec section 5) and the network-input normalisation."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stresnet.config import SamplingConfig
from stresnet.sampling import (
    CORNER_BAND, FLOW_SCALE, IMAGENET_MEAN, IMAGENET_STD, clip_rng, flow_indices, flow_offsets,
    eval_plan, eval_positions, eval_views, normalize_clip, train_crop, train_plan,
    train_positions, valid_range,
)


def test_flow_stack_is_centred_as_the_spec_says():
    # spec: frames t-L/2 .. t+L/2-1
    assert list(flow_offsets(10)) == list(range(-5, 5))
    assert list(flow_offsets(2)) == [-1, 0]
    assert list(flow_offsets(1)) == [0]
    assert flow_indices(20, 100, 10) == tuple(range(15, 25))


def test_flow_indices_clamp_to_the_existing_fields():
    # 6 frames -> flow fields 0..4
    assert flow_indices(0, 6, 4) == (0, 0, 0, 1)
    assert flow_indices(5, 6, 4) == (3, 4, 4, 4)


@pytest.mark.parametrize("num_frames", [60, 200])
def test_training_positions_keep_stride_and_room_for_the_flow_stack(num_frames):
    strides = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        pos = train_positions(num_frames, 5, 5, 15, 10, rng)
        assert len(pos) == 5
        steps = set(np.diff(pos))
        assert len(steps) == 1
        strides |= steps
        for p in pos:  # the whole stack exists: no clamping needed
            assert p - 5 >= 0 and p + 4 <= num_frames - 2
    if num_frames == 200:  # long video: every stride of [5, 15] is drawn
        assert strides == set(range(5, 16))
    else:  # 60 frames: range 5..54 holds at most stride 12 for 5 positions
        assert max(strides) == 12 and min(strides) == 5


def test_short_video_shrinks_the_stride_then_repeats_frames():
    rng = np.random.default_rng(0)
    # valid range for L=10 in 25 frames: 5..19 (room 14): stride at most 3 for T=5
    pos = train_positions(25, 5, 5, 15, 10, rng)
    assert np.diff(pos).tolist() == [3, 3, 3, 3]
    # 12 frames: valid 5..6, stride 0 does not exist -> evenly spread, repeated frames
    pos = train_positions(12, 5, 5, 15, 10, rng)
    assert pos == [5, 5, 6, 6, 6] or pos == [5, 5, 5, 6, 6]
    # shorter than a flow stack: whole video, flow clamped
    assert valid_range(4, 10) == (0, 3)
    for n in (2, 3, 4):
        pos = train_positions(n, 11, 1, 15, 10, rng)
        assert len(pos) == 11 and min(pos) >= 0 and max(pos) <= n - 1
        assert all(0 <= i <= n - 2 for p in pos for i in flow_indices(p, n, 10))


def test_test_positions_are_uniform_over_the_valid_range():
    assert eval_positions(100, 25, 10) == [int(v) for v in np.rint(np.linspace(5, 94, 25))]
    assert eval_positions(100, None, 10) == list(range(5, 95))  # whole video
    assert eval_positions(3, 4, 10) == [0, 1, 1, 2]


def test_crop_size_and_corner_placement():
    cfg = SamplingConfig(input_size=224)
    sizes, fractions, flips = [], [], []
    for seed in range(400):
        box, flip = train_crop(256, 340, cfg, np.random.default_rng(seed))
        assert 168 <= box.w <= 280 and 168 <= box.h <= 256  # 224*[.75, 1.25], clipped to h
        assert 0 <= box.x <= 340 - box.w and 0 <= box.y <= 256 - box.h
        sizes.append((box.w, box.h))
        if box.w < 320:
            fractions.append(box.x / (340 - box.w))
        flips.append(flip)
    fractions = np.array(fractions)
    # near a border, never in the centre (f25noCtr), both borders used
    assert np.all((fractions <= CORNER_BAND + 0.01) | (fractions >= 1 - CORNER_BAND - 0.01))
    assert (fractions < 0.5).any() and (fractions > 0.5).any()
    assert 0.4 < np.mean(flips) < 0.6
    assert len({w for w, _ in sizes}) > 20 and any(h == 256 for _, h in sizes)


def test_crop_anywhere_and_no_flip():
    cfg = SamplingConfig(input_size=224, crop_placement="anywhere", flip=False)
    fractions = []
    for seed in range(300):
        box, flip = train_crop(256, 340, cfg, np.random.default_rng(seed))
        assert not flip
        if box.w < 320:
            fractions.append(box.x / (340 - box.w))
    assert any(0.4 < f < 0.6 for f in fractions)


def test_crop_of_a_frame_smaller_than_the_input_is_clipped():
    box, _ = train_crop(20, 30, SamplingConfig(input_size=224), np.random.default_rng(0))
    assert (box.x, box.y, box.w, box.h) == (0, 0, 30, 20)


def test_plan_is_deterministic_per_seed_epoch_and_video():
    cfg = SamplingConfig(input_size=112, train_positions=5)
    a = train_plan(cfg, 10, 3, 1, "v_Run_g01_c01", 150, 128, 170)
    assert a == train_plan(cfg, 10, 3, 1, "v_Run_g01_c01", 150, 128, 170)
    others = [train_plan(cfg, 10, 3, e, "v_Run_g01_c01", 150, 128, 170) for e in range(2, 6)]
    others += [train_plan(cfg, 10, 4, 1, "v_Run_g01_c01", 150, 128, 170)]
    assert all(o != a for o in others)
    # the stream is keyed by the video id, not by Python's per-process (salted) hash()
    code = "from stresnet.sampling import clip_rng; print(clip_rng(3, 1, 'x').integers(1 << 30))"
    here = str(clip_rng(3, 1, "x").integers(1 << 30))
    for salt in ("12345",):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == here, out.stderr


def test_test_views():
    cfg = SamplingConfig(input_size=24, test_crops="center")
    assert [(b.x, b.y, b.w, b.h, f) for b, f in [(*v,) for v in eval_views(32, 40, cfg)]] == [
        (8, 4, 24, 24, False)
    ]
    cfg.test_crops = "center_flip"
    assert [f for _, f in eval_views(32, 40, cfg)] == [False, True]
    cfg.test_crops = "ten_crop"
    views = eval_views(32, 40, cfg)
    assert len(views) == 10 and len(set(views)) == 10
    assert {(b.x, b.y) for b, _ in views} == {(0, 0), (16, 0), (0, 8), (16, 8), (8, 4)}
    plan = eval_plan(cfg, 2, 7, 12, 32, 40)
    assert plan.flip and len(plan.positions) == cfg.test_positions


def test_normalize_clip_values_and_flow_x_negation_on_flip():
    rgb = torch.full((2, 1, 4, 4, 3), 255, dtype=torch.uint8)
    flow = torch.empty((2, 1, 4, 4, 4), dtype=torch.uint8)
    flow[..., 0::2] = 140  # x: rightward
    flow[..., 1::2] = 100  # y
    out_rgb, out_flow = normalize_clip(rgb, flow, torch.tensor([False, True]), "none")
    assert out_rgb.shape == (2, 1, 3, 4, 4) and out_rgb.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(out_rgb[0, 0, :, 0, 0], torch.tensor(expected))
    assert out_flow.shape == (2, 1, 4, 4, 4)
    assert torch.allclose(out_flow[0, 0, 0], torch.tensor((140 - 128) / FLOW_SCALE))
    assert torch.allclose(out_flow[1, 0, 0], torch.tensor((255 - 140 - 128) / FLOW_SCALE))
    assert torch.allclose(out_flow[1, 0, 1], torch.tensor((100 - 128) / FLOW_SCALE))  # y kept


def test_normalize_clip_median_centring():
    flow = torch.randint(0, 256, (1, 2, 5, 5, 4), dtype=torch.uint8)
    _, out = normalize_clip(None, flow, torch.tensor([False]), "median")
    medians = out.flatten(3).median(dim=3).values
    assert torch.allclose(medians, torch.zeros_like(medians))
