"""ST-ResNet (Feichtenhofer et al., NIPS 2016): two ResNet streams joined by residual connections.

``model.appearance`` sees RGB frames, ``model.motion`` stacks of 2L optical-flow channels; both are
``stresnet.backbone.ResNet`` (torchvision names). Modes:

* ``st_resnet``: the streams run unit by unit in lockstep, joined by the cross-stream
  connections of ``stresnet.cross_stream`` (spec section 2; ``model.injection``).
* ``late_fusion``: the same two streams without cross-stream connections (plain two-stream).
* ``appearance`` / ``motion``: one stream (base-stream training); the other input is ``None``.

Temporal convolutions and temporal pooling live inside each stream (``model.temporal``,
``model.temporal_pool``); they apply in every mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from stresnet.backbone import ResNet
from stresnet.checkpoint import WeightsError, read_model_file
from stresnet.config import ModelConfig, from_dict
from stresnet.cross_stream import CrossStreamConnection
from stresnet.weights import initialize


class STResNet(nn.Module):
    """``model(rgb (B,T,3,H,W), flow (B,T,2L,H,W))`` -> ``{"appearance", "motion", "fused"}``.

    Stream entries are class logits averaged over the remaining time steps; ``fused`` is the mean
    of the streams' softmax scores. Single-stream modes return their stream and ``fused``.
    ``per_step=True``: stream entries are the logits of every remaining time step
    ``(B, T', K)`` (for the per-step loss); ``fused`` is still computed from their time average.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.streams = cfg.streams
        common = dict(depth=cfg.depth, width=cfg.width, num_classes=cfg.num_classes,
                      temporal=cfg.temporal, pool=cfg.temporal_pool)
        if "appearance" in self.streams:
            self.appearance = ResNet(in_channels=3, dropout=cfg.dropout_appearance, **common)
        if "motion" in self.streams:
            self.motion = ResNet(
                in_channels=2 * cfg.flow_length, dropout=cfg.dropout_motion, **common
            )
        # Cross-stream connections exist only in st_resnet mode (late fusion is their ablation).
        self.cross_stream = None
        if cfg.mode == "st_resnet" and cfg.injection.stages:
            self.cross_stream = CrossStreamConnection(cfg.injection)

    def forward(
        self, rgb: Optional[Tensor], flow: Optional[Tensor], per_step: bool = False
    ) -> dict[str, Tensor]:
        inputs = {"appearance": rgb, "motion": flow}
        for name in self.streams:
            if inputs[name] is None:
                raise ValueError(f"model mode {self.cfg.mode!r} needs the {name} input, got None")
        num_frames = inputs[self.streams[0]].shape[1]
        if len(self.streams) == 2 and rgb.shape[:2] != flow.shape[:2]:
            raise ValueError(f"rgb and flow clips differ in (batch, frames): "
                             f"{tuple(rgb.shape[:2])} vs {tuple(flow.shape[:2])}")
        # (B, T, C, H, W) -> (B*T, C, H, W): every 2D layer processes all frames in one call.
        frames = {name: inputs[name].flatten(0, 1) for name in self.streams}

        if self.cross_stream is not None:
            features = self._cross_stream_features(frames["appearance"], frames["motion"], num_frames)
        else:
            features = {name: getattr(self, name).features(frames[name], num_frames)
                        for name in self.streams}
        out = {name: getattr(self, name).head(features[name], num_frames, per_step)
               for name in self.streams}
        clip_logits = [out[name].mean(dim=1) if per_step else out[name] for name in self.streams]
        out["fused"] = torch.stack([logits.softmax(dim=-1) for logits in clip_logits]).mean(0)
        return out

    def _cross_stream_features(self, a: Tensor, m: Tensor, num_frames: int) -> dict[str, Tensor]:
        """Both streams stage by stage, joined by the cross-stream connections."""
        a, m = self.appearance.stem(a), self.motion.stem(m)
        for number in (2, 3, 4, 5):
            a, m = self.cross_stream(number, self.appearance.stage(number),
                                     self.motion.stage(number), a, m, num_frames)
        return {"appearance": a, "motion": m}


def build_model(cfg: ModelConfig) -> STResNet:
    """The network described by ``cfg``, with its weights initialised per ``cfg.init``."""
    model = STResNet(cfg)
    initialize(model, cfg)
    return model


def load_model(path: str | Path) -> STResNet:
    """The network saved in ``model.pt`` (the file, a checkpoint folder or a run folder: see
    ``stresnet.checkpoint.checkpoint_file``), built from the model config stored beside the
    weights, so it matches whatever the run trained. ``model.cfg.init`` is ``random``: the
    weights came from the file. ``model.classes``: the class names stored with the weights
    (label order), None in files written before they were stored."""
    source, payload = read_model_file(path)
    config = payload.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise WeightsError(f"{source}: not a stresnet model file (expected keys 'model' and 'config')")
    model = build_model(from_dict(ModelConfig, {**config["model"], "init": {"kind": "random"}}, "model"))
    model.load_state_dict(payload["model"])
    classes = (payload.get("shards") or {}).get("classes", payload.get("classes"))
    model.classes = [str(c) for c in classes] if isinstance(classes, list) else None
    return model
