"""Training throughput on Ray Train: clips/s with 1 and 2 workers (scaling) and data vs compute time.

    .venv/bin/python benchmarks/training.py            # CPU: configs/synthetic/main.yaml's network
    .venv/bin/python benchmarks/training.py --gpu      # one GPU: full-size ST-ResNet-50, bf16, DALI

Runs ``stresnet train`` for ``--steps`` optimizer steps per setting on the synthetic shards (made
first if missing) and reads the per-step metrics back from MLflow: ``clips_per_second`` (global
clips per step over the step's wall time) and ``data_wait_fraction`` (share of the step spent
waiting for the loader). The first ``--warmup`` steps are left out. Writes section "training" of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import markdown_table, write_section  # noqa: E402

MAIN = REPO / "configs" / "synthetic" / "main.yaml"
# The paper's network (UCF101 stage 1 sizes) on the synthetic clips, for a GPU.
GPU = ["cluster.use_gpu=true", "data.backend=dali", "train.bf16=true", "train.channels_last=true",
       "model.width=1.0", "model.flow_length=10", "sampling.train_positions=5", "sampling.input_size=224",
       "data.batch_size_per_worker=16", "train.global_batch_size=16"]


def measure(workers: int, steps: int, warmup: int, extra: list[str], folder: Path) -> dict:
    from mlflow import MlflowClient

    from cluster.train import run_training
    from cluster.config import load_config

    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    cfg = load_config(MAIN, [
        f"cluster.num_workers={workers}",
        "train.epochs=1000", f"train.stop_at_step={steps}",
        "train.validate_every=1000", "train.checkpoint_every=1000",
        f"train.storage_path={folder}/runs", f"tracking.uri={uri}",
        "tracking.log_system_metrics=false", *extra,
    ])
    result = run_training(cfg)
    client = MlflowClient(uri)

    def history(key: str) -> list[float]:
        points = sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step)
        return [m.value for m in points][warmup:]

    rates, waits = history("clips_per_second"), history("data_wait_fraction")
    step_seconds = [cfg.train.global_batch_size / r for r in rates]
    return {
        "workers": workers,
        "clips_per_second": cfg.train.global_batch_size * len(step_seconds) / sum(step_seconds),
        "data_wait": statistics.fmean(waits),
        "steps": len(rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="one GPU worker, bf16, DALI, full-size network")
    args = parser.parse_args()

    from pipelines.shards import make_shards
    from cluster.config import load_config

    make_shards(load_config(MAIN))
    settings = [(1, GPU)] if args.gpu else [(1, []), (2, [])]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for workers, extra in settings:
            r = measure(workers, args.steps, args.warmup, extra, Path(tmp) / f"w{workers}")
            base = base or r["clips_per_second"]
            rows.append([
                r["workers"], f"{r['clips_per_second']:.1f}", f"{r['clips_per_second'] / workers:.1f}",
                f"{r['clips_per_second'] / base:.2f}x", f"{r['data_wait']:.0%}",
                f"{1 - r['data_wait']:.0%}", r["steps"],
            ])
    header = ["workers", "clips/s", "clips/s per worker", "scaling", "data wait", "compute", "steps"]
    table = markdown_table(header, rows)
    if args.gpu:
        what = "ST-ResNet-50 (full width, T=5, L=10, 224 px) on one GPU, bf16, DALI loader"
    else:
        what = ("configs/synthetic/main.yaml's network (ResNet-50 x 1/8 per stream, T=3, 64 px), "
                "CPU loader, 16 clips per step (1 worker: 2 micro-batches of 8 accumulated)")
    text = (
        f"### Training throughput (`benchmarks/training.py{' --gpu' if args.gpu else ''}`)\n\n"
        f"{what}; {args.steps} optimizer steps per row, the first {args.warmup} left out. "
        "\"data wait\" is the share of a step spent waiting for the next batch, \"compute\" the "
        "rest (forward, backward, all-reduce, optimizer).\n\n" + table
    )
    print(table)
    write_section("training-gpu" if args.gpu else "training", text)


if __name__ == "__main__":
    main()
