"""Clip loaders over the shards: ``build_loader`` gives the DALI or the CPU loader.

See docs/loaders.md for what they yield and how work is split across ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Only the light modules at import time: a process that needs just the shard reader (the
# preflight check, a tool listing samples) imports ``pipelines.loaders.shard_reader``, which runs
# this file first; torch, OpenCV and DALI (~530 MB resident for torch alone) come with
# ``build_loader``.
from pipelines.loaders.schedule import Schedule
from pipelines.loaders.shard_reader import ShardIndex

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


def build_loader(
    cfg: PipelineConfig,
    split: str,
    rank: int,
    world_size: int,
    backend: str | None = None,
    train: bool | None = None,
    whole_video: bool = False,
):
    """The loader of ``split`` for one rank: an iterable of batch dicts with ``len()`` (batches
    per epoch, equal on every rank) and ``set_epoch(epoch)``.

    ``backend``: ``"dali"`` or ``"cpu"`` (default ``cfg.data.backend``). ``train``: training clips
    (random positions/crops, ``cfg.data.batch_size_per_worker``) or evaluation views (``test_positions``
    uniform positions per (video, view), ``cfg.eval.batch_size_per_worker``); default: evaluation for
    ``cfg.data.val_split``, training otherwise. ``whole_video`` (evaluation only): every frame
    position of the video instead of ``test_positions``, one clip per batch (fully convolutional
    testing, spec section 5).
    """
    import torch

    from pipelines.loaders.clips import ClipSource

    backend = backend or cfg.data.backend
    if backend not in ("dali", "cpu"):
        raise ValueError(f"backend: got {backend!r}, expected 'dali' or 'cpu'")
    if train is None:
        train = split != cfg.data.val_split
    if whole_video and train:
        raise ValueError("whole_video applies to evaluation (train=False) only")
    if backend == "dali" and cfg.sampling.flow_center == "median":
        # DALI decodes only the crop region; the median belongs to the whole frame (the authors'
        # subMedian), so this centring is the CPU loader's for now.
        raise ValueError("sampling.flow_center 'median' is supported by data.backend 'cpu' only "
                         "(the median is taken over the whole frame before cropping)")
    if train and cfg.data.access == "stream":  # evaluation reads by random access, always
        from pipelines.loaders.stream import build_stream_loader

        device = _dali_device(cfg) if backend == "dali" else None
        return build_stream_loader(cfg, split, rank, world_size, backend, device)
    index = ShardIndex(cfg.data.shards, split, cfg.data.max_damaged_fraction)
    source = ClipSource(cfg, index, whole_video)
    if train:
        batch_size, frames = cfg.data.batch_size_per_worker, cfg.sampling.train_positions
        schedule = Schedule(len(index), batch_size, rank, world_size, cfg.seed)
    else:
        batch_size = 1 if whole_video else cfg.eval.batch_size_per_worker
        frames = cfg.sampling.test_positions
        schedule = Schedule(len(index), batch_size, rank, world_size, cfg.seed, source.num_views())
    size, workers = cfg.sampling.input_size, cfg.data.loader_workers

    if backend == "cpu":
        from pipelines.loaders.cpu import CpuClipLoader

        return CpuClipLoader(source, schedule, workers, size, frames)
    from pipelines.loaders.dali import DaliClipLoader

    return DaliClipLoader(
        source, schedule, batch_size, frames, workers, size, _dali_device(cfg),
        decode_threads=cfg.data.decode_threads, hw_decoder_load=cfg.data.hw_decoder_load,
        half=cfg.train.bf16,  # autocast computes in bf16 anyway: hand over float16, half the bytes
    )


def _dali_device(cfg: PipelineConfig) -> torch.device:
    """Where the DALI loader decodes and returns its batches (``data.dali_device``)."""
    import torch

    use_gpu = cfg.data.dali_device == "gpu" or (
        cfg.data.dali_device == "auto" and torch.cuda.is_available()
    )
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("data.dali_device is 'gpu' but this process sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
