"""Which shard holds which videos, and which shards are already written.

Everything here is deterministic, so any number of independent tasks agree without talking:

1. Within a split the videos are ordered by a hash of their id (mixes the classes within each
   shard, independent of the order of the split files) and dealt round-robin to
   ``shards.num_partitions`` partitions; each partition cuts its list into shards of
   ``shards.samples_per_shard``, named ``{split}-p{partition:03d}-{index:05d}.tar``.
2. Each partition keeps a progress record, ``progress-p{partition:03d}.json``: the shards it has
   completely written (with their keys and failed videos) and the settings they were made with.
   A re-run skips recorded shards and refuses a folder made with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipelines import shard_format as fmt
from pipelines.config import PipelineConfig
from pipelines.sources import DatasetIndex, VideoEntry
from stresnet.config import to_dict


class ShardsError(RuntimeError):
    """The output folder cannot be used as asked (other settings, incomplete partitions)."""


@dataclass
class ShardPlan:
    name: str
    split: str
    partition: int
    entries: list[VideoEntry]


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


def creation_params(cfg: PipelineConfig, index=None) -> dict:
    """The settings that decide the shards' content; a re-run must use the same ones. With
    ``index`` (the ``DatasetIndex``), also a digest of the source list: which videos, labels,
    class names and splits; an edited CSV or split file changes it."""
    d, s = cfg.dataset, cfg.shards
    params = {
        "dataset": {"kind": d.kind, "root": d.root, "splits_dir": d.splits_dir, "csv": d.csv, "split": d.split},
        "samples_per_shard": s.samples_per_shard,
        "num_partitions": s.num_partitions,
        "short_side": s.short_side,
        # flow is computed on the native frames, before any short_side resize (issue 10)
        "flow_resolution": "native",
        "fps": s.fps,
        "flow": s.flow,
        "tvl1_epsilon": s.tvl1_epsilon,
        "flow_bound": s.flow_bound,
        "jpeg_quality": s.jpeg_quality,
    }
    if d.kind == "synthetic":
        params["dataset"]["synthetic"] = to_dict(d.synthetic)
    if index is not None:
        params["sources"] = sources_digest(index)
    return params


def sources_digest(index) -> str:
    """SHA-256 of the source list: classes, then per video (key, source, label, class, split)."""
    rows = [index.classes] + [
        [e.video_id, e.source, e.label, e.class_name, e.split] for e in index.entries
    ]
    return "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# Progress records
# ------------------------------------------------------------------------------------------


def record_path(out: Path, partition: int) -> Path:
    return out / f"progress-p{partition:03d}.json"


def read_record(out: Path, partition: int, params: dict) -> dict:
    """This partition's progress record; refuses one written with other settings."""
    path = record_path(out, partition)
    if not path.is_file():
        return {"partition": partition, "params": params, "shards": {}}
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ShardsError(
            f"{path}: not valid JSON ({err}); delete it to redo the shards it lists"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("shards"), dict):
        raise ShardsError(f"{path}: not a progress record; delete it to redo the shards it lists")
    there = record.get("params") or {}
    if "sources" not in there and "sources" in params:  # made before the digest was recorded
        there = {**there, "sources": params["sources"]}  # cannot tell; record it from now on
        record["params"] = there
    if there != params and {k: v for k, v in there.items() if k != "sources"} == {
        k: v for k, v in params.items() if k != "sources"
    }:
        raise ShardsError(
            f"{path}: the source list (CSV, split files or video folders) changed since {out} "
            f"was made, so its shards hold other videos or labels; use a new shards.output or "
            f"delete {out} to make them again"
        )
    if record.get("params") != params:
        raise ShardsError(
            f"{path}: {out} was made with other settings; use a new shards.output or delete it.\n"
            f"  there: {json.dumps(record.get('params'), sort_keys=True)}\n"
            f"  now:   {json.dumps(params, sort_keys=True)}"
        )
    return record


def record_failures(record: dict) -> list[dict]:
    return [f for name in sorted(record["shards"]) for f in record["shards"][name]["failures"]]


def shard_done(out: Path, record: dict, plan: ShardPlan) -> bool:
    """Recorded as complete, and its tar is there (or it held no readable video at all)."""
    info = record["shards"].get(plan.name)
    return info is not None and (info["samples"] == 0 or (out / plan.name).is_file())


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (through ``NAME.partial`` and a rename)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
