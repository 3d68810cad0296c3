"""From a clip request to the clip's encoded JPEGs, and from decoded crops to the yielded batch.

The part both loaders share, so that they agree by construction: the clip plan
(``stresnet.sampling``), which members are read, the skip-and-substitute rule for damaged
samples, and the final normalisation. Only decoding + crop + resize + flip differ (DALI operators
vs OpenCV); ``decode_clip`` is the CPU version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import cv2
import numpy as np
import torch

from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shard_reader import (
    DamagedShardsError, SampleError, ShardIndex, check_damaged, check_jpeg, clip_member_names,
)
from stresnet.config import RunConfig
from stresnet.sampling import ClipPlan, normalize_clip, eval_plan, eval_views, train_plan

log = logging.getLogger(__name__)

# A damaged training sample is replaced by the next one in the split; give up after this many.
MAX_SUBSTITUTES = 8

T = TypeVar("T")


@dataclass
class EncodedClip:
    """The selected members of one clip, checked, in the order the loaders stack them."""

    index: int  # the sample actually used (differs from the request after a substitution)
    plan: ClipPlan
    rgb: list[bytes]  # one per position
    flow: list[bytes]  # per position: x1, y1, x2, y2, ... (2L)
    skipped: int  # damaged samples passed over to get this one


class ClipSource:
    """Plans and reads clips of one split for one run config (picklable: DALI workers get one)."""

    def __init__(self, cfg: RunConfig, index: ShardIndex, whole_video: bool = False):
        self.sampling = cfg.sampling
        self.flow_length = cfg.model.flow_length
        self.seed = cfg.seed
        self.use_rgb = cfg.model.mode != "motion"
        self.use_flow = cfg.model.mode != "appearance"
        self.whole_video = whole_video
        self.index = index
        self.max_damaged_fraction = cfg.data.max_damaged_fraction
        # Samples found damaged only when read (corrupt member, CRC mismatch), by this process.
        self.damaged_on_read: set[int] = set()

    def num_views(self) -> int:
        size = self.sampling.input_size  # the number of views does not depend on the frame size
        return len(eval_views(size, size, self.sampling))

    def plan(self, request: ClipRequest, index: int) -> ClipPlan:
        ref = self.index.ref(index)
        if request.train:
            return train_plan(
                self.sampling, self.flow_length, self.seed, request.epoch, ref.video_id,
                ref.num_frames, ref.height, ref.width,
            )
        return eval_plan(
            self.sampling, self.flow_length, request.view, ref.num_frames, ref.height,
            ref.width, self.whole_video,
        )

    def read(self, request: ClipRequest, index: int) -> EncodedClip:
        """The clip's members for sample ``index``; ``SampleError`` if any is missing or bad."""
        plan = self.plan(request, index)
        ref = self.index.ref(index)
        rgb_names, flow_names = clip_member_names(
            plan.positions, plan.flow_indices, self.use_rgb, self.use_flow
        )
        data = self.index.read(index, rgb_names + flow_names)
        for name, blob in data.items():
            check_jpeg(blob, ref.height, ref.width, f"{ref.path}: {ref.key}.{name}")
        return EncodedClip(
            index, plan, [data[n] for n in rgb_names], [data[n] for n in flow_names], 0
        )

    def load(self, request: ClipRequest, build: Callable[[EncodedClip], T]) -> T:
        """``build(read(...))``, skipping damaged samples with a logged warning.

        Training substitutes the next readable sample (so batches stay full and every rank keeps
        the same number of steps); evaluation re-raises, and the loader drops that item.
        """
        index, skipped = request.index, 0
        while True:
            try:
                clip = self.read(request, index)
                clip.skipped = skipped
                return build(clip)
            except (SampleError, cv2.error) as err:
                skipped += 1
                self._count_damaged(index, err)
                if not request.train:
                    log.warning("skipping test sample %d view %d: %s", index, request.view, err)
                    raise SampleError(str(err)) from None
                if skipped > MAX_SUBSTITUTES:
                    raise DamagedShardsError(
                        f"{self.index.folder}: {skipped} damaged samples in a row from sample "
                        f"{request.index} of split {self.index.split!r}; last error: {err}"
                    ) from None
                substitute = (index + 1) % len(self.index)
                log.warning(
                    "skipping sample %d (%s); using sample %d instead", index, err, substitute
                )
                index = substitute


    def _count_damaged(self, index: int, err: Exception) -> None:
        """The skip policy at read time: samples damaged when indexed plus those found damaged
        since, against ``data.max_damaged_fraction`` of the split."""
        if self.index.samples[index] is None or index in self.damaged_on_read:
            return
        self.damaged_on_read.add(index)
        check_damaged(self.index.unreadable + len(self.damaged_on_read), len(self.index),
                      self.max_damaged_fraction, f"{self.index.folder}: split {self.index.split!r}",
                      f"damaged (the latest: sample {index}, {err})")


def decode_clip(clip: EncodedClip, size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """CPU decode + crop + resize + flip: rgb (T, S, S, 3) and flow (T, S, S, 2L) uint8.

    Bilinear without antialiasing (the authors' ``imresize(..., 'Antialiasing', false)``), the
    same as the DALI pipeline's ``fn.resize`` settings.
    """
    rgb = flow = None
    if clip.rgb:  # OpenCV decodes to BGR
        rgb = np.stack([_crop(_decode(b, cv2.IMREAD_COLOR)[:, :, ::-1], clip.plan, size)
                        for b in clip.rgb])
    if clip.flow:
        fields = np.stack([_crop(_decode(b, cv2.IMREAD_GRAYSCALE), clip.plan, size)
                           for b in clip.flow])
        t = len(clip.plan.positions)  # (T*2L, S, S) -> (T, S, S, 2L)
        flow = fields.reshape(t, -1, size, size).transpose(0, 2, 3, 1)
    return rgb, flow


def _decode(data: bytes, mode: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), mode)
    if image is None:
        raise SampleError("JPEG could not be decoded")
    return image


def _crop(image: np.ndarray, plan: ClipPlan, size: int) -> np.ndarray:
    box = plan.box
    crop = image[box.y : box.y + box.h, box.x : box.x + box.w]
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(crop[:, ::-1]) if plan.flip else crop


def finish_batch(
    source: ClipSource,
    indices: list[int],
    views: list[int] | None,
    rgb: torch.Tensor | None,
    flow: torch.Tensor | None,
    flip: torch.Tensor,
    skipped: int,
) -> dict:
    """The dict a loader yields (see docs/loaders.md), from uint8 crops of the samples
    ``indices``; ``views`` is None for training clips, else the view of each evaluation item."""
    rgb_f, flow_f = normalize_clip(rgb, flow, flip, source.sampling.flow_center)
    refs = [source.index.ref(i) for i in indices]
    batch = {
        "rgb": rgb_f,
        "flow": flow_f,
        "label": torch.tensor([r.label for r in refs], dtype=torch.int64),
        "video_id": [r.video_id for r in refs],
        "skipped": skipped,
    }
    if views is not None:
        batch["view"] = torch.tensor(views, dtype=torch.int64)
        batch["num_views"] = source.num_views()
    return batch
