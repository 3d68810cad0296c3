"""``stresnet shards``: videos -> RGB frames + optical flow -> WebDataset shards + manifest.json.

The command, in steps (each in its own module):

1. For ``dataset.kind: synthetic`` the videos are generated first (``pipelines.synthetic``).
2. The source (``pipelines.sources``) lists the videos of each split; everything is checked first.
3. ``pipelines.shard_planning`` assigns the videos to partitions and shards (deterministically)
   and keeps each partition's progress record, so a killed run resumes where it stopped.
4. ``pipelines.shard_writer`` writes a partition's missing shards, each with its index file,
   from samples encoded in worker processes (``pipelines.sample_encoding``).
5. ``finalize`` checks that every partition is complete and writes ``manifest.json``.

With ``shards.partition`` unset one process does every partition and then finalizes; with it set
(a SLURM array task, a Ray task) only that partition is written, and ``--finalize`` runs step 5.
The command line (arguments, exit status) is ``cluster.shards``.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np

from pipelines import shard_format as fmt
from pipelines.config import PipelineConfig, ShardsConfig
from pipelines.shard_planning import (
    ShardsError, creation_params, plan_shards, read_record, record_failures, shard_done, write_json,
)
from pipelines.shard_writer import write_partition
from pipelines.sources import DatasetError, DatasetIndex, load_source
from pipelines.synthetic import write_synthetic_dataset

__all__ = ["DatasetError", "ShardFailures", "ShardsError", "finalize", "make_shards"]


class ShardFailures(RuntimeError):
    """Some videos could not be processed (and ``shards.allow_failures`` is false).

    Everything else was written, manifest included; ``manifest`` holds it.
    """

    def __init__(self, message: str, manifest: dict) -> None:
        super().__init__(message)
        self.manifest = manifest


# ------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------


def make_shards(cfg: PipelineConfig) -> dict:
    """Write the shards described by ``cfg`` and return the manifest.

    With ``cfg.shards.partition`` set, writes only that partition and returns its progress record
    (``finalize`` writes the manifest later). Raises ``DatasetError`` before any work when the
    source does not match the files, ``ShardFailures`` (after writing everything) when videos
    failed and ``shards.allow_failures`` is false.
    """
    out = Path(cfg.shards.output)
    if cfg.dataset.kind == "synthetic":  # the videos are made here, before any shard is planned
        write_synthetic_dataset(cfg.dataset)
    index = load_source(cfg.dataset)
    params = creation_params(cfg, index)
    plans = plan_shards(index, cfg.shards.samples_per_shard, cfg.shards.num_partitions)

    if cfg.shards.partition is None:
        existing = out / fmt.MANIFEST
        try:
            manifest = fmt.read_manifest(out) if existing.is_file() else None
        except ValueError as err:  # unreadable: finalize below writes it again
            print(f"rewriting {existing}: {err}")
            manifest = None
        if manifest is not None:
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


def finalize(cfg: PipelineConfig, index: DatasetIndex | None = None) -> dict:
    """Check that every partition is complete and write ``manifest.json``; return the manifest."""
    out = Path(cfg.shards.output)
    if index is None:
        index = load_source(cfg.dataset)
    params = creation_params(cfg, index)
    plans = plan_shards(index, cfg.shards.samples_per_shard, cfg.shards.num_partitions)

    records, incomplete = {}, []
    for partition in range(cfg.shards.num_partitions):
        record = read_record(out, partition, params)
        todo = [p.name for p in plans if p.partition == partition and not shard_done(out, record, p)]
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
        "class_families": index.class_families,  # {} for real datasets
        "splits": splits,
        "unused": index.unused,
        "params": params,
        "versions": library_versions(),
        "failures": failures,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / fmt.MANIFEST, manifest)
    print(f"wrote {out / fmt.MANIFEST}: {_summary(manifest)}")
    return _check_failures(manifest, cfg.shards)


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "cv2": cv2.__version__, "numpy": np.__version__}
    for name, dist in (("torch", "torch"), ("av", "av"), ("webdataset", "webdataset")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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
