"""Accuracy per class family: the evidence that each part of the model does its job.

The bundled synthetic dataset groups its classes into families, each solvable only by one part of
ST-ResNet (``pipelines/synthetic.py``): ``appearance`` (colour), ``motion`` (direction),
``conjunction`` (colour XOR direction: needs the cross-stream connections) and ``order`` (which
motion comes first: needs the temporal convolutions). Its shard manifest carries a class -> family
map; real datasets have none, and every function here then returns nothing rather than failing.

A family's *chance level* is one over its number of classes: a model that recognises the family
(each family has its own object shape) but not the class guesses among the family's classes.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np


def family_members(
    class_names: Sequence[str], families: Optional[Mapping[str, str]]
) -> dict[str, list[int]]:
    """``{family: [class indices]}`` in order of first appearance; ``{}`` without a family map.

    Classes missing from ``families`` belong to no family (and count only in the overall top-1).
    """
    members: dict[str, list[int]] = {}
    for index, name in enumerate(class_names):
        family = (families or {}).get(name)
        if family is not None:
            members.setdefault(family, []).append(index)
    return members


def family_top1(
    labels: Sequence[int],
    predictions: Sequence[int],
    class_names: Sequence[str],
    families: Optional[Mapping[str, str]],
) -> dict[str, dict]:
    """Video-level top-1 per family from a prediction table (one true and one predicted class
    index per video).

    Returns ``{family: {"top1", "correct", "videos", "classes", "chance"}}``; ``top1`` is
    ``None`` for a family without test videos. A prediction counts as correct only if it is the
    exact class (predicting another family's class is wrong too). ``{}`` when ``families`` is
    empty or None (e.g. UCF101).
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    out: dict[str, dict] = {}
    for family, indices in family_members(class_names, families).items():
        members = np.isin(labels, indices)
        videos = int(members.sum())
        correct = int((predictions[members] == labels[members]).sum())
        out[family] = {
            "top1": correct / videos if videos else None,
            "correct": correct,
            "videos": videos,
            "classes": len(indices),
            "chance": 1.0 / len(indices),
        }
    return out


def binomial_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``correct / total`` (95 % by default).

    Wilson rather than the normal approximation: it stays inside [0, 1] and is sensible at
    accuracies near 0 or 1 with a few hundred test videos.
    """
    if total <= 0:
        raise ValueError(f"total: got {total}, expected at least one trial")
    if not 0 <= correct <= total:
        raise ValueError(f"correct: got {correct}, expected 0..{total}")
    z = {0.9: 1.6448536, 0.95: 1.9599640, 0.99: 2.5758293}.get(confidence)
    if z is None:
        raise ValueError(f"confidence: got {confidence}, expected 0.9, 0.95 or 0.99")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
