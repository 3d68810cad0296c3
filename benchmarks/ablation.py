"""Ablation: does each part of ST-ResNet do its job? Six models, same data, budget and seeds.

    .venv/bin/python benchmarks/ablation.py                  # the table in benchmarks/RESULTS.md
    .venv/bin/python benchmarks/ablation.py --quick          # smoke run: tiny data, a few steps
    .venv/bin/python benchmarks/ablation.py --device cuda    # the same on a GPU

Trains every model of ``MODELS`` with every seed on the bundled synthetic dataset
(``configs/synthetic/ablation.yaml``: data, recipe and budget), in-process on the CPU loader (no
Ray: one process per core, each running one (model, seed) at a time), then scores the test videos
(video-level top-1 per family, ``stresnet/families.py``). Each family can only be solved by one
part of the network (``pipelines/synthetic.py``), so the table shows what each part contributes:

- ``appearance`` / ``motion``: one stream alone, 2D (the base streams);
- ``late_fusion``: both streams, no cross-stream connections, no temporal convolutions;
- ``no_temporal``: ST-ResNet without temporal convolutions (cross-stream connections only);
- ``no_cross``: ST-ResNet without cross-stream connections (temporal convolutions only);
- ``full``: ST-ResNet.

Logged to MLflow as one parent run with one child run per (model, seed) (``--tracking-uri``,
experiment ``stresnet-ablation``), and written to section "ablation" of benchmarks/RESULTS.md
(``--results``) with the machine and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import machine, markdown_table, write_section  # noqa: E402

CONFIG = REPO / "configs" / "synthetic" / "ablation.yaml"

# Model name -> config overrides. Every model shares the rest of the config.
MODELS: dict[str, list[str]] = {
    "appearance": ["model.mode=appearance", "model.temporal.stages=[]"],
    "motion": ["model.mode=motion", "model.temporal.stages=[]"],
    "late_fusion": ["model.mode=late_fusion", "model.temporal.stages=[]"],
    "no_temporal": ["model.mode=st_resnet", "model.temporal.stages=[]"],
    "no_cross": ["model.mode=late_fusion"],
    "full": ["model.mode=st_resnet"],
}
# What each model is, for the table.
DESCRIPTIONS = {
    "appearance": "RGB stream alone (2D)",
    "motion": "flow stream alone (2D)",
    "late_fusion": "two streams, no connections (2D)",
    "no_temporal": "cross-stream connections, no temporal convs",
    "no_cross": "temporal convs, no cross-stream connections",
    "full": "ST-ResNet (both)",
}
# Relative cost of one training step, to start the longest jobs first.
COST = {"appearance": 1, "motion": 1, "late_fusion": 2, "no_temporal": 2, "no_cross": 2, "full": 2}

# --quick: a tiny dataset and a few steps; checks the plumbing, not the model.
QUICK = [
    "dataset.root=data/ablation-quick/videos", "shards.output=data/ablation-quick/shards",
    "data.shards=data/ablation-quick/shards",
    "dataset.synthetic.videos_per_class=4", "dataset.synthetic.video_frames=16",
    "dataset.synthetic.height=32", "dataset.synthetic.width=40",
    "dataset.synthetic.test_fraction=0.5", "shards.flow=farneback",
    "sampling.input_size=32", "sampling.test_positions=3", "sampling.stride_min=2",
    "sampling.stride_max=4", "data.batch_size_per_worker=4", "train.global_batch_size=4", "train.epochs=1",
    "train.steps_per_epoch=2", "train.lr_steps=[]",
]


# --------------------------------------------------------------------------------------------
# One (model, seed): train in-process, evaluate
# --------------------------------------------------------------------------------------------


def class_families(cfg, manifest: dict) -> dict[str, str]:
    """The class -> family map: the manifest's, else the synthetic generator's (shards made
    before manifests carried it)."""
    families = manifest.get("class_families")
    if families:
        return families
    if cfg.dataset.kind == "synthetic":
        from pipelines.synthetic import class_families as synthetic_families

        return synthetic_families(manifest["classes"])
    return {}


def train_and_evaluate(config: str, overrides: list[str], seed: int, device: str,
                       threads: int) -> dict:
    """Train one model as the config says (single process), score the test split.

    The loop is ``cluster/train.py``'s without Ray: the same loaders, learning rate schedule,
    per-step seeding and training step, on one worker.
    """
    import numpy as np
    import torch

    from pipelines.loaders import build_loader
    from pipelines.shard_format import read_manifest
    from cluster.config import load_config
    from stresnet.evaluate import collect_scores, video_report
    from stresnet.families import family_top1
    from stresnet.model import build_model
    from stresnet.train_step import (
        accumulation_steps, build_optimizer, forward_backward, learning_rate, set_learning_rate,
        step_seed,
    )

    torch.set_num_threads(threads)
    cfg = load_config(config, [*overrides, f"seed={seed}"])
    manifest = read_manifest(cfg.data.shards)
    classes = manifest["classes"]
    cfg = replace(cfg, model=replace(cfg.model, num_classes=len(classes)))
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(dev)
    optimizer = build_optimizer(model, cfg.train)
    loader = build_loader(cfg, cfg.data.train_split, 0, 1, backend="cpu", train=True)
    accumulation = accumulation_steps(cfg.train.global_batch_size, cfg.data.batch_size_per_worker, 1)
    steps_per_epoch = len(loader) // accumulation
    if cfg.train.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.steps_per_epoch)
    total = cfg.train.epochs * steps_per_epoch

    started = time.perf_counter()
    losses: list[float] = []
    model.train()
    step = 0
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            torch.manual_seed(step_seed(cfg.seed, 0, step))
            set_learning_rate(optimizer, learning_rate(cfg.train, step))
            loss = 0.0
            for _ in range(accumulation):
                loss += forward_backward(model, next(batches), accumulation, dev).loss / accumulation
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            step += 1
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    test_loader = build_loader(cfg, cfg.data.val_split, 0, 1, backend="cpu", train=False)
    scores = collect_scores(model, test_loader, dev)
    families = class_families(cfg, manifest)
    report = video_report(scores, classes, families)
    # The prediction table of every stream, for the per-family figures.
    video_ids = sorted(scores.videos)
    labels = [scores.videos[v]["label"] for v in video_ids]
    per_family = {}
    for stream in report["streams"]:
        predicted = [int(np.argmax(scores.videos[v]["scores"][stream])) for v in video_ids]
        per_family[stream] = family_top1(labels, predicted, classes, families)
    return {
        "steps": total,
        "clips_per_step": cfg.train.global_batch_size,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - started,
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "report": report,
        "per_family": per_family,
        "train_videos": len(loader.source.index),
    }


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def scored_stream(result: dict) -> str:
    """The stream a model is judged by: fused (for one stream, fused is that stream)."""
    return "fused"


def summarise(results: dict[tuple[str, int], dict]) -> dict:
    """Per model and family: mean and range over seeds, and a binomial 95 % interval."""
    import numpy as np

    from stresnet.families import binomial_interval

    table: dict = {}
    for (model, seed), result in sorted(results.items()):
        fams = result["per_family"][scored_stream(result)]
        overall = result["report"]["streams"][scored_stream(result)]["top1"]
        row = table.setdefault(model, {})
        for family, value in fams.items():
            row.setdefault(family, {"values": [], "videos": value["videos"], "chance": value["chance"]})
            row[family]["values"].append(value["top1"])
        row.setdefault("all", {"values": [], "videos": result["report"]["videos"], "chance": None})
        row["all"]["values"].append(overall)
    for row in table.values():
        for cell in row.values():
            values = np.array(cell["values"], dtype=float)
            cell["mean"] = float(values.mean())
            cell["min"], cell["max"] = float(values.min()), float(values.max())
            # The interval of one run's accuracy at the seeds' mean on this many test videos:
            # how well the test set pins a figure down (the seeds share the test videos).
            cell["ci95"] = binomial_interval(round(cell["mean"] * cell["videos"]), cell["videos"])
    return table


def verdicts(table: dict) -> list[tuple[str, bool, str]]:
    """The separations issue 11 asks for: (claim, met, evidence)."""
    out = []

    def cell(model, family):
        return table.get(model, {}).get(family)

    def at_chance(model, family):
        c = cell(model, family)
        if c is None:
            return None
        low, high = c["ci95"]
        return low <= c["chance"] <= high or c["mean"] <= c["chance"] + 0.05

    full = table.get("full", {})
    for family, c in full.items():
        if family == "all":
            continue
        out.append((f"full ST-ResNet >= 0.90 on {family}", c["min"] >= 0.90,
                    f"{c['mean']:.3f} (seeds {c['min']:.3f}-{c['max']:.3f})"))
    for model, family in (("appearance", "motion"), ("motion", "appearance"),
                          ("late_fusion", "conjunction"), ("no_temporal", "order")):
        c = cell(model, family)
        if c is None:
            continue
        ok = at_chance(model, family)
        out.append((f"{model} at chance ({c['chance']:.2f}) on {family}", bool(ok),
                    f"{c['mean']:.3f}, 95 % interval {c['ci95'][0]:.2f}-{c['ci95'][1]:.2f}"))
    if cell("no_temporal", "order") and cell("full", "order"):
        a, b = cell("no_temporal", "order"), cell("full", "order")
        out.append(("no_temporal clearly below full on order", a["ci95"][1] < b["ci95"][0],
                    f"{a['mean']:.3f} vs {b['mean']:.3f}"))
    return out


def markdown(table: dict, meta: dict) -> str:
    families = [f for f in next(iter(table.values())) if f != "all"] + ["all"]
    anyrow = next(iter(table.values()))

    def head(family: str) -> str:
        c = anyrow[family]
        chance = f", chance {c['chance']:.2f}" if c["chance"] is not None else ""
        return f"{family} ({c['videos']} videos{chance})"

    rows = []
    for model in MODELS:
        if model not in table:
            continue
        cells = []
        for family in families:
            c = table[model][family]
            spread = f" ({c['min']:.2f}-{c['max']:.2f})" if c["min"] != c["max"] else ""
            cells.append(f"{c['mean']:.3f}{spread} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]")
        rows.append([f"`{model}`: {DESCRIPTIONS[model]}", *cells])
    lines = [
        "### Ablation: each part of ST-ResNet on its own family (`benchmarks/ablation.py`)",
        "",
        f"Config `{meta['config']}`{' (--quick)' if meta['quick'] else ''}: {meta['train_videos']} "
        f"training videos, {meta['steps']} SGD steps of {meta['clips_per_step']} clips per model, "
        f"seeds {meta['seeds']}, device {meta['device']}. Video-level top-1 of the fused scores "
        f"(a single-stream model: its stream), mean over seeds, (min-max over seeds) and "
        f"[binomial 95 % interval (Wilson) of the mean on the family's test videos]. A family's "
        f"chance level is 1 / its number of classes. Wall time {meta['wall']:.0f} s "
        f"({meta['wall'] / 60:.1f} min) for {meta['runs']} runs, {meta['jobs']} at a time; "
        f"load average at the end {meta['load']}.",
        "",
        markdown_table(["model", *[head(f) for f in families]], rows),
        "",
        "| claim | met | evidence |",
        "|---|---|---|",
        *[f"| {claim} | {'yes' if ok else '**no**'} | {evidence} |"
          for claim, ok, evidence in verdicts(table)],
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# MLflow: one parent run, one child run per (model, seed)
# --------------------------------------------------------------------------------------------


def log_child(parent_id: str, experiment_id: str, model: str, seed: int, result: dict,
              overrides: list[str]) -> None:
    import mlflow

    from stresnet.evaluate import summary_metrics

    with mlflow.start_run(run_name=f"{model}-seed{seed}", experiment_id=experiment_id,
                          nested=True, parent_run_id=parent_id):
        mlflow.log_params({"model": model, "seed": seed, "overrides": " ".join(overrides),
                           "steps": result["steps"]})
        metrics = summary_metrics(result["report"], prefix="test_")  # per family too
        metrics["train_seconds"] = result["train_seconds"]
        metrics["final_loss"] = result["final_loss"]
        mlflow.log_metrics(metrics)
        for i, loss in enumerate(result["loss_curve"]):
            mlflow.log_metric("loss", loss, step=i)
        mlflow.log_dict(result["report"], "report.json")
        mlflow.log_dict(result["per_family"], "per_family.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG.relative_to(REPO)))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time (default: one per core on CPU, 1 on a GPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 2 steps")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--results", default=None, help="markdown file (default benchmarks/RESULTS.md)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)

    os.chdir(REPO)  # the config's relative paths (data/...) are relative to the repository
    from pipelines.shard_format import read_manifest
    from pipelines.shards import make_shards
    from cluster.config import load_config
    from stresnet.config import absolute_paths

    overrides = [*(QUICK if args.quick else []), *args.overrides]
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    print(f"shards: {cfg.data.shards}", flush=True)
    make_shards(cfg)
    shard_seconds = time.perf_counter() - started
    manifest = read_manifest(cfg.data.shards)

    cores = os.cpu_count() or 1
    jobs = args.jobs or (1 if args.device != "cpu" else min(cores, 2 * len(args.seeds)))
    threads = max(1, cores // jobs)
    plan = sorted(((m, s) for m in args.models for s in args.seeds), key=lambda ms: -COST[ms[0]])

    import mlflow

    from cluster.tracking import ensure_experiment

    # The project's convention (cluster/tracking.py): a new experiment keeps its artifacts in
    # mlartifacts/<experiment> next to a sqlite database, not in the working directory.
    tracking = load_config(args.config, [*overrides, f"tracking.uri={args.tracking_uri}",
                                         "tracking.experiment=stresnet-ablation"])
    tracking = absolute_paths(tracking)
    mlflow.set_tracking_uri(tracking.tracking.uri)
    experiment_id = ensure_experiment(tracking)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[tuple[str, int], dict] = {}
    with mlflow.start_run(run_name=f"ablation-{stamp}{'-quick' if args.quick else ''}",
                          experiment_id=experiment_id) as parent:
        mlflow.log_params({"config": args.config, "overrides": " ".join(overrides),
                           "seeds": str(args.seeds), "device": args.device, "quick": args.quick})
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(train_and_evaluate, args.config, [*overrides, *MODELS[m]], s,
                            args.device, threads): (m, s)
                for m, s in plan
            }
            for future in as_completed(futures):
                model, seed = futures[future]
                result = future.result()
                results[(model, seed)] = result
                fams = result["per_family"]["fused"]
                shown = " ".join(f"{f} {v['top1']:.3f}" for f, v in fams.items() if v["top1"] is not None)
                print(f"{model:<12} seed {seed}: fused {shown} all "
                      f"{result['report']['streams']['fused']['top1']:.3f} "
                      f"({result['train_seconds']:.0f} s train, {time.perf_counter() - started:.0f} s "
                      f"elapsed)", flush=True)
                log_child(parent.info.run_id, experiment_id, model, seed, result,
                          [*overrides, *MODELS[model]])
        table = summarise(results)
        wall = time.perf_counter() - started
        any_result = next(iter(results.values()))
        meta = {
            "config": args.config, "quick": args.quick, "steps": any_result["steps"],
            "clips_per_step": any_result["clips_per_step"], "seeds": args.seeds,
            "device": args.device if args.device == "cpu" else machine(), "wall": wall,
            "runs": len(results), "jobs": jobs, "train_videos": any_result["train_videos"],
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        }
        text = markdown(table, meta) + f"\n\nShards: {shard_seconds:.0f} s of the wall time " \
            f"({'made' if shard_seconds > 5 else 'already there'})."
        for model, row in table.items():
            for family, c in row.items():
                mlflow.log_metric(f"{model}_fused_top1_{family}_mean", c["mean"])
        mlflow.log_text(text, "ablation.md")
        mlflow.log_dict({f"{m}/{f}": c for m, row in table.items() for f, c in row.items()},
                        "table.json")
    print("\n" + text)
    write_section("ablation", text, Path(args.results) if args.results else None)
    print(f"\nwrote section 'ablation' of {args.results or 'benchmarks/RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
