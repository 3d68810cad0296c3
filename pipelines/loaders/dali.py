"""The DALI loader: Python workers pick and read the JPEGs, DALI decodes them into network input.

Why a parallel external source and not ``fn.readers.webdataset``: the reader needs a fixed list
of member extensions per sample, but a video has a variable number of frames and a clip uses a
different ~20% of them every epoch. So Python workers (``parallel=True``) run the shared clip
plan and read exactly the selected members from the shards; DALI does the heavy part.

**One decoder per modality.** A batch of B clips of T positions is B*T RGB JPEGs and B*T*2L flow
JPEGs, each one DALI sample of one pipeline. DALI's conditional split divides the batch into an
RGB and a flow sub-batch, and each runs one ``fn.decoders.image_slice`` over all of its JPEGs
(only the crop region; ``device="mixed"`` = nvJPEG on a GPU, libjpeg-turbo on the CPU), one
``fn.resize`` and one ``fn.crop_mirror_normalize`` that mirrors, normalises (ImageNet statistics
for RGB, ``(byte - 128) / FLOW_SCALE`` for flow, a flipped x field negated as ``255 - byte``, as
``stresnet.sampling.normalize_clip`` does for the CPU loader) and writes CHW float (float16 on a
GPU under bf16 autocast): the network's input. ``torch.from_dlpack`` hands it over without a copy
(on the GPU, ordered on the current stream).

**Batch-level hand-over.** A worker returns a few dense arrays per batch (``output_names``):
every JPEG of the batch as one row of a zero-padded ``(N, longest)`` uint8 array, and one array
per argument that a DALI operator takes per JPEG (crop anchor and shape, mirror flag, output
size, flow normalisation, modality), already in the type the operator wants, plus the clips'
metadata. So the training process's main thread feeds a fixed number of arrays per batch, not one
per JPEG, and nothing is sliced or cast per JPEG inside DALI: there every per-JPEG operator costs
~1-2 us of CPU per JPEG (``fn.slice`` back to the exact bytes ~6 us), which measured as more than
all the rest of the hand-over. The decoder gets each row whole: it stops at the JPEG's end
marker, so the zero padding after it is never read (libjpeg-turbo: the packed vs per-sample test;
nvJPEG: ``benchmarks/gpu.py``'s parity section). Workers read each shard once per span of
neighbouring members (``os.preadv`` straight into the rows; a flow field shared by overlapping
stacks is read and checksummed once and copied) and check every JPEG's markers and size with
vectorised code; any clip that is not perfectly in order sends the whole batch through the
reference path (``ClipSource.load``: the same checks, warnings and substitutions as the CPU
loader), so both loaders skip the same samples.

**Built once.** The pipeline lives as long as the loader. A small control block shared with the
workers says which DALI epoch (``BatchInfo.epoch_idx``) produces which of our epochs, so any
epoch can follow any other without a rebuild. An epoch left early (``steps_per_epoch <
len(loader)``, or a resumed run) is abandoned through the same block (its remaining batches end
with ``StopIteration`` at once) and drained; the evaluation loader's epochs are all the same.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.loaders.clips import ClipSource, EncodedClip, batch_dict
from pipelines.loaders.schedule import ClipRequest
from pipelines.loaders.shard_reader import SampleError
from stresnet.sampling import FLOW_SCALE, IMAGENET_MEAN, IMAGENET_STD

# The clip metadata output (``_BatchReader.outputs``, int32, one row per JPEG so that it has the
# batch's size; only the first rows, one per clip, are filled): sample used, damaged samples
# skipped, flip, keep (0 = stand-in), view, and 1 marking the row as a clip row.
META_COLUMNS = 5
# Members of one shard closer than this are read with one preadv (the gap lands in a scratch
# buffer): a tar member is preceded by 1-2 KB of headers, so a clip's frames of one kind are one
# span.
MAX_GAP = 64 * 1024
# Members per preadv call (each takes two buffers: its row and the gap before it; IOV_MAX is 1024).
MAX_SPAN = 500
# Rows of the packed JPEG array are padded to a multiple of this, so that most batches have the
# same array size (DALI's shared-memory slots are then never resized).
ROW_ALIGN = 1024
_SOF = np.zeros(256, dtype=bool)  # JPEG start-of-frame markers (as in shard_reader._START_OF_FRAME)
_SOF[[0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF]] = True


@dataclass
class _BatchRead:
    """One batch's JPEGs, a row each: every RGB frame (clip by clip, position by position), then
    every flow field (clip, position, x1, y1, x2, ...); and one metadata row per clip."""

    jpegs: np.ndarray  # (N, longest) uint8, zero-padded
    lengths: np.ndarray  # (N,) int
    clip: np.ndarray  # (N,) int: the clip (row of ``meta``/``boxes``) each JPEG belongs to
    field: np.ndarray  # (N,) int: channel within its position (flow: 0 = x1, 1 = y1, ...)
    is_rgb: np.ndarray  # (N,) bool
    meta: np.ndarray  # (clips, META_COLUMNS) int64
    boxes: np.ndarray  # (clips, 4) int32: x, y, w, h
    sizes: np.ndarray  # (clips, 2) int32: height, width after resize (full_frame: not square)


class _Control:
    """Two int64 shared by the loader and its pipeline's worker processes (a small file in
    /dev/shm): DALI epochs from ``values[0]`` on produce our epochs ``values[1]``, ``values[1] +
    1``, ...; DALI epochs before ``values[0]`` are abandoned (their batches end at once). Workers
    open it by name, so it survives both ``fork`` and ``spawn``. The loader writes it only before
    draining and resetting the pipeline, so a task of the old epoch that reads a half-written
    pair either stops or builds a valid batch that is drained and dropped."""

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
    """The external source: batch ``iteration`` of DALI epoch ``epoch_idx`` as a few dense
    arrays. Stateless given ``BatchInfo`` and the control block, as DALI's parallel workers
    require; it is pickled into them."""

    def __init__(self, source: ClipSource, schedule, control: _Control, packed: bool = True):
        self.source = source
        self.schedule = schedule  # epoch -> list of batches of ClipRequest
        self.control = control
        self.packed = packed  # False: one array per JPEG (the reference the tests compare with)
        # Output sizes differ between JPEGs only for full_frame test views (input_size otherwise;
        # no schedule: training clips)
        self.sizes_vary = schedule is not None and bool(schedule.num_views) and (
            source.sampling.test_crops == "full_frame")
        self._cache: tuple[int, list] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def batches(self, epoch: int) -> list[list[ClipRequest]]:
        if self._cache is None or self._cache[0] != epoch:
            # DALI can't run empty batches
            batches = [self.source.with_frame_limits(b) for b in self.schedule(epoch) if b]
            self._cache = (epoch, batches)
        return self._cache[1]

    def __call__(self, info) -> tuple:
        start, epoch = (int(v) for v in self.control.values)
        if info.epoch_idx < start:  # abandoned
            raise StopIteration
        batches = self.batches(epoch + info.epoch_idx - start)
        if info.iteration >= len(batches):
            raise StopIteration
        return self.outputs(read_batch(self.source, batches[info.iteration]))

    def outputs(self, read: _BatchRead) -> tuple:
        """The external source's outputs (``output_names``), one row per JPEG each: every
        argument a DALI operator takes per JPEG as its own dense array of the type the operator
        wants, so that nothing is sliced or cast per JPEG inside DALI (each such operator costs
        ~1-2 us of CPU per JPEG there: more than the rest of the hand-over)."""
        clip = read.clip
        out = {
            "jpegs": read.jpegs if self.packed else
            [row[:k].copy() for row, k in zip(read.jpegs, read.lengths.tolist())],
            "anchor": read.boxes[clip, :2].astype(np.float32),
            "shape": read.boxes[clip, 2:].astype(np.float32),
            "mirror": read.meta[clip, 2].astype(np.int32),
            "size": read.sizes[clip].astype(np.float32),
            "is_rgb": read.is_rgb,
        }
        # A mirrored clip moves the other way: its x fields become 255 - byte, so
        # (255 - byte - 128) / s = (byte - 127) / -s.
        negate = (out["mirror"] == 1) & ~read.is_rgb & (read.field % 2 == 0)
        out["mean"] = np.where(negate, 127.0, 128.0).astype(np.float32)[:, None]
        out["std"] = np.where(negate, -FLOW_SCALE, FLOW_SCALE).astype(np.float32)[:, None]
        meta = np.zeros((len(clip), META_COLUMNS + 1), np.int32)
        meta[: len(read.meta), :META_COLUMNS] = read.meta
        meta[: len(read.meta), META_COLUMNS] = 1
        out["meta"] = meta
        return tuple(out[name] for name in output_names(self.source, self.sizes_vary))


def output_names(source: ClipSource, sizes_vary: bool) -> tuple[str, ...]:
    """What the external source hands over per batch, in order: the packed JPEGs, the crop
    (anchor x, y and shape w, h in pixels), mirror flag and output size (height, width) of each,
    the flow normalisation (mean, std; RGB uses constants), the modality that splits a
    two-stream batch, and the clip metadata (``META_COLUMNS``). Only what the graph uses: DALI
    warns about outputs that go nowhere; without ``sizes_vary`` every JPEG is resized to
    ``input_size`` square, a constant of the graph."""
    names = ["jpegs", "anchor", "shape", "mirror"] + (["size"] if sizes_vary else [])
    if source.use_flow:
        names += ["mean", "std"]
    if source.use_rgb and source.use_flow:
        names.append("is_rgb")
    return (*names, "meta")


def read_batch(source: ClipSource, requests: list[ClipRequest]) -> _BatchRead:
    """The JPEGs of a batch of clips, packed, with their metadata: the fast path when every clip
    reads and checks cleanly, else the reference path (``ClipSource.load``) for the whole batch."""
    fast = _read_fast(source, requests)
    return fast if fast is not None else _read_reference(source, requests)


def _layout(per_clip: dict[str, list[int]], two_l: int) -> tuple[np.ndarray, ...]:
    """clip, field and is_rgb of every row, for ``per_clip[modality]`` = JPEGs of each clip."""
    clip, field, is_rgb = [], [], []
    for modality, counts in per_clip.items():
        counts = np.asarray(counts, dtype=np.int64)
        per_position = 1 if modality == "rgb" else two_l
        first = np.repeat(np.cumsum(counts) - counts, counts)  # each row's clip's first row
        clip.append(np.repeat(np.arange(len(counts)), counts))
        field.append((np.arange(counts.sum()) - first) % per_position)
        is_rgb.append(np.full(counts.sum(), modality == "rgb"))
    return np.concatenate(clip), np.concatenate(field), np.concatenate(is_rgb)


def _read_fast(source: ClipSource, requests: list[ClipRequest]) -> _BatchRead | None:
    rgb_tables, flow_tables, refs, plans = [], [], [], []
    for request in requests:
        try:
            ref = source.index.ref(request.index)
            plan = source.plan(request, request.index)
        except SampleError:
            return None
        table = ref.members
        frames = table.shape[1]
        if source.use_rgb:
            positions = np.array(plan.positions)
            if positions.max() >= frames:
                return None
            rgb_tables.append(table[0, positions])
        if source.use_flow:  # per position x1, y1, x2, y2, ...
            fields = np.array(plan.flow_indices).reshape(-1)
            if fields.size and fields.max() >= frames:
                return None
            flow_tables.append(table[1:3, fields].transpose(1, 0, 2).reshape(-1, table.shape[2]))
        refs.append(ref)
        plans.append(plan)
    per_clip = {}
    if source.use_rgb:
        per_clip["rgb"] = [len(t) for t in rgb_tables]
    if source.use_flow:
        per_clip["flow"] = [len(t) for t in flow_tables]
    where = np.concatenate(rgb_tables + flow_tables)
    if (where[:, 0] < 0).any():
        return None
    clip, field, is_rgb = _layout(per_clip, 2 * source.flow_length)
    # Zero padding: the decoder gets each whole row and stops at the JPEG's end marker.
    jpegs = np.zeros((len(where), _align(int(where[:, 1].max()))), dtype=np.uint8)
    paths = {}
    file_of_clip = np.array([paths.setdefault(r.path, len(paths)) for r in refs])
    read = _read_members(list(paths), file_of_clip[clip], where, jpegs)
    if read is None:
        return None
    # the rows read (the others are copies of them)
    heights = np.array([r.height for r in refs])[clip[read]]
    widths = np.array([r.width for r in refs])[clip[read]]
    if not check_packed(jpegs, where[read, 1], heights, widths, rows=read).all():
        return None
    meta = np.array([[r.index, 0, p.flip, 1, r.view] for r, p in zip(requests, plans)], np.int64)
    boxes = np.array([[p.box.x, p.box.y, p.box.w, p.box.h] for p in plans], np.int32)
    sizes = np.array([p.size for p in plans], np.int32)
    return _BatchRead(jpegs, where[:, 1], clip, field, is_rgb, meta, boxes, sizes)


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
    return pack_clips(clips, source.use_rgb, source.use_flow, source.flow_length)


def pack_clips(clips: list[tuple[EncodedClip, int, int]], use_rgb: bool, use_flow: bool,
               flow_length: int) -> _BatchRead:
    """Clips already read, as (clip, keep, view), in the packed layout: the external source's
    hand-over for the reference path and for streamed clips (``pipelines/loaders/stream.py``)."""
    blobs: dict[str, list[list[bytes]]] = {}
    if use_rgb:
        blobs["rgb"] = [clip.rgb for clip, _, _ in clips]
    if use_flow:
        blobs["flow"] = [clip.flow for clip, _, _ in clips]
    flat = [b for per_clip in blobs.values() for blob in per_clip for b in blob]
    lengths = np.array([len(b) for b in flat], dtype=np.int64)
    jpegs = np.zeros((len(flat), _align(int(lengths.max()))), dtype=np.uint8)
    for row, blob in zip(jpegs, flat):
        row[: len(blob)] = np.frombuffer(blob, np.uint8)
    clip, field, is_rgb = _layout(
        {m: [len(b) for b in per_clip] for m, per_clip in blobs.items()}, 2 * flow_length
    )
    meta = np.array([[c.index, c.skipped, c.plan.flip, keep, view] for c, keep, view in clips],
                    np.int64)
    boxes = np.array([[c.plan.box.x, c.plan.box.y, c.plan.box.w, c.plan.box.h]
                      for c, _, _ in clips], np.int32)
    sizes = np.array([c.plan.size for c, _, _ in clips], np.int32)
    return _BatchRead(jpegs, lengths, clip, field, is_rgb, meta, boxes, sizes)


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


def _read_members(paths: list[str], files: np.ndarray, where: np.ndarray,
                  out: np.ndarray) -> np.ndarray | None:
    """Read member k (``where[k]`` = offset, size, CRC-32 or -1, in ``paths[files[k]]``) into
    ``out[k, :size]``: one ``os.preadv`` per span of neighbouring members of a file, each member
    once (a flow field in two overlapping stacks is read and checksummed once, then copied).
    Returns the rows read (the others are copies), or None if a file is shorter than expected or
    a member's bytes do not match its CRC-32 (the index files' checksums: the reference path then
    skips and counts the damaged sample)."""
    n = len(where)
    order = np.lexsort((where[:, 0], files))
    file, offset, size, crc = files[order], where[order, 0], where[order, 1], where[order, 2]
    dup = np.zeros(n, dtype=bool)  # the same member as the previous row in order
    dup[1:] = (file[1:] == file[:-1]) & (offset[1:] == offset[:-1])
    holder = order[np.maximum.accumulate(np.where(dup, 0, np.arange(n)))]
    unique = ~dup
    rows = order[unique]
    file, offset, size, crc = file[unique], offset[unique], size[unique], crc[unique]
    end = offset + size
    gap = np.zeros_like(offset)
    gap[1:] = offset[1:] - end[:-1]
    start = np.ones(len(rows), dtype=bool)  # a member that begins a new span
    start[1:] = (file[1:] != file[:-1]) | (gap[1:] > MAX_GAP) | (gap[1:] < 0)
    width = out.shape[1]
    flat = memoryview(out).cast("B", shape=[out.size])
    scratch = memoryview(bytearray(MAX_GAP))
    views = [flat[a : a + k] for a, k in zip((rows * width).tolist(), size.tolist())]
    gaps = [scratch[:g] for g in gap.tolist()]
    bounds = np.flatnonzero(start).tolist() + [len(rows)]
    with contextlib.ExitStack() as stack:
        fds = [stack.enter_context(_opened(p)) for p in paths]
        for first, stop in zip(bounds[:-1], bounds[1:]):
            for lo in range(first, stop, MAX_SPAN):  # preadv takes at most IOV_MAX buffers
                hi = min(lo + MAX_SPAN, stop)
                buffers = [None] * (2 * (hi - lo) - 1)
                buffers[0::2] = views[lo:hi]
                buffers[1::2] = gaps[lo + 1 : hi]
                want = int(end[hi - 1] - offset[lo])
                if os.preadv(fds[int(file[lo])], buffers, int(offset[lo])) != want:
                    return None
    checked = np.flatnonzero(crc >= 0).tolist()
    if checked:
        found = np.array([zlib.crc32(views[k]) for k in checked], dtype=np.int64)
        if (found != crc[checked]).any():
            return None
    copies = order[dup]
    if copies.size:
        out[copies] = out[holder[dup]]
    return rows


@contextlib.contextmanager
def _opened(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def check_packed(jpegs: np.ndarray, lengths: np.ndarray, heights: np.ndarray,
                 widths: np.ndarray, max_segments: int = 32,
                 rows: np.ndarray | None = None) -> np.ndarray:
    """``shards.check_jpeg`` for a whole packed batch at once: True where row k is a complete JPEG
    (start marker, end marker in its last 16 bytes) whose first start-of-frame segment says
    ``heights[k] x widths[k]``. It walks the marker segments of all rows in lockstep; a row whose
    frame header comes after more than ``max_segments`` segments is reported False (the caller
    then runs the exact scalar check). It never accepts what ``check_jpeg`` rejects. ``rows``:
    check only these rows of ``jpegs`` (``lengths``, ``heights``, ``widths`` are theirs)."""
    stride = jpegs.shape[1]
    flat = jpegs.reshape(-1)
    rows = np.arange(len(jpegs)) if rows is None else np.asarray(rows, dtype=np.int64)
    n = len(rows)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if n == 0:
        return np.ones(0, dtype=bool)
    base = rows * stride  # where each row starts in ``flat``
    last = stride - 1
    head = flat[base[:, None] + np.arange(2)]
    ok = (lengths >= 4) & (head[:, 0] == 0xFF) & (head[:, 1] == 0xD8)
    start = np.maximum(lengths - 16, 0)
    window = np.arange(16)
    tail = flat[base[:, None] + np.minimum(start[:, None] + window, last)]
    inside = window[None, :] < (lengths - start)[:, None]
    ok &= ((tail[:, :-1] == 0xFF) & (tail[:, 1:] == 0xD9) & inside[:, 1:]).any(axis=1)

    size_ok = np.zeros(n, dtype=bool)
    position = np.full(n, 2, dtype=np.int64)
    active = ok.copy()
    segment = np.arange(9)
    for _ in range(max_segments):
        act = np.flatnonzero(active)
        if act.size == 0:
            break
        p = position[act]
        room = p + 9 < lengths[act]
        q = np.minimum(p, last - 9)
        # marker byte, marker, segment length (2), precision, height (2), width (2)
        head = flat[(base[act] + q)[:, None] + segment].astype(np.int64)
        byte, marker = head[:, 0], head[:, 1]
        stop = ~room | (byte != 0xFF)
        fill = ~stop & (marker == 0xFF)
        frame = ~stop & ~fill & _SOF[marker]
        height = head[:, 5] * 256 + head[:, 6]
        width = head[:, 7] * 256 + head[:, 8]
        size_ok[act[frame]] = (height[frame] == heights[act[frame]]) & (
            width[frame] == widths[act[frame]])
        position[act] = np.where(fill, p + 1, p + 2 + head[:, 2] * 256 + head[:, 3])
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
    """Decode the crop of every JPEG, resize it to ``size`` (per JPEG: height, width; bilinear, no
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
    image = fn.resize(image, size=size, interp_type=types.INTERP_LINEAR,
                      antialias=False)
    dtype = types.FLOAT16 if settings.dtype == "float16" else types.FLOAT
    return fn.crop_mirror_normalize(image, mirror=mirror, mean=mean, std=std, dtype=dtype,
                                    output_layout="CHW")


def _build_pipeline(reader: _BatchReader, batch_size: int, size: int, workers: int,
                    settings: DecodeSettings, hint: int):
    from nvidia.dali import fn, pipeline_def

    source = reader.source
    parallel = workers > 0
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"  # no fork after CUDA init

    @pipeline_def(
        batch_size=batch_size, num_threads=settings.threads, device_id=settings.device_id,
        py_num_workers=max(1, workers), py_start_method=start_method, prefetch_queue_depth=2,
    )
    def clip_pipeline():
        extra = {}
        if parallel:  # depth >= workers keeps every worker busy; the hint sizes shared memory once
            extra = {"prefetch_queue_depth": 2 * workers, "bytes_per_sample_hint": hint}
        names = output_names(source, reader.sizes_vary)
        inputs = dict(zip(names, fn.external_source(
            reader, num_outputs=len(names), batch=True, batch_info=True, parallel=parallel,
            **extra,
        )))
        meta = inputs.pop("meta")
        is_rgb = inputs.pop("is_rgb", None)
        # Packed rows go to the decoder whole: it stops at the JPEG's end marker, so the zero
        # padding after it is never read (a per-JPEG fn.slice back to the exact bytes cost more
        # CPU than everything else in the graph together).
        parts = {"rgb": inputs, "flow": inputs}
        if is_rgb is not None:
            # One batch, two sub-batches: every RGB frame, every flow field. (DALI's conditional
            # split: what `if` compiles to with enable_conditionals, without merging back.)
            halves = {k: fn._conditional.split(v, predicate=is_rgb) for k, v in inputs.items()}
            parts = {m: {k: h[i] for k, h in halves.items()} for i, m in enumerate(("rgb", "flow"))}
        outputs = []
        for modality, used in (("rgb", source.use_rgb), ("flow", source.use_flow)):
            if not used:
                continue
            part = parts[modality]
            if modality == "rgb":
                mean = [m * 255 for m in IMAGENET_MEAN]
                std = [s * 255 for s in IMAGENET_STD]
            else:
                mean, std = part["mean"], part["std"]
            # network_input is looked up when the pipeline is built: the benchmarks stub it
            outputs.append(network_input(
                part["jpegs"], part["anchor"], part["shape"], part["mirror"], mean, std,
                modality == "rgb", part.get("size", [float(size)] * 2), settings,
            ))
        return (*outputs, meta)

    pipe = clip_pipeline()
    pipe.build()
    return pipe


def run_out(pipe) -> None:
    """Run ``pipe`` to the end of its current epoch (its feed raises StopIteration there) and
    reset it for the next one."""
    try:
        while True:
            pipe.run()
    except StopIteration:
        pass
    pipe.reset()


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
        self.builds = 0  # pipelines built: one per loader
        self._pipe = None
        self._control: _Control | None = None
        self._dali_epoch = 0  # BatchInfo.epoch_idx of the pipeline's current epoch
        self._consumed = 0  # batches of it handed out so far

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.schedule(self.epoch))

    def __iter__(self):
        self._start_epoch(self.epoch)
        for requests in self.schedule(self.epoch):
            if not requests:
                yield self._empty_batch()
                continue
            outputs = self._pipe.run()
            self._consumed += 1
            yield self._batch(outputs, requests)
        self._finish_epoch()

    # -- the pipeline's epochs -------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        """Make the pipeline's current DALI epoch produce ``epoch`` from its first batch."""
        if self._pipe is None:
            self._control = _Control()
            self._control.values[:] = (0, epoch)
            self._build()
            self._dali_epoch, self._consumed = 0, 0
            return
        start, first = (int(v) for v in self._control.values)
        current = first + self._dali_epoch - start
        if self._consumed == 0 and (current == epoch or self.schedule.num_views):
            return  # already prefetching exactly this epoch (evaluation: every epoch is)
        # the rest of the current DALI epoch is abandoned; the next one produces ``epoch``
        self._control.values[:] = (self._dali_epoch + 1, epoch)
        self._finish_epoch()

    def _finish_epoch(self) -> None:
        """Drain the current DALI epoch (at most the batches already prefetched) and start the
        next one: the workers begin prefetching it at once."""
        run_out(self._pipe)
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
        longest = max(index.longest_member, 1)  # members are not all in memory (shard_reader)
        per_position = int(self.source.use_rgb) + 2 * self.source.flow_length * int(
            self.source.use_flow)
        jpegs = self.batch_size * self._frames_per_clip() * per_position
        reader = _BatchReader(self.source, self.schedule, self._control, self.packed)
        hint = _align(longest) + 4 * (14 + META_COLUMNS) + 64  # one row and its arguments
        self._pipe = _build_pipeline(reader, jpegs, self.size, self.workers, settings, hint)
        self.builds += 1

    def _frames_per_clip(self) -> int:
        if self.source.whole_video:
            return max(r.num_frames for r in self.source.index.samples if r is not None)
        return self.frames

    # -- outputs -> batch dict -------------------------------------------------------------

    def _batch(self, outputs, requests: list[ClipRequest]) -> dict:
        *images, meta = outputs
        # no copy: the tensors keep DALI's buffers alive; on a GPU the consumer's current
        # stream waits for DALI's (no host synchronisation)
        images = [torch.from_dlpack(image.as_tensor()) for image in images]
        meta = np.asarray(meta.as_tensor())  # always on the CPU
        first = meta[meta[:, META_COLUMNS] == 1, :META_COLUMNS]  # per clip
        kept = first[:, 3] == 1
        used = first[kept, 0].tolist()
        skipped = int(first[:, 1].sum()) + len(requests) - len(used)
        self.skipped += skipped
        views = None if requests[0].train else first[kept, 4].tolist()
        keep = None if kept.all() else torch.from_numpy(kept)
        rgb = flow = None
        if self.source.use_rgb:
            rgb = self._clips(images.pop(0), keep, len(first), 3)
        if self.source.use_flow:
            flow = self._clips(images.pop(0), keep, len(first), 2 * self.source.flow_length)
        return batch_dict(self.source, used, views, rgb, flow, skipped)

    @staticmethod
    def _clips(images: torch.Tensor, keep: torch.Tensor | None, clips: int, channels: int):
        """(clips*T*channels/C, C, S, S) DALI samples -> (B, T, channels, S, S) kept clips."""
        out = images.reshape(clips, -1, channels, *images.shape[-2:])
        return out if keep is None else out[keep.to(out.device)]

    def _empty_batch(self) -> dict:
        def empty(channels: int) -> torch.Tensor:
            shape = (0, self.frames, channels, self.size, self.size)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

        rgb = empty(3) if self.source.use_rgb else None
        flow = empty(2 * self.source.flow_length) if self.source.use_flow else None
        # only evaluation has empty batches (a rank with fewer items than batches)
        return batch_dict(self.source, [], [], rgb, flow, 0)
