"""``stresnet predict``: the top-k classes of a trained model for video files.

    stresnet predict --model runs/NAME VIDEO_OR_FOLDER ... [--top-k 5] [--output FILE.json|.csv]
    stresnet predict --model models:/stresnet-ucf101@current --tracking-uri sqlite:///mlflow.db clips/

``--model``: a run folder (its newest checkpoint), a checkpoint folder, a ``model.pt`` or a
registered model ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (its weights file is read with
``torch.load(weights_only=True)``; nothing is unpickled).

Each video goes through the evaluation path of the model's own run: decoded with PyAV and turned
into the sample the shard writer would store, with the frame rate, resolution, flow method and
flow bound of the model's training shards (``pipelines.sample_encoding.video_sample``), then read
like a test video of the shards: the run's ``sampling.test_positions`` positions and test crops,
the softmax scores of all views averaged (``stresnet.evaluate``). A video that cannot be read is
reported and skipped; the exit status is then 1 (2: the model or the arguments are unusable).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cluster.config import RunConfig
from stresnet.checkpoint import WeightsError, read_model_file
from stresnet.config import ConfigError, from_dict

# What PyAV commonly reads; a folder argument is searched (recursively) for these.
VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp"}
# Shard creation parameters that decide what the network sees (the rest: shard layout).
INPUT_PARAMS = ("fps", "short_side", "flow", "tvl1_epsilon", "flow_bound")


class PredictError(RuntimeError):
    """The model or its input settings cannot be used; the message says why."""


@dataclasses.dataclass
class Predictor:
    """A loaded model with everything needed to turn a video file into scores."""

    model: nn.Module
    cfg: RunConfig
    classes: list[str]
    processing: object  # pipelines.sample_encoding.Processing
    device: torch.device
    source: str  # the file the weights came from (or the registry URI)


def load_predictor(spec: str, tracking_uri: str | None, device: torch.device) -> Predictor:
    """The model ``spec`` names (see the module docstring) and its shards' settings."""
    from cluster import tracking
    from stresnet.model import load_model

    if tracking.is_model_uri(spec):
        with tempfile.TemporaryDirectory() as folder:
            file = Path(folder) / "model.pt"
            resolved = tracking.fetch_registered_weights(
                spec, tracking.absolute_tracking_uri(tracking_uri or "sqlite:///mlflow.db"), file)
            _, payload = read_model_file(file)
            model = load_model(file)
        source = resolved
    else:
        source, payload = read_model_file(spec)
        model = load_model(source)
    try:
        cfg = from_dict(RunConfig, payload["config"], "config")
    except (ConfigError, KeyError, TypeError) as err:
        raise PredictError(f"{source}: the run config stored with the weights is unusable ({err})") from None
    cfg = replace(cfg, model=model.cfg)
    classes, params = shard_settings(source, payload, cfg)
    if len(classes) != cfg.model.num_classes:
        raise PredictError(f"{source}: {len(classes)} class names for a {cfg.model.num_classes}-class model")
    return Predictor(model.to(device).eval(), cfg, classes, processing(params), device, source)


def shard_settings(source: str, payload: dict, cfg: RunConfig) -> tuple[list[str], dict]:
    """(class names, shard creation parameters) of the model's training shards.

    From ``model.pt`` (saved there since this command exists) and/or the manifest in the run's
    ``data.shards`` folder; when both are there they must agree, otherwise the shards were remade
    with other settings after training and it is unclear which the model needs: refused.
    """
    from pipelines.shard_format import read_manifest

    stored = payload.get("shards")
    manifest = None
    try:
        manifest = read_manifest(cfg.data.shards)
    except (FileNotFoundError, ValueError, OSError):
        pass
    if stored is None and manifest is None:
        raise PredictError(
            f"{source}: the weights file does not record its training shards' settings and the "
            f"run's shard folder {cfg.data.shards} has no readable manifest.json; predictions need "
            f"the class names and the flow settings the model was trained with"
        )
    if stored is not None and manifest is not None:
        for key in (*INPUT_PARAMS, "dataset"):
            ours, theirs = stored["params"].get(key), manifest["params"].get(key)
            if key in stored["params"] and ours != theirs:
                raise PredictError(
                    f"{source}: the model was trained on shards made with {key}={ours!r}, but "
                    f"{cfg.data.shards}/manifest.json now says {key}={theirs!r}; the shards were "
                    f"remade since. Refusing to guess which settings the model needs."
                )
        if list(stored["classes"]) != list(manifest["classes"]):
            raise PredictError(f"{source}: the model's class names differ from those in "
                               f"{cfg.data.shards}/manifest.json; the shards were remade since")
    chosen = stored if stored is not None else manifest
    return list(chosen["classes"]), chosen["params"]


def processing(params: dict):
    """The video -> sample settings of shards created with ``params`` (their manifest's)."""
    from pipelines.sample_encoding import Processing

    fields = [f.name for f in dataclasses.fields(Processing)]
    missing = [f for f in fields if f not in params]
    if missing:
        raise PredictError(f"the shards' manifest lacks {missing}: made by an older stresnet?")
    return Processing(**{f: params[f] for f in fields})


def predict_video(predictor: Predictor, path: Path) -> dict:
    """Mean view scores per stream ``{stream: numpy (K,)}`` and the video's frame count, size.

    Raises ``pipelines.video.VideoError`` (or another exception) for an unreadable file.
    """
    from pipelines.loaders.clips import ClipSource
    from pipelines.loaders.cpu import CpuClipLoader
    from pipelines.loaders.schedule import Schedule
    from pipelines.loaders.video_samples import VideoSamples
    from pipelines.sample_encoding import video_sample
    from pipelines.sources import VideoEntry
    from stresnet.evaluate import collect_scores

    cfg = predictor.cfg
    entry = VideoEntry("video", path, str(path), -1, "", "predict")
    samples = VideoSamples([video_sample(entry, predictor.processing)])
    source = ClipSource(cfg, samples)
    schedule = Schedule(1, cfg.eval.batch_size_per_worker, 0, 1, cfg.seed, source.num_views())
    loader = CpuClipLoader(source, schedule, 0, cfg.sampling.input_size, cfg.sampling.test_positions)
    bf16 = cfg.train.bf16 and predictor.device.type == "cuda"
    scores = collect_scores(predictor.model, loader, predictor.device, bf16).videos.get("video")
    if scores is None or scores["views"] == 0:
        raise RuntimeError("no view of the video could be read")
    ref = samples.ref(0)
    return {
        "frames": ref.num_frames, "height": ref.height, "width": ref.width, "views": scores["views"],
        "scores": {s: total / scores["views"] for s, total in scores["scores"].items()},
    }


def top_k(scores, classes: list[str], k: int) -> list[dict]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:k]
    return [{"class": classes[i], "index": i, "score": round(float(scores[i]), 6)} for i in order]


def video_files(arguments: list[str]) -> list[Path]:
    """Files as given, folders expanded to the video files under them (sorted)."""
    files: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        else:
            files.append(path)  # a missing file is reported as a failure, like an unreadable one
    return files


def write_output(path: Path, results: list[dict], failures: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["video", "stream", "rank", "class", "index", "score", "error"])
            for result in results:
                for stream, ranked in result["top_k"].items():
                    for rank, item in enumerate(ranked, 1):
                        writer.writerow([result["video"], stream, rank, item["class"], item["index"],
                                         item["score"], ""])
            for failure in failures:
                writer.writerow([failure["video"], "", "", "", "", "", failure["error"]])
    else:
        path.write_text(json.dumps({"predictions": results, "failures": failures}, indent=2))


def format_result(result: dict) -> str:
    lines = [f"{result['video']}  ({result['frames']} frames, {result['width']}x{result['height']}, "
             f"{result['views']} views)"]
    for stream, ranked in result["top_k"].items():
        shown = ", ".join(f"{item['class']} {item['score']:.3f}" for item in ranked)
        lines.append(f"  {stream:<11} {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="stresnet predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="run folder, checkpoint folder, model.pt or models:/NAME@ALIAS")
    parser.add_argument("videos", nargs="+", metavar="VIDEO_OR_FOLDER")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per stream (default 5)")
    parser.add_argument("--output", help="write the predictions to FILE.json or FILE.csv")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda where available")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    if args.output and Path(args.output).suffix.lower() not in (".json", ".csv"):
        parser.error(f"--output {args.output}: expected a .json or .csv file name")
    if args.top_k < 1:
        parser.error("--top-k: expected at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("stresnet predict: error: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    from cluster.tracking import TrackingError

    try:
        predictor = load_predictor(args.model, args.tracking_uri, device)
    except (PredictError, WeightsError, TrackingError, ConfigError) as err:
        print(f"stresnet predict: error: {err}", file=sys.stderr)
        return 2

    results, failures = [], []
    files = video_files(args.videos)
    k = min(args.top_k, len(predictor.classes))
    for path in tqdm(files, unit="video", desc="predict", disable=None, file=sys.stderr):
        try:
            predicted = predict_video(predictor, path)
        except Exception as err:  # noqa: BLE001 - one bad video must not stop the others
            failures.append({"video": str(path), "error": f"{type(err).__name__}: {err}"})
            tqdm.write(f"stresnet predict: skipped {path}: {err}", file=sys.stderr)
            continue
        result = {"video": str(path), **{key: predicted[key] for key in ("frames", "height", "width", "views")},
                  "top_k": {s: top_k(v, predictor.classes, k) for s, v in predicted["scores"].items()}}
        results.append(result)
        tqdm.write(format_result(result))
    if args.output:
        write_output(Path(args.output), results, failures)
        print(f"predictions: {args.output}")
    if failures:
        print(f"stresnet predict: {len(failures)} of {len(files)} video(s) failed: "
              + ", ".join(f["video"] for f in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
