"""Which clips each rank reads in an epoch, batch by batch (both loaders use this).

Training (like ``torch.utils.data.DistributedSampler``): one permutation of all N samples per
epoch, drawn from ``(seed, epoch)`` so every rank computes the same one; it is padded by wrapping
to a multiple of the world size W and rank r takes every W-th sample from r. Each rank then has
``ceil(N / W)`` samples, wrapped again to whole batches, so every rank runs exactly
``ceil(ceil(N / W) / B)`` batches of exactly B clips and no rank waits for another at the end of an
epoch. Every sample is read at least once per epoch; the extra reads are the ``W*ceil(N/W) - N``
global padding samples plus each rank's wrap to whole batches (none when B*W divides N).

Evaluation: the (video, view) items are split across ranks with no padding (each exactly once).
Every rank runs the same number of batches, ``ceil(ceil(M / W) / B)`` for M items, with the rank's
items spread evenly over them, so batches may be smaller than B (and empty on ranks that have no
item at all, which happens only when M < W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipRequest:
    """One clip to build: sample ``index`` of the split for ``epoch`` (train) or ``view`` (test)."""

    index: int
    epoch: int = 0
    view: int = -1  # -1: a training clip
    # full_frame test views: cut the frame to this (height, width), the batch's smallest frame
    limit: tuple[int, int] | None = None

    @property
    def train(self) -> bool:
        return self.view < 0


def train_batches(
    num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int
) -> list[list[ClipRequest]]:
    """This rank's training batches for ``epoch``."""
    _check(num_samples, rank, world_size)
    per_rank = math.ceil(num_samples / world_size)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    padded = np.resize(order, per_rank * world_size)  # np.resize repeats cyclically
    mine = np.resize(padded[rank::world_size], math.ceil(per_rank / batch_size) * batch_size)
    requests = [ClipRequest(int(i), epoch) for i in mine]
    return [requests[k : k + batch_size] for k in range(0, len(requests), batch_size)]


def eval_batches(
    num_samples: int, num_views: int, batch_size: int, rank: int, world_size: int
) -> list[list[ClipRequest]]:
    """This rank's evaluation batches: every (video, view) on exactly one rank."""
    _check(num_samples, rank, world_size)
    items = [ClipRequest(i, 0, v) for i in range(num_samples) for v in range(num_views)]
    mine = items[rank::world_size]
    num_batches = math.ceil(math.ceil(len(items) / world_size) / batch_size)
    return [list(part) for part in _split_evenly(mine, num_batches)]


def _split_evenly(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _check(num_samples: int, rank: int, world_size: int) -> None:
    if num_samples < 1:
        raise ValueError("the split has no samples")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")


@dataclass(frozen=True)
class Schedule:
    """``schedule(epoch)`` -> this rank's batches; picklable, so DALI's workers can hold one."""

    num_samples: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    num_views: int = 0  # 0: training; else evaluation with this many views per video

    def __call__(self, epoch: int) -> list[list[ClipRequest]]:
        if self.num_views:
            return eval_batches(
                self.num_samples, self.num_views, self.batch_size, self.rank, self.world_size
            )
        return train_batches(
            self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, epoch
        )
