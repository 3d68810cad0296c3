"""The training step (spec sections 4 and 6), free of Ray and MLflow.

One *optimizer step* consumes ``train.global_batch_size`` clips in total: every worker runs
``accumulation`` micro-batches of ``data.batch_size_per_worker`` clips, summing gradients, then all workers
average them (DDP) and SGD takes one step. The learning rate is a pure function of the optimizer
step (:func:`learning_rate`), so a resumed run needs nothing but the step count to continue the
schedule.

Typical use (see ``cluster/train.py``)::

    optimizer = build_optimizer(model, cfg.train)
    for step, micro_batches in ...:
        set_learning_rate(optimizer, learning_rate(cfg.train, step))
        stats = [forward_backward(model, b, accumulation, device, autocast) for b in micro_batches]
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import contextlib
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


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD parameter groups: weight decay on conv/linear weights only.

    Biases and normalisation scales/shifts are the one-dimensional parameters; decaying them
    only shrinks the network's ability to re-scale features, so they get none (spec section 6).
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum
    )


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): ``lr`` divided by ``lr_decay``
    once for every entry of ``lr_steps`` that is ``<= step``."""
    drops = sum(1 for boundary in cfg.lr_steps if step >= boundary)
    return cfg.lr / cfg.lr_decay**drops


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def stream_losses(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Softmax cross-entropy of every stream the model has, plus their sum under ``"total"``.

    Each stream keeps its own classifier and loss; the summed loss is what is back-propagated
    (spec section 4).
    """
    losses = {
        name: F.cross_entropy(logits.float(), labels) for name, logits in outputs.items()
        if name != FUSED
    }
    if not losses:
        raise ValueError(f"model outputs {sorted(outputs)} contain no stream logits")
    losses["total"] = sum(losses.values())
    return losses


@dataclass
class MicroBatchStats:
    """What one micro-batch contributed: its loss (not divided by accumulation) and accuracy."""

    loss: float
    correct: int
    clips: int


def forward_backward(
    model: nn.Module,
    batch: dict,
    accumulation: int,
    device: torch.device,
    sync_gradients: bool = True,
    bf16: bool = False,
) -> MicroBatchStats:
    """Forward one micro-batch, back-propagate ``loss / accumulation``.

    Dividing by ``accumulation`` makes the summed gradient of all micro-batches the gradient of
    the mean loss over the whole step, i.e. what one large batch would give. With DDP,
    ``sync_gradients=False`` skips the all-reduce for all but the last micro-batch of a step.
    """
    rgb = batch["rgb"].to(device, non_blocking=True) if batch.get("rgb") is not None else None
    flow = batch["flow"].to(device, non_blocking=True) if batch.get("flow") is not None else None
    labels = batch["label"].to(device, non_blocking=True)
    no_sync = getattr(model, "no_sync", None)
    sync_context = contextlib.nullcontext() if sync_gradients or no_sync is None else no_sync()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with sync_context:
        with autocast:
            outputs = model(rgb, flow)
        loss = stream_losses(outputs, labels)["total"]
        (loss / accumulation).backward()
    correct = int((outputs["fused"].argmax(dim=1) == labels).sum())
    return MicroBatchStats(loss=float(loss.detach()), correct=correct, clips=len(labels))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed for optimizer step ``step`` on worker ``rank``.

    Re-seeding every step from (seed, rank, step) makes dropout masks a function of the step,
    so a run resumed from a checkpoint draws exactly what the uninterrupted run drew without
    storing every worker's generator state.
    """
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % 2**63
