"""Faults of issue 13 that need no Ray cluster: each test reproduces one and asserts the named
error, the skip count or the exit code (docs/reliability.md lists them all)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from loader_shards import config, write_shards
from stresnet.checkpoint import save_checkpoint
from cluster.config import dump_config
from stresnet.config import to_dict
from stresnet.model import build_model


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three classes (class0, class1, class2); 4 training and 2 test videos."""
    folder = tmp_path_factory.mktemp("shards")
    return write_shards(folder, {"train": [8] * 4, "test": [8] * 2})


def checkpoint_with(tmp_path, shards, classes: list[str]):
    """A tiny model trained (untrained, really) on ``classes``, saved as a checkpoint."""
    cfg = config(shards, **{"model.num_classes": len(classes), "model.width": 0.03125,
                            "eval.output": str(tmp_path / "eval")})
    torch.manual_seed(0)
    folder = save_checkpoint(tmp_path / "checkpoint", build_model(cfg.model), to_dict(cfg),
                             shards={"classes": classes, "params": {}})
    file = tmp_path / "run.yaml"
    dump_config(replace(cfg, model=replace(cfg.model, num_classes=3)), file)
    return file, folder


@pytest.mark.parametrize("classes, message", [
    (["class0", "class1", "class2", "class3"],
     "the model has 4 classes, the shards in {shards} have 3"),
    (["class0", "class2", "class1"],
     "the model's classes differ from those of the shards in {shards} at 2 label(s) "
     "(label 1: 'class2' vs 'class1', label 2: 'class1' vs 'class2')"),
])
def test_evaluate_refuses_a_model_trained_on_other_classes(shards, tmp_path, capsys, classes, message):
    """issue 13 item 7: more classes gave an IndexError, the same number in another order a
    silently wrong report."""
    from cluster.evaluate import main

    file, checkpoint = checkpoint_with(tmp_path, shards, classes)
    assert main(["--config", str(file), "--checkpoint", str(checkpoint)]) == 2
    assert message.format(shards=shards) in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()  # nothing written


def test_evaluate_accepts_the_classes_it_was_trained_on(shards, tmp_path, capsys):
    from cluster.evaluate import main

    file, checkpoint = checkpoint_with(tmp_path, shards, ["class0", "class1", "class2"])
    assert main(["--config", str(file), "--checkpoint", str(checkpoint)]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["videos"] == 2


# --------------------------------------------------------------------------------------------
# Item 3: the skip policy for truncated, deleted and corrupt shards (data.max_damaged_fraction)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    """12 training videos in 3 shards of 4 (the last one is damaged by the tests), 8 test
    videos in 2 shards of 4."""
    folder = tmp_path_factory.mktemp("twelve")
    return write_shards(folder, {"train": [8] * 12, "test": [8] * 8}, per_shard=4)


def damage(shards, tmp_path, how: str, shard: str = "train-p000-00002.tar"):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    path = copy / shard
    if how == "deleted":
        path.unlink()
    elif how == "truncated to a quarter":  # the reproduction, at 4 samples per shard
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 4])
    return copy


@pytest.mark.parametrize("how", ["deleted", "truncated to a quarter"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_damage_over_the_limit_is_a_named_error_before_any_batch(twelve, tmp_path, how, split):
    from pipelines.loaders import build_loader
    from pipelines.loaders.shard_reader import DamagedShardsError

    shard = "train-p000-00002.tar" if split == "train" else "test-p000-00001.tar"
    copy = damage(twelve, tmp_path, how, shard)
    lost = f"4 of {12 if split == 'train' else 8}"
    if how == "truncated to a quarter":
        lost = f"3 of {12 if split == 'train' else 8}"  # the first sample lies before the cut
    with pytest.raises(DamagedShardsError, match=(
        rf"split '{split}': {lost} samples unreadable when indexed \(damaged or missing shards: "
        rf"{shard}\), more than data.max_damaged_fraction=0.01 allows"
    )):
        build_loader(config(copy), split, 0, 1, backend="cpu")


@pytest.mark.parametrize("how", ["deleted", "truncated to a quarter"])
def test_damage_within_the_limit_is_skipped_and_counted(twelve, tmp_path, how, caplog):
    """Training substitutes the next readable sample: full batches, every skip counted."""
    import logging

    from pipelines.loaders import build_loader

    copy = damage(twelve, tmp_path, how)
    cfg = config(copy, **{"data.max_damaged_fraction": 0.34})
    with caplog.at_level(logging.WARNING):
        loader = build_loader(cfg, "train", 0, 1, backend="cpu")
        loader.set_epoch(0)
        batches = list(loader)
    assert "missing" in caplog.text if how == "deleted" else "damaged shard" in caplog.text
    assert len(batches) == 6 and all(b["rgb"].shape[0] == 2 for b in batches)
    lost = {"v008", "v009", "v010", "v011"} if how == "deleted" else {"v009", "v010", "v011"}
    assert not {v for b in batches for v in b["video_id"]} & lost
    assert sum(b["skipped"] for b in batches) == loader.skipped >= len(lost)


@pytest.mark.parametrize("split", ["train", "test"])
def test_corruption_found_while_reading_over_the_limit_is_a_named_error(twelve, tmp_path, split):
    """Members whose bytes changed after indexing (CRC-32 differs) count against the same limit."""
    from pipelines.loaders import build_loader
    from pipelines.loaders.shard_reader import DamagedShardsError

    copy = damage(twelve, tmp_path, "none")
    shard = copy / ("train-p000-00000.tar" if split == "train" else "test-p000-00000.tar")
    data = bytearray(shard.read_bytes())
    index = json.loads((shard.parent / (shard.name + ".idx")).read_text())
    for name, offset, size, _ in index["members"]:
        if ".rgb." in name:
            data[offset + size // 2] ^= 0xFF  # inside the entropy-coded data: decodes "fine"
    shard.write_bytes(bytes(data))
    loader = build_loader(config(copy, **{"data.max_damaged_fraction": 0.15}), split, 0, 1,
                          backend="cpu")
    loader.set_epoch(0)
    with pytest.raises(DamagedShardsError, match=(
        rf"split '{split}': 2 of {12 if split == 'train' else 8} samples damaged \(the latest: "
        r"sample \d+, .*is corrupt \(CRC-32 differs from the index file's\)\), more than "
        r"data.max_damaged_fraction=0.15 allows"
    )):
        list(loader)


def test_preflight_and_evaluate_apply_the_same_limit(twelve, tmp_path, capsys):
    """Before any worker starts (exit 2 of `stresnet train`), and in `stresnet evaluate`."""
    from cluster.evaluate import main
    from cluster.preflight import PreflightError, preflight

    copy = damage(twelve, tmp_path, "deleted", "test-p000-00001.tar")
    cfg = config(copy, **{"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
                          "eval.output": str(tmp_path / "eval"), "model.width": 0.03125})
    with pytest.raises(PreflightError, match=r"data.shards: .*split 'test': 4 of 8 samples "
                       r"unreadable when indexed \(damaged or missing shards: test-p000-00001.tar\)"):
        preflight(cfg)
    file = tmp_path / "run.yaml"
    dump_config(cfg, file)
    folder = save_checkpoint(tmp_path / "checkpoint", build_model(cfg.model), to_dict(cfg),
                             shards={"classes": ["class0", "class1", "class2"], "params": {}})
    assert main(["--config", str(file), "--checkpoint", str(folder)]) == 2
    assert "more than data.max_damaged_fraction=0.01 allows" in capsys.readouterr().err
    assert main(["--config", str(file), "--checkpoint", str(folder),
                 "data.max_damaged_fraction=0.5"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["videos"] == 4


# --------------------------------------------------------------------------------------------
# Item 4: corrupt JPEG data is skipped and counted: training metrics, the log, report.json
# --------------------------------------------------------------------------------------------


def corrupt_rgb(shard, key: str) -> None:
    """Flip one byte inside the entropy-coded data of every RGB frame of sample ``key``: OpenCV
    decodes such a JPEG without an error, only the index file's CRC-32 tells."""
    data = bytearray(shard.read_bytes())
    index = json.loads((shard.parent / (shard.name + ".idx")).read_text())
    for name, offset, size, _ in index["members"]:
        if name.startswith(f"{key}.rgb."):
            data[offset + size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_corrupt_jpegs_are_skipped_and_counted_in_training_metrics_and_the_report(twelve, tmp_path):
    from cluster.evaluate import main
    from cluster.worker import Worker, train_one_step
    from pipelines.loaders import build_loader
    from stresnet.train_step import build_optimizer

    copy = damage(twelve, tmp_path, "none")
    corrupt_rgb(copy / "train-p000-00000.tar", "v001")
    corrupt_rgb(copy / "test-p000-00000.tar", "v013")
    cfg = config(copy, **{"data.max_damaged_fraction": 0.2, "model.width": 0.03125,
                          "eval.output": str(tmp_path / "eval")})
    loader = build_loader(cfg, "train", 0, 1, backend="cpu")
    loader.set_epoch(0)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    batches = iter(loader)
    skipped = [train_one_step(model, optimizer, batches, 1, Worker(0, 1, torch.device("cpu"), False),
                              1e-3, False)[0]["skipped_samples"] for _ in range(len(loader))]
    assert sum(skipped) == 1  # v001, once per epoch

    file = tmp_path / "run.yaml"
    dump_config(cfg, file)
    folder = save_checkpoint(tmp_path / "checkpoint", model, to_dict(cfg),
                             shards={"classes": ["class0", "class1", "class2"], "params": {}})
    assert main(["--config", str(file), "--checkpoint", str(folder)]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["videos"] == 7  # v013 dropped
    assert report["skipped_views"] == report["views_per_video"]["max"] > 0  # all of v013's views


# --------------------------------------------------------------------------------------------
# Items 10 and 11: a registry URI that does not resolve, a tracking server that is down
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, model, message", [
    # before: ~4 minutes of MLflow's default retries, then a traceback
    ("http://127.0.0.1:9", "models:/stresnet-synthetic@current",
     "models:/stresnet-synthetic@current: not in the model registry at http://127.0.0.1:9"),
    ("sqlite:///{tmp}/mlflow.db", "models:/no-such-model@current",
     "models:/no-such-model@current: not in the model registry at sqlite:///"),
])
def test_evaluate_names_a_registry_it_cannot_use(tmp_path, capsys, uri, model, message):
    import os

    from cluster.evaluate import main

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "4"  # bounded by cluster/__init__.py
    file = tmp_path / "run.yaml"
    file.write_text("seed: 0\n")
    argv = ["--config", str(file), f"tracking.uri={uri.format(tmp=tmp_path)}", "--model-uri", model]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Item 9: checks before any worker starts (exit 2 of `stresnet train`, the key named)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"model.temporal.units": "[9]"}, "model.temporal.units: unit 9 does not exist in stage"),
    ({"model.init.kind": "checkpoint", "model.init.checkpoint": "{tmp}/model.pt"},
     "model.init.checkpoint: {tmp}/model.pt: cannot load weights"),
])
def test_preflight_catches_what_failed_in_every_worker(twelve, tmp_path, overrides, message):
    from cluster.preflight import PreflightError, preflight

    (tmp_path / "model.pt").write_bytes(bytes(range(256)) * 8)  # random bytes as weights
    items = {k: v.format(tmp=tmp_path) for k, v in overrides.items()}
    cfg = config(twelve, **{"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", **items})
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    assert message.format(tmp=tmp_path) in str(err.value)
