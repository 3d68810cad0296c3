"""What each Ray Train worker runs: :func:`train_loop`, written as plain functions.

In the style of torchvision's ``references/`` scripts: :func:`train_loop` reads top to bottom
(set up, restore, then epochs of :func:`train_one_step`, :func:`validate` and :func:`save`), and
every piece is a function of its inputs.

- one optimizer step = ``accumulation`` micro-batches per worker (``train.global_batch_size``
  clips over all workers);
- every ``train.checkpoint_every`` steps and at each epoch's end all ranks call
  ``ray.train.report``, rank 0 with a checkpoint folder (``stresnet.checkpoint``);
- on (re)start a worker restores the latest checkpoint (Ray Train hands it back after a worker
  failure, and when a run with the same name is launched again in the same storage path), sets
  the loader to the saved epoch and skips the micro-batches that epoch already consumed, so the
  resumed run sees exactly the data, learning rates and dropout masks of an uninterrupted one;
- world rank 0 owns the MLflow run (``cluster.tracking``) and polls the stop request file.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cluster.config import RunConfig
from pipelines.loaders.shard_reader import DamagedShardsError
from stresnet.checkpoint import MODEL_FILE, load_file, load_train_state, save_checkpoint
from stresnet.config import InitConfig, from_dict, to_dict
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

FAILURE_MARKER = "failure_injected"  # in the run folder: the injected failure already happened
# In the run folder: the final model could not be registered (the error). The driver fails the
# command with it; a relaunch of the finished run (train.resume=true) registers again.
REGISTRATION_FAILED = "registration_failed"
# In the run folder: the training loss became NaN or infinite (at which step); the run stopped
# without a checkpoint of that step and without registering a model.
LOSS_NOT_FINITE = "loss_not_finite"
# In the run folder: more of the data turned out damaged while reading than
# data.max_damaged_fraction allows (the error); the run stopped without registering a model.
DATA_DAMAGED = "data_damaged"


@dataclass
class Worker:
    """Where this worker runs: its rank among ``world`` workers, its device."""

    rank: int
    world: int
    device: torch.device
    bf16: bool  # autocast to bfloat16 (GPU only)
    loss: str = "per_step"  # train.loss


@dataclass
class TrainState:
    """What a checkpoint's ``train_state.pt`` holds besides the optimizer."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    mlflow_run_id: str | None = None
    optimizer: dict = field(default_factory=dict)  # the optimizer's state dict, when restored


def setup_worker(cfg: RunConfig) -> Worker:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        # Use the cores Ray reserved for this worker, not every core of the node: workers on one
        # node would otherwise oversubscribe it.
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    return Worker(context.get_world_rank(), context.get_world_size(), device,
                  bf16=cfg.train.bf16 and device.type == "cuda", loss=cfg.train.loss)


def build_and_restore(cfg: RunConfig, worker: Worker) -> tuple[nn.Module, torch.optim.Optimizer, TrainState]:
    """Model and optimizer, from the latest checkpoint when Ray Train hands one back."""
    import ray.train
    import ray.train.torch

    from stresnet.model import build_model

    checkpoint = ray.train.get_checkpoint()  # after a failure or on resume: the latest one
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # Resuming replaces all weights: don't load the init weights (they may be gone by now).
    model = build_model(cfg.model if checkpoint is None else replace(cfg.model, init=InitConfig()))
    if worker.device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train)
    state = TrainState()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model.load_state_dict(load_file(Path(folder) / MODEL_FILE)["model"])
            state = TrainState(**load_train_state(folder))
    model = ray.train.torch.prepare_model(model)  # to the device, DDP-wrapped (world > 1)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)  # after the move: state follows the params
        state.optimizer = {}
    return model, optimizer, state


def train_one_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, accumulation: int,
    worker: Worker, lr: float, stop_requested: bool,
) -> tuple[dict, bool]:
    """One optimizer step over ``accumulation`` micro-batches; returns (metrics, stop requested).

    Loss and accuracy are summed over all workers; rank 0's ``stop_requested`` travels in the
    same all-reduce, so every rank decides to stop at the same step.
    """
    started = time.perf_counter()
    set_learning_rate(optimizer, lr)
    # loss sum, correct, clips, damaged samples skipped, stop requested: summed on the device (no
    # host sync per micro-batch)
    waited, totals = 0.0, StepTotals(worker.device)
    for micro in range(accumulation):
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        totals.add(forward_backward(model, batch, accumulation, worker.device,
                                    sync_gradients=micro == accumulation - 1, bf16=worker.bf16,
                                    loss=worker.loss), skipped=batch.get("skipped", 0))
    totals.tensor[4] = float(stop_requested)
    if worker.world > 1:
        torch.distributed.all_reduce(totals.tensor)  # gloo/nccl: sums over workers
    step = totals.read()  # the step's one host/device synchronisation
    # Every rank sees the same summed loss: all skip a non-finite step alike, and the weights
    # stay those of the last finite step (the caller stops the run).
    if math.isfinite(step["loss"]):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    metrics = {
        "loss": step["loss"],
        "accuracy": step["accuracy"],
        "lr": lr,
        "clips_per_second": step["clips"] / elapsed,
        "data_wait_fraction": waited / elapsed,
        "skipped_samples": step["skipped"],  # damaged samples replaced in this step's batches
    }
    return metrics, step["flag"] > 0


def save(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
         worker: Worker, metrics: dict) -> None:
    """All ranks report ``metrics``; rank 0 attaches the checkpoint (weights are the same on every
    rank). ``state`` says where the run is: the checkpoint resumes from there."""
    import ray.train

    from pipelines.shard_format import read_manifest

    with tempfile.TemporaryDirectory() as folder:
        attached = None
        if worker.rank == 0:
            classes = read_manifest(cfg.data.shards)["classes"]  # evaluation checks them
            train_state = {
                "optimizer": optimizer.state_dict(),
                "epoch": state.epoch,
                "step_in_epoch": state.step_in_epoch,
                "global_step": state.global_step,
                "mlflow_run_id": state.mlflow_run_id,
            }
            attached = ray.train.Checkpoint.from_directory(
                save_checkpoint(folder, model, to_dict(cfg), train_state, shard_info(cfg)))
        ray.train.report(metrics, checkpoint=attached,
                         checkpoint_dir_name=f"checkpoint_{state.global_step:07d}")


def shard_info(cfg: RunConfig) -> dict:
    """The training shards' class names and creation parameters, saved beside the weights."""
    from pipelines.shard_format import model_shard_info, read_manifest

    return model_shard_info(read_manifest(cfg.data.shards))


def validate(cfg: RunConfig, model: nn.Module, loader, worker: Worker, epoch: int, step: int,
             run_dir: Path) -> dict:
    """Video-level evaluation on the validation split on all ranks; rank 0 logs it."""
    from cluster import tracking
    from pipelines.shard_format import read_manifest

    scores = gather_scores(collect_scores(getattr(model, "module", model), loader, worker.device,
                                          worker.bf16, cfg.eval.score_average))
    if worker.rank != 0:
        return {}
    manifest = read_manifest(cfg.data.shards)
    report = video_report(scores, manifest["classes"], manifest.get("class_families"))
    metrics = summary_metrics(report, prefix="val_")
    tracking.log_metrics(metrics, step=step)
    files = save_report(report, run_dir / "validation" / f"epoch_{epoch + 1:03d}")
    tracking.log_report(files, f"validation/epoch_{epoch + 1:03d}")
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("top1"))
    families = report["streams"]["fused"].get("per_family", {})
    if families:  # synthetic data: fused top-1 per family too
        shown += "; fused per family: " + ", ".join(
            f"{f} {v:.3f}" for f, v in families.items() if v is not None
        )
    progress(f"validation after epoch {epoch + 1}: {shown}")
    return metrics


def train_loop(loop_config: dict) -> None:
    """The per-worker training function (runs inside Ray Train); see the module docstring."""
    from cluster import stop_request, tracking
    from pipelines.loaders import build_loader

    quiet_ray_train()
    cfg: RunConfig = from_dict(RunConfig, loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    if (run_dir / DATA_DAMAGED).is_file():  # a retry after the data was found damaged: don't
        raise DamagedShardsError((run_dir / DATA_DAMAGED).read_text().strip())
    worker = setup_worker(cfg)
    model, optimizer, state = build_and_restore(cfg, worker)

    train_loader = build_loader(cfg, cfg.data.train_split, worker.rank, worker.world, train=True)
    val_loader = build_loader(cfg, cfg.data.val_split, worker.rank, worker.world, train=False)
    accumulation = accumulation_steps(cfg.train.global_batch_size, cfg.data.batch_size_per_worker,
                                      worker.world)
    steps_per_epoch = len(train_loader) // accumulation
    if cfg.train.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.steps_per_epoch)
    if steps_per_epoch == 0:
        raise RuntimeError(
            f"data.shards: the {cfg.data.train_split!r} split gives {len(train_loader)} "
            f"micro-batches per worker, fewer than one optimizer step needs ({accumulation}); "
            f"lower train.global_batch_size or data.batch_size_per_worker"
        )
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.stop_at_step is not None:
        total_steps = min(total_steps, cfg.train.stop_at_step)

    if worker.rank == 0:
        state.mlflow_run_id = loop_config["tracking"].start_run(
            cfg, loop_config["run_name"], state.mlflow_run_id)
        if state.global_step:
            progress(f"resumed at step {state.global_step} (epoch {state.epoch + 1})")

    # A checkpoint taken at the end of an epoch says step_in_epoch == steps_per_epoch.
    start_epoch, start_step = state.epoch, state.step_in_epoch
    if start_step >= steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0

    session_start, session_steps, skipped = time.perf_counter(), 0, 0
    model.train()
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            if state.global_step >= total_steps:
                break
            train_loader.set_epoch(epoch)
            batches = iter(train_loader)
            first = start_step if epoch == start_epoch else 0
            for _ in range(first * accumulation):  # the micro-batches the checkpoint already used
                next(batches)
            for step_in_epoch in range(first, steps_per_epoch):
                if state.global_step >= total_steps:
                    break
                step = state.global_step
                torch.manual_seed(step_seed(cfg.seed, worker.rank, step))
                asked = worker.rank == 0 and stop_request.stop_requested(loop_config["run_name"])
                metrics, stop = train_one_step(model, optimizer, batches, accumulation, worker,
                                               learning_rate(cfg.train, step, steps_per_epoch),
                                               asked)
                metrics["epoch"] = epoch + 1
                if not math.isfinite(metrics["loss"]):
                    stop_on_non_finite_loss(metrics, step + 1, worker, run_dir)
                    return
                state.global_step = step + 1
                session_steps += 1
                skipped += int(metrics["skipped_samples"])
                if stop and state.global_step < total_steps:
                    total_steps = state.global_step  # checkpoint below, then leave both loops
                    metrics["stopped_on_request"] = 1.0
                if worker.rank == 0:
                    tracking.log_metrics(metrics, step=state.global_step)
                    per_step = (time.perf_counter() - session_start) / session_steps
                    eta = per_step * (total_steps - state.global_step)
                    progress(
                        f"epoch {epoch + 1}/{cfg.train.epochs} step "
                        f"{step_in_epoch + 1}/{steps_per_epoch} (total {state.global_step}/"
                        f"{total_steps}) loss {metrics['loss']:.4f} acc {metrics['accuracy']:.3f} "
                        f"lr {metrics['lr']:.2g} {metrics['clips_per_second']:.1f} clips/s "
                        f"data-wait {metrics['data_wait_fraction']:.0%} ETA {eta:.0f}s"
                        + (f" skipped {skipped} damaged samples" if skipped else "")
                    )
                inject_failure(cfg, worker, state.global_step, run_dir)
                epoch_done = step_in_epoch + 1 == steps_per_epoch
                stopping = state.global_step >= total_steps
                if epoch_done and (epoch + 1) % cfg.train.validate_every == 0:
                    metrics.update(validate(cfg, model, val_loader, worker, epoch, state.global_step,
                                            run_dir))
                if epoch_done or stopping or state.global_step % cfg.train.checkpoint_every == 0:
                    state.epoch, state.step_in_epoch = epoch, step_in_epoch + 1
                    save(cfg, model, optimizer, state, worker, metrics)

    except DamagedShardsError as err:
        # Raised on one rank only: returning would leave the others waiting in an all-reduce.
        # Fail the worker (Ray Train stops them all); the retries Ray makes fail at once on
        # DATA_DAMAGED (see the top of this function) and the driver reports the error.
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DATA_DAMAGED).write_text(f"{err}\n")
        if worker.rank == 0:
            tracking.end_run(status="FAILED")
        raise

    if worker.rank == 0:
        finished = state.global_step >= cfg.train.epochs * steps_per_epoch
        failed = run_dir / REGISTRATION_FAILED
        # Not again when relaunching a finished run, unless its registration failed.
        if finished and (session_steps or failed.exists()):
            register_final_model(model, cfg, failed)
        else:
            tracking.end_run()


def stop_on_non_finite_loss(metrics: dict, step: int, worker: Worker, run_dir: Path) -> None:
    """The loss of optimizer step ``step`` is NaN or infinite (on every rank: it is summed over
    all of them). The step was not applied and nothing is saved or registered after it; rank 0
    logs the loss, ends the MLflow run as failed and leaves ``LOSS_NOT_FINITE`` for the driver,
    which fails the command (a worker error would be retried by Ray from the last checkpoint,
    into the same NaN)."""
    from cluster import tracking

    if worker.rank != 0:
        return
    tracking.log_metrics(metrics, step=step)
    message = f"training loss {metrics['loss']} at step {step} (learning rate {metrics['lr']:g})"
    progress(f"stopping: {message}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOSS_NOT_FINITE).write_text(message + "\n")
    tracking.end_run(status="FAILED")


def register_final_model(model: nn.Module, cfg: RunConfig, failed: Path) -> None:
    """Register the final model and end the MLflow run. Any error is written to ``failed``
    instead of raised: raised, Ray Train would retry the worker, find the run finished and
    exit 0 with nothing registered (issue 13). The driver turns ``failed`` into an error."""
    from cluster import tracking

    try:
        uri = tracking.log_final_model(model, cfg, shard_info(cfg))
    except Exception as err:  # noqa: BLE001 - whatever it is, the driver reports it
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"{type(err).__name__}: {err}\n")
        progress(f"registering the final model failed: {type(err).__name__}: {err}")
        tracking.end_run(status="FAILED")
        return
    failed.unlink(missing_ok=True)
    progress(f"registered the final model as {uri}")
    tracking.end_run()


def quiet_ray_train() -> None:
    """Ray Train logs one INFO line per report, under a logger named after its source file (so
    LoggingConfig does not reach it); silence it to keep the progress lines readable."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def progress(message: str) -> None:
    """One progress line on the worker's real stdout (Ray forwards it to the driver).

    Not ``print``: Ray Train re-routes ``print`` through logging and MLflow wraps ``sys.stdout``,
    which together show every line twice.
    """
    sys.__stdout__.write(f"[train] {message}\n")
    sys.__stdout__.flush()


def inject_failure(cfg: RunConfig, worker: Worker, step: int, run_dir: Path) -> None:
    """Failure injection for tests: once per run, the last rank dies at ``train.fail_at_step``."""
    if cfg.train.fail_at_step != step or worker.rank != worker.world - 1:
        return
    marker = run_dir / FAILURE_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker {worker.rank} killed at step {step}\n")
    # Ray Train's controller registers reported checkpoints when it polls the workers (every
    # 2 s). A real failure comes long after the last checkpoint; wait so the injected one does
    # too, instead of racing the registration of the checkpoint just taken.
    time.sleep(5)
    progress(f"failure injection: killing worker {worker.rank} at step {step}")
    os._exit(1)
