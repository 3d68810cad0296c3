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


# --------------------------------------------------------------------------------------------
# Item 9 (rest): resuming with a changed model; item 12: the message of a name already taken
# --------------------------------------------------------------------------------------------


def run_with_checkpoint(storage, shards, name: str = "run", **model):
    """A run folder ``storage/name`` with one checkpoint of the tiny model (``model`` overrides)."""
    cfg = config(shards, **{"model.width": 0.03125, "train.storage_path": str(storage),
                            "train.run_name": name, **model})
    save_checkpoint(storage / name / "checkpoint_0000004", build_model(cfg.model), to_dict(cfg),
                    train_state={"global_step": 4})
    return cfg


def test_resuming_with_a_changed_model_is_refused_before_any_worker(shards, tmp_path):
    """issue 13 item 9: every worker failed to load the checkpoint (4 attempts), or trained
    another network than the run's on its weights."""
    from cluster.preflight import PreflightError, resolve_run_name

    cfg = run_with_checkpoint(tmp_path / "runs", shards)
    resume = replace(cfg, train=replace(cfg.train, resume=True))
    assert resolve_run_name(resume) == "run"  # the same model: resumes
    init = replace(resume.model.init, kind="checkpoint", checkpoint=str(tmp_path / "gone.pt"))
    assert resolve_run_name(replace(resume, model=replace(resume.model, init=init))) == "run"
    changed = replace(resume.model, depth=101, dropout_motion=0.25)
    with pytest.raises(PreflightError) as err:
        resolve_run_name(replace(resume, model=changed))
    message = str(err.value)
    assert message.startswith("train.resume: the model differs from the one run 'run' trained (")
    assert "model.depth: 50 -> 101, model.dropout_motion: 0.8 -> 0.25." in message
    assert "another train.run_name (or none)" in message
    assert f"model.init.checkpoint={tmp_path / 'runs' / 'run' / 'checkpoint_0000004'}" in message


def test_a_taken_run_name_says_how_to_resume_or_clear_it(shards, tmp_path):
    """issue 13 item 12: the message did not say that deleting the folder frees the name."""
    from cluster.preflight import PreflightError, resolve_run_name

    cfg = run_with_checkpoint(tmp_path / "runs", shards, "failed")
    with pytest.raises(PreflightError) as err:
        resolve_run_name(cfg)
    assert str(err.value) == (
        f"train.run_name: a run named 'failed' already exists in {tmp_path / 'runs'} (latest "
        f"checkpoint checkpoint_0000004); set train.resume=true to continue it, delete the folder "
        f"{tmp_path / 'runs' / 'failed'} to start a new run under this name, or choose another "
        f"train.run_name (or none)"
    )


# --------------------------------------------------------------------------------------------
# Items 9 and 10: read-only places (a process without root's permission override), random bytes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["read-only train.storage_path", "read-only sqlite file"])
def test_train_names_a_read_only_place_before_any_worker(shards, tmp_path, fault):
    """Before: the workers failed at their first checkpoint or MLflow write, after Ray's retries."""
    from without_root import read_only, run_without_root_permissions, writable

    locked = tmp_path / "locked"
    database = tmp_path / "mlflow.db"
    overrides = {"tracking.uri": f"sqlite:///{database}", "model.width": 0.03125,
                 "train.storage_path": str(tmp_path / "runs")}
    if fault == "read-only train.storage_path":
        overrides["train.storage_path"] = str(locked / "runs")
        expected = (f"train.storage_path: {locked / 'runs'}: the folder {locked} (to create "
                    f"{locked / 'runs'} in) is not writable")
    else:
        database.write_bytes(b"")
        database.chmod(0o444)
        expected = f"tracking.uri: sqlite:///{database}: the database file {database} is not writable"
    file = tmp_path / "run.yaml"
    dump_config(config(shards, **overrides), file)
    read_only(locked)
    try:
        done = run_without_root_permissions("-m", "cluster.cli", "train", "--config", str(file))
    finally:
        writable(locked)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_evaluate_names_a_read_only_output_before_evaluating(shards, tmp_path):
    """Before: the whole evaluation ran, then writing report.json raised PermissionError."""
    from without_root import read_only, run_without_root_permissions, writable

    file, checkpoint = checkpoint_with(tmp_path, shards, ["class0", "class1", "class2"])
    locked = read_only(tmp_path / "eval")
    try:
        done = run_without_root_permissions("-m", "cluster.cli", "evaluate", "--config", str(file),
                                            "--checkpoint", str(checkpoint))
    finally:
        writable(locked)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"stresnet evaluate: error: eval.output: {locked}: the folder "
                                   f"{locked} is not writable; choose a writable place or fix its "
                                   f"permissions")
    assert "top-1" not in done.stdout  # nothing evaluated


def test_shards_names_a_read_only_output(tmp_path):
    """Before: every video failed to write, reported as failed videos (exit 1, "set
    shards.allow_failures=true to accept this")."""
    from without_root import read_only, run_without_root_permissions, writable

    locked = read_only(tmp_path / "locked")
    file = tmp_path / "shards.yaml"
    file.write_text(f"dataset: {{kind: synthetic, root: {tmp_path / 'videos'}, synthetic: "
                    f"{{videos_per_class: 2, video_frames: 4, height: 16, width: 16}}}}\n"
                    f"shards: {{output: {locked / 'shards'}}}\n")
    try:
        done = run_without_root_permissions("-m", "cluster.cli", "shards", "--config", str(file))
    finally:
        writable(locked)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"stresnet shards: shards.output: {locked / 'shards'}: the folder {locked} (to create "
        f"{locked / 'shards'} in) is not writable; choose a writable place or fix its permissions")


def test_evaluate_names_a_model_file_of_random_bytes(shards, tmp_path, capsys):
    from cluster.evaluate import main

    file, _ = checkpoint_with(tmp_path, shards, ["class0", "class1", "class2"])
    model = tmp_path / "random" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(bytes(range(256)) * 8)
    assert main(["--config", str(file), "--checkpoint", str(model.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stresnet evaluate: error: {model}: cannot load weights (")
    assert "Traceback" not in err
