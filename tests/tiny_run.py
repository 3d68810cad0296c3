"""A seconds-sized training run for the end-to-end cluster tests (SLURM, multi-node Ray).

``configs/synthetic/tiny.yaml`` with every path it writes (videos, shards, runs, MLflow, eval)
moved into a test folder, and its shards made with the real ``stresnet shards`` command.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cluster.config import dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "tiny.yaml"


def tiny_config(folder: Path, *overrides: str) -> Path:
    """Write tiny.yaml with its outputs under ``folder`` (plus ``overrides``); returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(TINY, [
        f"dataset.root={folder / 'videos'}",
        f"shards.output={folder / 'shards'}",
        f"data.shards={folder / 'shards'}",
        f"train.storage_path={folder / 'runs'}",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
        f"eval.output={folder / 'eval'}",
        *overrides,
    ])
    path = folder / "tiny.yaml"
    dump_config(cfg, path)
    return path


def make_tiny_shards(folder: Path) -> Path:
    """The tiny dataset's videos and shards under ``folder`` (single process); returns the config."""
    config = tiny_config(folder)
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "shards", "--config", str(config)],
                          timeout=300, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stresnet shards failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return config


def planned_steps(output: str) -> int:
    """The run's total optimizer steps, from the driver's progress lines ("(total 3/8)")."""
    return int(re.search(r"\(total \d+/(\d+)\)", output).group(1))


def mlflow_run_id(output: str) -> str:
    """The MLflow run id `stresnet train` printed at its end."""
    return re.search(r"^MLflow run: (\w+)", output, re.MULTILINE).group(1)


def loss_history(config: Path, run_id: str) -> dict[int, float]:
    """The run's logged training loss by optimizer step (from the config's MLflow store)."""
    from mlflow import MlflowClient

    uri = load_config(config).tracking.uri
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "loss")}
