"""The DALI loader: Python workers pick the JPEGs, DALI decodes, crops, resizes and flips them.

Why a parallel external source and not ``fn.readers.webdataset``: the reader needs a fixed list
of member extensions per sample, but a video has a variable number of frames and a clip uses a
different ~20% of them every epoch. So Python workers (``parallel=True``) run the shared clip
plan and read exactly the selected members from the shards (``ShardIndex``); DALI does the heavy
part. One DALI *sample* is one frame position of a clip: its RGB JPEG and its 2L flow JPEGs as
separate outputs (DALI needs every input of a pipeline to have the same batch size), all with the
clip's crop box and flip as per-sample arguments. A batch of B clips of T positions is B*T DALI
samples, decoded by ``fn.decoders.image_slice`` (only the crop region; ``device="mixed"`` =
nvJPEG on a GPU, libjpeg-turbo on the CPU otherwise), resized by ``fn.resize`` and mirrored by
``fn.flip``. The outputs become PyTorch tensors on the same device (``feed_ndarray``: a
device-to-device copy on GPU, no host round trip) and are normalised by the same code as the CPU
loader's (``clips.finish_batch``).
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.loaders.clips import ClipSource, EncodedClip, finish_batch
from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shard_reader import SampleError

# meta output per position: [sample used, damaged samples skipped, flip, keep (0 = stand-in), view]


class _BatchCallback:
    """The external source: batch ``iteration`` of epoch ``base_epoch + epoch_idx`` as encoded
    JPEGs + per-position crop/flip arguments. Stateless apart from caches, as DALI's parallel
    workers require; it is pickled into them."""

    def __init__(self, source: ClipSource, schedule, base_epoch: int):
        self.source = source
        self.schedule = schedule  # epoch -> list of batches of ClipRequest
        self.base_epoch = base_epoch
        self._cache: tuple[int, list] | None = None

    def batches(self, epoch: int) -> list[list[ClipRequest]]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, [b for b in self.schedule(epoch) if b])  # DALI can't run empty
        return self._cache[1]

    def __call__(self, info) -> tuple:
        batches = self.batches(self.base_epoch + info.epoch_idx)
        if info.iteration >= len(batches):
            raise StopIteration
        clips: list[tuple[EncodedClip, bool, int]] = []
        for request in batches[info.iteration]:
            try:
                clips.append((self.source.load(request, lambda clip: clip), True, request.view))
            except SampleError:  # evaluation: drop this item (already logged)
                pass
        if not clips:  # every item dropped: run a stand-in the main process throws away
            request = batches[info.iteration][0]
            clips.append((self._stand_in(request), False, request.view))
        return self._outputs(clips)

    def _stand_in(self, request: ClipRequest) -> EncodedClip:
        n = len(self.source.index)
        for k in range(1, n + 1):
            try:
                return self.source.read(request, (request.index + k) % n)
            except SampleError:
                continue
        raise RuntimeError(f"{self.source.index.folder}: no readable sample in the split")

    def _outputs(self, clips: list[tuple[EncodedClip, bool, int]]) -> tuple:
        rgb, flow, boxes, flips, meta = [], [], [], [], []
        two_l = 2 * self.source.flow_length
        for clip, keep, view in clips:
            b = clip.plan.box
            for k in range(len(clip.plan.positions)):
                if self.source.use_rgb:
                    rgb.append(np.frombuffer(clip.rgb[k], np.uint8))
                if self.source.use_flow:
                    stack = clip.flow[k * two_l : (k + 1) * two_l]
                    flow.append([np.frombuffer(x, np.uint8) for x in stack])
                boxes.append(np.array([b.x, b.y, b.w, b.h], np.int32))
                flips.append(np.array(int(clip.plan.flip), np.int32))
                meta.append(
                    np.array([clip.index, clip.skipped, clip.plan.flip, keep, view], np.int64)
                )
        outputs = []
        if self.source.use_rgb:
            outputs.append(rgb)
        if self.source.use_flow:
            outputs += [[fields[c] for fields in flow] for c in range(two_l)]
        return (*outputs, boxes, flips, meta)


def _build_pipeline(callback: _BatchCallback, max_positions: int, size: int, workers: int,
                    device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    source = callback.source
    two_l = 2 * source.flow_length
    num_jpeg_outputs = int(source.use_rgb) + (two_l if source.use_flow else 0)
    gpu = device_id is not None
    parallel = workers > 0
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"  # no fork after CUDA init

    @pipeline_def(
        batch_size=max_positions, num_threads=max(1, workers), device_id=device_id,
        py_num_workers=max(1, workers), py_start_method=start_method,
        prefetch_queue_depth=2,
    )
    def clip_pipeline():
        *jpegs, boxes, flips, meta = fn.external_source(
            callback, num_outputs=num_jpeg_outputs + 3, batch=True, batch_info=True,
            parallel=parallel,
        )
        anchor, shape = boxes[0:2], boxes[2:4]

        def crop(jpeg, color):
            # Absolute pixel boxes; fancy upsampling makes nvJPEG's chroma match libjpeg-turbo's
            # (the CPU decoder and OpenCV), so GPU and CPU loaders give the same pixels.
            image = fn.decoders.image_slice(
                jpeg, anchor, shape, axis_names="WH", normalized_anchor=False,
                normalized_shape=False, output_type=color, jpeg_fancy_upsampling=True,
                device="mixed" if gpu else "cpu",
            )
            image = fn.resize(image, size=[size, size], interp_type=types.INTERP_LINEAR,
                              antialias=False)
            return fn.flip(image, horizontal=flips)

        outputs = []
        if source.use_rgb:
            outputs.append(crop(jpegs.pop(0), types.RGB))
        if source.use_flow:
            outputs.append(fn.cat(*[crop(j, types.GRAY) for j in jpegs], axis=2))
        return (*outputs, meta)

    pipe = clip_pipeline()
    pipe.build()
    return pipe


class DaliClipLoader:
    """Iterable over one epoch's batches of one rank (see ``build_loader``)."""

    def __init__(self, source: ClipSource, schedule, batch_size: int, frames: int, workers: int,
                 size: int, device: torch.device):
        self.source = source
        self.schedule = schedule
        self.batch_size = batch_size
        self.frames = frames
        self.workers = workers
        self.size = size
        self.device = device
        self.epoch = 0
        self.skipped = 0
        self._pipe = None
        self._next_epoch = None  # the epoch the built pipeline produces next, if it is reusable

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.schedule(self.epoch))

    def __iter__(self):
        if self._pipe is None or self._next_epoch != self.epoch:
            # The pipeline's workers count epochs themselves (BatchInfo.epoch_idx) from the
            # epoch they were built for; any other epoch, or an epoch left unfinished (its
            # prefetched batches are still queued), needs a new pipeline.
            self._pipe = None
            device_id = (self.device.index or 0) if self.device.type == "cuda" else None
            callback = _BatchCallback(self.source, self.schedule, self.epoch)
            self._pipe = _build_pipeline(callback, self.batch_size * self.frames_per_clip(),
                                         self.size, self.workers, device_id)
        pipe, batches = self._pipe, self.schedule(self.epoch)
        self._next_epoch = None  # until this epoch is read to the end
        for requests in batches:
            if not requests:
                yield self._empty_batch()
                continue
            yield self._batch(pipe.run(), requests)
        try:
            pipe.run()  # the source raises StopIteration: the epoch is over for DALI too
        except StopIteration:
            pass
        pipe.reset()
        self._next_epoch = self.epoch + 1

    def frames_per_clip(self) -> int:
        if self.source.whole_video:
            return max(r.num_frames for r in self.source.index.samples if r is not None)
        return self.frames

    def _batch(self, outputs, requests: list[ClipRequest]) -> dict:
        *crops, meta = [self._to_torch(o) for o in outputs]
        # Positions of one clip are consecutive; the first position of each clip carries its meta.
        t = self._positions(meta)
        first = meta[::t]
        kept = first[:, 3].bool()
        used = [int(i) for i in first[kept, 0]]
        skipped = int(first[:, 1].sum()) + len(requests) - len(used)
        self.skipped += skipped
        views = None if requests[0].train else [int(v) for v in first[kept, 4]]
        rgb = _clips(crops.pop(0), meta[:, 3].bool(), t) if self.source.use_rgb else None
        flow = _clips(crops.pop(0), meta[:, 3].bool(), t) if self.source.use_flow else None
        return finish_batch(self.source, used, views, rgb, flow, first[kept, 2].bool(), skipped)

    def _positions(self, meta: torch.Tensor) -> int:
        if self.source.whole_video:
            return meta.shape[0]  # whole-video batches hold one clip
        return self.frames

    def _empty_batch(self) -> dict:
        def empty(channels: int) -> torch.Tensor:
            shape = (0, self.frames, self.size, self.size, channels)
            return torch.zeros(shape, dtype=torch.uint8, device=self.device)

        rgb = empty(3) if self.source.use_rgb else None
        flow = empty(2 * self.source.flow_length) if self.source.use_flow else None
        # only evaluation has empty batches (a rank with fewer items than batches)
        return finish_batch(self.source, [], [], rgb, flow, torch.zeros(0, dtype=torch.bool), 0)

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """A DALI output as a torch tensor where it already is (meta stays on the CPU)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        from nvidia.dali.tensors import TensorListGPU

        dense = tensor_list.as_tensor()
        if not isinstance(tensor_list, TensorListGPU):
            return torch.from_numpy(np.array(dense))
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out


def _clips(positions: torch.Tensor, keep: torch.Tensor, t: int) -> torch.Tensor:
    """(B*T, S, S, C) DALI samples -> (B, T, S, S, C) clips, without stand-in positions."""
    if not keep.all():
        positions = positions[keep.to(positions.device)]
    return positions.reshape(-1, t, *positions.shape[1:])
