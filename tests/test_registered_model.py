"""The registered MLflow model loads without unpickling anything and predicts like the checkpoint.

A tiny network is logged with ``cluster.tracking.log_final_model`` (what training's last step
does) into a temporary sqlite store; a fresh Python process whose ``pickle``/``cloudpickle``
loaders and ``torch.load(weights_only=False)`` raise then loads it, as MLflow's pyfunc and as
``stresnet evaluate --model-uri`` does, and its scores must equal the checkpoint network's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import load_config
from stresnet.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "tiny.yaml"

# Run in the fresh process: every unpickling entry point raises, then the model is loaded.
NO_PICKLE = r'''
import pickle, sys, numpy as np, torch

def refuse(*args, **kwargs):
    raise AssertionError("unpickling attempted")

pickle.loads = pickle.load = refuse
try:
    import cloudpickle
    cloudpickle.loads = cloudpickle.load = refuse
except ImportError:
    pass
_torch_load = torch.load
def guarded_load(*args, weights_only=None, **kwargs):
    if weights_only is not True:
        raise AssertionError("torch.load without weights_only=True")
    return _torch_load(*args, weights_only=True, **kwargs)
torch.load = guarded_load

import mlflow
from cluster.evaluate import load_registered_model

tracking_uri, clips_file, out_file = sys.argv[1:]
mlflow.set_tracking_uri(tracking_uri)
clips = np.load(clips_file, allow_pickle=False)
scores = mlflow.pyfunc.load_model("models:/stresnet-synthetic@current").predict(clips)
network = load_registered_model("models:/stresnet-synthetic@current", tracking_uri).eval()
with torch.no_grad():
    out = network(torch.from_numpy(clips[:, :, :3]), torch.from_numpy(clips[:, :, 3:]))
np.savez(out_file, pyfunc=scores, network=out["fused"].numpy())
print("loaded without pickle")
'''


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny network logged and registered as training does; (tracking URI, network)."""
    import mlflow

    from cluster.tracking import ensure_experiment, log_final_model

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config(TINY, [f"tracking.uri={uri}", "model.init.kind=random"])
    torch.manual_seed(0)
    network = build_model(cfg.model).eval()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=ensure_experiment(cfg)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert log_final_model(network, cfg) == "models:/stresnet-synthetic@current"
    return uri, network, [str(w.message) for w in caught]


def test_registered_model_is_logged_without_pickle_or_its_warning(registered):
    from mlflow import MlflowClient

    uri, _, messages = registered
    assert not [m for m in messages if "pickle" in m.lower()], messages
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("stresnet-synthetic", "current")
    folder = Path(client.get_model_version_download_uri("stresnet-synthetic", version.version))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "artifacts/model.pt" in files and "MLmodel" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth"))], files
    assert "python_model.pkl" not in files and not (folder / "data").exists()


def test_registered_model_loads_with_pickle_disabled_and_predicts_like_the_checkpoint(
    registered, tmp_path
):
    uri, network, _ = registered
    clips = torch.randn(3, 2, 3 + 4, 32, 32, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "clips.npy", clips.numpy())
    out = tmp_path / "scores.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", NO_PICKLE, uri, str(tmp_path / "clips.npy"), str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded without pickle" in done.stdout
    with torch.no_grad():
        expected = network(clips[:, :, :3], clips[:, :, 3:])
    want = torch.stack([expected["appearance"].softmax(1), expected["motion"].softmax(1),
                        expected["fused"]], 1).numpy()
    got = np.load(out)
    np.testing.assert_allclose(got["pyfunc"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["network"], expected["fused"].numpy(), rtol=1e-5, atol=1e-6)
