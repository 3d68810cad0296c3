"""The synthetic dataset: deterministic, real H.264/MPEG-4 files, classes that mean what they say."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from pipelines.sources import load_source
from pipelines.synthetic import FAMILY_CLASSES, order_timing, render_video, write_synthetic_dataset
from pipelines.video import decode_video
from cluster.config import load_config
from pipelines.config import DatasetConfig, SyntheticConfig


def small(root: Path, **overrides) -> DatasetConfig:
    syn = SyntheticConfig(videos_per_class=2, video_frames=6, height=32, width=40, test_fraction=0.5)
    for key, value in overrides.items():
        setattr(syn, key, value)
    return DatasetConfig(kind="synthetic", root=str(root), synthetic=syn)


def test_same_seed_same_videos_and_labels(tmp_path):
    roots = [write_synthetic_dataset(small(tmp_path / name)) for name in ("a", "b")]
    videos = sorted(p.relative_to(roots[0]) for p in roots[0].rglob("v_*"))
    assert len(videos) == 11 * 2
    for name in ("classInd.txt", "trainlist01.txt", "testlist01.txt"):
        assert (roots[0] / name).read_text() == (roots[1] / name).read_text()
    for rel in videos:
        a, b = decode_video(roots[0] / rel), decode_video(roots[1] / rel)
        assert a.frames.shape == (6, 32, 40, 3)
        assert np.array_equal(a.frames, b.frames)
    # A class looks the same whichever families are selected.
    motion_only = write_synthetic_dataset(small(tmp_path / "m", families=["motion"]))
    rel = Path("SquareMovesLeft/v_SquareMovesLeft_g01_c01.mp4")
    assert np.array_equal(decode_video(roots[0] / rel).frames, decode_video(motion_only / rel).frames)
    other = write_synthetic_dataset(small(tmp_path / "c", seed=1))
    assert not np.array_equal(
        decode_video(roots[0] / videos[0]).frames, decode_video(other / videos[0]).frames
    )


def test_writes_h264_mp4_and_mpeg4_avi_read_as_ucf101(tmp_path):
    cfg = small(tmp_path, families=["motion"])
    root = write_synthetic_dataset(cfg)
    codecs = {}
    for path in root.rglob("v_*"):
        with av.open(str(path)) as container:
            codecs[path.suffix] = container.streams.video[0].codec_context.name
    assert codecs == {".mp4": "h264", ".avi": "mpeg4"}
    index = load_source(cfg)
    assert index.classes == [c.name for c in FAMILY_CLASSES["motion"]]
    assert index.counts() == {"train": 4, "test": 4}
    assert (root / "classInd.txt").read_text().splitlines()[0] == "1 SquareMovesLeft"


def test_existing_dataset_is_reused_and_other_settings_refused(tmp_path):
    root = write_synthetic_dataset(small(tmp_path))
    stamp = (root / "RedDisc" / "v_RedDisc_g01_c01.mp4").stat().st_mtime_ns
    write_synthetic_dataset(small(tmp_path))
    assert (root / "RedDisc" / "v_RedDisc_g01_c01.mp4").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other settings"):
        write_synthetic_dataset(small(tmp_path, seed=3))


def object_track(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (x, y) per frame and the mean BGR colour of the saturated object pixels."""
    f = frames.astype(np.int32)
    saturation = f.max(axis=3) - f.min(axis=3)
    centres, colours = [], []
    for frame, sat in zip(f, saturation):
        ys, xs = np.nonzero(sat > 100)  # the background is grey-ish, objects are vivid
        if len(xs) == 0:  # hidden (order family)
            centres.append((np.nan, np.nan))
            continue
        centres.append((xs.mean(), ys.mean()))
        colours.append(frame[ys, xs].mean(axis=0))
    return np.array(centres), np.mean(colours, axis=0)


@pytest.mark.parametrize("family", ["appearance", "motion", "conjunction", "order"])
def test_class_cues(family):
    frames = 24 if family == "order" else 16  # order: 7 frames per phase
    for cls in FAMILY_CLASSES[family]:
        for seed in range(4):
            track, colour = object_track(render_video(cls, np.random.default_rng(seed), frames, 64, 80))
            half = frames // 2
            first = track[half - 1] - track[0]
            second = track[-1] - track[half]
            if family == "appearance":
                # Still in the scene: on screen it moves with the camera only (pan <= 0.3 px
                # and jitter <= 1 px per frame).
                assert np.abs(track[-1] - track[0]).max() < 0.3 * frames + 3
            elif family == "motion":
                direction = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[cls.motion]
                moved = track[-1] - track[0]
                assert np.dot(moved, direction) > 6  # net motion along the class direction
            elif family == "conjunction":
                red = colour[2] > colour[1]  # BGR
                moved = track[-1] - track[0]
                up_right = moved[0] > 6 and moved[1] < -6
                down_left = moved[0] < -6 and moved[1] > 6
                assert up_right or down_left
                # label = colour XOR direction: class 0 is red-up-right/green-down-left.
                assert (red == up_right) == (cls.name == "RedUpRightOrGreenDownLeft")
            else:
                # Hidden, out, hidden, back, hidden: the object is visible in the two phases only.
                start, length, second = order_timing(frames)
                visible = ~np.isnan(track[:, 0])
                expected = np.zeros(frames, bool)
                expected[start : start + length] = expected[second : second + length] = True
                assert np.array_equal(visible, expected)
                out = track[start + length - 1, 0] - track[start, 0]
                back = track[second + length - 1, 0] - track[second, 0]
                right_first = cls.name == "RingRightThenLeft"
                assert (out > 4) == right_first and (back < -4) == right_first
                assert (out < -4) != right_first and (back > 4) != right_first


def test_order_gap_hides_both_phases_from_one_flow_stack():
    # No flow stack of L <= 5 fields (L + 1 frames) holds motion of both phases: the hidden gap
    # between them is at least L - 2 frames for every video length the configs use.
    for frames in range(16, 65):
        start, length, second = order_timing(frames)
        gap = second - (start + length)
        assert gap >= 3 and start >= 1 and second + length < frames
        assert length >= 5  # enough frames per phase for a motion to be seen


# Classes told apart by horizontal direction: a mirrored clip of one is a clip of its partner.
HORIZONTAL_MOTIONS = {"left", "right", "xor", "right_left", "left_right"}
SYNTHETIC_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "synthetic").glob("*.yaml"))


@pytest.mark.parametrize("path", SYNTHETIC_CONFIGS, ids=lambda p: p.name)
def test_synthetic_training_configs_do_not_mirror(path):
    # Horizontal flips relabel half the clips of the left/right classes (the main job's motion
    # stream stayed at chance with sampling.flip on), so configs that train on them must not flip.
    cfg = load_config(path)
    families = cfg.dataset.synthetic.families
    chiral = [c.name for f in families for c in FAMILY_CLASSES[f] if c.motion in HORIZONTAL_MOTIONS]
    assert cfg.dataset.kind == "synthetic"
    assert chiral, f"{path}: expected the synthetic left/right classes among {families}"
    assert not cfg.sampling.flip, f"{path}: sampling.flip would swap the labels of {chiral}"
