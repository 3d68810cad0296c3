"""MLflow tracking: one experiment per dataset, one MLflow run per training run.

Ray Train has no MLflow callback for its current API, so world rank 0 logs from inside the
training function (``cluster/train.py``). The MLflow run id travels in every checkpoint's
``train_state.pt``; a resumed run re-opens the same MLflow run instead of starting a new one.

The final model is logged as an MLflow pyfunc *from code* (``cluster/pyfunc_model.py``): a
``stresnet.serving.ServingModel`` (one packed input tensor in, one tensor of per-stream scores
out, which is what MLflow's pyfunc serving supports) built from the plain weights file
(``model.pt``, the checkpoint format) that travels inside the logged model as
``artifacts/model.pt``. Nothing in it is pickled: loading runs only the stresnet code logged with
it and ``torch.load(weights_only=True)``. It is registered under a model name per dataset and
pointed to by an alias; a later stage or ``stresnet evaluate``/``predict`` reads just the weights
file (:func:`fetch_registered_weights`).

The driver creates the experiment (:func:`ensure_experiment`) before any worker starts: MLflow
would otherwise give it an artifact folder relative to the creating process's working directory,
which for a Ray worker is a temporary Ray session folder on one node.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import warnings
import urllib.error
from dataclasses import dataclass
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cluster.config import RunConfig, dump_config
from stresnet import serving
from stresnet.checkpoint import MODEL_FILE, save_model_file
from stresnet.config import flatten, to_dict

REPO = Path(__file__).resolve().parents[1]
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # the registered model's code
# Inside a logged model: the checkpoint-format weights; models logged before the pickle-free
# format carry them as extra_files/model.pt.
WEIGHTS_ARTIFACTS = (f"artifacts/{MODEL_FILE}", f"extra_files/{MODEL_FILE}")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")
# The MLflow UI (3.x) opens an experiment in its GenAI mode unless the experiment says it is for
# model training; the runs page's model-training mode is also selected by URL (run_links).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RAY_SESSION = re.compile(r"/session_(\d{4}-|latest\b)")  # Ray's per-session temp folders


class TrackingError(RuntimeError):
    """The tracking URI cannot be used; the message says what to fix."""


@dataclass
class RunTracking:
    """The run's tracking as the driver prepared it (:func:`prepare`); picklable, so it travels
    to the workers, where world rank 0 opens the MLflow run with :meth:`start_run`."""

    experiment_id: str
    tags: dict[str, str]

    def start_run(self, cfg: RunConfig, run_name: str, run_id: str | None) -> str:
        """Open the MLflow run (a new one, or ``run_id`` when resuming); returns its id."""
        return start_run(cfg, run_name, run_id, self.tags, self.experiment_id)


def prepare(cfg: RunConfig, ray_address: str | None, extra_tags: dict[str, str]) -> RunTracking:
    """The one tracking entry point of a training run, called by the driver: creates the
    experiment if needed (:func:`ensure_experiment`) and collects the run's tags (git commit,
    SLURM job, Ray address, plus ``extra_tags``)."""
    return RunTracking(ensure_experiment(cfg), {**run_tags(ray_address), **extra_tags})


def experiment_name(cfg: RunConfig) -> str:
    return cfg.tracking.experiment or f"stresnet-{cfg.dataset.kind}"


def registered_model_name(cfg: RunConfig) -> str:
    return cfg.tracking.registered_model or f"stresnet-{cfg.dataset.kind}"


def absolute_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute, so Ray workers (whose working directory
    is not the driver's) write to the same database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def absolute_artifact_location(location: str | None) -> str | None:
    """A local artifact folder made absolute (Ray workers do not share the driver's cwd)."""
    if location is None or re.match(r"[a-zA-Z][\w+.-]*:/", location):  # s3://, file:/, ...
        return location
    return str(Path(location).expanduser().resolve())


def artifact_location(cfg: RunConfig) -> str | None:
    """The artifact location for a new experiment: ``tracking.artifact_location``, or for a
    sqlite store ``mlartifacts/<experiment>`` next to the database; None: the server's default."""
    if cfg.tracking.artifact_location is not None:
        return absolute_artifact_location(cfg.tracking.artifact_location)
    uri = absolute_tracking_uri(cfg.tracking.uri)
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment_name(cfg))
    return None


def ensure_experiment(cfg: RunConfig) -> str:
    """The experiment's id, creating it (with :func:`artifact_location`) when it is new.

    Called by the driver. An existing experiment keeps the location it was created with (MLflow
    cannot move it); a warning says so when that is a Ray session folder, where artifacts are
    deleted with the session (where workers created experiments in earlier versions).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(cfg.tracking.uri)
    name = experiment_name(cfg)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(cfg),
                                            tags=EXPERIMENT_KIND)
        except MlflowException:
            # Two jobs starting at once (e.g. both base streams): the other one created it.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:  # created by an older stresnet; a user's choice stays
            client.set_experiment_tag(experiment.experiment_id, key, value)
    if RAY_SESSION.search(experiment.artifact_location):
        warnings.warn(
            f"MLflow experiment {name!r} keeps its artifacts in a Ray session folder "
            f"({experiment.artifact_location}), which Ray deletes: new reports and models would be "
            f"lost. Set tracking.experiment to a new name (created in tracking.artifact_location, "
            f"default mlartifacts/ next to a sqlite database).",
            stacklevel=2,
        )
    return experiment.experiment_id


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be reached."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(
                f"tracking.uri: {uri}: folder {folder} does not exist; create it or point "
                f"tracking.uri at a writable place (default sqlite:///mlflow.db)"
            )
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking.uri: {uri}: folder {folder} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            problem = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            problem = str(getattr(err, "reason", err))
        raise TrackingError(
            f"tracking.uri: cannot reach the MLflow server at {uri} ({problem}); start it "
            f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`) or set tracking.uri to a "
            f"reachable server or to sqlite:///mlflow.db"
        )
    # Other schemes (databricks, file, ...): MLflow reports problems itself on first use.


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(ray_address: str | None) -> dict[str, str]:
    """Where the run came from: git commit, SLURM job and Ray cluster, where present."""
    tags = {
        "git_commit": git_commit(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "ray_address": ray_address,
    }
    return {key: value for key, value in tags.items() if value}


def start_run(
    cfg: RunConfig, run_name: str, run_id: str | None, tags: dict[str, str], experiment_id: str
) -> str:
    """Open the MLflow run (a new one, or ``run_id`` when resuming); returns its id.

    ``experiment_id``: from :func:`ensure_experiment` in the driver. A new run gets the flattened
    config as params and the resolved config as ``config.yaml``.
    """
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    system = cfg.tracking.log_system_metrics
    if run_id is not None:
        return mlflow.start_run(run_id=run_id, log_system_metrics=system).info.run_id
    run = mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=system)
    mlflow.log_params(flatten(cfg))
    mlflow.log_text(dump_config(cfg), "config.yaml")
    log_shards_input(cfg.data.shards)
    return run.info.run_id


def shards_dataset(folder: str) -> tuple[Any, dict[str, str]]:
    """The shards as an MLflow dataset (name, digest of the manifest, source folder) and the tags
    of the run's input (videos per split, number of classes)."""
    import hashlib
    import json

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from pipelines.shard_format import MANIFEST, read_manifest

    manifest = read_manifest(folder)
    # Everything but the creation time: shards remade with the same content keep their digest.
    content = {k: v for k, v in manifest.items() if k != "created"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a local folder
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(folder))
    name = f"{manifest['dataset']}-shards"
    tags = {f"{split}_videos": str(info["samples"]) for split, info in manifest["splits"].items()}
    tags["classes"] = str(len(manifest["classes"]))
    tags["manifest"] = str(Path(folder) / MANIFEST)
    return MetaDataset(source, name=name, digest=digest), tags


def log_shards_input(folder: str) -> None:
    """Log the training shards as the run's dataset input (the UI's Dataset column and filter)."""
    import mlflow

    dataset, tags = shards_dataset(folder)
    mlflow.log_input(dataset, context="training", tags=tags)


def run_links(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> list[str]:
    """Links that open the MLflow UI on the experiment's training runs (model-training mode) and
    on the run; for a database store, on the `mlflow ui` it would be served by."""
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
    else:
        base = "http://127.0.0.1:5000"
    links = [f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"]
    if run_id:
        links.append(f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning")
    return links


def lineage_tags(cfg: RunConfig, init_tags: dict[str, str], run_name: str) -> dict[str, str]:
    """Tags linking the runs of one recipe (base streams -> stage 1 -> stage 2), for the UI's
    filters and group-by:

    * ``stresnet.stage``: ``base`` (single-stream modes) or ``stage N``, one more than the
      latest stage among the runs whose weights this run starts from (``stage 1`` without any);
    * ``stresnet.parents``: the MLflow run names this run's ``model.init`` weights come from;
    * ``stresnet.lineage``: this run and every run before it in the recipe, so filtering with
      ``tags.`stresnet.lineage` LIKE '%BASE_RUN%'`` shows a run and everything built on it.

    A parent is found from a checkpoint's ``train_state.pt`` (its MLflow run id) or a registered
    model version (``init_tags`` say which version a ``models:/`` URI resolved to).
    """
    import mlflow

    from stresnet.checkpoint import checkpoint_file, load_train_state

    client = mlflow.MlflowClient(cfg.tracking.uri)
    parents = []
    for key, path in cfg.model.init.files().items():
        if key == "torchvision_weights" or not path:
            continue
        run_id = None
        resolved = MODEL_URI.search(init_tags.get(f"model.init.{key}", "").split(" = ")[-1])
        try:
            if resolved and resolved["version"]:
                run_id = client.get_model_version(resolved["name"], resolved["version"]).run_id
            else:
                run_id = load_train_state(checkpoint_file(path).parent).get("mlflow_run_id")
            if run_id:
                parents.append(client.get_run(run_id))
        except Exception:  # noqa: BLE001 - lineage is best effort: a missing parent is no error
            continue
    if cfg.model.mode in ("appearance", "motion"):
        stage = "base"
    else:
        numbers = [int(p.data.tags.get("stresnet.stage", "stage 0").split()[-1])
                   for p in parents if p.data.tags.get("stresnet.stage", "").startswith("stage")]
        stage = f"stage {max(numbers, default=0) + 1}"
    lineage: list[str] = []
    for parent in parents:
        for name in parent.data.tags.get("stresnet.lineage", parent.info.run_name).split(","):
            if name and name not in lineage:
                lineage.append(name)
    tags = {"stresnet.stage": stage, "stresnet.lineage": ",".join([*lineage, run_name])}
    if parents:
        tags["stresnet.parents"] = ",".join(p.info.run_name for p in parents)
    return tags


def log_final_model(model: nn.Module, cfg: RunConfig, shards: dict | None = None) -> str:
    """Log the model to the active MLflow run, register it, point the alias at it. ``shards``:
    the training shards' class names and parameters, kept in ``model.pt`` (see
    ``stresnet.checkpoint``).

    Returns the registry URI ``models:/<name>@<alias>``.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    served = serving.serving_model(model, cfg.model)
    example = serving.example_clips(cfg.model, cfg.sampling.train_positions).numpy()
    with torch.no_grad():
        scores = served(torch.from_numpy(example)).numpy()
    signature = ModelSignature(
        # Unnamed tensors: pyfunc then passes one array, which is all mlflow.pytorch serves.
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1], example.shape[2], -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) + scores.shape[1:])]),
    )
    name = registered_model_name(cfg)
    with tempfile.TemporaryDirectory() as folder:
        # Models from code: MLflow stores cluster/pyfunc_model.py as source, not a pickle, and
        # that code builds the network from the checkpoint-format weights with
        # torch.load(weights_only=True). The same file is what a later stage starts from.
        weights = save_model_file(Path(folder) / MODEL_FILE, served.model.state_dict(), to_dict(cfg),
                                  shards)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={MODEL_FILE: str(weights)},  # pyfunc_model.WEIGHTS
            signature=signature,
            input_example=example,
            registered_model_name=name,
            code_paths=[str(REPO / "stresnet")],
            # Skip MLflow's requirement inference (it imports the model in a subprocess: slow).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pyyaml",
                              f"mlflow=={mlflow.__version__}"],
        )
    mlflow.MlflowClient().set_registered_model_alias(
        name, cfg.tracking.alias, info.registered_model_version
    )
    return f"models:/{name}@{cfg.tracking.alias}"


def is_model_uri(value: str | None) -> bool:
    return bool(value) and value.startswith("models:/")


def fetch_registered_weights(uri: str, tracking_uri: str, destination: Path) -> str:
    """Download the weights of registered model ``uri`` (``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``) to ``destination`` (a ``model.pt``-format file); returns the
    version it resolved to, ``models:/NAME/VERSION``. Raises :class:`TrackingError` naming the URI.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise TrackingError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = mlflow.MlflowClient(tracking_uri)
    name = match["name"]
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"]).version
        else:
            version = client.get_model_version(name, match["version"]).version
        source = client.get_model_version_download_uri(name, version)
    except MlflowException as err:
        raise TrackingError(f"{uri}: not in the model registry at {tracking_uri} ({err.message})") from None
    destination.parent.mkdir(parents=True, exist_ok=True)  # only now: a bad URI leaves nothing
    with tempfile.TemporaryDirectory(dir=destination.parent) as folder:
        for artifact in WEIGHTS_ARTIFACTS:
            try:
                file = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{source.rstrip('/')}/{artifact}", dst_path=folder
                )
                break
            except MlflowException:
                continue
        else:
            raise TrackingError(
                f"{uri}: version {version} has no {WEIGHTS_ARTIFACTS[0]} (not logged by this "
                f"version of stresnet?); start from its training run's checkpoint folder instead"
            )
        os.replace(file, destination)  # whole or not at all: a resumed run reuses it
    return f"models:/{name}/{version}"


def log_report(report_files: dict[str, Path], artifact_path: str) -> None:
    """Log an evaluation report's files (``save_report``'s result) to the active run."""
    import mlflow

    for path in report_files.values():
        mlflow.log_artifact(str(path), artifact_path)


def log_metrics(metrics: dict[str, Any], step: int) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def end_run(status: str = "FINISHED") -> None:
    import mlflow

    mlflow.end_run(status=status)
