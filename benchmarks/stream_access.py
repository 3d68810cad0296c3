"""Streaming training clips two ways: our WebDataset stream (``data.access: stream``) against Ray
Data's ``read_webdataset`` with ``streaming_split(world, equal=True)`` (what Ray Train's dataset
sharding does), next to random access through the index files.

One synthetic shard set (``benchmarks.loaders.write_dataset``: textured frames, noisy flow) is read
as 2 DDP ranks consumed at the same time (one thread per rank), one epoch after a warm-up epoch.
Every row cuts the same stage-1 clips (``stresnet.sampling.train_plan``: T=5 positions, L=10 flow
fields each) and decodes + crops them with the CPU loader's code (``clips.decode_clip``); rows
differ in how the shards are read and split:

* ``random access``: ``build_loader`` with ``data.access=random`` (index files, ``preadv``).
* ``stream, file`` / ``stream, HTTP``: ``data.access=stream`` from the shard folder / from
  ``python -m http.server`` on 127.0.0.1 (WebDataset opens ``http://`` with curl).
* ``Ray Data``: ``ray.data.read_webdataset(paths, decoder=None)`` -> ``map`` (the same clip cut
  and decode) -> ``streaming_split(2, equal=True)``, each rank ``iter_batches(batch_size=B)``.

"peak memory" is the proportional set size (PSS) of the row's process and all its children
(loader workers; Ray's GCS, raylet, workers and object store), sampled every 50 ms; each row runs
in a process of its own. "videos seen" counts distinct
training videos per epoch over both ranks.

    .venv/bin/python -m benchmarks.stream_access            # writes its section of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.loaders import write_dataset
from benchmarks.results import markdown_table, write_section
from pipelines.loaders import build_loader
from pipelines.loaders.clips import decode_clip
from pipelines.loaders.stream import ClipStream
from cluster.config import load_config

WORLD = 2
NOTES = """Ray's "build" includes starting a local Ray (`ray.init`), which a Ray Train job has
already paid. Memory is the PSS of the row's process tree. On a shared machine clips/s is noisy
between runs; batches per rank and videos seen are not. Discussion: docs/loaders.md, "Why a
WebDataset stream and not Ray Data"."""
RAY_ROW = "Ray Data read_webdataset + streaming_split(equal)"


class PeakMemory:
    """Peak RSS of this process and its children, sampled in a thread."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tree_rss(root: int) -> int:
    """Memory of process ``root`` and all its descendants: the sum of their proportional set
    sizes (PSS, from /proc: pages shared between forked workers are counted once in total)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


def config(shards: Path, args, **overrides):
    items = {
        "data.shards": str(shards), "data.batch_size_per_worker": args.batch,
        "data.loader_workers": 1, "data.train_split": "train", "data.val_split": "train",
        "sampling.input_size": args.size, "sampling.train_positions": 5, "sampling.stride_min": 1,
        "sampling.stride_max": 5, "model.flow_length": 10, "model.num_classes": 10, "seed": 0,
        "data.stream_shuffle_buffer": 16, **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def run_ranks(consume) -> tuple[float, list]:
    """``consume(rank)`` for every rank at once (one thread each); wall time and results."""
    results = [None] * WORLD
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, consume(r)))
               for r in range(WORLD)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def our_loader_row(name: str, cfg) -> list:
    with PeakMemory() as memory:
        start = time.perf_counter()
        loaders = [build_loader(cfg, "train", r, WORLD, backend="cpu", train=True) for r in range(WORLD)]
        built = time.perf_counter() - start

        def epoch(rank, e):
            loaders[rank].set_epoch(e)
            return [v for batch in loaders[rank] for v in batch["video_id"]]

        run_ranks(lambda r: epoch(r, 0))  # warm-up
        seconds, seen = run_ranks(lambda r: epoch(r, 1))
    batches = [len(s) // cfg.data.batch_size_per_worker for s in seen]
    clips = sum(len(s) for s in seen)
    return [name, f"{built:.2f}", f"{clips / seconds:.1f}", " / ".join(map(str, batches)),
            len({v for s in seen for v in s}), f"{memory.peak / 2**20:.0f}"]


def ray_data_row(cfg, shards: Path) -> list:
    import ray

    with PeakMemory() as memory:
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        cutter = ClipStream(cfg, "train", 0, 1)  # the same clip cut and decode as our stream

        def cut_and_decode(row: dict) -> dict:
            sample = {k: v for k, v in row.items() if v is not None}
            clip = cutter.cut(sample, 1, 0)
            rgb, flow, _ = decode_clip(clip)
            return {"rgb": rgb, "flow": flow, "label": clip.label, "video_id": clip.video_id}

        paths = sorted(str(p) for p in shards.glob("train-*.tar"))
        dataset = ray.data.read_webdataset(paths, decoder=None).map(cut_and_decode)
        splits = dataset.streaming_split(WORLD, equal=True)
        built = time.perf_counter() - start

        def epoch(rank):
            return [v for batch in splits[rank].iter_batches(
                batch_size=cfg.data.batch_size_per_worker, batch_format="numpy", drop_last=True)
                for v in batch["video_id"]]

        run_ranks(epoch)  # warm-up
        seconds, seen = run_ranks(epoch)
        ray.shutdown()
    batches = [len(s) // cfg.data.batch_size_per_worker for s in seen]
    clips = sum(len(s) for s in seen)
    return [RAY_ROW, f"{built:.2f}",
            f"{clips / seconds:.1f}", " / ".join(map(str, batches)),
            len({v for s in seen for v in s}), f"{memory.peak / 2**20:.0f}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=60)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--per-shard", type=int, default=6)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.row:  # one row, in this process (main runs each row as a child process)
        cfg = config(args.shards, args, **json.loads(args.overrides))
        row = (ray_data_row(cfg, args.shards) if args.row == RAY_ROW
               else our_loader_row(args.row, cfg))
        print("ROW " + json.dumps(row))
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards, _ = write_dataset(Path(tmp), args.videos, args.frames, args.height, args.width,
                                  args.per_shard)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                   "--directory", str(shards), str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = []
        try:
            time.sleep(1.0)
            for name, overrides in [
                ("random access (index files)", {}),
                ("stream, file", {"data.access": "stream"}),
                ("stream, HTTP", {"data.access": "stream",
                                  "data.stream_url": f"http://127.0.0.1:{port}/{{name}}"}),
                (RAY_ROW, {}),
            ]:
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.stream_access", "--row", name, "--shards",
                     str(shards), "--overrides", json.dumps(overrides),
                     *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                       if k in ("size", "batch")]],
                    capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.split("ROW ", 1)[1]))
                print(rows[-1], flush=True)
        finally:
            server.terminate()
            server.wait()
    header = ["reader (2 ranks at once)", "build (s)", "clips/s", "batches per rank",
              f"videos seen (of {args.videos})", "peak memory (MiB)"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        setup = (f"{args.videos} videos x {args.frames} frames {args.height}x{args.width}, "
                 f"{args.per_shard} per shard; clips T=5, L=10, {args.size} px, batch "
                 f"{args.batch} per rank, 1 loader process per rank (Ray: 2 CPUs)")
        write_section("stream_access", f"## Streaming: WebDataset stream vs Ray Data\n\n"
                      f"`python -m benchmarks.stream_access` ({setup}).\n\n{table}\n\n{NOTES}")


if __name__ == "__main__":
    main()
