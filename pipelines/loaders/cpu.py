"""The CPU loader: a torch DataLoader whose workers read, decode and crop clips with OpenCV.

The batch schedule (``schedule.py``) is computed in the main process and handed to the
DataLoader as its batch sampler, so worker processes need no epoch state: each request carries
its epoch. Workers return uint8 crops (4x less to pass between processes than float); the main
process normalises them (``stresnet.sampling.normalize_clip``), the reference for the DALI
loader's ``crop_mirror_normalize``.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.loaders.clips import ClipSource, batch_dict, decode_clip
from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shard_reader import SampleError
from stresnet.sampling import normalize_clip


class _ClipDataset(Dataset):
    """Map-style dataset indexed by ``ClipRequest``: one decoded clip, or None if unusable."""

    def __init__(self, source: ClipSource, size: int):
        self.source = source
        self.size = size

    def __len__(self) -> int:
        return len(self.source.index)

    def __getitem__(self, request: ClipRequest) -> dict | None:
        try:
            return self.source.load(request, lambda clip: self._decode(request, clip))
        except SampleError:  # evaluation: drop the item (already logged)
            return None

    def _decode(self, request, clip) -> dict:
        medians = self.source.sampling.flow_center == "median"
        rgb, flow, flow_median = decode_clip(clip, medians)
        return {"request": request, "index": clip.index, "rgb": rgb, "flow": flow,
                "flow_median": flow_median, "flip": clip.plan.flip, "skipped": clip.skipped}


def _collate(items: list[dict | None]) -> dict:
    kept = [i for i in items if i is not None]
    out = {
        "requests": [i["request"] for i in kept],
        "indices": [i["index"] for i in kept],
        "flip": torch.tensor([i["flip"] for i in kept], dtype=torch.bool),
        "skipped": sum(i["skipped"] for i in kept) + (len(items) - len(kept)),
    }
    for key in ("rgb", "flow", "flow_median"):
        arrays = [i[key] for i in kept if i[key] is not None]
        out[key] = torch.stack([torch.from_numpy(a) for a in arrays]) if arrays else None
    return out


class CpuClipLoader:
    """Iterable over one epoch's batches of one rank (see ``build_loader``)."""

    def __init__(self, source: ClipSource, schedule, workers: int, size: int, frames: int):
        self.source = source
        self.schedule = schedule  # epoch -> list of batches of ClipRequest
        self.workers = workers
        self.size = size
        self.frames = frames
        self.epoch = 0
        self.skipped = 0  # damaged samples skipped so far (all epochs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.schedule(self.epoch))

    def __iter__(self):
        batches = [self.source.with_frame_limits(b) for b in self.schedule(self.epoch)]
        loader = DataLoader(
            _ClipDataset(self.source, self.size),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            prefetch_factor=4 if self.workers else None,
        )
        for raw in loader:
            self.skipped += raw["skipped"]
            rgb = self._or_empty(raw["rgb"], self.source.use_rgb, 3)
            flow = self._or_empty(raw["flow"], self.source.use_flow, 2 * self.source.flow_length)
            views = None if self.schedule.num_views == 0 else [r.view for r in raw["requests"]]
            rgb, flow = normalize_clip(rgb, flow, raw["flip"], self.source.sampling.flow_center,
                                       raw["flow_median"])
            yield batch_dict(self.source, raw["indices"], views, rgb, flow, raw["skipped"])

    def _or_empty(self, crops: torch.Tensor | None, used: bool, channels: int):
        """Keep an unused modality None; give an all-dropped batch its (0, T, ...) shape."""
        if not used:
            return None
        if crops is None:
            return torch.zeros((0, self.frames, self.size, self.size, channels), dtype=torch.uint8)
        return crops
