"""``stresnet evaluate``: video-level accuracy report of a checkpoint or a registered MLflow model.

    stresnet evaluate --config FILE --checkpoint runs/NAME/checkpoint_0000100 [key=value ...]
    stresnet evaluate --config FILE --model-uri models:/stresnet-ucf101@current

Scores every test view of the ``data.val_split`` videos (spec section 5: ``sampling.test_positions``
frame positions, ``sampling.test_crops`` crops), averages each video's softmax scores and writes
``report.json`` (top-1/top-5 of appearance, motion and fused scores, per-class accuracy, confusion
matrix) and ``confusion_matrix.png`` into ``eval.output``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cluster.config import RunConfig, add_config_arguments, config_from_args
from cluster.tracking import TrackingError
from stresnet.checkpoint import WeightsError
from stresnet.config import ConfigError
from stresnet.evaluate import collect_scores, family_table, save_report, video_report


def load_registered_model(uri: str, tracking_uri: str) -> nn.Module:
    """The two-input network of a model registered by ``cluster.tracking.log_final_model``: its
    ``model.pt`` is downloaded and read with ``torch.load(weights_only=True)`` (no unpickling)."""
    import tempfile

    from cluster.tracking import fetch_registered_weights
    from stresnet.model import load_model

    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "model.pt"
        fetch_registered_weights(uri, tracking_uri, weights)
        return load_model(weights)


def evaluate_model(cfg: RunConfig, model: nn.Module) -> tuple[dict, dict[str, Path]]:
    """Score the validation split in this process; returns the report and its files."""
    from pipelines.loaders import build_loader
    from pipelines.shard_format import read_manifest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    bf16 = cfg.train.bf16 and device.type == "cuda"
    manifest = read_manifest(cfg.data.shards)
    classes, families = manifest["classes"], manifest.get("class_families")
    check_classes(model, classes, cfg.data.shards)
    loader = build_loader(cfg, cfg.data.val_split, rank=0, world_size=1, train=False)
    average = cfg.eval.score_average
    report = video_report(collect_scores(model, loader, device, bf16, average), classes, families)
    if cfg.eval.fully_convolutional:
        # Stage 2 (spec section 5): every frame of the video in one pass, convolutional in time.
        whole = build_loader(cfg, cfg.data.val_split, rank=0, world_size=1, train=False, whole_video=True)
        report["fully_convolutional"] = video_report(
            collect_scores(model, whole, device, bf16, average), classes, families
        )
    return report, save_report(report, cfg.eval.output)


def check_classes(model: nn.Module, classes: list[str], shards: str) -> None:
    """``ValueError`` unless the model was trained on these classes: the same number (else
    labels index past the scores) and, where the model file records them, the same names in the
    same order (else the report scores the wrong classes without a word)."""
    if model.cfg.num_classes != len(classes):
        raise ValueError(
            f"the model has {model.cfg.num_classes} classes, the shards in {shards} have "
            f"{len(classes)}: evaluate it on shards of the dataset it was trained on"
        )
    trained = getattr(model, "classes", None)
    if trained is not None and list(trained) != list(classes):
        differ = [i for i, (a, b) in enumerate(zip(trained, classes)) if a != b]
        shown = ", ".join(f"label {i}: {trained[i]!r} vs {classes[i]!r}" for i in differ[:3])
        raise ValueError(
            f"the model's classes differ from those of the shards in {shards} at {len(differ)} "
            f"label(s) ({shown}{', ...' if len(differ) > 3 else ''}): evaluate it on shards made "
            f"from the same class list"
        )


def format_summary(report: dict) -> str:
    lines = [f"{'stream':<11} {'top-1':>7} {'top-5':>7}   ({report['videos']} videos)"]
    for stream, values in report["streams"].items():
        lines.append(f"{stream:<11} {values['top1']:>7.3f} {values['top5']:>7.3f}")
    if "families" in report:
        lines += ["per family (video top-1):", *family_table(report)]
    if "fully_convolutional" in report:
        lines.append("whole videos, fully convolutional in time:")
        lines.append(format_summary(report["fully_convolutional"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stresnet evaluate", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model.pt, a checkpoint folder or a run folder (newest)")
    source.add_argument("--model-uri", help="MLflow model URI, e.g. models:/stresnet-ucf101@current")
    # Intermixed: overrides may come before or after --checkpoint/--model-uri.
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = config_from_args(args)
        if args.checkpoint:
            from stresnet.model import load_model

            model = load_model(args.checkpoint)
        else:
            from cluster.tracking import absolute_tracking_uri

            model = load_registered_model(args.model_uri, absolute_tracking_uri(cfg.tracking.uri))
        # The network's own config decides what the loader decodes (modalities, flow length).
        cfg = replace(cfg, model=model.cfg)
        report, files = evaluate_model(cfg, model)
    except (ConfigError, FileNotFoundError, ValueError, WeightsError, TrackingError) as err:
        print(f"stresnet evaluate: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from mlflow.exceptions import MlflowException

        if not isinstance(err, MlflowException):
            raise
        # An unknown models:/ URI, a tracking server that is down or failing (after the bounded
        # retries set in cluster/__init__.py).
        message = str(err.message).splitlines()[0][:500]
        print(f"stresnet evaluate: error: --model-uri {args.model_uri}: {message}", file=sys.stderr)
        return 2
    print(format_summary(report))
    print(f"report: {files['report']}")
    if "confusion_matrix" in files:
        print(f"confusion matrix: {files['confusion_matrix']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
