"""Per-family accuracy from a prediction table, and the binomial interval of the ablation table."""

from __future__ import annotations

import pytest

from stresnet.families import binomial_interval, family_members, family_top1

CLASSES = ["RedDisc", "GreenDisc", "Left", "Right", "Up", "XorA", "XorB"]
FAMILIES = {"RedDisc": "appearance", "GreenDisc": "appearance", "Left": "motion", "Right": "motion",
            "Up": "motion", "XorA": "conjunction", "XorB": "conjunction"}


def test_family_top1_hand_computed():
    # video:        0  1  2  3  4  5  6  7  8  9
    labels = [0, 1, 1, 2, 3, 4, 4, 5, 6, 6]
    predictions = [0, 0, 1, 2, 2, 4, 5, 5, 5, 6]
    # appearance: videos 0,1,2 -> correct 0,2 = 2/3; motion: 3,4,5,6 -> correct 3,5 = 2/4
    # (video 6 predicted XorA, another family's class: wrong); conjunction: 7,8,9 -> 7,9 = 2/3
    out = family_top1(labels, predictions, CLASSES, FAMILIES)
    assert list(out) == ["appearance", "motion", "conjunction"]
    assert out["appearance"] == {"top1": 2 / 3, "correct": 2, "videos": 3, "classes": 2, "chance": 0.5}
    assert out["motion"] == {"top1": 0.5, "correct": 2, "videos": 4, "classes": 3, "chance": 1 / 3}
    assert out["conjunction"]["top1"] == pytest.approx(2 / 3)
    assert out["conjunction"]["videos"] == 3


def test_family_without_test_videos_and_classes_without_family():
    families = {"RedDisc": "appearance", "Left": "motion"}  # the other classes have no family
    out = family_top1([0, 0, 3], [0, 1, 3], CLASSES, families)
    assert out == {
        "appearance": {"top1": 0.5, "correct": 1, "videos": 2, "classes": 1, "chance": 1.0},
        "motion": {"top1": None, "correct": 0, "videos": 0, "classes": 1, "chance": 1.0},
    }


@pytest.mark.parametrize("families", [None, {}])
def test_no_families_no_keys_no_error(families):
    # UCF101-like data: no family map at all.
    assert family_top1([0, 1, 2], [0, 1, 1], CLASSES, families) == {}
    assert family_members(CLASSES, families) == {}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        family_top1([0, 1], [0], CLASSES, FAMILIES)


def test_binomial_interval():
    # Wilson 95 % interval for 45/50, computed by hand: centre (0.9 + 1.96^2/100) / (1 + 1.96^2/50)
    low, high = binomial_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=1e-4)
    assert high == pytest.approx(0.9565, abs=1e-4)
    assert binomial_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert binomial_interval(10, 10)[1] == pytest.approx(1.0)
    # 100 videos at 0.5: about +-0.1
    low, high = binomial_interval(50, 100)
    assert high - low == pytest.approx(0.192, abs=0.002)
    with pytest.raises(ValueError, match="total"):
        binomial_interval(0, 0)
    with pytest.raises(ValueError, match="correct"):
        binomial_interval(5, 4)
