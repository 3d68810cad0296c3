"""Writing shards: a partition's missing shards, each a WebDataset tar plus its index file.

A partition is written by one process (with a pool of ``shards.processes`` encoding processes, see
``pipelines.sample_encoding``). Each shard is written as ``NAME.partial`` and its index as
``NAME.idx.partial``; both are renamed when complete (index first), then the shard is recorded in
the partition's progress record (``pipelines.shard_planning``). A killed run therefore never
leaves a half-written ``.tar``, and a re-run rewrites exactly the shards not yet recorded.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib
from contextlib import closing
from pathlib import Path
from typing import BinaryIO, Iterator

import webdataset as wds
from tqdm import tqdm

from pipelines import shard_format as fmt
from pipelines.config import ShardsConfig
from pipelines.sample_encoding import Processing, process_videos
from pipelines.shard_planning import (
    ShardPlan, read_record, record_failures, record_path, shard_done, write_json,
)

_BLOCK = 512  # tar block size: member data is padded to a multiple of it


class IndexedTarWriter:
    """webdataset's ``TarWriter`` that also records where each member's data lands.

    Members are written one at a time in the order ``TarWriter`` itself uses (sorted by name), so
    the tar is byte-for-byte what ``TarWriter.write(sample)`` would give; after each one the tar
    stream's offset is the end of its padded data, which locates the data exactly.
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        # Fixed member times and owner: the same samples always give the same bytes.
        self.tar = wds.TarWriter(stream, encoder=False, mtime=0.0, user="stresnet", group="stresnet")
        self.members: list[list] = []  # [name, data offset, size, CRC-32 of the data] in tar order

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for name in sorted(k for k in sample if not k.startswith("_")):
            data = sample[name]
            self.tar.write({"__key__": key, name: data})
            end = self.tar.tarstream.offset  # just past this member's data, padded to a block
            padded = (len(data) + _BLOCK - 1) // _BLOCK * _BLOCK
            self.members.append([f"{key}.{name}", end - padded, len(data), zlib.crc32(data)])

    def close(self) -> dict:
        """Finish the tar; return its index (see ``pipelines.shard_format``)."""
        self.tar.close()
        self.stream.flush()
        return {"format": fmt.INDEX_FORMAT, "tar_size": self.stream.tell(), "members": self.members}


def write_index(path: Path, index: dict) -> None:
    """Write an index file (compact JSON, one member per line so it diffs and greps well)."""
    lines = [json.dumps(m, separators=(",", ":")) for m in index["members"]]
    head = json.dumps({k: v for k, v in index.items() if k != "members"}, separators=(",", ":"))
    path.write_text(head[:-1] + ',"members":[\n' + ",\n".join(lines) + "\n]}\n")


def write_tar(path: Path, samples) -> dict:
    """Write ``samples`` as the shard ``path`` and its index file ``path.idx``; return the index.

    For tools and tests that write small shards directly (the shard command goes through
    ``write_partition``).
    """
    with open(path, "wb") as stream:
        writer = IndexedTarWriter(stream)
        for sample in samples:
            writer.write(sample)
        index = writer.close()
    write_index(path.with_name(fmt.index_name(path.name)), index)
    return index


def write_partition(
    out: Path, plans: list[ShardPlan], partition: int, params: dict, cfg: ShardsConfig
) -> dict:
    """Write the missing shards of one partition; return its progress record."""
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(out, partition, params)
    mine = [p for p in plans if p.partition == partition]
    todo = [p for p in mine if not shard_done(out, record, p)]
    for stale in out.glob(f"*-p{partition:03d}-*.partial"):  # left by a killed run
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
            write_json(record_path(out, partition), record)
    print(f"partition {partition}: wrote {len(todo)} shard(s), {written} sample(s), "
          f"{len(record_failures(record))} failure(s) in total")
    return record


def write_shard(
    out: Path, plan: ShardPlan, results: Iterator, bar: tqdm, crash_at: int | None
) -> tuple[list[str], list[dict]]:
    """Write one shard and its index from the next ``len(plan.entries)`` results; return
    (keys, failures). A shard whose every video failed is not written at all."""
    partial = out / (plan.name + ".partial")
    keys, failures = [], []
    with open(partial, "wb") as stream:
        writer = IndexedTarWriter(stream)
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
        index = writer.close()
        os.fsync(stream.fileno())
    if not keys:
        partial.unlink()
        return keys, failures
    index_partial = out / (fmt.index_name(plan.name) + ".partial")
    write_index(index_partial, index)
    # Index first: a finished .tar always has its index beside it (atomic renames, one filesystem).
    os.replace(index_partial, out / fmt.index_name(plan.name))
    os.replace(partial, out / plan.name)
    return keys, failures
