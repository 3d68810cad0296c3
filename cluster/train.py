"""``stresnet train``: ST-ResNet on Ray Train (DDP workers), tracked in MLflow.

The driver (:func:`run_training`) checks everything that can be checked before any worker starts
(shards, model config, init weights, batch arithmetic, tracking URI, run name), starts or joins
Ray and runs a ``TorchTrainer``. Each worker runs :func:`train_loop`:

- model, optimizer and loaders are built per worker; world rank 0 owns the MLflow run;
- one optimizer step = ``accumulation`` micro-batches per worker (``train.batch_size`` clips over
  all workers);
- every ``train.checkpoint_every`` steps and at each epoch's end all ranks call
  ``ray.train.report``, rank 0 with a checkpoint folder holding ``model.pt`` and
  ``train_state.pt``;
- on (re)start a worker restores the latest checkpoint (Ray Train hands it back after a worker
  failure, and when a run with the same name is launched again in the same storage path), sets the
  loader to the saved epoch and skips the micro-batches that epoch already consumed, so the
  resumed run sees exactly the data, learning rates and dropout masks of an uninterrupted one;
- SIGUSR1 to the driver (``slurm/ray_train.sh`` forwards SLURM's warning before a time limit or
  preemption) makes every rank stop after the current step with a checkpoint; the command then
  exits with ``EXIT_STOPPED`` (75) and the same run continues with ``train.resume=true``.

Also runnable against a running cluster::

    ray job submit --working-dir . -- python -m cluster.train --config FILE [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch

from stresnet.config import (
    ConfigError,
    InitConfig,
    RunConfig,
    add_config_arguments,
    config_from_args,
    from_dict,
    to_dict,
)
from stresnet.evaluate import collect_scores, gather_scores, save_report, summary_metrics, video_report
from stresnet.train_step import (
    StepTotals,
    accumulation_steps,
    build_optimizer,
    forward_backward,
    learning_rate,
    set_learning_rate,
    step_seed,
)

MODEL_FILE = "model.pt"
# model.init keys naming a model.pt, a checkpoint or run folder, or a registered model models:/...
INIT_CHECKPOINTS = ("appearance_checkpoint", "motion_checkpoint", "checkpoint")
STATE_FILE = "train_state.pt"
FAILURE_MARKER = "failure_injected"  # in the run folder: the injected failure already happened
STOP_REQUEST = "stop_requested"  # in the run folder: checkpoint after the current step and stop
EXIT_STOPPED = 75  # `stresnet train` stopped on request (EX_TEMPFAIL): resume the run later


class PreflightError(RuntimeError):
    """The run cannot start; the message says what to fix."""


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint: Path | None  # latest checkpoint folder (model.pt + train_state.pt)
    mlflow_run_id: str | None
    steps: int  # optimizer steps done in total
    metrics: dict  # the last reported metrics
    stopped: bool = False  # stopped early on request (SIGUSR1), checkpointed; resume to finish


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with every path made absolute: Ray workers do not share the driver's cwd."""
    from cluster.tracking import absolute_artifact_location, absolute_tracking_uri, is_model_uri

    def absolute(path: str | None) -> str | None:
        if path is None or is_model_uri(path):  # registered models: resolved by the driver
            return path
        return str(Path(path).expanduser().resolve())

    init = cfg.model.init
    return replace(
        cfg,
        dataset=replace(cfg.dataset, root=absolute(cfg.dataset.root),
                        splits_dir=absolute(cfg.dataset.splits_dir), csv=absolute(cfg.dataset.csv)),
        shards=replace(cfg.shards, output=absolute(cfg.shards.output)),
        model=replace(cfg.model, init=replace(
            init,
            torchvision_weights=init.torchvision_weights if init.torchvision_weights == "imagenet"
            else absolute(init.torchvision_weights),
            appearance_checkpoint=absolute(init.appearance_checkpoint),
            motion_checkpoint=absolute(init.motion_checkpoint),
            checkpoint=absolute(init.checkpoint),
        )),
        data=replace(cfg.data, shards=absolute(cfg.data.shards)),
        train=replace(cfg.train, storage_path=absolute(cfg.train.storage_path)),
        tracking=replace(cfg.tracking, uri=absolute_tracking_uri(cfg.tracking.uri),
                         artifact_location=absolute_artifact_location(cfg.tracking.artifact_location)),
        eval=replace(cfg.eval, output=absolute(cfg.eval.output)),
    )


def preflight(cfg: RunConfig) -> None:
    """Everything that would otherwise fail inside a worker minutes later, checked now."""
    from cluster.tracking import check_tracking_uri
    from pipelines.shard_format import read_manifest

    # Configs built in code skip load_config's validation: validate them the same way.
    try:
        from_dict(RunConfig, to_dict(cfg))
    except ConfigError as err:
        raise PreflightError(f"config: {err}") from None

    try:
        manifest = read_manifest(cfg.data.shards)
    except (FileNotFoundError, ValueError) as err:
        raise PreflightError(f"data.shards: {err}") from None
    for key in ("train_split", "val_split"):
        split = getattr(cfg.data, key)
        samples = manifest.get("splits", {}).get(split, {}).get("samples", 0)
        if samples == 0:
            raise PreflightError(
                f"data.{key}: the shards in {cfg.data.shards} have no {split!r} videos "
                f"(splits: {sorted(manifest.get('splits', {}))}); fix data.{key} or re-make the shards"
            )
    classes = len(manifest["classes"])
    if classes != cfg.model.num_classes:
        raise PreflightError(
            f"model.num_classes: got {cfg.model.num_classes}, but the shards in {cfg.data.shards} "
            f"have {classes} classes; set model.num_classes={classes}"
        )

    from cluster.tracking import TrackingError, is_model_uri

    init = cfg.model.init
    for key in ("torchvision_weights", *INIT_CHECKPOINTS):
        path = getattr(init, key)
        registered = key in INIT_CHECKPOINTS and is_model_uri(path)  # fetched after preflight
        if path and path != "imagenet" and not registered and not Path(path).exists():
            raise PreflightError(f"model.init.{key}: {path} does not exist")

    try:
        accumulation_steps(cfg.train.batch_size, cfg.data.batch_size, cfg.cluster.num_workers)
    except ConfigError as err:
        raise PreflightError(str(err)) from None

    try:
        check_tracking_uri(cfg.tracking.uri)
    except TrackingError as err:
        raise PreflightError(str(err)) from None


def fetch_registered_init(cfg: RunConfig, run_dir: Path) -> tuple[RunConfig, dict[str, str]]:
    """Replace each ``models:/...`` in ``model.init`` by the registered model's weights, fetched
    into ``{run_dir}/init/<key>.pt`` (shared storage: every worker reads it; ``stresnet/`` never
    sees MLflow). A resumed run reuses the file it started from, wherever the alias points now.

    Returns the config and tags recording which version each URI resolved to.
    """
    from cluster.tracking import TrackingError, fetch_registered_weights, is_model_uri

    init, tags = cfg.model.init, {}
    used = {"base_streams": ["appearance_checkpoint", "motion_checkpoint"],
            "checkpoint": ["checkpoint"]}.get(init.kind, [])
    for key in used:
        uri = getattr(init, key)
        if not is_model_uri(uri):
            continue
        file = run_dir / "init" / f"{key}.pt"
        if not file.is_file():
            try:
                resolved = fetch_registered_weights(uri, cfg.tracking.uri, file)
            except TrackingError as err:
                raise PreflightError(f"model.init.{key}: {err}") from None
            tags[f"model.init.{key}"] = f"{uri} = {resolved}"
            progress(f"model.init.{key}: {uri} ({resolved}) -> {file}")
        init = replace(init, **{key: str(file)})
    return replace(cfg, model=replace(cfg.model, init=init)), tags


def resolve_run_name(cfg: RunConfig) -> str:
    """A fresh unique name, or the configured one; an existing run is only reused on resume."""
    storage = Path(cfg.train.storage_path)
    if cfg.train.run_name is None:
        if cfg.train.resume:
            raise PreflightError("train.resume: true needs train.run_name: the run to resume")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return f"{cfg.name}-{stamp}-{secrets.token_hex(2)}"
    name = cfg.train.run_name
    if (storage / name).exists() and not cfg.train.resume:
        raise PreflightError(
            f"train.run_name: a run named {name!r} already exists in {storage}; set "
            f"train.resume=true to continue it, or choose another train.run_name (or none)"
        )
    return name


def connect_ray(cfg: RunConfig) -> str:
    """Start a local Ray (``cluster.address`` None) or join a running one; returns its address."""
    import ray

    if not ray.is_initialized():
        if cfg.cluster.address is None:
            needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
            ray.init(
                # "local": always start this run's own Ray. With no address, ray.init joins the
                # latest `ray start` cluster on the host, another user's or job's included.
                address="local",
                num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                num_gpus=torch.cuda.device_count() if cfg.cluster.use_gpu else 0,
                include_dashboard=False,  # needs ray[default]; not a dependency
                # Without the dashboard, Ray Train's placement-group cleaner warns every few
                # seconds that the state API is unavailable; show Ray's errors only.
                logging_config=ray.LoggingConfig(log_level="ERROR"),
                dashboard_host=cfg.cluster.dashboard_host,
            )
        else:
            ray.init(address=cfg.cluster.address)
    return ray.get_runtime_context().gcs_address


def run_training(cfg: RunConfig) -> TrainResult:
    """Check the config, run the workers, return where the run and its latest checkpoint are."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.tracking import ensure_experiment, run_tags

    cfg = absolute_paths(cfg)
    preflight(cfg)
    run_name = resolve_run_name(cfg)
    run_dir = Path(cfg.train.storage_path) / run_name
    cfg, init_tags = fetch_registered_init(cfg, run_dir)
    experiment_id = ensure_experiment(cfg)  # here, not in a worker: see cluster/tracking.py
    address = connect_ray(cfg)

    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": to_dict(cfg),
            "run_name": run_name,
            "run_dir": str(run_dir),
            "tags": {**run_tags(address if cfg.cluster.address else None), **init_tags},
            "experiment_id": experiment_id,
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
    # Rank 0 polls this file (the run folder is shared storage; the driver may be on another node).
    stop_request = run_dir / STOP_REQUEST
    stop_request.unlink(missing_ok=True)  # the last launch's request (before a requeue) is done
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: request_stop(stop_request))
    result = trainer.fit()
    checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
    state = load_train_state(checkpoint) if checkpoint else {}
    return TrainResult(
        run_name=run_name,
        run_dir=run_dir,
        checkpoint=checkpoint,
        mlflow_run_id=state.get("mlflow_run_id"),
        steps=state.get("global_step", 0),
        metrics=dict(result.metrics or {}),
        stopped=bool((result.metrics or {}).get("stopped_on_request")),
    )


def request_stop(stop_request: Path) -> None:
    """Ask the workers to checkpoint after their current step and stop (the SIGUSR1 handler)."""
    stop_request.parent.mkdir(parents=True, exist_ok=True)
    stop_request.touch()
    progress(f"stop requested: checkpointing after the current step ({stop_request})")


def load_train_state(checkpoint_dir: str | Path) -> dict:
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------


def train_loop(loop_config: dict) -> None:
    """The per-worker training function (runs inside Ray Train)."""
    import ray.train
    import ray.train.torch

    from cluster import tracking
    from pipelines.loaders import build_loader
    from stresnet.model import build_model

    # Ray Train logs one INFO line per report, under a logger named after its source file (so
    # LoggingConfig does not reach it); silence it to keep the progress lines readable.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    cfg: RunConfig = from_dict(RunConfig, loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # Use the cores Ray reserved for this worker, not every core of the node: workers on one
        # node would otherwise oversubscribe it.
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    bf16 = cfg.train.bf16 and on_gpu

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "mlflow_run_id": None}
    checkpoint = ray.train.get_checkpoint()  # after a failure or on resume: the latest one
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # Resuming replaces all weights: don't load the init weights (they may be gone by now).
    model = build_model(cfg.model if checkpoint is None else replace(cfg.model, init=InitConfig()))
    if on_gpu and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train)

    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            weights = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=True)
            model.load_state_dict(weights["model"])
            saved = load_train_state(folder)
        optimizer_state = saved.pop("optimizer")
        state.update(saved)
    model = ray.train.torch.prepare_model(model)  # to the device, DDP-wrapped (world > 1)
    if checkpoint is not None:
        optimizer.load_state_dict(optimizer_state)  # after the move: state follows the params

    train_loader = build_loader(cfg, cfg.data.train_split, rank, world, train=True)
    val_loader = build_loader(cfg, cfg.data.val_split, rank, world, train=False)
    accumulation = accumulation_steps(cfg.train.batch_size, cfg.data.batch_size, world)
    steps_per_epoch = len(train_loader) // accumulation
    if cfg.train.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.steps_per_epoch)
    if steps_per_epoch == 0:
        raise RuntimeError(
            f"data.shards: the {cfg.data.train_split!r} split gives {len(train_loader)} "
            f"micro-batches per worker, fewer than one optimizer step needs ({accumulation}); "
            f"lower train.batch_size or data.batch_size"
        )
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.stop_at_step is not None:
        total_steps = min(total_steps, cfg.train.stop_at_step)

    if rank == 0:
        state["mlflow_run_id"] = tracking.start_run(
            cfg, loop_config["run_name"], state["mlflow_run_id"], loop_config["tags"],
            loop_config["experiment_id"],
        )
        if state["global_step"]:
            progress(f"resumed at step {state['global_step']} (epoch {state['epoch'] + 1})")

    def save_and_report(metrics: dict, epoch: int, step_in_epoch: int) -> None:
        """All ranks report; rank 0 attaches the checkpoint (weights are the same everywhere)."""
        with tempfile.TemporaryDirectory() as folder:
            attached = None
            if rank == 0:
                weights = getattr(model, "module", model).state_dict()
                torch.save({"model": weights, "config": to_dict(cfg)}, Path(folder) / MODEL_FILE)
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "step_in_epoch": step_in_epoch,
                        "global_step": state["global_step"],
                        "mlflow_run_id": state["mlflow_run_id"],
                    },
                    Path(folder) / STATE_FILE,
                )
                attached = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                metrics, checkpoint=attached,
                checkpoint_dir_name=f"checkpoint_{state['global_step']:07d}",
            )

    # A checkpoint taken at the end of an epoch says step_in_epoch == steps_per_epoch.
    start_epoch, start_step = state["epoch"], state["step_in_epoch"]
    if start_step >= steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0

    clips_per_step = cfg.train.batch_size
    session_start, session_steps = time.perf_counter(), 0
    metrics: dict = {}
    model.train()
    for epoch in range(start_epoch, cfg.train.epochs):
        if state["global_step"] >= total_steps:
            break
        train_loader.set_epoch(epoch)
        batches = iter(train_loader)
        first = start_step if epoch == start_epoch else 0
        for _ in range(first * accumulation):  # the micro-batches the checkpoint already used
            next(batches)
        for step_in_epoch in range(first, steps_per_epoch):
            if state["global_step"] >= total_steps:
                break
            step = state["global_step"]
            started = time.perf_counter()
            torch.manual_seed(step_seed(cfg.seed, rank, step))
            lr = learning_rate(cfg.train, step)
            set_learning_rate(optimizer, lr)
            # loss sum, correct, clips on the device (no host sync per micro-batch); the free
            # slot carries "stop requested" (rank 0 decides for all ranks)
            waited, totals = 0.0, StepTotals(device)
            for micro in range(accumulation):
                before = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - before
                totals.add(forward_backward(
                    model, batch, accumulation, device,
                    sync_gradients=micro == accumulation - 1, bf16=bf16,
                ))
            if rank == 0 and (run_dir / STOP_REQUEST).exists():
                totals.tensor[3] = 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                torch.distributed.all_reduce(totals.tensor)  # gloo/nccl: sums over workers
            step_means = totals.read()  # the step's one host/device synchronisation
            state["global_step"] = step + 1
            session_steps += 1
            stop_requested = step_means["flag"] > 0 and state["global_step"] < total_steps
            if stop_requested:
                total_steps = state["global_step"]  # checkpoint below, then leave both loops
            elapsed = time.perf_counter() - started
            metrics = {
                "loss": step_means["loss"],
                "accuracy": step_means["accuracy"],
                "lr": lr,
                "clips_per_second": clips_per_step / elapsed,
                "data_wait_fraction": waited / elapsed,
                "epoch": epoch + 1,
            }
            if stop_requested:
                metrics["stopped_on_request"] = 1.0
            if rank == 0:
                tracking.log_metrics(metrics, step=state["global_step"])
                per_step = (time.perf_counter() - session_start) / session_steps
                eta = per_step * (total_steps - state["global_step"])
                progress(
                    f"epoch {epoch + 1}/{cfg.train.epochs} step "
                    f"{step_in_epoch + 1}/{steps_per_epoch} (total {state['global_step']}/"
                    f"{total_steps}) loss {metrics['loss']:.4f} acc {metrics['accuracy']:.3f} "
                    f"lr {lr:.2g} {metrics['clips_per_second']:.1f} clips/s "
                    f"data-wait {metrics['data_wait_fraction']:.0%} ETA {eta:.0f}s"
                )
            inject_failure(cfg, rank, world, state["global_step"], run_dir)
            epoch_done = step_in_epoch + 1 == steps_per_epoch
            stopping = state["global_step"] >= total_steps
            if epoch_done and (epoch + 1) % cfg.train.validate_every == 0:
                metrics.update(validate(model, val_loader, device, bf16, cfg, epoch, state, rank, run_dir))
            if epoch_done or stopping or state["global_step"] % cfg.train.checkpoint_every == 0:
                save_and_report(metrics, epoch, step_in_epoch + 1)

    if rank == 0:
        import mlflow

        finished = state["global_step"] >= cfg.train.epochs * steps_per_epoch
        if finished and session_steps:  # not again when relaunching a finished run
            uri = tracking.log_final_model(model, cfg)
            progress(f"registered the final model as {uri}")
        mlflow.end_run()


def validate(model, loader, device, bf16, cfg, epoch, state, rank, run_dir) -> dict:
    """Video-level evaluation on the validation split on all ranks; rank 0 logs it."""
    scores = gather_scores(collect_scores(getattr(model, "module", model), loader, device, bf16))
    if rank != 0:
        return {}
    from cluster import tracking
    from pipelines.shard_format import read_manifest

    report = video_report(scores, read_manifest(cfg.data.shards)["classes"])
    metrics = summary_metrics(report, prefix="val_")
    tracking.log_metrics(metrics, step=state["global_step"])
    files = save_report(report, run_dir / "validation" / f"epoch_{epoch + 1:03d}")
    tracking.log_report(files, f"validation/epoch_{epoch + 1:03d}")
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("top1"))
    progress(f"validation after epoch {epoch + 1}: {shown}")
    return metrics


def progress(message: str) -> None:
    """One progress line on the worker's real stdout (Ray forwards it to the driver).

    Not ``print``: Ray Train re-routes ``print`` through logging and MLflow wraps ``sys.stdout``,
    which together show every line twice.
    """
    sys.__stdout__.write(f"[train] {message}\n")
    sys.__stdout__.flush()


def inject_failure(cfg: RunConfig, rank: int, world: int, step: int, run_dir: Path) -> None:
    """Failure injection for tests: once per run, the last rank dies at ``train.fail_at_step``."""
    if cfg.train.fail_at_step != step or rank != world - 1:
        return
    marker = run_dir / FAILURE_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker {rank} killed at step {step}\n")
    # Ray Train's controller registers reported checkpoints when it polls the workers (every
    # 2 s). A real failure comes long after the last checkpoint; wait so the injected one does
    # too, instead of racing the registration of the checkpoint just taken.
    time.sleep(5)
    progress(f"failure injection: killing worker {rank} at step {step}")
    os._exit(1)


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
    if result.stopped:
        print(f"stopped on request at step {result.steps}, checkpoint {result.checkpoint}; continue "
              f"with train.run_name={result.run_name} train.resume=true")
        return EXIT_STOPPED
    print(f"run:        {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"steps:      {result.steps}")
    print(f"MLflow run: {result.mlflow_run_id} (tracking URI {absolute_paths(cfg).tracking.uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
