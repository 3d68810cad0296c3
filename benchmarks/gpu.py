"""One-command GPU check: can the DALI loader feed an ST-ResNet-50 on this card?

    python -m benchmarks.gpu                          # on one GPU: every figure, ~5 minutes
    .venv/bin/python -m benchmarks.gpu --device cpu --quick   # the same code paths, tiny sizes

Measures, on UCF101-shaped shards written on the fly (341x256 frames, T=5, L=10: 105 JPEGs per
clip; ``--quick``: tiny frames and counts):

1. **Parity**: two epochs of the DALI loader (``mixed`` = nvJPEG on the GPU) against the CPU
   loader: the same clips, pixel differences in grey levels (target <= 3), the batches are on the
   device, and the packed hand-over decodes to exactly the pixels of one array per JPEG.
2. **Loader throughput**: clips/s with 1 vs 4 Python workers and batch 8 vs 32; the training
   process's main-thread CPU per clip next to its whole-process CPU per clip (decoding threads
   included: a large gap means decoding fell back to the CPU); the longest wait for the first
   batch of an epoch; device memory in use.
3. **Decode only**: JPEG/s of the loader's decoder (crop decode of the packed batch) at
   ``hw_decoder_load`` 0 / 0.65 / 1.0, against the 105,000 JPEG/s that 1,000 clips/s needs.
4. **Training step**: bf16 clips/s and model FLOP utilisation of ST-ResNet-50 next to two
   torchvision ResNet-50s on the frames (``benchmarks/model.py``).
5. **Ray Train**: the tiny config for real on one GPU worker (NCCL; ``--device cpu``: gloo),
   loading with DALI.

Every section catches its own failure and reports it as a row, so one run always yields the whole
table; it goes into ``benchmarks/RESULTS.md`` under the card's name (``--no-write``: print only;
``--quick`` never writes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.loaders import measure, repeat_split, write_dataset
from benchmarks.results import machine, markdown_table, write_section
from pipelines.loaders import build_loader
from pipelines.loaders.dali import read_batch
from cluster.config import RunConfig, dump_config, load_config
from stresnet.sampling import FLOW_SCALE, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "tiny.yaml"
JPEGS_PER_CLIP = 105  # T=5 RGB frames + 5 stacks of 2L=20 flow fields
TARGET_CLIPS = 1000  # what an H200 training ST-ResNet-50 wants, order of magnitude


class Report:
    """Rows of (section, figure, value); a failing section adds its error instead."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(self, section: str, figure: str, value: str) -> None:
        print(f"[{section}] {figure}: {value}", flush=True)
        self.rows.append([section, figure, value])

    @contextlib.contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        except Exception as err:  # report and go on: one run must give the whole table
            traceback.print_exc()
            self.add(name, "FAILED", f"{type(err).__name__}: {str(err)[:200]}")
        print(f"[{name}] took {time.perf_counter() - start:.0f}s", flush=True)


def device_memory_used() -> float:
    """GiB in use on the device (every allocator: DALI's, PyTorch's, nvJPEG's)."""
    if not torch.cuda.is_available():
        return float("nan")
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def loader_config(shards: Path, args: argparse.Namespace, workers: int, batch: int) -> RunConfig:
    return load_config(None, [
        f"data.shards={shards}", f"data.batch_size_per_worker={batch}",
        f"data.loader_workers={workers}",
        f"data.dali_device={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"sampling.input_size={args.size}", "sampling.train_positions=5", "sampling.stride_min=1",
        "sampling.stride_max=5", "model.flow_length=10", "data.train_split=many",
        "data.val_split=many", f"eval.batch_size_per_worker={batch}",
    ])


def check_parity(report: Report, shards: Path, args: argparse.Namespace) -> None:
    cfg = loader_config(shards, args, workers=2, batch=8)
    cfg = replace(cfg, data=replace(cfg.data, train_split="train"))
    cpu = build_loader(cfg, "train", 0, 1, backend="cpu")
    dali = build_loader(cfg, "train", 0, 1, backend="dali")
    worst_rgb = worst_flow = 0.0
    clips, on_device = 0, True
    for epoch in (0, 1):  # across an epoch boundary
        cpu.set_epoch(epoch)
        dali.set_epoch(epoch)
        for a, b in zip(cpu, dali, strict=True):
            if a["video_id"] != b["video_id"]:
                raise RuntimeError(f"epoch {epoch}: clips differ: {a['video_id']} {b['video_id']}")
            on_device &= b["rgb"].device.type == ("cuda" if args.device == "cuda" else "cpu")
            rgb = (a["rgb"] - b["rgb"].float().cpu()).abs() * 255 * max(IMAGENET_STD)
            flow = (a["flow"] - b["flow"].float().cpu()).abs() * FLOW_SCALE
            worst_rgb = max(worst_rgb, float(rgb.max()))
            worst_flow = max(worst_flow, float(flow.max()))
            clips += len(b["video_id"])
    # packed rows vs one array per JPEG: the same decoder input, so identical pixels
    per_sample = build_loader(cfg, "train", 0, 1, backend="dali")
    per_sample.packed = False
    for loader in (dali, per_sample):
        loader.set_epoch(2)
    identical = all(
        torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["flow"], b["flow"])
        for a, b in zip(dali, per_sample, strict=True)
    )
    report.add("parity", "packed vs per-sample hand-over: identical pixels",
               "yes" if identical else "NO")
    verdict = "ok" if max(worst_rgb, worst_flow) <= 3 else "FAILS (> 3 grey levels)"
    report.add("parity", f"DALI vs CPU loader, {clips} clips, 2 epochs: max |diff| RGB / flow",
               f"{worst_rgb:.2f} / {worst_flow:.2f} grey levels: {verdict}")
    report.add("parity", "DALI batches on the device", "yes" if on_device else "NO")


def loader_grid(report: Report, shards: Path, args: argparse.Namespace) -> None:
    for workers in args.workers:
        for batch in args.batches:
            cfg = loader_config(shards, args, workers, batch)
            before = device_memory_used()
            loader = build_loader(cfg, "many", 0, 1, backend="dali")
            result = measure(loader, args.epochs)
            used = device_memory_used()
            name = f"{workers} workers, batch {batch}"
            report.add("loader", f"{name}: clips/s", f"{result['rate']:.0f}")
            report.add("loader", f"{name}: CPU ms/clip main thread / whole process",
                       f"{result['main_ms']:.3f} / {result['cpu_ms']:.2f}")
            report.add("loader", f"{name}: first batch / longest epoch change (s)",
                       f"{result['first']:.2f} / {result['epoch_change']:.2f}")
            if args.device == "cuda":
                report.add("loader", f"{name}: device memory in use (GiB, loader's share)",
                           f"{used:.2f} ({used - before:+.2f})")
            del loader


def decode_only(report: Report, shards: Path, args: argparse.Namespace) -> None:
    """JPEG/s of the loader's decoders alone (RGB frames in colour, flow fields in grey, crops
    only), on one packed batch of 32 clips fed again and again."""
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.loaders.clips import ClipSource
    from pipelines.loaders.dali import _BatchReader, output_names
    from pipelines.loaders.schedule import Schedule
    from pipelines.loaders.shard_reader import ShardIndex

    cfg = loader_config(shards, args, workers=0, batch=32)
    index = ShardIndex(shards, "many")
    source = ClipSource(cfg, index)
    requests = Schedule(len(index), 32, 0, 1, cfg.seed)(0)[0]
    reader = _BatchReader(source, None, None)
    batch = dict(zip(output_names(source, reader.sizes_vary),
                     reader.outputs(read_batch(source, requests))))
    gpu = args.device == "cuda"
    for load in (0.0, 0.65, 1.0):
        @pipeline_def(batch_size=len(batch["jpegs"]), num_threads=args.decode_threads,
                      device_id=0 if gpu else None, prefetch_queue_depth=2)
        def decode():
            names = ("jpegs", "anchor", "shape", "is_rgb")
            data, anchor, shape, is_rgb = (
                fn.external_source(_constant(batch[name]), batch=True, no_copy=True)
                for name in names)
            halves = [fn._conditional.split(x, predicate=is_rgb) for x in (data, anchor, shape)]
            hints = {"hw_decoder_load": load} if gpu else {}
            outputs = []
            for half, colour in ((0, types.RGB), (1, types.GRAY)):
                outputs.append(fn.decoders.image_slice(
                    halves[0][half], halves[1][half], halves[2][half],
                    axis_names="WH", normalized_anchor=False, normalized_shape=False,
                    output_type=colour, jpeg_fancy_upsampling=True,
                    device="mixed" if gpu else "cpu", **hints))
            return tuple(outputs)

        pipe = decode()
        pipe.build()
        for _ in range(2):
            pipe.run()
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            pipe.run()
            runs += 1
        if gpu:
            torch.cuda.synchronize()
        rate = runs * len(batch["jpegs"]) / (time.perf_counter() - start)
        need = TARGET_CLIPS * JPEGS_PER_CLIP
        report.add("decode", f"hw_decoder_load {load}: JPEG/s ({args.decode_threads} CPU threads)",
                   f"{rate:,.0f} ({rate / need:.2f}x the {need:,} that {TARGET_CLIPS} clips/s "
                   f"need)")
        del pipe


def _constant(value):
    """An external source that hands over ``value`` every iteration (takes no argument)."""
    return lambda: value


def training_step(report: Report, args: argparse.Namespace) -> None:
    from benchmarks import model as bench

    wanted = ("two ResNet-50s (torchvision)", "ST-ResNet-50")
    makers = bench.variants(101, 10)
    models = {name: makers[name]() for name in wanted}
    settings = SimpleNamespace(
        device=args.device, bf16=args.device == "cuda", size=args.step_size, frames=5,
        flow_length=10, batch=args.step_batch, num_classes=101, iters=args.step_iters,
        warmup=1,
    )
    torch.backends.cudnn.benchmark = True
    results = bench.measure(models, settings)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else ""
    peak = next((v for k, v in bench.PEAK_TFLOPS.items() if k in name), None)
    for model_name, r in results.items():
        achieved = r["flops_per_clip"] * r["clips_per_s"] / 1e12
        mfu = f", MFU {100 * achieved / peak:.1f} %" if peak else ""
        report.add("train step", f"{model_name}, {'bf16' if settings.bf16 else 'fp32'} "
                   f"{args.step_size}px batch {args.step_batch}: clips/s",
                   f"{r['clips_per_s']:.1f} ({r['flops_per_clip'] / 1e9:.0f} GFLOP/clip{mfu})")


def ray_run(report: Report, folder: Path, args: argparse.Namespace) -> None:
    gpu = args.device == "cuda"
    cfg = load_config(TINY, [
        f"dataset.root={folder / 'videos'}", f"shards.output={folder / 'shards'}",
        f"data.shards={folder / 'shards'}", f"train.storage_path={folder / 'runs'}",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", f"eval.output={folder / 'eval'}",
        "cluster.num_workers=1", f"cluster.use_gpu={str(gpu).lower()}", "data.backend=dali",
        f"data.dali_device={'gpu' if gpu else 'cpu'}", "train.global_batch_size=11",
        *([] if not args.quick else ["train.epochs=2", "train.validate_every=2"]),
    ])
    config = folder / "tiny.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, config)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for command in ("shards", "train"):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cluster.cli", command, "--config",
                               str(config)], capture_output=True, text=True, env=env, timeout=420)
        took = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"stresnet {command} failed ({done.returncode}): "
                               f"{done.stderr.strip().splitlines()[-1:]}")
    backend = "NCCL, 1 GPU worker" if gpu else "gloo, 1 CPU worker"
    last = [line for line in done.stdout.splitlines() if " loss " in line][-1:]
    report.add("ray train", f"tiny config, {backend}, DALI loader: train wall time",
               f"{took:.0f}s, ok; last step: {last[0].strip() if last else '?'}"[:200])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this process sees no CUDA device (try --device cpu --quick)")
    full = not args.quick
    args.videos, args.frames = (64, 48) if full else (4, 12)
    args.height, args.width, args.size = (256, 341, 224) if full else (40, 52, 32)
    args.repeat = 16 if full else 2
    args.workers, args.batches = ([1, 4], [8, 32]) if full else ([1, 2], [2, 4])
    args.epochs, args.seconds = (2, 5.0) if full else (1, 0.5)
    args.decode_threads = min(8, len(os.sched_getaffinity(0)))
    args.step_size, args.step_batch, args.step_iters = (224, 8, 5) if full else (16, 1, 1)
    torch.set_num_threads(min(4, args.decode_threads))

    report = Report()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="stresnet-gpu-"))
    try:
        shards, _ = write_dataset(root, args.videos, args.frames, args.height, args.width, 16)
        repeat_split(shards, "train", "many", args.repeat)
        print(f"wrote {args.videos} videos in {time.perf_counter() - started:.0f}s", flush=True)
        with report.section("parity"):
            check_parity(report, shards, args)
        with report.section("loader"):
            loader_grid(report, shards, args)
        with report.section("decode"):
            decode_only(report, shards, args)
        with report.section("train step"):
            training_step(report, args)
        with report.section("ray train"):
            ray_run(report, root / "tiny", args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started
    table = markdown_table(["section", "figure", "value"], report.rows)
    setup = (
        f"`{' '.join(['python -m benchmarks.gpu', *(sys.argv[1:] if argv is None else argv)])}`"
        f" on {machine()}: {args.videos} synthetic videos x {args.frames} frames of "
        f"{args.width}x{args.height}, crops resized to {args.size}, T=5, L=10 (105 JPEGs per "
        f"clip); loader rows read the training split {args.repeat} times per epoch, "
        f"{args.epochs} timed epochs after a warm-up epoch. Whole check: {total:.0f}s."
    )
    text = f"### GPU check (`benchmarks/gpu.py`)\n\n{setup}\n\n{table}"
    print("\n" + text)
    if not args.no_write and not args.quick:
        write_section("gpu", text)
    failed = [row for row in report.rows if row[1] == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
