"""How start-up time, memory and throughput of the shard loaders grow with the size of a split.

Writes synthetic shard sets with the real member layout (json + one RGB JPEG per frame + flow x/y
JPEGs per field, ``pipelines.sample_encoding.sample_members``; tars and ``.tar.idx`` index files by
the shard writer's ``write_tar``) at fractions of UCF101's member count: 13,320 videos averaging
186 frames, i.e. 557 members per video and ~7.4 M members at 1/1, 64 videos per shard. The payload
is one tiny JPEG reused (32x32 RGB, 32x32 grey for flow): only the layout and the counts matter.

Per size, each measurement runs in a fresh process (one process = one rank):

* import RSS: resident memory after ``from pipelines.loaders import build_loader``;
* index: wall and CPU seconds to build the split's ``ShardIndex`` and the resident memory it adds
  (VmRSS after minus before, and the peak), its size pickled (what DALI's workers receive), bytes
  per member;
* first batch: from ``build_loader`` (index included) to the first batch of the CPU loader;
* steps/s: the following ``--steps`` batches, random access (``data.access`` random), and the
  streaming mode when the config has it (``data.access: stream``), else "not yet".

"cold-ish": the set's files are evicted from the page cache with ``posix_fadvise(DONTNEED)``
before the process starts (no root needed; a hypervisor's cache may still hold them). "hot": the
same process again right after, with the index files in the page cache.

Growth: a least-squares fit of ``log(value) = a + b log(members)`` over the measured sizes; ``b``
is the exponent (1 = linear, 0 = flat), and the fit projects each figure to a Kinetics-400-sized
split (~240,000 videos, ~216 M members).

    .venv/bin/python -m benchmarks.scale                  # 1/100, 1/10, 1/1 (~12 GB in --root)
    .venv/bin/python -m benchmarks.scale --quick          # two tiny sets, seconds, no RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UCF101_VIDEOS = 13_320
MEAN_FRAMES = 186  # UCF101's mean frame count
KINETICS_VIDEOS = 240_000
KINETICS_MEMBERS = 216_000_000
PER_SHARD = 64
SIZE = 32  # frame height and width of the tiny JPEGs

COLUMNS = [
    "size", "videos", "members", "shards", "GB on disk", "cache", "import RSS MB",
    "index s (wall)", "index s (CPU)", "index RSS MB", "index peak MB", "bytes/member (RSS)",
    "index pickled MB", "first batch s", "steps/s random", "first batch s (stream)",
    "steps/s stream",
]


def members_per_video(frames: int) -> int:
    return 1 + frames + 2 * (frames - 1)  # json, RGB frames, flow x/y fields


def frame_counts(videos: int) -> list[int]:
    """A deterministic spread of 136..236 frames around UCF101's mean of 186."""
    return [MEAN_FRAMES - 50 + (i * 37) % 101 for i in range(videos)]


# -- the shard sets ---------------------------------------------------------------------------


def write_set(folder: Path, videos: int) -> dict:
    """``videos`` synthetic videos as shards + index files + manifest in ``folder`` (reused when
    its manifest says it holds exactly that); returns the manifest."""
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params", {}).get("scale_videos") == videos:
            return manifest
    import cv2
    import numpy as np

    from pipelines.sample_encoding import sample_members
    from pipelines.shard_format import FORMAT_VERSION, shard_name
    from pipelines.shard_writer import write_tar

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rgb = cv2.imencode(".jpg", np.full((SIZE, SIZE, 3), (40, 120, 200), np.uint8))[1].tobytes()
    grey = cv2.imencode(".jpg", np.full((SIZE, SIZE), 128, np.uint8))[1].tobytes()
    classes = [f"class{c:03d}" for c in range(101)]
    counts = frame_counts(videos)
    shards = []
    for start in range(0, videos, PER_SHARD):
        samples = []
        for v in range(start, min(start + PER_SHARD, videos)):
            key, n = f"v_{classes[v % 101]}_g{v // 101:03d}_c01", counts[v]
            meta = {"video_id": key, "label": v % 101, "class_name": classes[v % 101],
                    "split": "train", "num_frames": n, "fps": 25.0, "height": SIZE,
                    "width": SIZE, "flow_height": SIZE, "flow_width": SIZE, "flow_bound": 20.0,
                    "flow_method": "tvl1", "source": f"{classes[v % 101]}/{key}.avi"}
            samples.append(sample_members(key, [rgb] * n, [(grey, grey)] * (n - 1), meta))
        name = shard_name("train", 0, len(shards))
        write_tar(folder / name, samples)
        shards.append({"name": name, "samples": len(samples)})
    manifest = {"format": FORMAT_VERSION, "dataset": "scale-benchmark", "classes": classes,
                "class_families": {}, "splits": {"train": {"samples": videos, "shards": shards}},
                "unused": 0, "params": {"scale_videos": videos}, "versions": {}, "failures": []}
    manifest_path.write_text(json.dumps(manifest))  # last: a set without it is incomplete
    return manifest


def drop_page_cache(folder: Path) -> None:
    """Evict the set's files from the page cache (clean pages only; no root needed)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir())


# -- one rank's measurements (run in a fresh process) ------------------------------------------


def _rss_mb() -> float:
    """Resident MB now, after handing freed heap back to the OS (glibc keeps it otherwise, and
    the index files' parsed JSON is freed right after each shard)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rank(folder: Path, access: str, steps: int, batch: int) -> dict:
    """What one rank pays for ``folder``'s train split (see the module docstring)."""
    import pickle

    rss_start = _rss_mb()
    import pipelines.loaders as loaders
    from cluster.config import load_config

    out = {"import_mb": _rss_mb(), "python_mb": rss_start}
    original = loaders.ShardIndex

    class TimedIndex(original):  # the index build inside build_loader, timed on its own
        def __init__(self, *args, **kwargs):
            rss, peak = _rss_mb(), _peak_mb()
            wall, cpu = time.perf_counter(), time.process_time()
            super().__init__(*args, **kwargs)
            out["index_s"] = time.perf_counter() - wall
            out["index_cpu_s"] = time.process_time() - cpu
            out["index_mb"] = _rss_mb() - rss
            out["index_peak_mb"] = max(0.0, _peak_mb() - peak)

    loaders.ShardIndex = TimedIndex
    items = [f"data.shards={folder}", f"data.batch_size_per_worker={batch}",
             "data.loader_workers=0", "data.train_split=train", "sampling.input_size=32",
             "sampling.train_positions=5", "sampling.stride_min=5", "sampling.stride_max=15",
             "model.flow_length=10"]
    cfg = load_config(None, items)
    out["has_access"] = hasattr(cfg.data, "access")  # the streaming mode exists in this tree
    if access != "random":
        if not hasattr(cfg.data, "access"):
            out["steps_per_s"] = None
            return out
        cfg = load_config(None, items + [f"data.access={access}"])
    start = time.perf_counter()
    loader = loaders.build_loader(cfg, "train", 0, 1, backend="cpu")
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    out["first_batch_s"] = time.perf_counter() - start
    start, done = time.perf_counter(), 0
    for _ in range(steps):
        if next(batches, None) is None:
            break
        done += 1
    out["steps_per_s"] = done / (time.perf_counter() - start)
    index = getattr(getattr(loader, "source", None), "index", None)
    if index is not None:
        index.__class__ = original  # the timing subclass is local: pickle it as what it is
        out["pickled_mb"] = len(pickle.dumps(index)) / 2**20
    out["rss_mb"] = _rss_mb()
    return out


def run_rank(folder: Path, access: str, steps: int, batch: int) -> dict:
    """``measure_rank`` in a fresh interpreter (clean memory figures, one process per rank)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--rank", str(folder), "--access", access,
         "--steps", str(steps), "--batch", str(batch)],
        capture_output=True, text=True, env=env, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def import_costs(quick: bool) -> list[list]:
    """Resident MB after importing each module alone, in a fresh interpreter."""
    rows = []
    modules = ["pipelines.loaders.shard_reader", "pipelines.loaders"] + ([] if quick else [
        "pipelines.loaders.clips", "torch"])
    for module in modules:
        code = (f"import {module}; "
                "print(next(int(l.split()[1]) for l in open('/proc/self/status') "
                "if l.startswith('VmRSS:')) / 1024)")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, check=True)
        rows.append([f"`import {module}`", f"{float(done.stdout):.0f}"])
    return rows


# -- the table and the projection --------------------------------------------------------------


def _least_squares(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through ``points``."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def fit(members: list[float], values: list[float | None],
        rate: bool = False) -> tuple[float, float] | None:
    """(exponent b, value at KINETICS_MEMBERS), or None without 2 points. The exponent is the
    slope of log v against log n (1 = linear, 0 = flat, > 1 worse than linear); the projection
    is a straight line v = c + k n through the points (a fixed cost plus a cost per member,
    which log-log extrapolation from small sets with a large fixed cost would understate),
    or, for a ``rate`` (steps/s: the split's size does not enter a step, so a slope is load
    noise, and extrapolated 30x it says nothing), its value at the largest set."""
    pairs = [(n, v) for n, v in zip(members, values) if v and v > 0]
    if len(pairs) < 2:
        return None
    _, b = _least_squares([(math.log(n), math.log(v)) for n, v in pairs])
    if rate:
        return b, pairs[-1][1]
    c, k = _least_squares(pairs)
    return b, max(0.0, c + k * KINETICS_MEMBERS)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "not yet"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        rank, stream = r["rank"], r.get("stream")
        rows.append([
            r["label"], f"{r['videos']:,}", f"{r['members']:,}", r["shards"],
            _fmt(r["disk_gb"]), r["cache"], _fmt(rank["import_mb"], 0), _fmt(rank["index_s"]),
            _fmt(rank["index_cpu_s"]), _fmt(rank["index_mb"], 1), _fmt(rank["index_peak_mb"], 1),
            _fmt(rank["index_mb"] * 2**20 / r["members"], 1), _fmt(rank.get("pickled_mb"), 1),
            _fmt(rank["first_batch_s"]), _fmt(rank["steps_per_s"], 1),
            _fmt(None if stream is None else stream.get("first_batch_s")),
            _fmt(None if stream is None else stream.get("steps_per_s"), 1),
        ])
    return rows


PROJECTED = [  # (name, key in the rank's results, unit)
    ("index build, wall (hot)", "index_s", "s"),
    ("index build, CPU (hot)", "index_cpu_s", "s"),
    ("index RSS per rank", "index_mb", "MB"),
    ("index pickled (per DALI worker)", "pickled_mb", "MB"),
    ("time to first batch (hot)", "first_batch_s", "s"),
    ("steps/s random access (hot)", "steps_per_s", "steps/s"),
]


def projection_rows(results: list[dict]) -> list[list[str]]:
    hot = [r for r in results if r["cache"] == "hot"]
    members = [r["members"] for r in hot]
    rows = []
    for name, key, unit in PROJECTED:
        values = [r["rank"].get(key) for r in hot]
        got = fit(members, values, rate=key == "steps_per_s")
        if got is None:
            rows.append([name, unit, "–", "–", "–"])
            continue
        b, projected = got
        growth = "flat" if abs(b) < 0.2 else "linear" if abs(b - 1) < 0.2 else (
            "worse than linear" if b > 1 else "sub-linear")
        if key == "steps_per_s":
            growth += "; not projected: load noise"
        rows.append([name, unit, f"{b:.2f} ({growth})", _fmt(values[-1]), _fmt(projected)])
    return rows


PROJECTION_HEADER = ["figure", "unit", "exponent b (growth)", "at the largest set measured",
                     f"projected: Kinetics-400 size ({KINETICS_MEMBERS / 1e6:.0f} M members)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="where the sets are written (default: a temporary folder)")
    parser.add_argument("--fractions", default="0.01,0.1,1",
                        help="sizes as fractions of UCF101's member count")
    parser.add_argument("--quick", action="store_true",
                        help="two tiny sets (1/2000, 1/500), 3 steps: seconds; no RESULTS.md")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the sets for another run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--json", type=Path, help="also save the raw results here")
    parser.add_argument("--before", default="",
                        help="comma-separated --json files of the same benchmark run on an "
                             "earlier tree: shown as a 'before' table in RESULTS.md")
    parser.add_argument("--before-label", default="before", help="what the earlier tree was")
    parser.add_argument("--note", default="", help="a sentence for RESULTS.md about this run")
    parser.add_argument("--render", default="",
                        help="comma-separated --json files: write the table from these results "
                             "(measured earlier, e.g. sizes in separate runs) instead of measuring")
    parser.add_argument("--rank", type=Path, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--access", default="random", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank:
        print(json.dumps(measure_rank(args.rank, args.access, args.steps, args.batch)))
        return 0
    if args.quick:
        args.fractions, args.steps, args.batch, args.no_write = "0.0005,0.002", 3, 2, True

    root = args.root or Path(tempfile.mkdtemp(prefix="stresnet-scale-"))
    results = [r for path in filter(None, args.render.split(",")) for r in json.loads(Path(path).read_text())]
    if args.render:
        args.fractions = ",".join(sorted({r["label"] for r in results}, key=lambda l: -len(l)))
    try:
        for fraction in [] if args.render else [float(f) for f in args.fractions.split(",")]:
            videos = max(1, round(UCF101_VIDEOS * fraction))
            folder = root / f"ucf101x{fraction:g}"
            start = time.perf_counter()
            manifest = write_set(folder, videos)
            print(f"set 1/{1 / fraction:g}: {videos} videos ready after "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
            members = sum(members_per_video(n) for n in frame_counts(videos))
            base = {"label": f"1/{1 / fraction:g}", "videos": videos, "members": members,
                    "shards": len(manifest["splits"]["train"]["shards"]),
                    "disk_gb": disk_bytes(folder) / 1e9}
            for cache in ("hot",) if args.quick else ("cold-ish", "hot"):
                if cache == "cold-ish":
                    drop_page_cache(folder)
                rank = run_rank(folder, "random", args.steps, args.batch)
                stream = (run_rank(folder, "stream", args.steps, args.batch)
                          if rank["has_access"] else None)
                results.append({**base, "cache": cache, "rank": rank, "stream": stream})
                print(markdown_table(COLUMNS, table_rows(results[-1:])).splitlines()[-1],
                      flush=True)
            if not args.keep and args.root is None:
                shutil.rmtree(folder)
    finally:
        if args.root is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    table = markdown_table(COLUMNS, table_rows(results))
    projection = markdown_table(PROJECTION_HEADER, projection_rows(results))
    imports = markdown_table(["import alone", "RSS MB"], import_costs(args.quick))
    print(table + "\n\n" + projection + "\n\n" + imports)
    before = ""
    if args.before:
        earlier = [r for path in args.before.split(",") for r in json.loads(Path(path).read_text())]
        before = (f"\n**Before** ({args.before_label}), same sets:\n\n"
                  f"{markdown_table(COLUMNS, table_rows(earlier))}\n\n"
                  f"{markdown_table(PROJECTION_HEADER, projection_rows(earlier))}\n")
        print(before)
    if not args.no_write:
        write_section("scale", section(args, table, projection, imports) + before)
    return 0


def section(args, table: str, projection: str, imports: str) -> str:
    return (
        f"### Scale: start-up, memory and throughput against split size (`benchmarks/scale.py`)\n\n"
        f"Synthetic train splits with UCF101's layout (557 members per video on average, 64 videos"
        f" per shard, one tiny JPEG reused) at fractions {args.fractions} of UCF101's ~7.4 M "
        f"members; one process = one rank, CPU loader, 0 workers, batch {args.batch}, T=5, L=10, "
        f"{args.steps} steps timed after the first batch. cold-ish = the set's files evicted "
        f"from the page cache (`posix_fadvise`) before the process started; hot = run again "
        f"right after. Index RSS = VmRSS after the `ShardIndex` build minus before (freed heap "
        f"returned with `malloc_trim` first); index pickled = what each DALI worker process "
        f"receives. Load average at the end: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (the machine is shared: wall times are inflated by other "
        f"jobs, CPU seconds are this process's own).\n\n"
        f"{args.note + ' ' if args.note else ''}"
        f"What the numbers say and what changed: docs/loaders.md, \"At scale\".\n\n"
        f"{table}\n\nGrowth, fitted over the hot rows (log-log least squares), projected to a "
        f"Kinetics-400-sized split:\n\n{projection}\n\nResident memory of a fresh interpreter "
        f"after one import:\n\n{imports}\n"
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    from benchmarks.results import markdown_table as table

    return table(header, rows)


def write_section(name: str, markdown: str) -> None:
    from benchmarks.results import write_section as write

    write(name, markdown)


if __name__ == "__main__":
    sys.exit(main())
