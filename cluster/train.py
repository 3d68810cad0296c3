"""``stresnet train``: ST-ResNet on Ray Train (DDP workers), tracked in MLflow. The driver.

Three parts, one module each:

- ``cluster/preflight.py``: everything that can be checked before any worker starts (shards,
  model config, init weights, batch arithmetic, tracking URI, run name);
- this module, the driver (:func:`run_training`): absolute paths, preflight, the tracking set-up
  (``cluster.tracking.prepare``), Ray, a ``TorchTrainer``, and the command line;
- ``cluster/worker.py``: what each worker runs (:func:`cluster.worker.train_loop`).

SIGUSR1 or SIGTERM to the driver (``slurm/ray_train.sh`` forwards SLURM's warning before a time
limit or preemption), or a stop request put in Ray's KV store by any node
(``cluster/stop_request.py``), makes every rank stop after the current step with a checkpoint;
the command then exits with ``EXIT_STOPPED`` (75) and the same run continues with
``train.resume=true``. A second SIGTERM ends the driver at once.

Also runnable against a running cluster::

    ray job submit --working-dir . -- python -m cluster.train --config FILE [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.config import RunConfig, add_config_arguments, config_from_args
from cluster.local_ray import announced_gcs_port, secure_local_ray
from cluster.preflight import PreflightError, fetch_registered_init, preflight, resolve_run_name
from cluster.worker import (
    DATA_DAMAGED,
    LOSS_NOT_FINITE,
    REGISTRATION_FAILED,
    progress,
    train_loop,
)
from pipelines.loaders.shard_reader import DamagedShardsError
from stresnet.checkpoint import load_train_state
from stresnet.config import (
    ConfigError,
    absolute_paths,
    to_dict,
)

EXIT_STOPPED = 75  # `stresnet train` stopped on request (EX_TEMPFAIL): resume the run later


class RegistrationError(RuntimeError):
    """Training finished but its final model was not registered; the checkpoint is kept."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped, its checkpoints are kept."""


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint: Path | None  # latest checkpoint folder (model.pt + train_state.pt)
    mlflow_run_id: str | None
    steps: int  # optimizer steps done in total
    metrics: dict  # the last reported metrics
    stopped: bool = False  # stopped early on request (SIGUSR1), checkpointed; resume to finish
    experiment_id: str | None = None  # the MLflow experiment


LOCAL_RAY_ATTEMPTS = 3  # starts of a local Ray before giving up (see connect_ray)


def connect_ray(cfg: RunConfig) -> str:
    """Start a local Ray (``cluster.address`` None) or join a running one; returns its address."""
    if cfg.cluster.address is None:
        secure_local_ray()  # before `import ray`: Ray reads RAY_AUTH_MODE when imported
    import ray

    if not ray.is_initialized():
        if cfg.cluster.address is None:
            needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
            options = dict(
                # "local": always start this run's own Ray. With no address, ray.init joins the
                # latest `ray start` cluster on the host, another user's or job's included.
                address="local",
                num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                num_gpus=torch.cuda.device_count() if cfg.cluster.use_gpu else 0,
                # The dashboard (ray[default]) costs seconds and processes at every start; it is
                # what serves Ray's state API, so with it off, Ray Train's placement-group
                # cleaner warns every few seconds that the state API is unavailable: show Ray's
                # errors only.
                include_dashboard=cfg.cluster.dashboard,
                dashboard_host=cfg.cluster.dashboard_host,
                logging_config=ray.LoggingConfig(log_level="ERROR"),
                # Ray Train logs at WARNING (run_training); some of its warnings are none here.
                runtime_env={"worker_process_setup_hook": "cluster.local_ray.quiet_ray_train"},
            )
            # Ray Train's preemption watcher follows node draining (autoscaled, preemptible
            # clusters); a local Ray's only node is never drained, and the watcher's start
            # prints an error line ("PreemptionWatcher ... max_restarts > 0") that is none.
            # The workers Ray starts inherit this environment; a user's setting wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
                try:
                    with announced_gcs_port():
                        ray.init(**options)
                    break
                except Exception as err:  # Ray raises a bare Exception for this
                    # Ray gives its raylet a fixed 30 s to register; on a loaded host (another
                    # run starting Ray at the same moment) that can pass. Start afresh.
                    if "timed out during startup" not in str(err) or attempt == LOCAL_RAY_ATTEMPTS:
                        raise
                    ray.shutdown()
                    progress(f"local Ray did not start in time (attempt {attempt}); retrying")
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                progress(f"warning: RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE')}: this run's "
                         "local Ray accepts connections from anyone who can reach this host")
        else:
            ray.init(address=cfg.cluster.address)
    return ray.get_runtime_context().gcs_address


def run_training(cfg: RunConfig) -> TrainResult:
    """Check the config, run the workers, return where the run and its latest checkpoint are."""
    from cluster import tracking

    cfg = absolute_paths(cfg)
    preflight(cfg)
    run_name = resolve_run_name(cfg)
    run_dir = Path(cfg.train.storage_path) / run_name
    cfg, init_tags = fetch_registered_init(cfg, run_dir)
    address = connect_ray(cfg)  # before Ray Train is imported: see secure_local_ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Here, not in a worker: the experiment's artifact location (see cluster/tracking.py).
    tags = {**init_tags, **tracking.lineage_tags(cfg, init_tags, run_name)}
    run_tracking = tracking.prepare(cfg, address if cfg.cluster.address else None, tags)

    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": to_dict(cfg),
            "run_name": run_name,
            "run_dir": str(run_dir),
            "tracking": run_tracking,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=cfg.train.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # Ray Train's own INFO lines (one per checkpoint) would drown the progress lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    # SIGUSR1/SIGTERM: checkpoint and stop, through Ray's KV store (cluster/stop_request.py).
    from cluster.stop_request import clear_stop_request, install_stop_signals

    (run_dir / LOSS_NOT_FINITE).unlink(missing_ok=True)  # a resumed run tries again
    damaged = run_dir / DATA_DAMAGED
    damaged.unlink(missing_ok=True)
    if threading.current_thread() is threading.main_thread():
        install_stop_signals(run_name)
    try:
        result = trainer.fit()
    except Exception:
        if damaged.is_file():  # the skip policy's limit, reached while reading (a named error)
            raise DamagedShardsError(
                f"{damaged.read_text().strip()}. The run's checkpoints in {run_dir} are kept; "
                f"after fixing the shards continue with train.run_name={run_name} train.resume=true"
            ) from None
        raise
    finally:
        clear_stop_request(run_name)
    checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
    not_finite = run_dir / LOSS_NOT_FINITE
    if not_finite.is_file():
        raise NonFiniteLossError(
            f"{not_finite.read_text().strip()}: the run stopped and registered no model. Its "
            f"checkpoints (latest: {checkpoint}) are kept; lower train.lr (or check the data) and "
            f"start a new run, or resume this one with train.run_name={run_name} train.resume=true"
        )
    failed = run_dir / REGISTRATION_FAILED
    if failed.is_file():
        raise RegistrationError(
            f"training finished but the final model was not registered as "
            f"{tracking.registered_model_name(cfg)}@{cfg.tracking.alias}: "
            f"{failed.read_text().strip()}. The checkpoint {checkpoint} is kept: fix the cause and "
            f"run again with train.run_name={run_name} train.resume=true to register it"
        )
    state = load_train_state(checkpoint) if checkpoint else {}
    return TrainResult(
        run_name=run_name,
        run_dir=run_dir,
        checkpoint=checkpoint,
        mlflow_run_id=state.get("mlflow_run_id"),
        steps=state.get("global_step", 0),
        metrics=dict(result.metrics or {}),
        experiment_id=run_tracking.experiment_id,
        stopped=bool((result.metrics or {}).get("stopped_on_request")),
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stresnet train", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = run_training(cfg)
    except (ConfigError, PreflightError) as err:
        print(f"stresnet train: error: {err}", file=sys.stderr)
        return 2
    except (RegistrationError, NonFiniteLossError, DamagedShardsError) as err:
        print(f"stresnet train: error: {err}", file=sys.stderr)
        return 1
    if result.stopped:
        print(f"stopped on request at step {result.steps}, checkpoint {result.checkpoint}; continue "
              f"with train.run_name={result.run_name} train.resume=true")
        return EXIT_STOPPED
    print(f"run:        {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"steps:      {result.steps}")
    uri = absolute_paths(cfg).tracking.uri
    print(f"MLflow run: {result.mlflow_run_id} (tracking URI {uri})")
    from cluster.tracking import run_links

    runs, run = run_links(uri, result.experiment_id, result.mlflow_run_id)
    if not uri.startswith(("http://", "https://")):
        print(f"MLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then")
    print(f"  runs:     {runs}\n  this run: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
