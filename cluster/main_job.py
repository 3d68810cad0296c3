"""``stresnet main-job``: the whole pipeline on one machine, from one config file.

    stresnet main-job --config configs/synthetic/main.yaml

1. shards: write the synthetic videos (when ``dataset.kind`` is synthetic) and their RGB + flow
   shards (skipped when complete shards with the same parameters exist);
2. train: ST-ResNet on a local Ray cluster (``cluster.num_workers`` workers), tracked in MLflow;
3. evaluate: video-level accuracy of the final checkpoint on the test split, logged into the same
   MLflow run;

then a summary: where the run is, how to open it in MLflow, accuracy per stream, time per phase.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from cluster.config import RunConfig, add_config_arguments, config_from_args
from stresnet.config import ConfigError


@dataclass
class PhaseTimer:
    """Wall time per phase, announced as each phase starts."""

    phases: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn, *args):
        number = self.phases.index(name) + 1
        print(f"\n=== phase {number}/{len(self.phases)}: {name} ===", flush=True)
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[name] = time.perf_counter() - start
        print(f"=== {name} done in {format_duration(self.seconds[name])} ===", flush=True)
        return result


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def evaluate_and_log(cfg: RunConfig, result) -> dict:
    """Evaluate the final checkpoint; log metrics and report files into the training's MLflow run."""
    import mlflow

    from cluster import tracking
    from cluster.evaluate import evaluate_model
    from stresnet.model import load_model
    from stresnet.evaluate import summary_metrics

    model = load_model(result.checkpoint)
    report, files = evaluate_model(cfg, model)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    with mlflow.start_run(run_id=result.mlflow_run_id):
        tracking.log_metrics(summary_metrics(report, prefix="test_"), step=result.steps)
        tracking.log_report(files, "evaluation")
    report["files"] = {name: str(path) for name, path in files.items()}
    return report


def summary(cfg: RunConfig, result, report: dict, timer: PhaseTimer) -> str:
    from cluster.tracking import experiment_name, registered_model_name
    from stresnet.evaluate import family_table

    total = sum(timer.seconds.values())
    lines = [
        "",
        f"stresnet main job finished in {format_duration(total)}",
        "",
        "wall time per phase:",
        *(f"  {name:<9} {format_duration(secs):>8}" for name, secs in timer.seconds.items()),
        "",
        f"run folder:       {result.run_dir}",
        f"checkpoint:       {result.checkpoint}  ({result.steps} optimizer steps)",
        f"MLflow run:       {result.mlflow_run_id} in experiment {experiment_name(cfg)!r}",
        f"  tracking URI:   {cfg.tracking.uri}",
        f"  open it:        .venv/bin/mlflow ui --backend-store-uri {cfg.tracking.uri}"
        "   (then http://127.0.0.1:5000)",
        f"registered model: models:/{registered_model_name(cfg)}@{cfg.tracking.alias}",
        f"report:           {report['files']['report']}",
        "",
        f"video-level accuracy on {report['videos']} test videos:",
        f"  {'stream':<11} {'top-1':>6} {'top-5':>6}",
    ]
    for stream, values in report["streams"].items():
        lines.append(f"  {stream:<11} {values['top1']:>6.3f} {values['top5']:>6.3f}")
    table = family_table(report)
    if table:  # the synthetic dataset: each family tests one part of the network
        lines += ["", "video top-1 per family (chance = 1 / classes in the family; "
                      "see docs/ablation.md):", *table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stresnet main-job", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    from cluster.train import NonFiniteLossError, PreflightError, RegistrationError, run_training
    from stresnet.config import absolute_paths
    from pipelines.loaders.shard_reader import DamagedShardsError
    from pipelines.shards import DatasetError, ShardFailures, ShardsError, make_shards

    try:
        given = config_from_args(args)
    except ConfigError as err:
        print(f"stresnet main-job: error: {err}", file=sys.stderr)
        return 2
    cfg = absolute_paths(given)  # the Ray workers do not share this process's working directory
    timer = PhaseTimer(["shards", "train", "evaluate"])
    try:
        # The config as given: the shard folder records its parameters, paths as written, so
        # `stresnet shards` with the same file finds the same shards complete.
        timer.run("shards", make_shards, given)
        result = timer.run("train", run_training, cfg)
        report = timer.run("evaluate", evaluate_and_log, cfg, result)
    except (ConfigError, PreflightError, DatasetError, ShardsError, ShardFailures) as err:
        print(f"stresnet main-job: error: {err}", file=sys.stderr)
        return 2
    except (RegistrationError, NonFiniteLossError, DamagedShardsError) as err:
        print(f"stresnet main-job: error: {err}", file=sys.stderr)
        return 1
    print(summary(cfg, result, report, timer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
