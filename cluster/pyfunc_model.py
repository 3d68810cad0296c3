"""The registered model's code: an MLflow pyfunc logged as *models from code*, without pickle.

``cluster.tracking.log_final_model`` logs this file (``python_model=<this file>``) with the
checkpoint-format weights as the artifact ``model.pt`` and the ``stresnet`` package as code.
Loading the model (``mlflow.pyfunc.load_model``, ``mlflow models serve``) runs this file, which
builds the network from the weights file with ``torch.load(weights_only=True)``: nothing is
unpickled, so a registered model cannot run code hidden in a pickle (the warning MLflow prints
for pickled models does not apply).

Input and output are those of ``stresnet.serving.ServingModel``: clips ``(B, T, C, H, W)``
float32 -> per-stream scores ``(B, S, K)``.

This file is executed by MLflow in the loading process: it imports only ``mlflow`` and the
``stresnet`` package that travels with the model, never ``cluster``.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

WEIGHTS = "model.pt"  # the artifact key (and file name) of the weights


class STResNetPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper around ``ServingModel`` built from the logged ``model.pt``."""

    def load_context(self, context) -> None:
        from stresnet.model import load_model
        from stresnet.serving import ServingModel

        network = load_model(context.artifacts[WEIGHTS]).eval()
        self.served = ServingModel(network, network.cfg).eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        clips = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.served(clips).numpy()


mlflow.models.set_model(STResNetPyfunc())
