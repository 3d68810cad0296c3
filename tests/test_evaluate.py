"""Video-level metrics on hand-made scores: view averaging, top-1/top-5, per class, confusion."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stresnet.evaluate import VideoScores, save_report, summary_metrics, video_report

CLASSES = ["a", "b", "c", "d", "e", "f"]


def logits_for(probabilities: list[float]) -> torch.Tensor:
    """Logits whose softmax is ``probabilities``."""
    return torch.log(torch.tensor(probabilities))


def add_view(scores: VideoScores, video: str, label: int, appearance: list, motion: list) -> None:
    app, mot = logits_for(appearance), logits_for(motion)
    fused = (app.softmax(0) + mot.softmax(0)) / 2
    scores.add(
        {"appearance": app[None], "motion": mot[None], "fused": fused[None]},
        torch.tensor([label]),
        [video],
    )


def test_views_are_averaged_before_the_arg_max():
    scores = VideoScores("softmax")
    # Video v0 (class 0): view 1 prefers class 1 slightly, view 2 prefers class 0 strongly.
    # Averaged, class 0 wins; a per-view vote would tie.
    add_view(scores, "v0", 0, [0.30, 0.40, 0.1, 0.1, 0.05, 0.05], [0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
    add_view(scores, "v0", 0, [0.80, 0.10, 0.05, 0.03, 0.01, 0.01], [0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
    report = video_report(scores, CLASSES)
    assert report["videos"] == 1
    assert report["views_per_video"] == {"min": 2, "max": 2}
    assert report["streams"]["appearance"]["top1"] == 1.0


def test_top1_top5_per_class_and_confusion():
    scores = VideoScores("softmax")
    uniform_tail = [0.01] * 5
    # v0, class 0: appearance right; motion ranks the truth 6th (outside top-5).
    add_view(scores, "v0", 0, [0.9] + uniform_tail, [0.0005, 0.2, 0.2, 0.2, 0.2, 0.1995])
    # v1, class 1: appearance wrong (class 2 first, truth 2nd); motion right.
    add_view(scores, "v1", 1, [0.1, 0.3, 0.5, 0.05, 0.03, 0.02], [0.05, 0.8, 0.05, 0.05, 0.03, 0.02])
    # v2, class 1: both wrong: predicted class 3; truth inside the top-5 for both.
    add_view(scores, "v2", 1, [0.1, 0.2, 0.05, 0.5, 0.1, 0.05], [0.1, 0.2, 0.05, 0.5, 0.1, 0.05])
    report = video_report(scores, CLASSES)

    app, mot, fused = (report["streams"][s] for s in ("appearance", "motion", "fused"))
    assert app["top1"] == pytest.approx(1 / 3)
    assert app["top5"] == 1.0
    assert mot["top1"] == pytest.approx(1 / 3)
    assert mot["top5"] == pytest.approx(2 / 3)
    assert app["per_class"] == {"a": 1.0, "b": 0.0, "c": None, "d": None, "e": None, "f": None}
    assert mot["per_class"]["a"] == 0.0 and mot["per_class"]["b"] == 0.5
    # Fused = mean of the two softmax scores: v0 -> class 0, v1 -> class 1, v2 -> class 3.
    assert fused["top1"] == pytest.approx(2 / 3)
    confusion = report["confusion_matrix"]
    assert confusion[0][0] == 1 and confusion[1][1] == 1 and confusion[1][3] == 1
    assert sum(map(sum, confusion)) == 3
    assert summary_metrics(report, "val_")["val_fused_top1"] == pytest.approx(2 / 3)


def test_merging_worker_parts_equals_scoring_in_one_place():
    whole, part1, part2 = VideoScores("softmax"), VideoScores("softmax"), VideoScores("softmax")
    views = [
        ("v0", 0, [0.6, 0.1, 0.1, 0.1, 0.05, 0.05], [0.2] * 5 + [0.0001]),
        ("v0", 0, [0.1, 0.6, 0.1, 0.1, 0.05, 0.05], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]),
        ("v1", 2, [0.1, 0.1, 0.6, 0.1, 0.05, 0.05], [0.1, 0.1, 0.5, 0.1, 0.1, 0.1]),
    ]
    for i, view in enumerate(views):
        add_view(whole, *view)
        add_view(part1 if i % 2 else part2, *view)
    part1.merge(part2)
    assert video_report(part1, CLASSES) == video_report(whole, CLASSES)


def test_report_files(tmp_path):
    scores = VideoScores("softmax")
    add_view(scores, "v0", 0, [0.9] + [0.02] * 5, [0.9] + [0.02] * 5)
    paths = save_report(video_report(scores, CLASSES), tmp_path / "eval")
    loaded = json.loads(paths["report"].read_text())
    assert loaded["streams"]["fused"]["top1"] == 1.0
    assert math.isclose(sum(v for v in loaded["streams"]["fused"]["per_class"].values() if v), 1.0)
    assert paths["confusion_matrix"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_scores_are_an_error():
    with pytest.raises(ValueError, match="no test videos"):
        video_report(VideoScores("softmax"), CLASSES)


def test_logit_and_softmax_averaging_differ_as_expected():
    """Three views of one video (class 0): two say class 0 with a moderate margin, one says
    class 1 with a huge logit. Averaged logits follow the one large view (class 1); averaged
    probabilities are bounded per view, so the two agreeing views win (class 0)."""
    views = [torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([[5.0, 0.0, 0.0]]),
             torch.tensor([[0.0, 30.0, 0.0]])]
    mean = {}
    for average in ("logits", "softmax"):
        scores = VideoScores(average)
        for logits in views:
            outputs = {"appearance": logits, "motion": logits, "fused": logits.softmax(1)}
            scores.add(outputs, torch.tensor([0]), ["v"])
        entry = scores.videos["v"]
        mean[average] = {k: v / entry["views"] for k, v in entry["scores"].items()}
        report = video_report(scores, ["a", "b", "c"])
        assert report["score_average"] == average
        assert report["streams"]["fused"]["top1"] == (1.0 if average == "softmax" else 0.0)
    logit_mean = torch.cat(views).mean(0).double().numpy()
    prob_mean = torch.cat([v.softmax(1) for v in views]).mean(0).double().numpy()
    assert mean["logits"]["appearance"] == pytest.approx(logit_mean)
    assert mean["logits"]["fused"] == pytest.approx(logit_mean)  # mean of identical streams
    assert mean["softmax"]["appearance"] == pytest.approx(prob_mean, rel=1e-6)
    assert mean["logits"]["appearance"].argmax() == 1
    assert mean["softmax"]["appearance"].argmax() == 0

def test_per_family_top1_in_report_and_metrics():
    scores = VideoScores("softmax")
    uniform_tail = [0.01] * 5
    # Same three videos as above: appearance predicts 0, 2, 3; motion 5, 1, 3; fused 0, 1, 3.
    add_view(scores, "v0", 0, [0.9] + uniform_tail, [0.0005, 0.2, 0.2, 0.2, 0.2, 0.1995])
    add_view(scores, "v1", 1, [0.1, 0.3, 0.5, 0.05, 0.03, 0.02], [0.05, 0.8, 0.05, 0.05, 0.03, 0.02])
    add_view(scores, "v2", 1, [0.1, 0.2, 0.05, 0.5, 0.1, 0.05], [0.1, 0.2, 0.05, 0.5, 0.1, 0.05])
    families = {"a": "colour", "b": "move", "c": "move", "d": "xor", "e": "xor", "f": "xor"}
    report = video_report(scores, CLASSES, families)
    assert report["families"] == {
        "colour": {"classes": ["a"], "videos": 1, "chance": 1.0},
        "move": {"classes": ["b", "c"], "videos": 2, "chance": 0.5},
        "xor": {"classes": ["d", "e", "f"], "videos": 0, "chance": 1 / 3},
    }
    assert report["streams"]["appearance"]["per_family"] == {"colour": 1.0, "move": 0.0, "xor": None}
    assert report["streams"]["motion"]["per_family"] == {"colour": 0.0, "move": 0.5, "xor": None}
    assert report["streams"]["fused"]["per_family"] == {"colour": 1.0, "move": 0.5, "xor": None}
    metrics = summary_metrics(report, "test_")
    assert metrics["test_fused_top1_move"] == 0.5
    assert metrics["test_appearance_top1_colour"] == 1.0
    assert "test_fused_top1_xor" not in metrics  # no test videos: no number
    # Without a family map (UCF101): no family keys at all.
    plain = video_report(scores, CLASSES)
    assert "families" not in plain and "per_family" not in plain["streams"]["fused"]
    assert not any(key.count("_") > 1 for key in summary_metrics(plain))
