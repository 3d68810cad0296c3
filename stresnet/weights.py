"""Where an ST-ResNet's weights come from before training (``model.init``).

The chain the paper trains along (spec sections 1-4):

1. ``torchvision``: an ImageNet ResNet state dict -> each base stream. The motion stream's conv1
   gets the "cross-modality" init: the RGB filters averaged over their 3 input channels and
   replicated over the 2L flow channels. The classifier is re-initialised when the class count
   differs.
2. ``base_streams``: the ST-ResNet takes its appearance stream from the trained appearance base
   stream's checkpoint and its motion stream from the motion one.
3. ``checkpoint``: a whole model, e.g. stage 2 from stage 1.

In every case a 1x1 weight meets a temporal conv by inflation (``stresnet.backbone.inflate_1x1``,
rule ``model.temporal.init``). Files load through ``stresnet.checkpoint`` (``weights_only=True``); any missing,
unexpected or mis-shaped key stops with the file name and the lists of keys.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from stresnet.backbone import inflate_1x1
from stresnet.checkpoint import WeightsError, load_file, read_checkpoint
from stresnet.config import ModelConfig

log = logging.getLogger(__name__)


def initialize(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Initialise ``model`` (an ``STResNet``: one ResNet attribute per stream of
    ``model_cfg.streams``) in place per ``model_cfg.init``; ``random`` keeps the constructor's."""
    cfg, streams = model_cfg.init, model_cfg.streams
    temporal_init = model_cfg.temporal.init
    if cfg.kind == "random":
        return
    if cfg.kind == "torchvision":
        source, state = torchvision_state_dict(cfg.torchvision_weights, model_cfg.depth)
        for name in streams:
            load_stream(getattr(model, name), state, source, temporal_init,
                        cross_modality=name == "motion", new_classifier=True)
    elif cfg.kind == "base_streams":
        files = {"appearance": cfg.appearance_checkpoint, "motion": cfg.motion_checkpoint}
        for name in streams:
            source, state = read_checkpoint(files[name])
            load_stream(getattr(model, name), stream_part(state, name, source, strict=False),
                        source, temporal_init)
    elif cfg.kind == "checkpoint":
        source, state = read_checkpoint(cfg.checkpoint)
        others = sorted(k for k in state if k.split(".", 1)[0] not in streams)
        if others:
            raise WeightsError(f"{source}: unexpected keys (streams this model lacks): {others}")
        for name in streams:
            load_stream(getattr(model, name), stream_part(state, name, source, strict=True),
                        source, temporal_init)
    log.info("initialised %s from %s", model_cfg.mode, cfg.kind)


def torchvision_state_dict(weights: str | None, depth: int) -> tuple[str, dict[str, Tensor]]:
    """(source name, state dict) of a torchvision ResNet: a file, or ``imagenet`` (downloads)."""
    if weights == "imagenet":
        from torchvision import models

        enum = {50: models.ResNet50_Weights, 101: models.ResNet101_Weights,
                152: models.ResNet152_Weights}[depth].IMAGENET1K_V1  # the classic recipe
        return f"torchvision {enum}", enum.get_state_dict(progress=False)
    state = load_file(weights)
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{weights}: expected a ResNet state dict (name -> tensor)")
    return str(weights), state


def stream_part(state: dict[str, Tensor], name: str, source: str, strict: bool) -> dict[str, Tensor]:
    """The entries ``{name}.*`` of a model state dict, without the prefix."""
    prefix = f"{name}."
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        streams = sorted({k.split(".", 1)[0] for k in state})
        raise WeightsError(f"{source}: no {name} stream in this checkpoint (it has {streams})")
    return part


def load_stream(
    stream: nn.Module,
    state: dict[str, Tensor],
    source: str,
    temporal_init: str,
    cross_modality: bool = False,
    new_classifier: bool = False,
) -> None:
    """Load ``state`` into one ResNet stream, adapting only what the init chain allows.

    Adaptations: 1x1 -> temporal inflation; ``cross_modality``: RGB conv1 -> 2L flow channels;
    ``new_classifier``: keep the fresh fc when the class count differs. Everything else must
    match exactly, or ``WeightsError`` lists the missing, unexpected and mis-shaped keys.
    """
    target = stream.state_dict()
    if new_classifier and state.get("fc.weight", None) is not None:
        if state["fc.weight"].shape != target["fc.weight"].shape:
            log.info("%s: classifier has %d classes, model %d: fc re-initialised", source,
                     state["fc.weight"].shape[0], target["fc.weight"].shape[0])
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            target = {k: v for k, v in target.items() if not k.startswith("fc.")}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    loaded, mismatched = {}, []
    for key in sorted(set(target) & set(state)):
        src, dst = state[key], target[key]
        if src.shape == dst.shape:
            loaded[key] = src
        elif dst.dim() == 5 and src.dim() == 4 and src.shape == dst.shape[:2] + (1, 1):
            loaded[key] = inflate_1x1(src, dst.shape[2], temporal_init)
        elif cross_modality and key == "conv1.weight" and src.shape[1] == 3 \
                and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
            loaded[key] = src.mean(dim=1, keepdim=True).expand_as(dst)
        else:
            mismatched.append(f"{key}: file {tuple(src.shape)} vs model {tuple(dst.shape)}")
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{source}: does not fit the model: missing keys {missing}; unexpected keys "
            f"{unexpected}; shape mismatches {mismatched}"
        )
    stream.load_state_dict(loaded, strict=False)
