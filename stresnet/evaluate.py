"""Video-level evaluation (spec section 5): the same code validates during training and runs in
``stresnet evaluate``.

A test loader yields every (video, view) once, where a view is one crop of the video's test
positions. A video's scores are averaged over its views per stream; the video's prediction is the
arg-max of that average. What is averaged is ``eval.score_average``: ``logits`` (the authors' code,
``cnn_train_dag.m``: the prediction layer's outputs averaged over positions, flips and streams) or
``softmax`` (the probabilities). The fused score averages the streams' scores of the same kind.
Reported: top-1/top-5 of the appearance, motion and fused scores, per-class accuracy and the
fused confusion matrix.

In distributed evaluation each worker sees a disjoint part of the views; :func:`gather_scores`
merges the workers' sums so every rank can compute the same report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

from stresnet.families import family_members, family_top1

# Order in which reports list the streams; a single-stream model has its own stream and fused.
REPORT_STREAMS = ("appearance", "motion", "fused")


class VideoScores:
    """Per video: its label, the number of views seen and the sum of each stream's scores.

    ``average``: ``"logits"`` sums the streams' logits (fused: their mean over streams),
    ``"softmax"`` sums softmax probabilities (fused: the model's mean of the streams' softmax).
    """

    def __init__(self, average: str = "logits") -> None:
        if average not in ("logits", "softmax"):
            raise ValueError(f"eval.score_average: got {average!r}, expected 'logits' or 'softmax'")
        self.average = average
        self.videos: dict[str, dict] = {}
        self.skipped = 0  # views the loader dropped (damaged samples)

    def add(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, video_ids: list[str]) -> None:
        """Add one batch of model outputs (stream logits and fused scores) for ``video_ids``."""
        streams = {name: outputs[name].float() for name in REPORT_STREAMS
                   if name in outputs and name != "fused"}
        if self.average == "logits":
            per_view = dict(streams)
            per_view["fused"] = torch.stack(list(streams.values())).mean(0)
        else:
            per_view = {name: logits.softmax(dim=1) for name, logits in streams.items()}
            # "fused" already is the mean of the streams' softmax
            per_view["fused"] = outputs["fused"].float() if "fused" in outputs else (
                torch.stack(list(per_view.values())).mean(0))
        scores_np = {name: values.cpu().numpy() for name, values in per_view.items()}
        for i, video_id in enumerate(video_ids):
            entry = self.videos.setdefault(
                video_id, {"label": int(labels[i]), "views": 0, "scores": {}}
            )
            entry["views"] += 1
            for name, values in scores_np.items():
                total = entry["scores"].get(name)
                entry["scores"][name] = values[i].astype(np.float64) if total is None else total + values[i]

    def merge(self, other: "VideoScores") -> None:
        self.skipped += other.skipped
        for video_id, theirs in other.videos.items():
            mine = self.videos.get(video_id)
            if mine is None:
                self.videos[video_id] = theirs
                continue
            mine["views"] += theirs["views"]
            for name, total in theirs["scores"].items():
                mine["scores"][name] = mine["scores"][name] + total


def gather_scores(scores: VideoScores) -> VideoScores:
    """All ranks' scores merged (a no-op outside ``torch.distributed``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return scores
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (scores.videos, scores.skipped))
    merged = VideoScores(scores.average)
    for videos, skipped in parts:
        part = VideoScores(scores.average)
        part.videos, part.skipped = videos, skipped
        merged.merge(part)
    return merged


@torch.no_grad()
def collect_scores(
    model: nn.Module, loader, device: torch.device, bf16: bool = False, average: str = "logits"
) -> VideoScores:
    """Run ``model`` over a test-mode loader; returns this process's summed view scores
    (``average``: ``eval.score_average``)."""
    was_training = model.training
    model.eval()
    scores = VideoScores(average)
    try:
        for batch in loader:
            rgb = batch["rgb"].to(device) if batch.get("rgb") is not None else None
            flow = batch["flow"].to(device) if batch.get("flow") is not None else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outputs = model(rgb, flow)
            scores.add(outputs, batch["label"], list(batch["video_id"]))
            scores.skipped += int(batch.get("skipped", 0))
    finally:
        model.train(was_training)
    return scores


def video_report(
    scores: VideoScores, class_names: list[str], families: Optional[Mapping[str, str]] = None
) -> dict:
    """Top-1/top-5 per stream, per-class accuracy and the fused confusion matrix.

    Per-class accuracy is ``null`` for a class without test videos. The confusion matrix has
    true classes as rows and predicted classes as columns (fused scores). With a class -> family
    map (the synthetic dataset's), each stream also gets ``per_family`` top-1 and the report a
    ``families`` entry (classes, test videos and chance level of each family); without one
    (UCF101, HMDB51) neither key appears.
    """
    if not scores.videos:
        raise ValueError("no test videos were scored: is the evaluation split empty?")
    num_classes = len(class_names)
    video_ids = sorted(scores.videos)
    labels = np.array([scores.videos[v]["label"] for v in video_ids])
    views = np.array([scores.videos[v]["views"] for v in video_ids])
    streams = [s for s in REPORT_STREAMS if s in scores.videos[video_ids[0]]["scores"]]
    k = min(5, num_classes)  # top-5 with fewer than 5 classes counts every class
    report: dict = {
        "videos": len(video_ids),
        "skipped_views": scores.skipped,  # of damaged samples, not scored (docs/reliability.md)
        "views_per_video": {"min": int(views.min()), "max": int(views.max())},
        "score_average": scores.average,
        "classes": list(class_names),
        "streams": {},
    }
    for stream in streams:
        mean = np.stack([scores.videos[v]["scores"][stream] for v in video_ids]) / views[:, None]
        ranked = np.argsort(-mean, axis=1, kind="stable")
        top1 = ranked[:, 0] == labels
        topk = (ranked[:, :k] == labels[:, None]).any(axis=1)
        per_class = {}
        for index, name in enumerate(class_names):
            members = labels == index
            per_class[name] = float(top1[members].mean()) if members.any() else None
        report["streams"][stream] = {
            "top1": float(top1.mean()),
            "top5": float(topk.mean()),
            "per_class": per_class,
        }
        by_family = family_top1(labels, ranked[:, 0], class_names, families)
        if by_family:
            report["streams"][stream]["per_family"] = {f: v["top1"] for f, v in by_family.items()}
            report["families"] = {
                f: {"classes": [class_names[i] for i in members], "videos": v["videos"],
                    "chance": v["chance"]}
                for (f, v), members in zip(
                    by_family.items(), family_members(class_names, families).values()
                )
            }
        if stream == "fused":
            confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
            np.add.at(confusion, (labels, ranked[:, 0]), 1)
            report["confusion_matrix"] = confusion.tolist()
    return report


def summary_metrics(report: dict, prefix: str = "") -> dict[str, float]:
    """Flat ``{"<prefix>fused_top1": ...}`` numbers of a report, for metric logging; with
    families also ``{"<prefix>fused_top1_conjunction": ...}`` (families with test videos)."""
    metrics = {f"{prefix}skipped_views": float(report.get("skipped_views", 0))}
    for stream, values in report["streams"].items():
        for key, value in values.items():
            if key.startswith("top"):
                metrics[f"{prefix}{stream}_{key}"] = value
        for family, value in values.get("per_family", {}).items():
            if value is not None:
                metrics[f"{prefix}{stream}_top1_{family}"] = value
    return metrics


def family_table(report: dict) -> list[str]:
    """Video top-1 per stream (rows) and family (columns, then all classes), with each family's
    chance level and number of test videos; ``[]`` for a report without families."""
    families = report.get("families")
    if not families:
        return []
    names = list(families)
    width = max(11, *(len(n) + 1 for n in names))
    cell = f"{{:>{width}}}"

    def row(label: str, values: list) -> str:
        return f"  {label:<12}" + "".join(cell.format(v) for v in values)

    lines = [
        row("top-1", [*names, "all"]),
        row("chance", [f"{families[n]['chance']:.2f}" for n in names]
            + [f"{1 / len(report['classes']):.2f}"]),
        row("test videos", [families[n]["videos"] for n in names] + [report["videos"]]),
    ]
    for stream, values in report["streams"].items():
        per_family = values.get("per_family", {})
        shown = ["-" if per_family.get(n) is None else f"{per_family[n]:.3f}" for n in names]
        lines.append(row(stream, [*shown, f"{values['top1']:.3f}"]))
    return lines


def save_report(report: dict, folder: str | Path) -> dict[str, Path]:
    """Write ``report.json`` and ``confusion_matrix.png`` into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(report, indent=2))
    paths = {"report": json_path}
    if "confusion_matrix" in report:
        confusion = np.array(report["confusion_matrix"], dtype=np.float64)
        # Row-normalised so classes with few test videos are as readable as large ones.
        rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
        classes = report["classes"]
        size = min(4 + 0.25 * len(classes), 24)
        fig, ax = plt.subplots(figsize=(size, size))
        image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046)
        if len(classes) <= 40:  # beyond that tick labels are unreadable
            ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        fused = report["streams"]["fused"]["top1"]
        ax.set_title(f"fused scores, video top-1 {fused:.3f} ({report['videos']} videos)")
        fig.tight_layout()
        png_path = folder / "confusion_matrix.png"
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        paths["confusion_matrix"] = png_path
    return paths
