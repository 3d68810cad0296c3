"""What the spatiotemporal machinery costs: ST-ResNet-50 vs two plain 2D ResNet-50s.

Forward + backward of one training step (both streams' cross-entropy losses summed) on the same
clips, same machine, same run. Rows:

* ``two ResNet-50s (torchvision)``: the baseline, torchvision's resnet50 on the B*T RGB frames and
  a second one (conv1 with 2L inputs) on the flow stacks, logits averaged over time.
* ``late fusion (ours, 2D)``: our streams with every switch off: shows the clip plumbing is free.
* ``+ temporal convs``, ``+ cross-stream``: one mechanism each.
* ``ST-ResNet-50``: the full model (stage-1 config: both mechanisms, no temporal pooling).
* ``ST-ResNet-50, zero time padding``: the authors' padding; replicate padding (the default)
  keeps a padded copy of each temporal conv's input for the backward pass.

Measured per clip: median wall time of a step; FLOPs of a step (``FlopCounterMode``); memory.
Memory on CPU is the bytes of tensors autograd keeps for the backward pass (deduplicated by
storage, via ``saved_tensors_hooks``): the activation memory a training step needs on any device,
exactly and repeatably, which RSS deltas on a shared CPU machine are not. On CUDA it is also the
allocator's peak (``torch.cuda.max_memory_allocated``) minus the memory held before the step.

    .venv/bin/python -m benchmarks.model                       # CPU: 112 px, T=5, batch 1
    python -m benchmarks.model --device cuda --bf16 --size 224 --batch 8   # + clips/s and MFU

Time on CPU is the process's CPU time with one thread (``time.process_time``): the machine this
was written on is shared, and its wall times swing by 2x between identical steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.results import markdown_table, write_section
from cluster.config import load_config
from stresnet.model import build_model

# Dense bf16 tensor-core peak (TFLOP/s) for the model FLOP utilisation column.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


class TwoTorchvisionResNets(nn.Module):
    """The baseline: two independent torchvision ResNet-50s, per-frame logits averaged over T."""

    def __init__(self, num_classes: int, flow_channels: int) -> None:
        super().__init__()
        self.appearance = torchvision.models.resnet50(num_classes=num_classes)
        self.motion = torchvision.models.resnet50(num_classes=num_classes)
        self.motion.conv1 = nn.Conv2d(flow_channels, 64, 7, 2, 3, bias=False)

    def forward(self, rgb: Tensor, flow: Tensor) -> dict[str, Tensor]:
        b, t = rgb.shape[:2]
        return {
            "appearance": self.appearance(rgb.flatten(0, 1)).unflatten(0, (b, t)).mean(1),
            "motion": self.motion(flow.flatten(0, 1)).unflatten(0, (b, t)).mean(1),
        }


def variants(num_classes: int, flow_length: int) -> dict[str, Callable[[], nn.Module]]:
    def ours(*overrides: str) -> Callable[[], nn.Module]:
        base = [f"model.num_classes={num_classes}", f"model.flow_length={flow_length}"]
        return lambda: build_model(load_config(None, base + list(overrides)).model)

    return {
        "two ResNet-50s (torchvision)": lambda: TwoTorchvisionResNets(num_classes, 2 * flow_length),
        "late fusion (ours, 2D)": ours("model.mode=late_fusion", "model.temporal.stages=[]"),
        "+ temporal convs": ours("model.mode=late_fusion"),
        "+ cross-stream": ours("model.temporal.stages=[]"),
        "ST-ResNet-50": ours(),
        "ST-ResNet-50, zero time padding": ours("model.temporal.padding=zero"),
    }


def step(model: nn.Module, rgb: Tensor, flow: Tensor, label: Tensor, bf16: bool) -> None:
    with torch.autocast(rgb.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(rgb, flow)
        loss = F.cross_entropy(out["appearance"], label) + F.cross_entropy(out["motion"], label)
    loss.backward()


def saved_bytes(model: nn.Module, rgb: Tensor, flow: Tensor, label: Tensor, bf16: bool) -> int:
    """Bytes of activations autograd saves for backward in one step (each storage once;
    parameters, resident anyway, excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, rgb, flow, label, bf16)
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def measure(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, dict]:
    """FLOPs, saved activations, then step times with the models taking turns, so that load from
    other processes on a shared machine hits every model alike."""
    device = torch.device(args.device)
    rgb = torch.randn(args.batch, args.frames, 3, args.size, args.size, device=device)
    flow = torch.randn(args.batch, args.frames, 2 * args.flow_length, args.size, args.size, device=device)
    label = torch.randint(0, args.num_classes, (args.batch,), device=device)
    results: dict[str, dict] = {}
    for name, model in models.items():
        model.to(device).train()
        if args.device == "cuda":
            model.to(memory_format=torch.channels_last)
        flops = FlopCounterMode(display=False)
        with flops:
            step(model, rgb, flow, label, args.bf16)
        model.zero_grad(set_to_none=True)
        results[name] = {"flops": flops.get_total_flops(),
                         "act": saved_bytes(model, rgb, flow, label, args.bf16), "times": []}

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    # CPU: seconds of CPU this process used, not wall time: on a shared machine other processes
    # stretch wall time at random, CPU time much less. CUDA: wall time after a synchronize.
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    for iteration in range(args.warmup + args.iters):
        for name, model in models.items():
            if args.device == "cuda":
                sync()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = clock()
            step(model, rgb, flow, label, args.bf16)
            sync()
            if iteration >= args.warmup:
                results[name]["times"].append(clock() - start)
            if args.device == "cuda":
                results[name]["peak"] = torch.cuda.max_memory_allocated() - before
            model.zero_grad(set_to_none=True)
    for r in results.values():
        seconds = statistics.median(r["times"])
        r.update(s_per_clip=seconds / args.batch, clips_per_s=args.batch / seconds,
                 flops_per_clip=r["flops"] / args.batch, act_per_clip=r["act"] / args.batch,
                 peak_per_clip=r["peak"] / args.batch if "peak" in r else None)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA path)")
    parser.add_argument("--size", type=int, default=112, help="frame side in pixels")
    parser.add_argument("--frames", type=int, default=5, help="T frames per clip")
    parser.add_argument("--batch", type=int, default=1, help="clips per step")
    parser.add_argument("--flow-length", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=101)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: CPU time then counts no spin-waiting)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="accelerator bf16 peak for MFU (default: known H100/H200/A100)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(0)
    peak_tflops = args.peak_tflops
    if args.device == "cuda" and peak_tflops is None:
        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    models = {name: make() for name, make in variants(args.num_classes, args.flow_length).items()}
    results = measure(models, args)
    for name, r in results.items():
        print(f"{name}: {1e3 * r['s_per_clip']:.1f} ms/clip, {r['flops_per_clip'] / 1e9:.1f} GFLOP/clip, "
              f"{r['act_per_clip'] / 2**20:.0f} MiB saved/clip", flush=True)

    base = results["two ResNet-50s (torchvision)"]
    time_label = "ms/clip" if args.device == "cuda" else "CPU ms/clip"
    header = ["model", time_label, "x time", "GFLOP/clip", "x FLOPs", "saved act. MiB/clip", "x act."]
    if args.device == "cuda":
        header += ["peak MiB/clip", "x peak", "clips/s", "MFU"]
    rows = []
    for name, r in results.items():
        row = [name, f"{1e3 * r['s_per_clip']:.1f}", f"{r['s_per_clip'] / base['s_per_clip']:.3f}",
               f"{r['flops_per_clip'] / 1e9:.1f}", f"{r['flops_per_clip'] / base['flops_per_clip']:.3f}",
               f"{r['act_per_clip'] / 2**20:.0f}", f"{r['act_per_clip'] / base['act_per_clip']:.3f}"]
        if args.device == "cuda":
            achieved = r["flops_per_clip"] * r["clips_per_s"] / 1e12
            mfu = f"{100 * achieved / peak_tflops:.1f} %" if peak_tflops else "n/a"
            row += [f"{r['peak_per_clip'] / 2**20:.0f}", f"{r['peak_per_clip'] / base['peak_per_clip']:.3f}",
                    f"{r['clips_per_s']:.1f}", mfu]
        rows.append(row)
    table = markdown_table(header, rows)
    st = results["ST-ResNet-50"]
    overhead = 100 * (st["s_per_clip"] / base["s_per_clip"] - 1)
    setup = (f"{args.device}{' bf16 autocast, channels_last' if args.device == 'cuda' else ' float32'}, "
             f"{args.size}x{args.size} px, T={args.frames}, L={args.flow_length}, batch {args.batch}, "
             f"median of {args.iters} steps after {args.warmup} warm-up (models taking turns), "
             f"{args.threads} CPU thread(s)"
             + ("" if args.device == "cuda" else "; time = CPU time of the process (time.process_time)"))
    text = (f"### ST-ResNet-50 vs two plain ResNet-50s (`python -m benchmarks.model "
            f"{' '.join(argv)}`)\n\n{setup}.\n\n{table}\n\n"
            f"ST machinery time overhead: **{overhead:+.1f} %** (target <= 15 %). "
            "`x` columns are ratios to the torchvision baseline. GFLOP = forward + backward "
            "(`FlopCounterMode`). Saved activations = bytes autograd keeps for the backward pass "
            "(each storage once, parameters excluded): the step's memory that grows with the "
            "clips" + ("; the CPU has no allocator peak counter that separates it from other "
                       "processes. A reduced input because this is a CPU; on a GPU run "
                       "`--device cuda --bf16 --size 224 --batch 8` for the full-size numbers, "
                       "clips/s and MFU." if args.device == "cpu" else
                       f"; peak = allocator peak during a step minus memory held before it. "
                       f"MFU against {peak_tflops} TFLOP/s bf16 dense."))
    print("\n" + text)
    if not args.no_write:
        write_section("model", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
