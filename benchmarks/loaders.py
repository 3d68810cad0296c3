"""Clips per second of the shard loaders against the usual per-frame-JPEG ("rawframes") layout.

One synthetic dataset is written twice, as shards (``pipelines/shard_format.py``) and as a
directory per video of ``img_00001.jpg``, ``flow_x_00001.jpg``, ``flow_y_00001.jpg`` files. Every
row builds the same training clips (``stresnet.sampling``: same frames, crops and flips, stage-1
T=5, L=10) with the same number of workers; rows differ only in where the JPEGs come from and
what decodes them:

* ``rawframes (CPU)``: the CPU loader's DataLoader and OpenCV decode, reading one file per JPEG.
* ``shards, CPU loader``: ``build_loader(backend="cpu")``.
* ``shards, DALI (cpu)``: ``build_loader(backend="dali")``, ``data.dali_device=cpu``
  (libjpeg-turbo and CPU operators in DALI).
* ``shards, DALI (mixed)``: only with ``--device cuda``: ``data.dali_device=gpu``, nvJPEG decode
  and resize on the GPU, clips delivered as CUDA tensors.
* ``DALI, decoding stubbed``: the DALI loader with its decode + resize + normalise graph
  (``dali.network_input``) replaced by ``stub_network_input``, which takes every per-JPEG input
  the real operators take and returns a tiny image per JPEG: what is left is the Python side end
  to end (schedule, clip plans, shard reads, JPEG checks, packing, the hand-over through shared
  memory, DALI's split into the two modalities, and the batch assembly on the main thread), i.e.
  the ceiling the loader puts on a GPU that decodes infinitely fast -- plus the stub's own few
  operators per JPEG.

"main thread ms/clip" is the CPU time of the training process's main thread alone
(``time.thread_time``) per clip during the timed epochs: the part that does not overlap with the
model's compute. "epoch change (s)" is the longest wait for the first batch of a timed epoch.

The timed part starts after one warm-up epoch (worker start-up and pipeline build excluded) and
covers ``--epochs`` epochs; the rows run in turn ``--repeats`` times (the machine may be shared)
and the table shows the median. Time to the first batch is reported separately.

Start-up: the CPU time of building the split's ``ShardIndex`` from the shards' index files (``NAME.tar.idx``, as
``stresnet shards`` writes them) and, on a copy without them, by scanning the tar headers (the
fallback for shards made by other tools), each the median of ``--repeats`` interleaved builds.

    .venv/bin/python -m benchmarks.loaders                # this machine, CPU rows
    python -m benchmarks.loaders --device cuda --videos 256 --size 224 --height 256 --width 340
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from benchmarks.results import markdown_table, write_section
from pipelines.loaders import build_loader, dali
from pipelines.loaders.clips import ClipSource
from pipelines.loaders.cpu import CpuClipLoader
from pipelines.loaders.schedule import Schedule
from pipelines.loaders.shard_reader import SampleError, SampleRef, ShardIndex
from pipelines.shard_format import (
    FORMAT_VERSION, flow_members, quantize_flow, rgb_member, shard_name,
)
from pipelines.shard_writer import write_tar
from cluster.config import RunConfig, load_config


NOTES = """Reading the numbers: the rows share sampling, augmentation and worker count; the
shard and rawframes CPU rows even share the decode code, so their difference is storage alone.
With a warm page cache on a local disk, rawframes pays only for ~105 file opens per clip; on a
network file system each open is a metadata round trip, which the shard layout avoids (not
measured here). The DALI loader decodes a whole batch per modality (one RGB and one flow decoder
over every JPEG of the batch) and normalises in `crop_mirror_normalize`, so its training-process
main thread only feeds a fixed set of arrays per batch and wraps the outputs
(`torch.from_dlpack`); the CPU loader's main thread receives uint8 crops and normalises them
itself. DALI's CPU mode is the
fallback without a GPU and the parity reference; on a GPU (`--device cuda`, row "DALI (mixed)")
decoding, resizing and normalising run on the device, and `benchmarks/gpu.py` measures the rest.
The stubbed row is the Python side's ceiling on this machine: schedule, clip plans, shard reads,
checks, packing, shared-memory hand-over, the split into modalities and batch assembly, with
DALI's decode graph replaced by a stub that takes the same inputs (its own operators, ~6 per JPEG,
are part of the figure)."""


def encode(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def write_dataset(root: Path, videos: int, frames: int, height: int, width: int,
                  per_shard: int) -> tuple[Path, Path]:
    """Shards and rawframes of the same videos: a blurred-noise texture drifting right, with
    noisy flow fields, so JPEG sizes are like natural frames rather than flat colour."""
    rng = np.random.default_rng(0)
    shards, raw = root / "shards", root / "rawframes"
    shards.mkdir(parents=True)
    entries, batch = [], []
    for v in range(videos):
        if v % per_shard == 0:
            name = shard_name("train", 0, len(entries))
            entries.append({"name": name, "samples": min(per_shard, videos - v)})
        key = f"video{v:05d}"
        noise = rng.integers(0, 256, (height, width + frames, 3), np.uint8)
        texture = cv2.GaussianBlur(noise, (7, 7), 2)
        sample = {"__key__": key, "json": (
            f'{{"video_id": "{key}", "label": {v % 10}, "num_frames": {frames}, '
            f'"height": {height}, "width": {width}}}').encode()}
        folder = raw / key
        folder.mkdir(parents=True)
        for t in range(frames):
            data = encode(texture[:, frames - t : frames - t + width])
            sample[rgb_member(t)] = data
            (folder / f"img_{t + 1:05d}.jpg").write_bytes(data)
        for i in range(frames - 1):
            for name, prefix in zip(flow_members(i), ("flow_x", "flow_y")):
                field = rng.normal(1.0, 2.0, (height // 8, width // 8))
                data = encode(quantize_flow(cv2.resize(field, (width, height)), 20.0))
                sample[name] = data
                (folder / f"{prefix}_{i + 1:05d}.jpg").write_bytes(data)
        batch.append(sample)
        if len(batch) == entries[-1]["samples"]:
            write_tar(shards / entries[-1]["name"], batch)  # with its index file, as the writer does
            batch = []
    manifest = {"format": FORMAT_VERSION, "dataset": "benchmark",
                "classes": [str(c) for c in range(10)],
                "splits": {"train": {"samples": videos, "shards": entries}}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards, raw


class RawframesIndex:
    """``ShardIndex``'s reading interface over one folder of per-frame JPEG files per video."""

    def __init__(self, shard_index: ShardIndex, root: Path):
        self.folder = root
        self.samples = shard_index.samples  # same videos, sizes and labels
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def ref(self, index: int) -> SampleRef:
        return self.samples[index]

    def read(self, index: int, names: list[str]) -> dict[str, bytes]:
        folder = self.root / self.samples[index].key
        out = {}
        for name in names:  # rgb.00003.jpg -> img_00004.jpg, flow_x.00003.jpg -> flow_x_00004.jpg
            kind, number, _ = name.split(".")
            file = folder / f"{'img' if kind == 'rgb' else kind}_{int(number) + 1:05d}.jpg"
            try:
                out[name] = file.read_bytes()
            except OSError as err:
                raise SampleError(f"{file}: {err.strerror}") from None
        return out


STUB_ROW = "DALI, decoding stubbed"


def repeat_split(shards: Path, split: str, name: str, times: int) -> None:
    """Add split ``name`` to the manifest: ``split``'s shards listed ``times`` times."""
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    entries = manifest["splits"][split]["shards"] * times
    manifest["splits"][name] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    path.write_text(json.dumps(manifest))


def children_cpu() -> float:
    """CPU seconds of this process's child processes (the loader's workers): those alive, read
    from /proc, plus those already ended and waited for."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ended.ru_utime + ended.ru_stime
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == me:  # fields after the name: state, ppid, ..., utime (12), stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(loader, epochs: int) -> dict[str, float]:
    """Seconds to the first batch; then over the ``epochs`` epochs after the first: clips/s, CPU
    ms per clip of this process (its DALI threads included), of its main thread alone and of its
    worker processes, and the longest wait for an epoch's first batch."""
    start = time.perf_counter()
    loader.set_epoch(0)
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    for _ in iterator:  # finish epoch 0 untimed
        pass
    start, cpu, main_cpu, clips = time.perf_counter(), time.process_time(), time.thread_time(), 0
    workers_cpu = children_cpu()
    epoch_change = 0.0
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        asked = time.perf_counter()
        for k, batch in enumerate(loader):
            if k == 0:
                epoch_change = max(epoch_change, time.perf_counter() - asked)
            clips += len(batch["video_id"])
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU rows: count only finished clips
    return {
        "first": first,
        "rate": clips / (time.perf_counter() - start),
        "cpu_ms": (time.process_time() - cpu) * 1000 / clips,
        "main_ms": (time.thread_time() - main_cpu) * 1000 / clips,
        "workers_ms": (children_cpu() - workers_cpu) * 1000 / clips,
        "epoch_change": epoch_change,
    }


def stub_network_input(jpegs, anchors, shapes, mirror, mean, std, color, size, settings):
    """Stands in for ``dali.network_input`` (decode + resize + normalise): it takes every input
    the real operators take per JPEG -- the bytes (their row length, read without decoding), crop
    anchor and shape, output size, mirror flag and, for flow, the normalisation -- so everything
    that feeds them still runs, and returns them as a tiny (C, 1, k) "image" per JPEG. Its own
    operators (casts, reshapes, shape, cat) cost ~0.5 us per JPEG each."""
    from nvidia.dali import fn, types

    flag = fn.reshape(fn.cast(mirror, dtype=types.FLOAT), shape=[1])
    values = [anchors, shapes, flag, fn.cast(jpegs.shape(), dtype=types.FLOAT)]
    count = 6
    if not isinstance(size, list):  # per-JPEG sizes (full_frame views; else a constant)
        values.append(size)
        count += 2
    if not color:
        values += [mean, std]
        count += 2
    channels = 3 if color else 1
    while count % channels:
        values.append(flag)
        count += 1
    shape = [channels, 1, count // channels]
    image = fn.reshape(fn.cat(*values, axis=0), shape=shape)
    return fn.cast(image, dtype=types.FLOAT16) if settings.dtype == "float16" else image


@contextlib.contextmanager
def stubbed_decoding():
    original = dali.network_input
    dali.network_input = stub_network_input
    try:
        yield
    finally:
        dali.network_input = original


def measure_startup(shards: Path, copy: Path, repeats: int) -> dict[str, float]:
    """Median CPU seconds of this process (``process_time``: reads from the page cache count, other
    jobs on the machine do not) to build the split's ``ShardIndex`` from the index files and, on a
    copy without them, from the tar headers; interleaved, after one untimed build of each."""
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns("*.idx"))
    times: dict[str, list[float]] = {"index files": [], "header scan": []}
    for repeat in range(repeats + 1):
        for name, folder in (("index files", shards), ("header scan", copy)):
            t0 = time.process_time()
            ShardIndex(folder, "train")
            if repeat:
                times[name].append(time.process_time() - t0)
    return {name: float(np.median(values)) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=170)
    parser.add_argument("--size", type=int, default=112, help="network input size S")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--stub-repeat", type=int, default=16,
                        help="the stubbed row's split lists the shards this many times")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="stresnet-loaders-"))
    try:
        t0 = time.perf_counter()
        shards, raw = write_dataset(root, args.videos, args.frames, args.height, args.width, 16)
        took = time.perf_counter() - t0
        print(f"wrote {args.videos} videos x {args.frames} frames in {took:.1f}s")
        cfg: RunConfig = load_config(None, [
            f"data.shards={shards}", f"data.batch_size_per_worker={args.batch}",
            f"data.loader_workers={args.workers}", f"sampling.input_size={args.size}",
            "sampling.train_positions=5", "sampling.stride_min=1", "sampling.stride_max=5",
            "model.flow_length=10",
        ])
        repeat_split(shards, "train", "many", args.stub_repeat)
        index = ShardIndex(shards, "train")
        startup = measure_startup(shards, root / "shards-without-index", args.repeats)

        def loaders(workers: int) -> list:
            """(row name, loader factory, decoding stubbed)"""
            run = replace(cfg, data=replace(cfg.data, loader_workers=workers))
            on = {d: replace(run, data=replace(run.data, dali_device=d)) for d in ("cpu", "gpu")}
            raw_source = ClipSource(run, RawframesIndex(index, raw))
            schedule = Schedule(len(index), args.batch, 0, 1, cfg.seed)
            device = "gpu" if args.device == "cuda" else "cpu"
            rows = [
                ("rawframes (CPU)",
                 lambda: CpuClipLoader(raw_source, schedule, workers, args.size, 5), False),
                ("shards, CPU loader", lambda: build_loader(run, "train", 0, 1, "cpu"), False),
                ("shards, DALI (cpu)", lambda: build_loader(on["cpu"], "train", 0, 1, "dali"),
                 False),
            ]
            if args.device == "cuda":
                rows.append(("shards, DALI (mixed)",
                             lambda: build_loader(on["gpu"], "train", 0, 1, "dali"), False))
            rows.append((STUB_ROW, lambda: build_loader(on[device], "many", 0, 1, "dali"), True))
            return rows

        # Throughput with workers; CPU cost with everything in this process (workers=0), where
        # process_time() sees all of it (DALI's decoder threads included) even on a busy machine.
        runs: dict[str, list[dict]] = {}
        cost: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, make, stub in loaders(args.workers):
                with stubbed_decoding() if stub else contextlib.nullcontext():
                    result = measure(make(), args.epochs)
                runs.setdefault(name, []).append(result)
                print(f"{name:<28} {result['rate']:8.1f} clips/s  CPU ms/clip: main thread "
                      f"{result['main_ms']:.3f}, process {result['cpu_ms']:.2f}, workers "
                      f"{result['workers_ms']:.2f}  (first batch after {result['first']:.1f}s,"
                      f" epoch change {result['epoch_change']:.2f}s)", flush=True)
            for name, make, stub in loaders(0):
                with stubbed_decoding() if stub else contextlib.nullcontext():
                    ms = measure(make(), 1)["cpu_ms"]
                cost.setdefault(name, []).append(ms)
                print(f"{name:<28} {ms:8.2f} CPU ms/clip (workers=0)", flush=True)
        cores = len(os.sched_getaffinity(0))
        for name, results in runs.items():
            for result, ms in zip(results, cost[name]):
                result["total_ms"] = result["cpu_ms"] + result["workers_ms"]
                result["one_process_ms"] = ms
        med = lambda key, values: float(np.median([v[key] for v in values]))  # noqa: E731
        base = runs["rawframes (CPU)"]
        rows = []
        for name, results in runs.items():
            rows.append([
                name, f"{med('rate', results):.1f}", f"{med('main_ms', results):.3f}",
                f"{med('cpu_ms', results):.2f}", f"{med('workers_ms', results):.2f}",
                f"{med('total_ms', results):.2f}", f"{med('one_process_ms', results):.2f}",
                f"{med('one_process_ms', base) / med('one_process_ms', results):.2f}x",
                f"{med('first', results):.1f}", f"{med('epoch_change', results):.2f}",
            ])
        table = markdown_table(
            ["loader", "clips/s (wall)", "main thread", "process", "worker processes",
             "total", "all in one process (workers=0)", "vs rawframes", "first batch (s)",
             "epoch change (s)"],
            rows,
        )
        table = ("CPU ms per clip, except the first, last two and the ratio column "
                 "(rawframes CPU ms / this row's, workers=0):\n\n" + table)
        setup = (
            f"{args.videos} videos x {args.frames} frames of {args.height}x{args.width}, "
            f"clips of T=5 frames + 5 stacks of L=10 flow fields (105 JPEGs per clip) at "
            f"{args.size}x{args.size}, batch {args.batch}, {args.workers} workers, "
            f"{args.epochs} epochs timed after one warm-up epoch, median of {args.repeats} "
            f"interleaved runs (the stubbed row reads the same shards {args.stub_repeat} times "
            f"per epoch, so that an epoch is long enough to time). CPU time is what the "
            f"figures rest on, because the machine is shared ({cores} cores; load average at "
            f"the end: {os.getloadavg()[0]:.1f}) and wall-clock clips/s is only a lower bound: "
            f"\"main thread\" is `time.thread_time` of the training process's main thread, "
            f"\"process\" its `time.process_time` (DALI's threads included), \"worker "
            f"processes\" the loader's worker processes (`/proc/PID/stat` of the live ones plus "
            f"`getrusage(RUSAGE_CHILDREN)` of ended ones), \"total\" the sum; \"all in one "
            f"process\": the same loader with 0 workers, `process_time` per clip over one epoch. "
            f"Start-up (`ShardIndex` of the split, CPU time, median of {args.repeats}): "
            f"{startup['index files'] * 1000:.1f} ms from the index files, "
            f"{startup['header scan'] * 1000:.1f} ms scanning the tar headers."
        )

        def spread(values: list[float], digits: int) -> str:
            low, mid, high = min(values), float(np.median(values)), max(values)
            return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

        stub, dali_row = runs[STUB_ROW], runs["shards, DALI (cpu)"]
        cpu_row = runs["shards, CPU loader"]
        projected = [cores * 1000 / r["total_ms"] for r in stub]
        projected_one = [cores * 1000 / r["one_process_ms"] for r in stub]
        main = [r["main_ms"] for r in stub]
        ratio_one = [c["one_process_ms"] / d["one_process_ms"] for c, d in zip(cpu_row, dali_row)]
        ratio_total = [c["total_ms"] / d["total_ms"] for c, d in zip(cpu_row, dali_row)]
        ratio_rate = [d["rate"] / c["rate"] for c, d in zip(cpu_row, dali_row)]
        verdict = lambda ok: "yes" if ok else "no"  # noqa: E731
        targets = markdown_table(["target (issue 15)", "measured: median (min-max) of "
                                  f"{args.repeats} runs", "met"], [
            [f"Python side, decoding stubbed: >= 2,000 clips/s, from CPU time: {cores} cores x "
             f"1000 / total CPU ms per clip ({args.workers} workers)", spread(projected, 0),
             verdict(np.median(projected) >= 2000)],
            ["... the same, all in one process (workers=0)", spread(projected_one, 0),
             verdict(np.median(projected_one) >= 2000)],
            ["... wall clock on this shared machine (a lower bound)",
             spread([r["rate"] for r in stub], 0), ""],
            [f"training process's main thread <= 0.2 CPU ms per clip (stubbed, {args.workers} "
             "workers)", spread(main, 3), verdict(np.median(main) <= 0.2)],
            ["DALI (cpu) not slower than the CPU loader: CPU loader's CPU ms per clip / DALI's "
             "(workers=0)", spread(ratio_one, 2) + "x", verdict(np.median(ratio_one) >= 1)],
            [f"... total CPU with {args.workers} workers", spread(ratio_total, 2) + "x",
             verdict(np.median(ratio_total) >= 1)],
            ["... wall clips/s (DALI / CPU loader)", spread(ratio_rate, 2) + "x",
             verdict(np.median(ratio_rate) >= 1)],
        ])
        print(table)
        print(targets)
        print(f"start-up (CPU): {startup['index files'] * 1000:.1f} ms from the index files, "
              f"{startup['header scan'] * 1000:.1f} ms scanning the tar headers")
        if not args.no_write:
            heading = "### Loaders (`benchmarks/loaders.py`)"
            write_section("loaders", f"{heading}\n\n{setup}\n\n{table}\n\n{targets}\n\n{NOTES}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
