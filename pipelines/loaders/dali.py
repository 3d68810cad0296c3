"""The DALI loader: Python workers pick and read the JPEGs, DALI decodes them into network input.

Why a parallel external source and not ``fn.readers.webdataset``: the reader needs a fixed list
of member extensions per sample, but a video has a variable number of frames and a clip uses a
different ~20% of them every epoch. So Python workers (``parallel=True``) run the shared clip
plan and read exactly the selected members from the shards; DALI does the heavy part.

**One decoder per modality.** A batch of B clips of T positions is B*T RGB JPEGs and B*T*2L flow
JPEGs, and one DALI pipeline has one batch size, so each modality has its own pipeline: the RGB
pipeline's sample is one RGB frame, the flow pipeline's sample is one flow field (x1, y1, x2, ...
of a position's stack). Each runs one ``fn.decoders.image_slice`` over its whole batch (only the
crop region; ``device="mixed"`` = nvJPEG on a GPU, libjpeg-turbo on the CPU), one ``fn.resize``
and one ``fn.crop_mirror_normalize`` that mirrors, normalises (``stresnet.sampling``: ImageNet
statistics for RGB, ``(byte - 128) / FLOW_SCALE`` for flow, with a flipped x field negated as
``255 - byte``) and writes CHW float (float16 on a GPU under bf16 autocast): the network's input.
``torch.from_dlpack`` hands it over without a copy (on the GPU, ordered on the current stream).

**Batch-level hand-over.** A worker returns a handful of dense arrays per batch: every JPEG of
the batch as one row of a zero-padded ``(N, longest)`` uint8 array plus its length (``fn.slice``
cuts the rows back to the exact bytes inside DALI), and stacked crop boxes, mirror flags,
normalisation and per-sample metadata. The training process's main thread therefore handles a
few arrays per batch instead of one per JPEG. Workers read each shard once per span of
neighbouring members (``os.preadv`` straight into the rows) and check every JPEG's markers and
size with vectorised code; any clip that is not perfectly in order sends the whole batch through
the reference path (``ClipSource.load``: the same checks, warnings and substitutions as the CPU
loader), so both loaders skip the same samples.

**Built once.** The pipelines live as long as the loader. A DALI epoch is one of our epochs; its
number is ``offset + BatchInfo.epoch_idx`` with ``offset`` in a small shared control block, so
any epoch can follow any other without a rebuild. An epoch left early (``steps_per_epoch <
len(loader)``, or a resumed run) is abandoned through the same block (its remaining batches end
with ``StopIteration`` at once) and drained; the evaluation loader's epochs are all the same.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.loaders.clips import ClipSource, EncodedClip, batch_dict
from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shards import SampleError
from stresnet.sampling import FLOW_SCALE, IMAGENET_MEAN, IMAGENET_STD, normalize_clip

log = logging.getLogger(__name__)

# Per-sample metadata columns: sample used, damaged samples skipped, flip, keep (0 = stand-in),
# view. Every sample of a clip carries its clip's row; the loader reads the first of each clip.
META_COLUMNS = 5
# Members of one shard closer than this are read with one preadv (the gap lands in a scratch
# buffer): a tar member is preceded by 1-2 KB of headers, so a clip's frames of one kind are one
# span.
MAX_GAP = 64 * 1024
# Rows of the packed JPEG array are padded to a multiple of this, so that most batches have the
# same array size (DALI's shared-memory slots are then never resized).
ROW_ALIGN = 1024
_SOF = np.zeros(256, dtype=bool)  # JPEG start-of-frame markers (as in shards._START_OF_FRAME)
_SOF[[0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF]] = True


@dataclass
class _Packed:
    """One batch's JPEGs of one modality, a row each, and one metadata row per clip."""

    jpegs: np.ndarray  # (N, longest) uint8, zero-padded
    lengths: np.ndarray  # (N, 1) int32
    clip_rows: np.ndarray  # (N,) int: which clip (row of ``meta``/``boxes``) a JPEG belongs to
    field: np.ndarray  # (N,) int: channel within the position (flow: 0 = x1, 1 = y1, ...)


@dataclass
class _BatchRead:
    rgb: _Packed | None
    flow: _Packed | None
    meta: np.ndarray  # (clips, META_COLUMNS) int64
    boxes: np.ndarray  # (clips, 4) int32: x, y, w, h


class _Control:
    """Two int64 shared by the loader and its pipelines' worker processes (a small file in
    /dev/shm): [0] the DALI epoch index below which every epoch is abandoned, [1] the offset that
    turns ``BatchInfo.epoch_idx`` into our epoch. Workers open it by name, so it survives both
    ``fork`` and ``spawn``."""

    def __init__(self, path: str | None = None):
        self.owner = path is None
        if path is None:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="stresnet-dali-", dir=folder)
            os.write(fd, np.zeros(2, np.int64).tobytes())
            os.close(fd)
            weakref.finalize(self, _unlink, path, os.getpid())
        self.path = path
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 16)
        self.values = np.frombuffer(self._map, dtype=np.int64)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _unlink(path: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked worker exiting: the file is the loader's
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _BatchReader:
    """The external source of one modality's pipeline: batch ``iteration`` of DALI epoch
    ``epoch_idx`` as a few dense arrays. Stateless given ``BatchInfo`` and the control block, as
    DALI's parallel workers require; it is pickled into them."""

    def __init__(self, source: ClipSource, schedule, modality: str, control: _Control,
                 packed: bool = True):
        self.source = source
        self.schedule = schedule  # epoch -> list of batches of ClipRequest
        self.modality = modality  # "rgb" or "flow"
        self.control = control
        self.packed = packed  # False: one array per JPEG (the reference the tests compare with)
        self._cache: tuple[int, list] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def batches(self, epoch: int) -> list[list[ClipRequest]]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, [b for b in self.schedule(epoch) if b])  # DALI can't run empty
        return self._cache[1]

    def __call__(self, info) -> tuple:
        abandoned, offset = (int(v) for v in self.control.values)
        batches = self.batches(offset + info.epoch_idx)
        if info.epoch_idx < abandoned or info.iteration >= len(batches):
            raise StopIteration
        requests = batches[info.iteration]
        read = read_batch(self.source, requests)
        return self._outputs(read)

    def _outputs(self, read: _BatchRead) -> tuple:
        part = read.rgb if self.modality == "rgb" else read.flow
        rows = part.clip_rows
        boxes = read.boxes[rows]
        meta = read.meta[rows]
        mirror = meta[:, 2].astype(np.int32)
        if self.packed:
            jpegs = part.jpegs
        else:
            jpegs = [row[: int(n)].copy() for row, n in zip(part.jpegs, part.lengths[:, 0])]
        outputs = [jpegs, part.lengths, boxes[:, :2].copy(), boxes[:, 2:].copy(), mirror, meta]
        if self.modality == "flow":
            # A mirrored clip moves the other way: its x fields become 255 - byte, so
            # (255 - byte - 128) / s = (byte - 127) / -s. (Median centring happens in torch.)
            negate = (mirror == 1) & (part.field % 2 == 0)
            if self.source.sampling.flow_center == "median":
                negate[:] = False
            mean = np.where(negate, 127.0, 128.0).astype(np.float32)[:, None]
            std = np.where(negate, -FLOW_SCALE, FLOW_SCALE).astype(np.float32)[:, None]
            outputs += [mean, std]
        return tuple(outputs)


def read_batch(source: ClipSource, requests: list[ClipRequest]) -> _BatchRead:
    """The JPEGs of a batch of clips, packed, with their metadata: the fast path when every clip
    reads and checks cleanly, else the reference path (``ClipSource.load``) for the whole batch."""
    fast = _read_fast(source, requests)
    return fast if fast is not None else _read_reference(source, requests)


def _read_fast(source: ClipSource, requests: list[ClipRequest]) -> _BatchRead | None:
    two_l = 2 * source.flow_length
    tables: dict[str, list[np.ndarray]] = {"rgb": [], "flow": []}
    refs, plans = [], []
    for request in requests:
        try:
            ref = source.index.ref(request.index)
            plan = source.plan(request, request.index)
        except SampleError:
            return None
        table = ref.members
        frames = table.shape[1]
        positions = np.asarray(plan.positions, dtype=np.int64)
        fields = np.asarray(plan.flow_indices, dtype=np.int64).reshape(-1)
        if (source.use_rgb and positions.max() >= frames) or (
            source.use_flow and fields.size and fields.max() >= frames
        ):
            return None
        if source.use_rgb:
            tables["rgb"].append(table[0, positions])
        if source.use_flow:  # per position x1, y1, x2, y2, ...
            tables["flow"].append(table[1:3, fields].transpose(1, 0, 2).reshape(-1, 2))
        refs.append(ref)
        plans.append(plan)

    parts: dict[str, _Packed | None] = {"rgb": None, "flow": None}
    for modality, per_clip in tables.items():
        if not per_clip:
            continue
        where = np.concatenate(per_clip)
        if (where[:, 0] < 0).any():
            return None
        rows = np.repeat(np.arange(len(per_clip)), [len(t) for t in per_clip])
        longest = _align(int(where[:, 1].max()))
        jpegs = np.empty((len(where), longest), dtype=np.uint8)
        paths = [refs[r].path for r in rows]
        if not _read_members(paths, where, jpegs):
            return None
        heights = np.array([refs[r].height for r in rows])
        widths = np.array([refs[r].width for r in rows])
        lengths = where[:, 1]
        if not check_packed(jpegs, lengths, heights, widths).all():
            return None
        per_position = 1 if modality == "rgb" else two_l
        field = np.concatenate([np.arange(len(t)) % per_position for t in per_clip])
        parts[modality] = _Packed(jpegs, lengths.astype(np.int32)[:, None], rows, field)
    meta = np.array([[r.index, 0, p.flip, 1, r.view] for r, p in zip(requests, plans)], np.int64)
    boxes = np.array([[p.box.x, p.box.y, p.box.w, p.box.h] for p in plans], np.int32)
    return _BatchRead(parts["rgb"], parts["flow"], meta, boxes)


def _read_reference(source: ClipSource, requests: list[ClipRequest]) -> _BatchRead:
    """Clip by clip through ``ClipSource.load``: substitutes damaged training samples, drops
    damaged evaluation items (a batch with none left gets one stand-in the loader discards)."""
    clips: list[tuple[EncodedClip, int, int]] = []  # clip, keep, view
    for request in requests:
        try:
            clips.append((source.load(request, lambda clip: clip), 1, request.view))
        except SampleError:  # evaluation: drop this item (already logged)
            pass
    if not clips:
        request = requests[0]
        clips.append((_stand_in(source, request), 0, request.view))
    parts = {}
    for modality in ("rgb", "flow"):
        if not (source.use_rgb if modality == "rgb" else source.use_flow):
            parts[modality] = None
            continue
        blobs = [getattr(clip, modality) for clip, _, _ in clips]
        rows = np.repeat(np.arange(len(blobs)), [len(b) for b in blobs])
        flat = [b for per_clip in blobs for b in per_clip]
        lengths = np.array([len(b) for b in flat], dtype=np.int64)
        jpegs = np.zeros((len(flat), _align(int(lengths.max()))), dtype=np.uint8)
        for row, blob in zip(jpegs, flat):
            row[: len(blob)] = np.frombuffer(blob, np.uint8)
        per_position = 1 if modality == "rgb" else 2 * source.flow_length
        field = np.concatenate([np.arange(len(b)) % per_position for b in blobs])
        parts[modality] = _Packed(jpegs, lengths.astype(np.int32)[:, None], rows, field)
    meta = np.array([[c.index, c.skipped, c.plan.flip, keep, view] for c, keep, view in clips],
                    np.int64)
    boxes = np.array([[c.plan.box.x, c.plan.box.y, c.plan.box.w, c.plan.box.h]
                      for c, _, _ in clips], np.int32)
    return _BatchRead(parts["rgb"], parts["flow"], meta, boxes)


def _stand_in(source: ClipSource, request: ClipRequest) -> EncodedClip:
    n = len(source.index)
    for k in range(1, n + 1):
        try:
            return source.read(request, (request.index + k) % n)
        except SampleError:
            continue
    raise RuntimeError(f"{source.index.folder}: no readable sample in the split")


def _align(n: int) -> int:
    return max(ROW_ALIGN, -(-n // ROW_ALIGN) * ROW_ALIGN)


def _read_members(paths: list[str], where: np.ndarray, out: np.ndarray) -> bool:
    """Read member k (``where[k]`` = offset, size in ``paths[k]``) into ``out[k, :size]``: one
    ``os.preadv`` per span of neighbouring members of a file, each member once (a flow field in
    two overlapping stacks is read once and copied). False if a file is shorter than expected."""
    names = {path: i for i, path in enumerate(dict.fromkeys(paths))}
    files = np.array([names[p] for p in paths])
    order = np.lexsort((where[:, 0], files))
    offsets, sizes = where[order, 0], where[order, 1]
    same = np.zeros(len(order), dtype=bool)  # the same member as the previous row in order
    same[1:] = (files[order][1:] == files[order][:-1]) & (offsets[1:] == offsets[:-1])
    width = out.shape[1]
    flat = memoryview(out).cast("B", shape=[out.size])
    scratch = memoryview(bytearray(MAX_GAP))
    by_file = [p for p in names]
    spans: list[tuple[int, int, list]] = []  # (file, start, buffers)
    copies: list[tuple[int, int, int]] = []  # (row, row holding the same member, size)
    end, holder = -1, -1
    for row, file, offset, size, dup in zip(order.tolist(), files[order].tolist(),
                                            offsets.tolist(), sizes.tolist(), same.tolist()):
        if dup:
            copies.append((row, holder, size))
            continue
        holder = row
        if not spans or file != spans[-1][0] or offset - end > MAX_GAP or len(spans[-1][2]) > 900:
            spans.append((file, offset, []))
        elif offset > end:
            spans[-1][2].append(scratch[: offset - end])
        spans[-1][2].append(flat[row * width : row * width + size])
        end = offset + size
    descriptors = {}
    try:
        for file, start, buffers in spans:
            if file not in descriptors:
                descriptors[file] = os.open(by_file[file], os.O_RDONLY)
            if os.preadv(descriptors[file], buffers, start) != sum(len(b) for b in buffers):
                return False
    finally:
        for fd in descriptors.values():
            os.close(fd)
    for row, holder, size in copies:
        out[row, :size] = out[holder, :size]
    return True


def check_packed(jpegs: np.ndarray, lengths: np.ndarray, heights: np.ndarray,
                 widths: np.ndarray, max_segments: int = 32) -> np.ndarray:
    """``shards.check_jpeg`` for a whole packed batch at once: True where row k is a complete JPEG
    (start marker, end marker in its last 16 bytes) whose first start-of-frame segment says
    ``heights[k] x widths[k]``. It walks the marker segments of all rows in lockstep; a row whose
    frame header comes after more than ``max_segments`` segments is reported False (the caller
    then runs the exact scalar check). It never accepts what ``check_jpeg`` rejects."""
    n = len(jpegs)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if n == 0:
        return np.ones(0, dtype=bool)
    rows = np.arange(n)
    last = jpegs.shape[1] - 1
    ok = (lengths >= 4) & (jpegs[:, 0] == 0xFF) & (jpegs[:, 1] == 0xD8)
    start = np.maximum(lengths - 16, 0)
    window = np.arange(16)
    idx = np.minimum(start[:, None] + window, last)
    tail = jpegs[rows[:, None], idx]
    inside = window[None, :] < (lengths - start)[:, None]
    ok &= ((tail[:, :-1] == 0xFF) & (tail[:, 1:] == 0xD9) & inside[:, 1:]).any(axis=1)

    size_ok = np.zeros(n, dtype=bool)
    position = np.full(n, 2, dtype=np.int64)
    active = ok.copy()
    for _ in range(max_segments):
        act = np.flatnonzero(active)
        if act.size == 0:
            break
        p = position[act]
        room = p + 9 < lengths[act]
        q = np.minimum(p, last - 9)
        byte = jpegs[act, q]
        marker = jpegs[act, q + 1]
        stop = ~room | (byte != 0xFF)
        fill = ~stop & (marker == 0xFF)
        frame = ~stop & ~fill & _SOF[marker]
        height = jpegs[act, q + 5].astype(np.int64) * 256 + jpegs[act, q + 6]
        width = jpegs[act, q + 7].astype(np.int64) * 256 + jpegs[act, q + 8]
        size_ok[act[frame]] = (height[frame] == heights[act[frame]]) & (
            width[frame] == widths[act[frame]])
        length = jpegs[act, q + 2].astype(np.int64) * 256 + jpegs[act, q + 3]
        position[act] = np.where(fill, p + 1, p + 2 + length)
        active[act[stop | frame]] = False
    return ok & size_ok


@dataclass(frozen=True)
class DecodeSettings:
    """How the pipelines decode: see ``data.decode_threads`` and ``data.hw_decoder_load``."""

    device_id: int | None  # None: CPU operators only
    threads: int
    hw_decoder_load: float
    dtype: str  # "float16" or "float32"
    max_height: int
    max_width: int


def network_input(jpegs, anchors, shapes, mirror, mean, std, color: bool, size: int,
                  settings: DecodeSettings):
    """Decode the crop of every JPEG, resize it to ``size`` x ``size`` (bilinear, no
    antialiasing: the authors' ``imresize``) and mirror/normalise/transpose it to CHW: the DALI
    graph shared by both modalities (the benchmarks replace it to time everything around it)."""
    from nvidia.dali import fn, types

    hints = {}
    if settings.device_id is not None:
        hints = dict(hw_decoder_load=settings.hw_decoder_load,
                     preallocate_height_hint=settings.max_height,
                     preallocate_width_hint=settings.max_width)
    # Absolute pixel boxes; fancy upsampling makes nvJPEG's chroma match libjpeg-turbo's (the CPU
    # decoder and OpenCV), so GPU and CPU loaders give the same pixels.
    image = fn.decoders.image_slice(
        jpegs, anchors, shapes, axis_names="WH", normalized_anchor=False,
        normalized_shape=False, output_type=types.RGB if color else types.GRAY,
        jpeg_fancy_upsampling=True, device="mixed" if settings.device_id is not None else "cpu",
        **hints,
    )
    image = fn.resize(image, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=False)
    dtype = types.FLOAT16 if settings.dtype == "float16" else types.FLOAT
    return fn.crop_mirror_normalize(image, mirror=mirror, mean=mean, std=std, dtype=dtype,
                                    output_layout="CHW")


def _build_pipeline(reader: _BatchReader, batch_size: int, size: int, workers: int,
                    settings: DecodeSettings, hint: int):
    from nvidia.dali import fn, pipeline_def

    color = reader.modality == "rgb"
    parallel = workers > 0
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"  # no fork after CUDA init

    @pipeline_def(
        batch_size=batch_size, num_threads=settings.threads, device_id=settings.device_id,
        py_num_workers=max(1, workers), py_start_method=start_method, prefetch_queue_depth=2,
    )
    def clip_pipeline():
        # depth >= workers keeps every worker busy; the hint sizes the shared memory once
        extra = {}
        if parallel:
            extra = {"prefetch_queue_depth": 2 * workers, "bytes_per_sample_hint": hint}
        outputs = fn.external_source(
            reader, num_outputs=6 if color else 8, batch=True, batch_info=True,
            parallel=parallel, **extra,
        )
        jpegs, lengths, anchors, shapes, mirror, meta = outputs[:6]
        if reader.packed:
            jpegs = fn.slice(jpegs, start=[0], shape=lengths, axes=[0])
        if color:
            mean = [m * 255 for m in IMAGENET_MEAN]
            std = [s * 255 for s in IMAGENET_STD]
        elif reader.source.sampling.flow_center == "median":
            mean, std = [0.0], [1.0]  # bytes as float: centred and negated in torch
        else:
            mean, std = outputs[6], outputs[7]
        # network_input is looked up when the pipeline is built: the benchmarks stub it
        image = network_input(jpegs, anchors, shapes, mirror, mean, std, color, size, settings)
        return image, meta

    pipe = clip_pipeline()
    pipe.build()
    return pipe


class DaliClipLoader:
    """Iterable over one epoch's batches of one rank (see ``build_loader``)."""

    def __init__(self, source: ClipSource, schedule, batch_size: int, frames: int, workers: int,
                 size: int, device: torch.device, decode_threads: int = 0,
                 hw_decoder_load: float = 0.65, half: bool = False):
        self.source = source
        self.schedule = schedule
        self.batch_size = batch_size
        self.frames = frames
        self.workers = workers
        self.size = size
        self.device = device
        self.decode_threads = decode_threads
        self.hw_decoder_load = hw_decoder_load
        self.dtype = torch.float16 if half and device.type == "cuda" else torch.float32
        self.packed = True  # False: hand JPEGs over one array each (the tests' reference)
        self.epoch = 0
        self.skipped = 0
        self.builds = 0  # pipelines built (one per modality, once per loader)
        self._pipes: dict[str, object] = {}
        self._control: _Control | None = None
        self._dali_epoch = 0  # BatchInfo.epoch_idx of the pipelines' current epoch
        self._consumed = 0  # batches of it handed out so far

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.schedule(self.epoch))

    def modalities(self) -> list[str]:
        return [m for m, used in (("rgb", self.source.use_rgb), ("flow", self.source.use_flow))
                if used]

    def __iter__(self):
        self._start_epoch(self.epoch)
        batches = self.schedule(self.epoch)
        for requests in batches:
            if not requests:
                yield self._empty_batch()
                continue
            outputs = {m: self._pipes[m].run() for m in self._pipes}
            self._consumed += 1
            yield self._batch(outputs, requests)
        self._finish_epoch(abandon=False)

    # -- the pipelines' epochs -------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        """Make the pipelines' current DALI epoch produce ``epoch`` from its first batch."""
        if not self._pipes:
            self._control = _Control()
            self._control.values[:] = (0, epoch)
            self._build()
            self._dali_epoch, self._consumed = 0, 0
            return
        current = int(self._control.values[1]) + self._dali_epoch
        if self._consumed == 0 and (current == epoch or self.schedule.num_views):
            return  # already prefetching exactly this epoch (evaluation: every epoch is)
        self._finish_epoch(abandon=True, next_epoch=epoch)

    def _finish_epoch(self, abandon: bool, next_epoch: int | None = None) -> None:
        """End the current DALI epoch (abandoning what is left of it) and start the next one,
        which produces ``next_epoch`` (default: the epoch after the current one)."""
        values = self._control.values
        if abandon:
            values[0] = self._dali_epoch + 1  # workers answer StopIteration from now on
        for pipe in self._pipes.values():
            try:
                while True:  # at most the batches already prefetched
                    pipe.run()
            except StopIteration:
                pass
        if next_epoch is not None:
            values[1] = next_epoch - (self._dali_epoch + 1)
        for pipe in self._pipes.values():
            pipe.reset()  # workers start prefetching the next epoch now
        self._dali_epoch += 1
        self._consumed = 0

    def _build(self) -> None:
        index = self.source.index
        refs = [r for r in index.samples if r is not None]
        settings = DecodeSettings(
            device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
            threads=self.decode_threads or max(1, min(8, len(os.sched_getaffinity(0)))),
            hw_decoder_load=self.hw_decoder_load,
            dtype="float16" if self.dtype == torch.float16 else "float32",
            max_height=max((r.height for r in refs), default=0),
            max_width=max((r.width for r in refs), default=0),
        )
        longest = max((int(r.members[:, :, 1].max()) for r in refs if r.members.size), default=1)
        clips = self.batch_size
        positions = self._frames_per_clip()
        for modality in self.modalities():
            per_clip = positions * (1 if modality == "rgb" else 2 * self.source.flow_length)
            reader = _BatchReader(self.source, self.schedule, modality, self._control,
                                  self.packed)
            hint = _align(longest) + 64 + 8 * META_COLUMNS  # one row + its arguments
            self._pipes[modality] = _build_pipeline(
                reader, clips * per_clip, self.size, self.workers, settings, hint
            )
            self.builds += 1

    def _frames_per_clip(self) -> int:
        if self.source.whole_video:
            return max(r.num_frames for r in self.source.index.samples if r is not None)
        return self.frames

    # -- outputs -> batch dict -------------------------------------------------------------

    def _batch(self, outputs: dict, requests: list[ClipRequest]) -> dict:
        images, metas = {}, {}
        for modality, (image, meta) in outputs.items():
            images[modality] = torch.from_dlpack(image.as_tensor())  # no copy; stream-ordered
            metas[modality] = torch.from_dlpack(meta.as_tensor())
        two_l = 2 * self.source.flow_length
        per_sample = {"rgb": 1, "flow": two_l}
        # the metadata of each clip, from the first sample of each clip
        clips = {m: self._clip_rows(metas[m], per_sample[m]) for m in metas}
        first = next(iter(clips.values()))
        if len(clips) == 2 and not torch.equal(clips["rgb"], clips["flow"]):
            raise RuntimeError("DALI loader: the RGB and flow pipelines went out of step")
        kept = first[:, 3].bool()
        used = [int(i) for i in first[kept, 0]]
        skipped = int(first[:, 1].sum()) + len(requests) - len(used)
        self.skipped += skipped
        views = None if requests[0].train else [int(v) for v in first[kept, 4]]
        clip_count = len(first)
        rgb = flow = None
        if "rgb" in images:
            rgb = self._clips(images["rgb"], kept, clip_count, 3)
        if "flow" in images:
            flow = self._clips(images["flow"], kept, clip_count, two_l)
            if self.source.sampling.flow_center == "median":  # bytes: centre in torch
                _, flow = normalize_clip(None, flow.permute(0, 1, 3, 4, 2),
                                         first[kept, 2].bool(), "median")
        return batch_dict(self.source, used, views, rgb, flow, skipped)

    def _clip_rows(self, meta: torch.Tensor, per_position: int) -> torch.Tensor:
        if self.source.whole_video:  # one clip per batch
            return meta[:1]
        return meta[:: self.frames * per_position]

    @staticmethod
    def _clips(images: torch.Tensor, kept: torch.Tensor, clips: int, channels: int):
        """(clips*T*channels/C, C, S, S) DALI samples -> (B, T, channels, S, S) kept clips."""
        out = images.reshape(clips, -1, channels, *images.shape[-2:])
        if not kept.all():
            out = out[kept.to(out.device)]
        return out

    def _empty_batch(self) -> dict:
        def empty(channels: int) -> torch.Tensor:
            shape = (0, self.frames, channels, self.size, self.size)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

        rgb = empty(3) if self.source.use_rgb else None
        flow = empty(2 * self.source.flow_length) if self.source.use_flow else None
        # only evaluation has empty batches (a rank with fewer items than batches)
        return batch_dict(self.source, [], [], rgb, flow, 0)
