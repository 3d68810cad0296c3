"""Training on Ray Train end to end: tiny synthetic shards, 2 CPU workers, MLflow in a temp sqlite.

One shard set and one uninterrupted run ("straight") are shared by the tests of this module; the
failure-injection and resume tests compare their final weights with it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.preflight import PreflightError
from cluster.train import main, run_training
from stresnet.checkpoint import load_train_state
from cluster.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "tiny.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Paths for this module's data, runs and MLflow store, with the tiny shards written."""
    from pipelines.shards import make_shards

    root = tmp_path_factory.mktemp("training")
    overrides = [
        f"dataset.root={root}/videos",
        f"shards.output={root}/shards",
        f"data.shards={root}/shards",
        f"train.storage_path={root}/runs",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
        f"eval.output={root}/eval",
    ]
    make_shards(load_config(TINY, overrides))
    yield root, overrides
    import ray

    ray.shutdown()


def tiny(workspace, *more: str):
    return load_config(TINY, [*workspace[1], *more])


@pytest.fixture(scope="module")
def straight(workspace):
    return run_training(tiny(workspace, "train.run_name=straight"))


def final_weights(result) -> dict[str, torch.Tensor]:
    return torch.load(result.checkpoint / "model.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        # Same seed and data on CPU; only float32 reduction order may differ.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_two_worker_training_tracks_everything_in_mlflow(workspace, straight):
    import mlflow
    from mlflow import MlflowClient

    from stresnet.model import load_model

    root = workspace[0]
    assert straight.steps == 24  # 24 epochs x 1 step
    assert straight.run_dir == root / "runs" / "straight"
    assert {p.name for p in straight.checkpoint.iterdir()} >= {"model.pt", "train_state.pt"}
    assert load_train_state(straight.checkpoint)["mlflow_run_id"] == straight.mlflow_run_id

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    run = client.get_run(straight.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "stresnet-synthetic"
    assert run.data.params["model.width"] == "0.125"
    assert run.data.params["train.global_batch_size"] == "22"
    assert "git_commit" in run.data.tags
    # What the MLflow UI needs: the experiment is a model-training one, the shards are the run's
    # dataset input, the recipe tags (a stage-1 run from scratch: its own lineage only).
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["stresnet.stage"] == "stage 1"
    assert run.data.tags["stresnet.lineage"] == "straight"
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synthetic-shards"
    assert json.loads(dataset_input.dataset.source) == {"uri": str(root / "shards")}
    assert len(dataset_input.dataset.digest) == 16
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert input_tags["train_videos"] == "21" and input_tags["test_videos"] == "7"
    assert input_tags["mlflow.data.context"] == "training"
    for key in ("loss", "accuracy", "lr", "clips_per_second", "data_wait_fraction",
                "val_fused_top1", "val_appearance_top5", "val_motion_top1",
                "skipped_samples", "val_skipped_views"):  # issue 13 item 4: skips are counted
        assert key in run.data.metrics, key

    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    # Metric step s is optimizer step s - 1 (0-based) done: lr_steps [20] starts at step 21.
    assert lrs[20] == pytest.approx(0.01) and lrs[21] == pytest.approx(0.001)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "validation"} <= artifacts
    validation = {a.path for a in client.list_artifacts(run.info.run_id, "validation/epoch_024")}
    assert validation == {"validation/epoch_024/report.json", "validation/epoch_024/confusion_matrix.png"}

    version = client.get_model_version_by_alias("stresnet-synthetic", "current")
    assert version.run_id == run.info.run_id

    # The registered model (a pickle-free pyfunc: tests/test_registered_model.py) predicts what
    # the checkpoint's network predicts.
    mlflow.set_tracking_uri(uri)
    network = load_model(straight.checkpoint)
    network.eval()
    clips = torch.randn(3, 2, 3 + 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = network(clips[:, :, :3], clips[:, :, 3:])
        expected = torch.stack([out["appearance"].softmax(1), out["motion"].softmax(1), out["fused"]], 1)
    pyfunc = mlflow.pyfunc.load_model("models:/stresnet-synthetic@current")
    np.testing.assert_allclose(pyfunc.predict(clips.numpy()), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_artifacts_are_stored_next_to_the_database_not_in_ray_temp_folders(workspace, straight):
    from mlflow import MlflowClient

    root = workspace[0]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    # The driver created the experiment; a worker would have put it in its Ray session folder.
    experiment = client.get_experiment_by_name("stresnet-synthetic")
    folder = root / "mlartifacts" / "stresnet-synthetic"
    assert experiment.artifact_location == str(folder)
    run = client.get_run(straight.mlflow_run_id)
    assert run.info.artifact_uri == str(folder / run.info.run_id / "artifacts")
    assert (folder / run.info.run_id / "artifacts" / "validation" / "epoch_024" / "report.json").is_file()
    version = client.get_model_version_by_alias("stresnet-synthetic", "current")
    model_folder = Path(client.get_model_version_download_uri("stresnet-synthetic", version.version))
    assert model_folder.is_relative_to(folder)
    assert {"MLmodel", "artifacts"} <= {p.name for p in model_folder.iterdir()}
    weights = torch.load(model_folder / "artifacts" / "model.pt", weights_only=True)
    assert_same_weights(weights["model"], final_weights(straight))


def test_existing_experiment_in_a_ray_session_folder_is_kept_with_a_warning(tmp_path):
    from mlflow import MlflowClient

    from cluster.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lost = "/tmp/ray/session_2026-01-01_00-00-00_1/artifacts/x/mlruns/1"
    created = MlflowClient(uri).create_experiment("stresnet-synthetic", artifact_location=lost)
    cfg = load_config(TINY, [f"tracking.uri={uri}"])
    with pytest.warns(UserWarning, match=r"Ray session folder .*Set tracking.experiment to a new name"):
        assert ensure_experiment(cfg) == created
    new = ensure_experiment(load_config(TINY, [f"tracking.uri={uri}", "tracking.experiment=fresh"]))
    assert MlflowClient(uri).get_experiment(new).artifact_location == str(tmp_path / "mlartifacts" / "fresh")


def test_a_stage_starts_from_a_registered_model(workspace, straight, tmp_path):
    from mlflow import MlflowClient

    from cluster.preflight import fetch_registered_init, preflight
    from stresnet.config import absolute_paths
    from stresnet.model import build_model

    cfg = absolute_paths(tiny(workspace, "model.init.kind=checkpoint",
                              "model.init.checkpoint=models:/stresnet-synthetic@current"))
    preflight(cfg)  # a registry URI is not a missing file
    resolved, tags = fetch_registered_init(cfg, tmp_path / "run")
    assert resolved.model.init.checkpoint == str(tmp_path / "run" / "init" / "checkpoint.pt")
    version = MlflowClient(cfg.tracking.uri).get_model_version_by_alias("stresnet-synthetic", "current")
    assert tags == {"model.init.checkpoint":
                    f"models:/stresnet-synthetic@current = models:/stresnet-synthetic/{version.version}"}
    # What a worker builds from the config it is handed.
    assert_same_weights(build_model(resolved.model).state_dict(), final_weights(straight))
    # The next stage is linked to the run it starts from: by registry version or by checkpoint.
    from cluster.tracking import lineage_tags

    expected = {"stresnet.stage": "stage 2", "stresnet.parents": "straight",
                "stresnet.lineage": "straight,next"}
    assert lineage_tags(resolved, tags, "next") == expected
    from_folder = absolute_paths(tiny(workspace, "model.init.kind=checkpoint",
                                      f"model.init.checkpoint={straight.run_dir}"))
    assert lineage_tags(from_folder, {}, "next") == expected


def test_evaluate_command_on_checkpoint_and_registered_model(workspace, straight, capsys):
    import json

    from cluster.evaluate import main as evaluate

    root, overrides = workspace
    reports = []
    for source in (["--checkpoint", str(straight.run_dir)],  # a run folder: its newest checkpoint
                   ["--model-uri", "models:/stresnet-synthetic@current"]):
        output = root / f"eval-{len(reports)}"
        argv = ["--config", str(TINY), *overrides, f"eval.output={output}", *source]
        assert evaluate([*argv, "eval.fully_convolutional=true"]) == 0
        reports.append(json.loads((output / "report.json").read_text()))
        assert (output / "confusion_matrix.png").is_file()
    checkpoint_report, registry_report = reports
    assert checkpoint_report["videos"] == 7
    assert checkpoint_report["views_per_video"] == {"min": 1, "max": 1}  # test_crops: center
    assert set(checkpoint_report["streams"]) == {"appearance", "motion", "fused"}
    assert checkpoint_report["fully_convolutional"]["videos"] == 7
    # The final checkpoint and the registered model are the same weights.
    for stream in ("appearance", "motion", "fused"):
        assert registry_report["streams"][stream]["top1"] == checkpoint_report["streams"][stream]["top1"]
    # The same number validation logged for the last epoch.
    assert checkpoint_report["streams"]["fused"]["top1"] == pytest.approx(straight.metrics["val_fused_top1"])
    assert "fused" in capsys.readouterr().out


def test_existing_run_name_is_not_reused_without_resume(workspace, straight):
    with pytest.raises(PreflightError, match=r"run named 'straight' already exists.*train.resume=true"):
        run_training(tiny(workspace, "train.run_name=straight"))


def test_a_failed_registration_fails_the_command_and_a_resume_registers(workspace, capsys):
    """issue 13 item 1: a registry failure after training used to be retried by Ray, skipped on
    the retry (the run was finished) and exit 0 with nothing registered."""
    import sqlite3

    from mlflow import MlflowClient

    root, overrides = workspace
    db = root / "broken-registry.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    client.search_experiments()  # creates the schema
    with sqlite3.connect(db) as con:  # tracking works, the model registry does not
        con.execute("ALTER TABLE registered_models RENAME TO registered_models_away")
    argv = ["--config", str(TINY), *overrides, f"tracking.uri={uri}", "train.epochs=1",
            "train.validate_every=12", "train.run_name=unregistered"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "training finished but the final model was not registered as stresnet-synthetic@current" in err
    assert "train.run_name=unregistered train.resume=true to register it" in err
    (run,) = client.search_runs(client.get_experiment_by_name("stresnet-synthetic").experiment_id)
    assert run.info.status == "FAILED"

    with sqlite3.connect(db) as con:  # the registry is back: resuming registers, no new steps
        con.execute("ALTER TABLE registered_models_away RENAME TO registered_models")
    assert main(argv + ["train.resume=true"]) == 0
    version = client.get_model_version_by_alias("stresnet-synthetic", "current")
    assert version.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert not (root / "runs" / "unregistered" / "registration_failed").exists()


def test_a_non_finite_loss_stops_the_run_keeps_its_checkpoint_and_registers_nothing(workspace, capsys):
    """issue 13 item 6: a diverging run used to finish with exit 0 and register its NaN model."""
    from mlflow import MlflowClient

    root, overrides = workspace
    uri = f"sqlite:///{root}/diverged.db"
    # One step per epoch; the first step's update (lr 1e38) overflows the weights.
    argv = ["--config", str(TINY), *overrides, f"tracking.uri={uri}", "train.epochs=4",
            "train.validate_every=12", "train.checkpoint_every=1", "train.lr=1.0e+38",
            "train.run_name=diverged"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    match = re.search(r"training loss (nan|inf) at step (\d+) .*registered no model", err)
    assert match, err
    step = int(match.group(2))
    assert step >= 2
    run_dir = root / "runs" / "diverged"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_[0-9]*"))
    assert kept and kept[-1] == f"checkpoint_{step - 1:07d}"  # the last finite step's, kept
    assert not (run_dir / "registration_failed").exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("stresnet-synthetic").experiment_id)
    assert run.info.status == "FAILED"
    assert client.search_registered_models() == []


# Two steps per epoch (6 clips x 2 workers per step), 3 epochs: checkpoints after steps 2, 3
# (train.checkpoint_every, in the middle of epoch 2), 4 and 6 (epoch ends).
MID_EPOCH = ["data.batch_size_per_worker=6", "train.global_batch_size=12", "train.epochs=3", "train.checkpoint_every=3",
             "train.validate_every=3", "train.lr_steps=[4]"]


@pytest.fixture(scope="module")
def straight_mid_epoch(workspace):
    return run_training(tiny(workspace, *MID_EPOCH, "train.run_name=straight-mid-epoch"))


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_finishes_the_same(workspace, straight_mid_epoch):
    # Killed at step 4, before that step's checkpoint: the run restarts from the checkpoint of
    # step 3 (mid-epoch), skips the epoch's consumed batches and redoes step 4.
    result = run_training(tiny(workspace, *MID_EPOCH, "train.run_name=killed", "train.fail_at_step=4"))
    assert (result.run_dir / "failure_injected").is_file()
    assert straight_mid_epoch.steps == 6
    assert result.steps == straight_mid_epoch.steps
    assert_same_weights(final_weights(result), final_weights(straight_mid_epoch))


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_straight_run(workspace, straight_mid_epoch):
    first = run_training(tiny(workspace, *MID_EPOCH, "train.run_name=resumed", "train.stop_at_step=3"))
    assert first.steps == 3
    assert load_train_state(first.checkpoint)["step_in_epoch"] == 1  # stopped mid-epoch
    second = run_training(tiny(workspace, *MID_EPOCH, "train.run_name=resumed", "train.resume=true"))
    assert second.steps == straight_mid_epoch.steps
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    assert_same_weights(final_weights(second), final_weights(straight_mid_epoch))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.shards={root}/missing", r"data.shards: .*missing/manifest.json: no shard manifest; run `stresnet shards"),
        ("model.mode=resnet3d", r"tiny.yaml: model.mode: got 'resnet3d' \(str\), expected one of \['st_resnet', 'late_fusion'"),
        ("model.num_classes=9", r"model.num_classes: got 9, but the shards .* have 7 classes; set model.num_classes=7"),
        ("tracking.uri=http://127.0.0.1:9", r"tracking.uri: cannot reach the MLflow server at http://127.0.0.1:9"),
        ("model.init.kind=checkpoint model.init.checkpoint=models:/stresnet-synthetic@nope",
         r"model.init.checkpoint: models:/stresnet-synthetic@nope: not in the model registry at sqlite:///"),
        ("model.init.kind=checkpoint model.init.checkpoint=models:/no-such-model/1",
         r"model.init.checkpoint: models:/no-such-model/1: not in the model registry at .*no-such-model"),
    ],
)
def test_bad_configs_fail_before_training(workspace, capsys, override, message):
    root, overrides = workspace
    runs = root / "bad-runs"
    argv = ["--config", str(TINY), *overrides, f"train.storage_path={runs}", *override.format(root=root).split()]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not runs.exists()  # nothing started


@pytest.mark.slow
def test_main_job_runs_every_phase_and_prints_the_summary(workspace, capsys):
    from cluster.main_job import main as main_job

    root, overrides = workspace
    argv = ["--config", str(TINY), *overrides, f"train.storage_path={root}/main-job-runs",
            f"eval.output={root}/main-job-eval", "train.epochs=2", "train.validate_every=2"]
    assert main_job(argv) == 0
    out = capsys.readouterr().out
    for phase in ("phase 1/3: shards", "phase 2/3: train", "phase 3/3: evaluate"):
        assert phase in out
    assert re.search(r"MLflow run: +[0-9a-f]{32} in experiment 'stresnet-synthetic'", out)
    assert re.search(r"fused +\d\.\d{3} +\d\.\d{3}", out)
    assert (root / "main-job-eval" / "report.json").is_file()
    # The per-family table (the tiny config has the appearance and motion families): a header,
    # chance levels, test videos and a row per stream with a column per family and all.
    assert re.search(r"top-1 +appearance +motion +all", out)
    assert re.search(r"chance +0\.33 +0\.25 +0\.14", out)
    assert re.search(r"test videos +3 +4 +7", out)
    assert re.search(r"fused +\d\.\d{3} +\d\.\d{3} +\d\.\d{3}\n", out)
    # ... and the same figures in the MLflow run.
    from mlflow import MlflowClient

    run_id = re.search(r"MLflow run: +([0-9a-f]{32})", out).group(1)
    metrics = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(run_id).data.metrics
    for stream in ("appearance", "motion", "fused"):
        for family in ("appearance", "motion"):
            assert 0.0 <= metrics[f"test_{stream}_top1_{family}"] <= 1.0
    assert any(key.startswith("val_fused_top1_") for key in metrics)  # validation too
