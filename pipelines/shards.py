"""``stresnet shards``: videos -> RGB frames + optical flow -> WebDataset shards + manifest.json.

How the work is cut up (all deterministic, so any number of independent tasks agree):

1. The source (``pipelines.sources``) lists the videos of each split; everything is checked first.
2. Within a split the videos are ordered by a hash of their id (mixes the classes within each
   shard, independent of the order of the split files) and dealt round-robin to
   ``shards.num_partitions`` partitions; each partition cuts its list into shards of
   ``shards.samples_per_shard``, named ``{split}-p{partition:03d}-{index:05d}.tar``.
3. A partition is written by one process (with a pool of ``shards.processes`` decoding processes).
   Each shard is written to ``NAME.partial`` and renamed when complete, then recorded in
   ``progress-p{partition:03d}.json``; a re-run skips recorded shards, so a killed run resumes
   where it stopped and never leaves a half-written ``.tar``.
4. ``finalize`` checks that every partition is complete and writes ``manifest.json``.

With ``shards.partition`` unset one process does every partition and then finalizes; with it set
(a SLURM array task, a Ray task) only that partition is written, and ``--finalize`` runs step 4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipelines import shard_format as fmt
from pipelines.flow import FlowEstimator
from pipelines.sources import DatasetError, DatasetIndex, VideoEntry, load_source
from pipelines.synthetic import write_synthetic_dataset
from pipelines.video import VideoError, decode_video
from stresnet.config import ConfigError, RunConfig, ShardsConfig, add_config_arguments, config_from_args, to_dict


class ShardsError(RuntimeError):
    """The output folder cannot be used as asked (other settings, incomplete partitions)."""


class ShardFailures(RuntimeError):
    """Some videos could not be processed (and ``shards.allow_failures`` is false).

    Everything else was written, manifest included; ``manifest`` holds it.
    """

    def __init__(self, message: str, manifest: dict) -> None:
        super().__init__(message)
        self.manifest = manifest


@dataclass
class ShardPlan:
    name: str
    split: str
    partition: int
    entries: list[VideoEntry]


@dataclass(frozen=True)
class Processing:
    """What a worker needs to turn one video into one sample."""

    fps: float | None
    short_side: int
    flow: str
    tvl1_epsilon: float
    flow_bound: float
    jpeg_quality: int

    @classmethod
    def from_config(cls, cfg: ShardsConfig) -> "Processing":
        return cls(cfg.fps, cfg.short_side, cfg.flow, cfg.tvl1_epsilon, cfg.flow_bound, cfg.jpeg_quality)


# ------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------


def make_shards(cfg: RunConfig) -> dict:
    """Write the shards described by ``cfg`` and return the manifest.

    With ``cfg.shards.partition`` set, writes only that partition and returns its progress record
    (``finalize`` writes the manifest later). Raises ``DatasetError`` before any work when the
    source does not match the files, ``ShardFailures`` (after writing everything) when videos
    failed and ``shards.allow_failures`` is false.
    """
    out = Path(cfg.shards.output)
    if cfg.dataset.kind == "synthetic":
        write_synthetic_dataset(cfg.dataset)
    index = load_source(cfg.dataset)
    params = creation_params(cfg)
    plans = plan_shards(index, cfg.shards.samples_per_shard, cfg.shards.num_partitions)

    if cfg.shards.partition is None:
        existing = out / fmt.MANIFEST
        if existing.is_file():
            manifest = json.loads(existing.read_text())
            listed = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
            shards_there = all((out / name).is_file() for name in listed)
            if manifest.get("params") == params and shards_there:
                print(f"nothing to do: {out} is complete ({_summary(manifest)})")
                return _check_failures(manifest, cfg.shards)
        for partition in range(cfg.shards.num_partitions):
            write_partition(out, plans, partition, params, cfg.shards)
        return finalize(cfg, index)
    record = write_partition(out, plans, cfg.shards.partition, params, cfg.shards)
    if record_failures(record) and not cfg.shards.allow_failures:
        raise ShardFailures(_failure_text(record_failures(record)), record)
    return record


def finalize(cfg: RunConfig, index: DatasetIndex | None = None) -> dict:
    """Check that every partition is complete and write ``manifest.json``; return the manifest."""
    out = Path(cfg.shards.output)
    if index is None:
        index = load_source(cfg.dataset)
    params = creation_params(cfg)
    plans = plan_shards(index, cfg.shards.samples_per_shard, cfg.shards.num_partitions)

    records, incomplete = {}, []
    for partition in range(cfg.shards.num_partitions):
        record = read_record(out, partition, params)
        todo = [p.name for p in plans if p.partition == partition and not _shard_done(out, record, p)]
        if todo:
            incomplete.append(f"partition {partition}: {len(todo)} shard(s) not written, e.g. {todo[0]}")
        records[partition] = record
    if incomplete:
        raise ShardsError(
            f"{out}: cannot finalize, run these partitions first "
            f"(shards.partition=N shards.num_partitions={cfg.shards.num_partitions}):\n  "
            + "\n  ".join(incomplete)
        )

    splits: dict[str, dict] = {}
    for plan in sorted(plans, key=lambda p: p.name):
        samples = records[plan.partition]["shards"][plan.name]["samples"]
        split = splits.setdefault(plan.split, {"samples": 0, "shards": []})
        if samples:  # a shard whose every video failed is not written at all
            split["shards"].append({"name": plan.name, "samples": samples})
            split["samples"] += samples
    failures = [f for p in sorted(records) for f in record_failures(records[p])]
    manifest = {
        "format": fmt.FORMAT_VERSION,
        "dataset": index.name,
        "classes": index.classes,
        "splits": splits,
        "unused": index.unused,
        "params": params,
        "versions": library_versions(),
        "failures": failures,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(out / fmt.MANIFEST, manifest)
    print(f"wrote {out / fmt.MANIFEST}: {_summary(manifest)}")
    return _check_failures(manifest, cfg.shards)


def main(argv: list[str] | None = None) -> int:
    """``stresnet shards --config FILE [--finalize] [key=value ...]``.

    Exit status: 0 done (or nothing to do), 1 some videos failed (everything else written),
    2 nothing could be done (bad config, dataset problems, incomplete partitions, other settings).
    """
    parser = argparse.ArgumentParser(
        prog="stresnet shards", description="videos -> RGB frames + optical flow -> WebDataset shards"
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--finalize", action="store_true",
        help="only write manifest.json from the completed partitions",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.finalize:
            finalize(cfg)
        else:
            make_shards(cfg)
    except ShardFailures as err:
        print(f"stresnet shards: {err}\n(set shards.allow_failures=true to accept this)", file=sys.stderr)
        return 1
    except (ConfigError, DatasetError, ShardsError, FileExistsError) as err:
        print(f"stresnet shards: {err}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------


def plan_shards(index: DatasetIndex, samples_per_shard: int, num_partitions: int) -> list[ShardPlan]:
    """Every shard of every partition with the videos it holds (see the module docstring)."""
    plans = []
    for split in sorted({e.split for e in index.entries}):
        entries = sorted(
            (e for e in index.entries if e.split == split),
            key=lambda e: hashlib.sha1(e.video_id.encode()).hexdigest(),
        )
        for partition in range(num_partitions):
            mine = entries[partition::num_partitions]
            for number, start in enumerate(range(0, len(mine), samples_per_shard)):
                name = fmt.shard_name(split, partition, number)
                plans.append(ShardPlan(name, split, partition, mine[start : start + samples_per_shard]))
    return plans


def creation_params(cfg: RunConfig) -> dict:
    """The settings that decide the shards' content; a re-run must use the same ones."""
    d, s = cfg.dataset, cfg.shards
    params = {
        "dataset": {"kind": d.kind, "root": d.root, "splits_dir": d.splits_dir, "csv": d.csv, "split": d.split},
        "samples_per_shard": s.samples_per_shard,
        "num_partitions": s.num_partitions,
        "short_side": s.short_side,
        "fps": s.fps,
        "flow": s.flow,
        "tvl1_epsilon": s.tvl1_epsilon,
        "flow_bound": s.flow_bound,
        "jpeg_quality": s.jpeg_quality,
    }
    if d.kind == "synthetic":
        params["dataset"]["synthetic"] = to_dict(d.synthetic)
    return params


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "cv2": cv2.__version__, "numpy": np.__version__}
    for name, dist in (("torch", "torch"), ("av", "av"), ("webdataset", "webdataset")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ------------------------------------------------------------------------------------------
# Writing one partition
# ------------------------------------------------------------------------------------------


def record_path(out: Path, partition: int) -> Path:
    return out / f"progress-p{partition:03d}.json"


def read_record(out: Path, partition: int, params: dict) -> dict:
    """This partition's progress record; refuses one written with other settings."""
    path = record_path(out, partition)
    if not path.is_file():
        return {"partition": partition, "params": params, "shards": {}}
    record = json.loads(path.read_text())
    if record.get("params") != params:
        raise ShardsError(
            f"{path}: {out} was made with other settings; use a new shards.output or delete it.\n"
            f"  there: {json.dumps(record.get('params'), sort_keys=True)}\n"
            f"  now:   {json.dumps(params, sort_keys=True)}"
        )
    return record


def write_partition(
    out: Path, plans: list[ShardPlan], partition: int, params: dict, cfg: ShardsConfig
) -> dict:
    """Write the missing shards of one partition; return its progress record."""
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(out, partition, params)
    mine = [p for p in plans if p.partition == partition]
    todo = [p for p in mine if not _shard_done(out, record, p)]
    for stale in out.glob(f"*-p{partition:03d}-*.tar.partial"):  # left by a killed run
        stale.unlink()
    if not todo:
        print(f"partition {partition}: all {len(mine)} shard(s) already written, nothing to do")
        return record

    videos = [e for p in todo for e in p.entries]
    processing = Processing.from_config(cfg)
    done_before = len(mine) - len(todo)
    print(
        f"partition {partition}/{cfg.num_partitions}: {len(videos)} video(s) -> {len(todo)} shard(s)"
        + (f" ({done_before} already written)" if done_before else "")
    )
    written = 0
    # In a log file (SLURM) a bar redrawn every 0.1 s is noise: redraw every 30 s there.
    bar = tqdm(total=len(videos), unit="video", desc=f"p{partition:03d}",
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    failed = len(record_failures(record))
    with bar, closing(process_videos(videos, processing, cfg.processes)) as results:
        for plan in todo:
            crash_at = None if cfg.crash_after_samples is None else cfg.crash_after_samples - written
            keys, failures = write_shard(out, plan, results, bar, crash_at)
            written += len(keys)
            failed += len(failures)
            bar.set_postfix(failed=failed)
            record["shards"][plan.name] = {"samples": len(keys), "keys": keys, "failures": failures}
            _write_json(record_path(out, partition), record)
    print(f"partition {partition}: wrote {len(todo)} shard(s), {written} sample(s), "
          f"{len(record_failures(record))} failure(s) in total")
    return record


def write_shard(
    out: Path, plan: ShardPlan, results: Iterator, bar: tqdm, crash_at: int | None
) -> tuple[list[str], list[dict]]:
    """Write one shard from the next ``len(plan.entries)`` results; return (keys, failures).

    The tar is written as ``NAME.partial`` and renamed when complete, so a ``.tar`` is never
    half-written. A shard whose every video failed is not written at all.
    """
    partial = out / (plan.name + ".partial")
    keys, failures = [], []
    with open(partial, "wb") as stream:
        # Fixed member times and owner: the same videos always give the same bytes.
        writer = wds.TarWriter(stream, encoder=False, mtime=0.0, user="stresnet", group="stresnet")
        for entry in plan.entries:
            sample, reason = next(results)
            bar.update(1)
            if reason is not None:
                failures.append({"source": entry.source, "video_id": entry.video_id,
                                 "split": entry.split, "reason": reason})
                bar.write(f"skipped {entry.source}: {reason}")
                continue
            writer.write(sample)
            keys.append(entry.video_id)
            if crash_at is not None and len(keys) >= crash_at:
                stream.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # failure injection: a hard crash mid-shard
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    if keys:
        os.replace(partial, out / plan.name)  # atomic on one filesystem
    else:
        partial.unlink()
    return keys, failures


def record_failures(record: dict) -> list[dict]:
    return [f for name in sorted(record["shards"]) for f in record["shards"][name]["failures"]]


def _shard_done(out: Path, record: dict, plan: ShardPlan) -> bool:
    info = record["shards"].get(plan.name)
    return info is not None and (info["samples"] == 0 or (out / plan.name).is_file())


# ------------------------------------------------------------------------------------------
# Processing videos (in worker processes)
# ------------------------------------------------------------------------------------------


def process_videos(
    videos: list[VideoEntry], processing: Processing, workers: int
) -> Iterator[tuple[dict | None, str | None]]:
    """(sample, None) or (None, reason) per video, in order; a process pool when ``workers`` != 1."""
    workers = min(workers or len(os.sched_getaffinity(0)), len(videos))
    jobs = iter([(entry, processing) for entry in videos])
    if workers <= 1:
        _init_worker()
        yield from map(_process_one, jobs)
        return
    # spawn: a clean interpreter per worker (fork after OpenCV/FFmpeg threads started can hang).
    # A pool whose worker dies raises BrokenProcessPool instead of waiting forever, and at most
    # 2 videos per worker are in flight, so finished samples never pile up in memory.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        in_flight = deque(pool.submit(_process_one, job) for job in islice(jobs, 2 * workers))
        while in_flight:
            result = in_flight.popleft().result()
            for job in islice(jobs, 1):
                in_flight.append(pool.submit(_process_one, job))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_ESTIMATORS: dict[tuple[str, float], FlowEstimator] = {}


def _init_worker() -> None:
    # One thread per process: the parallelism is across videos, and timings stay per core.
    cv2.setNumThreads(1)


def _process_one(job: tuple[VideoEntry, Processing]) -> tuple[dict | None, str | None]:
    entry, p = job
    try:
        return video_sample(entry, p), None
    except VideoError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - one bad video must not stop the run; its reason is recorded
        return None, f"{type(err).__name__}: {err}"


def video_sample(entry: VideoEntry, p: Processing) -> dict:
    """Decode one video, compute its flow and encode everything as one WebDataset sample."""
    video = decode_video(entry.path, fps=p.fps, short_side=p.short_side)
    frames = video.frames
    if len(frames) < 2:
        raise VideoError(f"only {len(frames)} frame: no optical flow")
    key = (p.flow, p.tvl1_epsilon)
    if key not in _ESTIMATORS:
        _ESTIMATORS[key] = FlowEstimator(p.flow, p.tvl1_epsilon)

    params = [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality]
    sample: dict = {"__key__": entry.video_id}
    for i, frame in enumerate(frames):
        sample[fmt.rgb_member(i)] = _jpeg(frame, params)
    for i, field in enumerate(_ESTIMATORS[key].fields(frames)):
        flow = fmt.quantize_flow(field, p.flow_bound)
        name_x, name_y = fmt.flow_members(i)
        sample[name_x] = _jpeg(flow[:, :, 0], params)
        sample[name_y] = _jpeg(flow[:, :, 1], params)
    height, width = frames.shape[1:3]
    meta = {
        "video_id": entry.video_id, "label": entry.label, "class_name": entry.class_name, "split": entry.split,
        "num_frames": len(frames), "fps": video.fps, "height": height, "width": width,
        "flow_bound": p.flow_bound, "flow_method": p.flow, "source": entry.source,
    }
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def _jpeg(image: np.ndarray, params: list[int]) -> bytes:
    ok, data = cv2.imencode(".jpg", image, params)
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _summary(manifest: dict) -> str:
    parts = [
        f"{name}: {s['samples']} sample(s) in {len(s['shards'])} shard(s)"
        for name, s in manifest["splits"].items()
    ]
    return "; ".join(parts) + f"; {len(manifest['failures'])} failure(s)"


def _failure_text(failures: list[dict]) -> str:
    lines = [f"{f['source']}: {f['reason']}" for f in failures]
    return f"{len(failures)} video(s) failed and were skipped:\n  " + "\n  ".join(lines)


def _check_failures(manifest: dict, cfg: ShardsConfig) -> dict:
    if manifest["failures"] and not cfg.allow_failures:
        raise ShardFailures(_failure_text(manifest["failures"]), manifest)
    return manifest
