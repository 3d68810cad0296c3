"""The served model: the trained network behind one input tensor and one output tensor.

Model servers (MLflow's pyfunc among them) pass one array in and take one array out, so
:class:`ServingModel` packs the two inputs into one tensor and the streams' scores into another:

* input ``clips (B, T, C, H, W)``: the RGB channels (3) then the flow stack's ``2L`` channels,
  only the modalities the model's mode uses (``ModelConfig.input_channels``);
* output ``(B, S, K)``: softmax scores of the model's streams, then ``fused``, in that order
  (:attr:`ServingModel.outputs`).

Nothing here knows about MLflow: ``cluster/tracking.py`` logs a ``ServingModel`` and only the
``stresnet`` package's code has to travel with it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from stresnet.config import ModelConfig


class ServingModel(nn.Module):
    """``clips (B, T, C, H, W)`` -> per-stream scores ``(B, S, K)`` (see the module docstring)."""

    def __init__(self, model: nn.Module, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.model = model
        self.uses_rgb = model_cfg.uses_rgb
        self.uses_flow = model_cfg.uses_flow
        self.streams = [*model_cfg.streams, "fused"]  # the output's S entries, in order

    def forward(self, clips: Tensor) -> Tensor:
        rgb = clips[:, :, :3] if self.uses_rgb else None
        flow = (clips[:, :, 3:] if self.uses_rgb else clips) if self.uses_flow else None
        outputs = self.model(rgb, flow)
        scores = [
            outputs[s].float() if s == "fused" else outputs[s].float().softmax(dim=1)
            for s in self.streams
        ]
        return torch.stack(scores, dim=1)


def serving_model(model: nn.Module, model_cfg: ModelConfig) -> ServingModel:
    """A CPU float32 eval-mode copy of ``model`` (unwrapped from DDP) behind :class:`ServingModel`."""
    model = copy.deepcopy(getattr(model, "module", model)).float().cpu().eval()
    return ServingModel(model, model_cfg)


def example_clips(model_cfg: ModelConfig, frames: int, size: int = 32, seed: int = 0) -> Tensor:
    """A small input example: one clip of ``frames`` positions, ``size`` pixels square (the
    network is fully convolutional in space)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, model_cfg.input_channels, size, size, generator=generator)
