"""From a clip request to the clip's encoded JPEGs, and from decoded crops to the yielded batch.

The part both loaders share, so that they agree by construction: the clip plan
(``stresnet.sampling``), which members are read, the skip-and-substitute rule for damaged
samples, and the yielded dict. Only decoding + crop + resize + flip + normalisation differ (DALI
operators vs OpenCV and ``stresnet.sampling.normalize_clip``); ``decode_clip`` is the CPU version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import cv2
import numpy as np
import torch

from pipelines.config import PipelineConfig
from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shard_reader import (
    DamagedShardsError, SampleError, ShardIndex, check_damaged, check_jpeg, clip_member_names,
)
from stresnet.sampling import ClipPlan, eval_plan, eval_views, train_plan

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

    def __init__(self, cfg: PipelineConfig, index: ShardIndex, whole_video: bool = False):
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
            ref.width, self.whole_video, request.limit,
        )

    def with_frame_limits(self, batch: list[ClipRequest]) -> list[ClipRequest]:
        """``full_frame`` test views of different-sized videos cannot share a batch tensor: cut
        every frame of the batch to the batch's smallest height and width (the authors' rule,
        ``cnn_get_im_flow_batch.m``). Other batches are returned as they are."""
        if self.sampling.test_crops != "full_frame" or not batch or batch[0].train:
            return batch
        refs = [self.index.ref(r.index) for r in batch]
        limit = (min(r.height for r in refs), min(r.width for r in refs))
        return [replace(r, limit=limit) for r in batch]

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


def decode_clip(
    clip: EncodedClip, medians: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """CPU decode + crop + resize + flip: rgb (T, H, W, 3) and flow (T, H, W, 2L) uint8, where
    (H, W) is ``clip.plan.size``; with ``medians``, also each flow image's median byte over the
    whole frame, before cropping (T, 2L) (``sampling.flow_center: median``).

    Bilinear without antialiasing (the authors' ``imresize(..., 'Antialiasing', false)``), the
    same as the DALI pipeline's ``fn.resize`` settings.
    """
    rgb = flow = flow_median = None
    if clip.rgb:  # OpenCV decodes to BGR
        rgb = np.stack([_crop(_decode(b, cv2.IMREAD_COLOR)[:, :, ::-1], clip.plan)
                        for b in clip.rgb])
    if clip.flow:
        images = [_decode(b, cv2.IMREAD_GRAYSCALE) for b in clip.flow]
        fields = np.stack([_crop(image, clip.plan) for image in images])
        t = len(clip.plan.positions)  # (T*2L, H, W) -> (T, H, W, 2L)
        flow = fields.reshape(t, -1, *fields.shape[1:]).transpose(0, 2, 3, 1)
        if medians:
            # torch's median (the lower middle value), as the crop-based centring had
            flow_median = torch.from_numpy(
                np.stack([image.reshape(-1) for image in images])
            ).median(dim=1).values.numpy().reshape(t, -1)
    return rgb, flow, flow_median


def _decode(data: bytes, mode: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), mode)
    if image is None:
        raise SampleError("JPEG could not be decoded")
    return image


def _crop(image: np.ndarray, plan: ClipPlan) -> np.ndarray:
    box = plan.box
    crop = image[box.y : box.y + box.h, box.x : box.x + box.w]
    height, width = plan.size
    if crop.shape[:2] != (height, width):
        crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(crop[:, ::-1]) if plan.flip else crop


def batch_dict(
    source: ClipSource,
    indices: list[int],
    views: list[int] | None,
    rgb: torch.Tensor | None,
    flow: torch.Tensor | None,
    skipped: int,
) -> dict:
    """The dict a loader yields (see docs/loaders.md), from the network input of the samples
    ``indices`` (``rgb`` (B, T, 3, S, S), ``flow`` (B, T, 2L, S, S)); ``views`` is None for
    training clips, else the view of each evaluation item."""
    refs = [source.index.ref(i) for i in indices]
    batch = {
        "rgb": rgb,
        "flow": flow,
        "label": torch.tensor([r.label for r in refs], dtype=torch.int64),
        "video_id": [r.video_id for r in refs],
        "skipped": skipped,
    }
    if views is not None:
        batch["view"] = torch.tensor(views, dtype=torch.int64)
        batch["num_views"] = source.num_views()
    return batch
