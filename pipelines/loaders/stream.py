"""Streaming access (``data.access: stream``): training clips from whole shards read in sequence.

For shards that live where random access is slow or impossible (object storage, HTTP): no index
files, no per-member reads. Each shard is opened once per epoch with WebDataset's ``gopen`` (a
local path, ``http(s)://`` through curl, a ``pipe:`` command such as ``aws s3 cp s3://... -``) and
read front to back with WebDataset's tar iterator and sample grouping; a clip keeps only the
JPEGs its plan selects (the same ``stresnet.sampling.train_plan`` as random access, so the same
video gives the same clip in the same epoch), and WebDataset's shuffle buffer mixes the clips.

**Equal steps, every video once.** Every rank must run the same number of batches, and every
video should be read in every epoch. Per epoch, the split's shards (from ``manifest.json``, in a
permutation drawn from ``(seed, epoch)``) are dealt to ranks largest first, each to the rank
with the fewest samples so far (and a rank's shards likewise to its loader processes). That is
WebDataset's ``split_by_node`` / ``split_by_worker`` with the shard sizes balanced and the rank
given explicitly, so every rank knows every rank's load: the loads depend only on the multiset
of shard sizes, hence are the same every epoch. Every rank runs ``ceil(max load / B)`` batches;
a rank with fewer samples tops up its last batches by reading its first shards again (the same
clips again, as random access wraps). So each training video is read at least once per epoch,
exactly once except for those top-ups (none when all shards hold the same number of samples
and their count divides evenly), and no rank waits for another at the end of an epoch.

**Deterministic.** The stream of a rank is a function of ``(seed, epoch, rank, world size,
data.loader_workers)``: shard order, shuffle buffer (seeded), the DataLoader's round-robin over
its workers. A resumed run with the same world size and loader workers therefore gets exactly
the batches it would have had (it re-reads the batches the checkpoint already used, and drops
them); with another world size the epoch and the number of steps left are right, but the clips
in them differ (docs/loaders.md, "Streaming").

**Broken streams.** A shard whose stream fails (a dropped connection, a command that fails, a
tar that ends early) is opened again up to ``data.stream_retries`` times; the samples already
used from it are passed over. After that, ``ShardStreamError`` names the URL. A damaged sample
(missing member, bad JPEG) is skipped with a warning and counted, as with random access.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.config import PipelineConfig
from pipelines.loaders.clips import EncodedClip, decode_clip
from pipelines.loaders.shard_reader import (
    DamagedShardsError, SampleError, _jpeg_size, check_damaged, check_jpeg, clip_member_names,
)
from pipelines.shard_format import MANIFEST, read_manifest, rgb_member
from stresnet.sampling import normalize_clip, train_plan

log = logging.getLogger(__name__)

# What a shard name may be before it goes into a URL template (which may be a shell command,
# ``pipe:...``): the writer's names are ``{split}-p{partition:03d}-{index:05d}.tar``.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.tar")


class ShardStreamError(RuntimeError):
    """A shard's stream broke off (or could not be opened) more often than
    ``data.stream_retries`` allows; the message names the URL."""


@dataclass(frozen=True)
class StreamShard:
    """One shard of the split as streaming reads it."""

    url: str
    samples: int  # as the manifest says
    first: int  # index of its first sample in the split (manifest order)


@dataclass
class StreamedClip(EncodedClip):
    """A clip cut out of a streamed sample: what random access gets from the index, carried."""

    label: int = 0
    video_id: str = ""


def shard_urls(cfg: PipelineConfig, split: str) -> list[StreamShard]:
    """The shards of ``split`` listed in ``data.shards/manifest.json``, each at
    ``data.stream_url`` with ``{name}`` replaced by its file name (default: the file in
    ``data.shards``)."""
    manifest = read_manifest(cfg.data.shards)
    where = Path(cfg.data.shards) / MANIFEST
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(f"{where}: no split {split!r}; the shards hold {sorted(splits)}")
    template = cfg.data.stream_url or str(Path(cfg.data.shards) / "{name}")
    shards, first = [], 0
    for entry in splits[split]["shards"]:
        name, samples = entry["name"], int(entry["samples"])
        if not SAFE_NAME.fullmatch(name):  # it may become part of a shell command
            raise ValueError(f"{where}: shard name {name!r} is not a plain file name (NAME.tar)")
        shards.append(StreamShard(template.replace("{name}", name), samples, first))
        first += samples
    return shards


def assign(sizes: list[int], parts: int, seed: int, epoch: int, salt: int) -> list[list[int]]:
    """Deal items (shards, of ``sizes[i]`` samples) to ``parts``: in a random order drawn from
    ``(seed, epoch, salt)``, largest first, each to the part with the smallest load so far (the
    lowest-numbered on a tie). The loads depend only on the multiset of sizes, not on the order;
    within a part, items keep the random order."""
    order = np.random.default_rng([seed, epoch, salt]).permutation(len(sizes)).tolist()
    rank_in_order = {item: k for k, item in enumerate(order)}
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for item in sorted(order, key=lambda i: -sizes[i]):  # stable: ties keep the random order
        part = loads.index(min(loads))
        out[part].append(item)
        loads[part] += sizes[item]
    return [sorted(items, key=rank_in_order.__getitem__) for items in out]


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, larger ones first."""
    size, extra = divmod(total, parts)
    return [size + (1 if k < extra else 0) for k in range(parts)]


class ClipStream:
    """The training clips of one rank, as a stream (picklable: loader processes get one)."""

    _RANKS, _WORKERS, _SHUFFLE = 1, 2, 3  # salts of the random streams

    def __init__(self, cfg: PipelineConfig, split: str, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards = shard_urls(cfg, split)
        if len(self.shards) < world_size:
            raise ValueError(
                f"{Path(cfg.data.shards) / MANIFEST}: split {split!r} has {len(self.shards)} "
                f"shards, fewer than the {world_size} ranks that stream it (each rank reads whole "
                "shards); use data.access=random or make more, smaller shards"
            )
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.sampling = cfg.sampling
        self.flow_length = cfg.model.flow_length
        self.seed = cfg.seed
        self.use_rgb = cfg.model.mode != "motion"
        self.use_flow = cfg.model.mode != "appearance"
        self.batch_size = cfg.data.batch_size_per_worker
        self.buffer = cfg.data.stream_shuffle_buffer
        self.retries = cfg.data.stream_retries
        self.max_damaged_fraction = cfg.data.max_damaged_fraction
        # Batches per epoch: the same on every rank and in every epoch (see ``assign``).
        sizes = [s.samples for s in self.shards]
        loads = [sum(sizes[i] for i in part) for part in assign(sizes, world_size, 0, 0, 0)]
        self.batches = math.ceil(max(loads) / self.batch_size)

    def rank_shards(self, epoch: int) -> list[StreamShard]:
        """The shards this rank reads in ``epoch``, in reading order."""
        sizes = [s.samples for s in self.shards]
        parts = assign(sizes, self.world_size, self.seed, epoch, self._RANKS)
        return [self.shards[i] for i in parts[self.rank]]

    def worker_plan(self, epoch: int, worker: int, workers: int) -> tuple[list[StreamShard], int]:
        """The shards of loader process ``worker`` of ``workers`` and how many clips it yields:
        its shards' samples plus its share of the rank's top-up to ``batches`` full batches."""
        shards = self.rank_shards(epoch)
        parts = assign([s.samples for s in shards], workers, self.seed, epoch, self._WORKERS)
        loads = [sum(shards[i].samples for i in part) for part in parts]
        reading = [w for w in range(workers) if loads[w]]
        top_up = spread(self.batches * self.batch_size - sum(loads), len(reading))
        quota = loads[worker]
        if worker in reading:
            quota += top_up[reading.index(worker)]
        return [shards[i] for i in parts[worker]], quota

    def clips(self, epoch: int, worker: int = 0, workers: int = 1) -> Iterator[StreamedClip]:
        """Loader process ``worker``'s clips of ``epoch``, through the shuffle buffer."""
        from webdataset import filters

        shards, quota = self.worker_plan(epoch, worker, workers)
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}/{self._SHUFFLE}")
        shuffle = filters.shuffle(self.buffer, self.buffer, rng=rng)  # WebDataset's buffer
        yield from shuffle(self._unshuffled(epoch, shards, quota))

    def _unshuffled(self, epoch: int, shards: list[StreamShard], quota: int):
        made, pending_skips, damaged = 0, 0, set()
        total = sum(s.samples for s in shards)
        while made < quota:
            made_before = made
            for shard in shards:
                for position, sample in enumerate(stream_samples(shard, self.retries)):
                    index = shard.first + position
                    try:
                        clip = self.cut(sample, epoch, index)
                    except (SampleError, ValueError, KeyError, TypeError) as err:
                        log.warning("skipping %s sample %s: %s", shard.url,
                                    sample.get("__key__"), err)
                        pending_skips += 1
                        damaged.add(index)
                        check_damaged(len(damaged), total, self.max_damaged_fraction,
                                      f"split {self.split!r} (streamed)",
                                      f"damaged (the latest: {shard.url} sample {position}, {err})")
                        continue
                    clip.skipped, pending_skips = pending_skips, 0
                    yield clip
                    made += 1
                    if made == quota:
                        return
            if made == made_before:
                raise DamagedShardsError(f"split {self.split!r}: no readable sample in "
                                         f"{', '.join(s.url for s in shards)}")

    def cut(self, sample: dict, epoch: int, index: int) -> StreamedClip:
        """The training clip of a streamed sample: plan it, keep its JPEGs, check them."""
        meta = json.loads(sample["json"])
        label, num_frames = int(meta["label"]), int(meta["num_frames"])
        video_id = str(meta.get("video_id", sample["__key__"]))
        where = f"{sample['__url__']}: {sample['__key__']}"
        size = _jpeg_size(sample.get(rgb_member(0), b""))  # the frames' size, as random access
        if size is None:
            raise SampleError(f"{where}: no readable first frame")
        plan = train_plan(self.sampling, self.flow_length, self.seed, epoch, video_id,
                          num_frames, *size)
        rgb_names, flow_names = clip_member_names(plan.positions, plan.flow_indices,
                                                  self.use_rgb, self.use_flow)
        data = {}
        for name in rgb_names + flow_names:
            if name not in sample:
                raise SampleError(f"{where}: no member {name}")
            data[name] = sample[name]
            check_jpeg(data[name], *size, f"{where}.{name}")
        return StreamedClip(index, plan, [data[n] for n in rgb_names],
                            [data[n] for n in flow_names], 0, label, video_id)


def stream_samples(shard: StreamShard, retries: int) -> Iterator[dict]:
    """The samples of one shard (WebDataset's sample dicts), opening it again after a failure
    and passing over the samples already yielded; ``ShardStreamError`` after ``retries``
    failed re-opens. A stream that ends before the manifest's count of samples has failed."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    done, attempt = 0, 0
    while True:
        stream, seen, last = None, 0, None
        try:
            stream = gopen(shard.url)
            for sample in group_by_keys(tar_file_expander([{"url": shard.url, "stream": stream}])):
                # Hold one back: the last sample of a stream cut at a member boundary is
                # incomplete, and only the end of the stream says which one is last.
                if last is not None:
                    seen += 1
                    if seen > done:
                        done += 1
                        yield last
                last = sample
            if last is not None and complete(last):
                seen += 1
                if seen > done:
                    done += 1
                    yield last
            if done < shard.samples:
                raise ShardStreamError(f"the tar ended after {done} of its {shard.samples} samples")
            _close(stream)
            return
        except GeneratorExit:  # the consumer has what it needs (quota reached)
            _close(stream, quiet=True)
            raise
        except Exception as err:  # noqa: BLE001 -- any failure of the transfer is retried
            _close(stream, quiet=True)
            attempt += 1
            if attempt > retries:
                raise ShardStreamError(
                    f"{shard.url}: stream broke off after {done} of {shard.samples} samples "
                    f"({type(err).__name__}: {err}); gave up after {attempt} attempts "
                    f"(data.stream_retries={retries})"
                ) from None
            log.warning("%s: stream broke off after %d samples (%s: %s); opening it again "
                        "(%d of %d)", shard.url, done, type(err).__name__, err, attempt, retries)
            time.sleep(min(0.2 * 2 ** attempt, 5.0))


def probe(cfg: PipelineConfig, split: str) -> None:
    """Open the split's first shard and read its first tar header: ``ShardStreamError`` naming
    the URL if it cannot be opened or does not start like a tar (preflight, before any worker)."""
    from webdataset.gopen import gopen

    url = shard_urls(cfg, split)[0].url
    stream = None
    try:
        stream = gopen(url)
        header = stream.read(512)
        if len(header) < 512:  # a failed command or transfer: its exit status says why
            _close(stream)
    except Exception as err:  # noqa: BLE001 -- whatever the transport raises, name the URL
        raise ShardStreamError(f"{url}: cannot be read ({type(err).__name__}: {err})") from None
    finally:
        _close(stream, quiet=True)
    if len(header) < 512 or header[257:262] != b"ustar":
        raise ShardStreamError(f"{url}: does not start like a tar file (got {len(header)} bytes)")


def complete(sample: dict) -> bool:
    """Whether a streamed sample has every member its json promises (3N - 2 JPEGs)."""
    try:
        frames = int(json.loads(sample["json"])["num_frames"])
    except (KeyError, ValueError, TypeError):
        return False
    jpegs = sum(1 for k in sample if k.endswith(".jpg"))
    return jpegs >= 3 * frames - 2


def _close(stream, quiet: bool = False) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except Exception:  # noqa: BLE001 -- a pipe we stopped reading exits with a signal status
        if not quiet:
            raise


# -- loaders ----------------------------------------------------------------------------------


class _StreamDataset(IterableDataset):
    """The clips of one epoch; in a DataLoader, each worker process streams its own shards."""

    def __init__(self, stream: ClipStream, epoch: int, decode: bool):
        self.stream = stream
        self.epoch = epoch
        self.decode = decode

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        medians = self.stream.sampling.flow_center == "median"
        last = None
        for clip in self.stream.clips(self.epoch, worker, workers):
            if not self.decode:
                yield clip
                continue
            try:
                rgb, flow, flow_median = decode_clip(clip, medians)
            except (SampleError, cv2.error) as err:
                # The JPEG check passed but libjpeg refused it: the previous clip stands in (the
                # stream cannot go back for another sample), counted as skipped.
                if last is None:
                    raise DamagedShardsError(f"{clip.video_id}: {err}") from None
                log.warning("skipping %s (%s); repeating the previous clip", clip.video_id, err)
                yield dict(last, skipped=clip.skipped + 1)
                continue
            last = {"rgb": rgb, "flow": flow, "flow_median": flow_median,
                    "flip": clip.plan.flip, "label": clip.label, "video_id": clip.video_id,
                    "skipped": 0}
            yield dict(last, skipped=clip.skipped)


class _StreamLoaderBase:
    """Epochs of exactly ``len(self)`` batches of exactly B clips (see the module docstring)."""

    def __init__(self, stream: ClipStream, workers: int, size: int, frames: int):
        self.stream = stream
        self.workers = workers
        self.size = size
        self.frames = frames
        self.epoch = 0
        self.skipped = 0  # damaged samples skipped so far (all epochs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.stream.batches

    def _item_batches(self, decode: bool) -> Iterator[list]:
        """The epoch's items (decoded dicts or ``StreamedClip``), B at a time."""
        loader = DataLoader(_StreamDataset(self.stream, self.epoch, decode), batch_size=None,
                            num_workers=self.workers, collate_fn=_identity,
                            prefetch_factor=2 * self.stream.batch_size if self.workers else None)
        items = iter(loader)
        for _ in range(self.stream.batches):
            batch = [item for _, item in zip(range(self.stream.batch_size), items)]
            if len(batch) < self.stream.batch_size:  # the quotas rule this out
                raise RuntimeError("the stream ended before the epoch's last batch")
            yield batch


def _identity(item):
    return item


class StreamClipLoader(_StreamLoaderBase):
    """The CPU loader over a stream: loader processes read, cut and decode; the main process
    batches and normalises (``stresnet.sampling.normalize_clip``, as the CPU loader)."""

    def __iter__(self):
        for items in self._item_batches(decode=True):
            skipped = sum(i["skipped"] for i in items)
            self.skipped += skipped
            stack = (lambda key: torch.stack([torch.from_numpy(i[key]) for i in items])
                     if items[0][key] is not None else None)
            flips = torch.tensor([i["flip"] for i in items], dtype=torch.bool)
            rgb, flow = normalize_clip(stack("rgb"), stack("flow"), flips,
                                       self.stream.sampling.flow_center, stack("flow_median"))
            yield {"rgb": rgb, "flow": flow,
                   "label": torch.tensor([i["label"] for i in items], dtype=torch.int64),
                   "video_id": [i["video_id"] for i in items], "skipped": skipped}


class StreamDaliLoader(_StreamLoaderBase):
    """The DALI loader over a stream: loader processes read and cut clips (no decoding); the
    main process hands each batch to DALI's external source in the packed layout of
    ``pipelines.loaders.dali`` (one row per JPEG), and DALI decodes, crops and normalises."""

    def __init__(self, stream: ClipStream, workers: int, size: int, frames: int,
                 device: torch.device, decode_threads: int = 0, hw_decoder_load: float = 0.65,
                 half: bool = False):
        super().__init__(stream, workers, size, frames)
        self.device = device
        self.decode_threads = decode_threads
        self.hw_decoder_load = hw_decoder_load
        self.dtype = torch.float16 if half and device.type == "cuda" else torch.float32
        self.builds = 0
        self._pipe = None
        self._feed: _Feed | None = None

    def __iter__(self):
        self._start()
        self._feed.batches = self._item_batches(decode=False)
        for _ in range(self.stream.batches):
            outputs = self._pipe.run()
            yield self._batch(outputs, self._feed.handed.popleft())
        self._drain()

    def _start(self) -> None:
        if self._pipe is None:
            self._build()
        elif self._feed.batches is not None:  # the previous epoch was left early
            self._feed.batches = None
            self._drain()

    def _drain(self) -> None:
        """Run out the DALI epoch (the feed stops at the end of the stream or when abandoned)."""
        from pipelines.loaders.dali import run_out

        run_out(self._pipe)
        self._feed.batches = None
        self._feed.handed.clear()

    def _build(self) -> None:
        import os

        from pipelines.loaders.dali import DecodeSettings, _build_pipeline

        settings = DecodeSettings(
            device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
            threads=self.decode_threads or max(1, min(8, len(os.sched_getaffinity(0)))),
            hw_decoder_load=self.hw_decoder_load,
            dtype="float16" if self.dtype == torch.float16 else "float32",
            max_height=0, max_width=0,  # not known before the stream: DALI sizes as it goes
        )
        per_position = int(self.stream.use_rgb) + 2 * self.stream.flow_length * int(
            self.stream.use_flow)
        jpegs = self.stream.batch_size * self.frames * per_position
        self._feed = _Feed(self.stream)
        # workers=0: the feed runs in this process (a stream is sequential, not indexable by
        # batch number as DALI's parallel external source needs); the reading runs in the
        # DataLoader's processes behind it.
        self._pipe = _build_pipeline(self._feed, jpegs, self.size, 0, settings, 0)
        self.builds += 1

    def _batch(self, outputs, clips: list[StreamedClip]) -> dict:
        from pipelines.loaders.dali import DaliClipLoader

        *images, _ = outputs
        images = [torch.from_dlpack(image.as_tensor()) for image in images]
        skipped = sum(c.skipped for c in clips)
        self.skipped += skipped
        rgb = flow = None
        if self.stream.use_rgb:
            rgb = DaliClipLoader._clips(images.pop(0), None, len(clips), 3)
        if self.stream.use_flow:
            flow = DaliClipLoader._clips(images.pop(0), None, len(clips), 2 * self.stream.flow_length)
        return {"rgb": rgb, "flow": flow,
                "label": torch.tensor([c.label for c in clips], dtype=torch.int64),
                "video_id": [c.video_id for c in clips], "skipped": skipped}


class _Feed:
    """DALI's external source in streaming mode: the next batch of the stream, packed as
    ``pipelines.loaders.dali`` packs its batches. DALI asks ahead (prefetch), so the batches
    handed over wait in ``handed`` for their outputs."""

    packed = True
    sizes_vary = False  # training clips: every JPEG is resized to input_size square

    def __init__(self, stream: ClipStream):
        self.source = stream  # what the pipeline builder reads: use_rgb, use_flow, sampling
        self.batches: Iterator[list[StreamedClip]] | None = None
        self.handed: deque[list[StreamedClip]] = deque()

    def __call__(self, info):
        from pipelines.loaders.dali import _BatchReader, pack_clips

        clips = next(self.batches) if self.batches is not None else None
        if clips is None:
            raise StopIteration
        self.handed.append(clips)
        read = pack_clips([(c, 1, -1) for c in clips], self.source.use_rgb,
                          self.source.use_flow, self.source.flow_length)
        return _BatchReader(self.source, None, None).outputs(read)


def build_stream_loader(cfg: PipelineConfig, split: str, rank: int, world_size: int,
                        backend: str, device: torch.device | None = None):
    """The training loader of ``split`` for one rank in ``data.access: stream``
    (``build_loader`` calls this; benchmarks may too)."""
    stream = ClipStream(cfg, split, rank, world_size)
    size, frames, workers = (cfg.sampling.input_size, cfg.sampling.train_positions,
                             cfg.data.loader_workers)
    if backend == "cpu":
        return StreamClipLoader(stream, workers, size, frames)
    return StreamDaliLoader(stream, workers, size, frames, device or torch.device("cpu"),
                            cfg.data.decode_threads, cfg.data.hw_decoder_load, cfg.train.bf16)
