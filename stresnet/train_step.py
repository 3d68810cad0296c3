"""The training step (spec sections 4 and 6), free of Ray and MLflow.

One *optimizer step* consumes ``train.global_batch_size`` clips in total: every worker runs
``accumulation`` micro-batches of ``data.batch_size_per_worker`` clips, summing gradients, then all workers
average them (DDP) and SGD takes one step. The learning rate is a pure function of the optimizer
step (:func:`learning_rate`), so a resumed run needs nothing but the step count to continue the
schedule.

Typical use (see ``cluster/worker.py``)::

    optimizer = build_optimizer(model, cfg.train)
    for step, micro_batches in ...:
        set_learning_rate(optimizer, learning_rate(cfg.train, step, steps_per_epoch))
        totals = StepTotals(device)
        for b in micro_batches:
            totals.add(forward_backward(model, b, accumulation, device, bf16=bf16, loss=cfg.train.loss))
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        metrics = totals.read()  # the step's only host/device synchronisation

Nothing before ``StepTotals.read`` waits for the GPU: losses and accuracies stay on the device, so
the host keeps queueing micro-batches while the GPU works (a ``float(loss)`` per micro-batch
would drain the queue every time and leave the GPU idle while the next batch is handed over).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stresnet.config import ConfigError, TrainConfig

FUSED = "fused"  # the model output that averages the streams' softmax; every other is a stream


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per worker per optimizer step so that the global batch is exact."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise ConfigError(
            f"train.global_batch_size: got {global_batch}, expected a multiple of data.batch_size_per_worker x "
            f"workers = {micro_batch} x {world_size} = {per_pass} (gradient accumulation "
            f"reaches the global batch in whole micro-batches)"
        )
    return global_batch // per_pass


def parameter_groups(model: nn.Module, weight_decay: float, bias_lr_factor: float = 1.0) -> list[dict]:
    """SGD parameter groups: weight decay on conv/linear weights only; biases at a higher rate.

    Biases and normalisation scales/shifts are the one-dimensional parameters; decaying them
    only shrinks the network's ability to re-scale features, so they get none (spec section 6).
    Parameters named ``bias`` (the classifier's and the normalisation shifts) learn at
    ``bias_lr_factor`` times the learning rate: the authors' ``setLrWd(..., 'biasesLRWD',
    [2 0])`` (``STResNet_stage1.m``). Each group's ``lr_factor`` is applied by
    :func:`set_learning_rate`.
    """
    decay, scales, biases = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim > 1:
            decay.append(param)
        elif name.rsplit(".", 1)[-1] == "bias":
            biases.append(param)
        else:
            scales.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_factor": 1.0},
        {"params": scales, "weight_decay": 0.0, "lr_factor": 1.0},
        {"params": biases, "weight_decay": 0.0, "lr_factor": bias_lr_factor},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    optimizer = torch.optim.SGD(
        parameter_groups(model, cfg.weight_decay, cfg.bias_lr_factor), lr=cfg.lr,
        momentum=cfg.momentum,
    )
    set_learning_rate(optimizer, cfg.lr)
    return optimizer


def steps_per_pass(num_videos: int, global_batch: int, micro_batch: int, world_size: int) -> int:
    """Optimizer steps in one pass over ``num_videos`` training videos, as the training loop
    counts them (``cluster/worker.py``): every rank gets ``ceil(N / W)`` samples in whole
    micro-batches of ``micro_batch``; ``accumulation`` micro-batches make one step."""
    accumulation = accumulation_steps(global_batch, micro_batch, world_size)
    micro_batches = math.ceil(math.ceil(num_videos / world_size) / micro_batch)
    return micro_batches // accumulation


def lr_boundaries(cfg: TrainConfig, steps_per_epoch: int) -> list[int]:
    """The optimizer steps at which the learning rate drops: ``lr_steps`` and the first step
    of every epoch in ``lr_epochs``, sorted."""
    return sorted([*cfg.lr_steps, *(epoch * steps_per_epoch for epoch in cfg.lr_epochs)])


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int = 0) -> float:
    """The learning rate for optimizer step ``step`` (0-based): ``lr`` divided by ``lr_decay``
    once for every boundary (:func:`lr_boundaries`) that is ``<= step``. ``lr_epochs`` need
    ``steps_per_epoch``."""
    if cfg.lr_epochs and steps_per_epoch <= 0:
        raise ValueError("train.lr_epochs needs the number of steps per epoch")
    drops = sum(1 for boundary in lr_boundaries(cfg, steps_per_epoch) if step >= boundary)
    return cfg.lr / cfg.lr_decay**drops


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


def stream_losses(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, kind: str = "per_step"
) -> dict[str, torch.Tensor]:
    """Softmax cross-entropy of every stream the model has, plus their sum under ``"total"``.

    Each stream keeps its own classifier and loss; the summed loss is what is back-propagated
    (spec section 4). Stream outputs are clip logits ``(B, K)`` or per-time-step logits
    ``(B, T', K)`` (``model(..., per_step=True)``). ``kind="per_step"`` (the authors' code): the
    loss of every time step, the label repeated over time, averaged; ``"clip_mean"``: the loss
    of the logits averaged over time.
    """
    if kind not in ("per_step", "clip_mean"):
        raise ValueError(f"train.loss: got {kind!r}, expected 'per_step' or 'clip_mean'")
    losses = {}
    for name, logits in outputs.items():
        if name == FUSED:
            continue
        logits = logits.float()
        if logits.ndim == 3 and kind == "clip_mean":
            logits = logits.mean(dim=1)
        if logits.ndim == 3:  # (B, T', K): one loss term per time step
            steps = logits.shape[1]
            losses[name] = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(steps))
        else:
            losses[name] = F.cross_entropy(logits, labels)
    if not losses:
        raise ValueError(f"model outputs {sorted(outputs)} contain no stream logits")
    losses["total"] = sum(losses.values())
    return losses


@dataclass
class MicroBatchStats:
    """What one micro-batch contributed, as tensors on the device (reading them synchronises)."""

    loss: torch.Tensor  # 0-dim float32: the summed stream loss, not divided by accumulation
    correct: torch.Tensor  # 0-dim int64: clips whose fused prediction is right
    clips: int


def forward_backward(
    model: nn.Module,
    batch: dict,
    accumulation: int,
    device: torch.device,
    sync_gradients: bool = True,
    bf16: bool = False,
    loss: str = "per_step",
) -> MicroBatchStats:
    """Forward one micro-batch, back-propagate ``loss / accumulation``; no host synchronisation.

    Dividing by ``accumulation`` makes the summed gradient of all micro-batches the gradient of
    the mean loss over the whole step, i.e. what one large batch would give. With DDP,
    ``sync_gradients=False`` skips the all-reduce for all but the last micro-batch of a step.
    ``loss``: ``train.loss`` (:func:`stream_losses`).
    """
    rgb = batch["rgb"].to(device, non_blocking=True) if batch.get("rgb") is not None else None
    flow = batch["flow"].to(device, non_blocking=True) if batch.get("flow") is not None else None
    labels = batch["label"].to(device, non_blocking=True)
    no_sync = getattr(model, "no_sync", None)
    sync_context = contextlib.nullcontext() if sync_gradients or no_sync is None else no_sync()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with sync_context:
        with autocast:
            outputs = model(rgb, flow, per_step=loss == "per_step")
        total = stream_losses(outputs, labels, loss)["total"]
        (total / accumulation).backward()
    correct = (outputs["fused"].detach().argmax(dim=1) == labels).sum()
    return MicroBatchStats(loss=total.detach(), correct=correct, clips=len(labels))


class StepTotals:
    """Loss sum, correct predictions and clips of one optimizer step, summed on the device.

    ``tensor`` is what to all-reduce across workers (float64: exact counts); ``read`` returns the
    step's mean loss and accuracy, its clips (of all workers, after an all-reduce) and the free
    slot, with one synchronisation, at log time.
    """

    def __init__(self, device: torch.device) -> None:
        # loss * clips, correct, clips, damaged samples skipped, and a free slot (e.g. a flag
        # every rank must see)
        self.tensor = torch.zeros(5, dtype=torch.float64, device=device)
        self.clips = 0

    def add(self, stats: MicroBatchStats, skipped: int = 0) -> None:
        self.tensor[0] += stats.loss.double() * stats.clips
        self.tensor[3] += skipped
        self.tensor[1] += stats.correct
        self.tensor[2] += stats.clips
        self.clips += stats.clips

    def read(self) -> dict[str, float]:
        loss_sum, correct, clips, skipped, flag = self.tensor.tolist()
        return {"loss": loss_sum / clips, "accuracy": correct / clips, "clips": clips,
                "skipped": skipped, "flag": flag}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed for optimizer step ``step`` on worker ``rank``.

    Re-seeding every step from (seed, rank, step) makes dropout masks a function of the step,
    so a run resumed from a checkpoint draws exactly what the uninterrupted run drew without
    storing every worker's generator state.
    """
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % 2**63
