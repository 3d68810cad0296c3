"""One stream of the two-stream network: a torchvision-layout bottleneck ResNet for video clips.

The layout and parameter names are torchvision's (``conv1, bn1, layer1..layer4, fc``; blocks with
``conv1..conv3, bn1..bn3, downsample.0/1``), so ImageNet weights load by name. Three additions:

* ``width`` scales every channel count (stem, bottleneck and output widths), so the same
  architecture runs small on a CPU. ``width=1.0`` is exactly torchvision's network.
* Clips: the 2D layers see all frames of all clips at once, ``(B*T, C, H, W)``; only the temporal
  convolutions (spec section 3) and the temporal pooling look across time, through views of it.
* The temporal pooling head (spec section 4): pool over time on the last stage's output, then
  classify every remaining time step and average the logits.

The cross-stream connections (spec section 2) live in ``stresnet.cross_stream``, which steps the
two streams' residual units in lockstep and hands the receiving unit its extra input.
"""

from __future__ import annotations

from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv

from stresnet.config import TemporalConfig, TemporalPoolConfig

# Residual units per stage (conv2_x .. conv5_x), as in torchvision.
STAGE_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def channels(base: int, width: float) -> int:
    """A torchvision channel count scaled by the width multiplier (at least 1)."""
    return max(1, int(round(base * width)))


def inflate_1x1(weight: Tensor, kernel: int, init: Literal["average", "center"]) -> Tensor:
    """A 1x1 conv weight ``(out, in, 1, 1)`` -> temporal ``(out, in, kernel, 1, 1)``.

    ``average`` (authors' code): W/kernel on every tap, so a clip of identical frames gives the 2D
    result. ``center``: W on the centre tap, zeros elsewhere (same property, frame by frame).
    """
    taps = weight.unsqueeze(2).expand(-1, -1, kernel, -1, -1)
    if init == "average":
        return taps / kernel
    inflated = torch.zeros_like(taps)
    inflated[:, :, kernel // 2] = weight
    return inflated


class TemporalConv(nn.Module):
    """A 1x1 convolution turned into a ``kernel x 1 x 1`` convolution over time.

    Takes and returns frames ``(B*T, C, H, W)``. In the state dict its ``weight`` keeps the 1x1
    conv's name with a 3D shape ``(out, in, kernel, 1, 1)``. Padding in time repeats the end
    frames (``replicate``, so identical frames stay exactly 2D) or adds zeros (``zero``, the
    authors' code).

    A ``k x 1 x 1`` conv over ``(T, H, W)`` is a ``k x 1`` 2D conv over ``(T, H*W)``; run that
    way it uses the well-tuned 2D kernels (2-3x faster than ``conv3d`` on CPU), and the
    ``(B, C, T, H*W)`` view of channels-last frames is itself channels-last: no copies. The
    parameter is therefore held as ``(out, in, kernel, 1)``, which also lets
    ``model.to(memory_format=torch.channels_last)`` work (it rejects 5D parameters).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, padding: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.kernel, self.padding = kernel, padding
        self.register_state_dict_post_hook(_weight_to_3d)
        self.register_load_state_dict_pre_hook(_weight_from_3d)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        size = x.shape[2:]
        clips = x.unflatten(0, (-1, num_frames)).flatten(3).transpose(1, 2)  # (B, C, T, H*W)
        pad = self.kernel // 2
        if self.padding == "replicate":
            clips, pad = F.pad(clips, (0, 0, pad, pad), mode="replicate"), 0
        out = F.conv2d(clips, self.weight, padding=(pad, 0))  # zero padding in time
        return out.transpose(1, 2).unflatten(3, size).flatten(0, 1)

    def extra_repr(self) -> str:
        out, inp, kernel = self.weight.shape[:3]
        return f"{inp}, {out}, kernel={kernel}x1x1, padding={self.padding}"


def _weight_to_3d(module: nn.Module, state: dict, prefix: str, metadata: dict) -> None:
    state[prefix + "weight"] = state[prefix + "weight"].unsqueeze(-1)


def _weight_from_3d(module: nn.Module, state: dict, prefix: str, *args) -> None:
    weight = state.get(prefix + "weight")
    if weight is not None and weight.dim() == 5 and weight.shape[-1] == 1:
        state[prefix + "weight"] = weight.squeeze(-1)


def _conv(conv: nn.Module, x: Tensor, num_frames: int) -> Tensor:
    return conv(x, num_frames) if isinstance(conv, TemporalConv) else conv(x)


class Bottleneck(tv.Bottleneck):
    """torchvision's bottleneck unit, on clips, whose residual branch may read an extra tensor.

    ``branch_input`` (same shape as ``x``): what the residual branch reads instead of ``x``; the
    identity path keeps ``x``. The cross-stream connections (``stresnet.cross_stream``) use it.
    """

    def residual_sum(
        self, x: Tensor, num_frames: int = 1, branch_input: Optional[Tensor] = None
    ) -> Tensor:
        """``F(branch_input or x) + identity(x)``: the unit's output before its final ReLU."""
        out = x if branch_input is None else branch_input
        out = self.relu(self.bn1(_conv(self.conv1, out, num_frames)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(_conv(self.conv3, out, num_frames))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity

    def forward(  # type: ignore[override]
        self, x: Tensor, num_frames: int = 1, branch_input: Optional[Tensor] = None
    ) -> Tensor:
        return self.relu(self.residual_sum(x, num_frames, branch_input))


class ResNet(nn.Module):
    """A bottleneck ResNet stream (torchvision names) with width multiplier and clip support.

    ``temporal``: which 1x1 convs become temporal (None or empty stages: a plain 2D network).
    ``pool``: temporal pooling before the classifier (None: ``kind: none``).
    """

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        in_channels: int = 3,
        num_classes: int = 1000,
        dropout: float = 0.0,
        temporal: Optional[TemporalConfig] = None,
        pool: Optional[TemporalPoolConfig] = None,
    ) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"depth: got {depth}, expected one of {sorted(STAGE_BLOCKS)}")
        self.pool = pool or TemporalPoolConfig()
        stem = channels(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        for index, blocks in enumerate(STAGE_BLOCKS[depth]):
            planes = channels(64 * 2**index, width)
            stage = self._make_stage(inplanes, planes, blocks, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", stage)
            inplanes = planes * Bottleneck.expansion
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes, num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if temporal is not None:
            self._make_temporal(temporal)

    @staticmethod
    def _make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                tv.conv1x1(inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        units = [Bottleneck(inplanes, planes, stride, downsample)]
        units += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def _make_temporal(self, cfg: TemporalConfig) -> None:
        """Swap the configured 1x1 convs for temporal ones, initialised from their 2D weights."""
        for stage in cfg.stages:
            units = self.stage(stage)
            for unit in cfg.units:
                if unit > len(units):
                    raise ValueError(
                        f"model.temporal.units: unit {unit} does not exist in stage {stage} "
                        f"(it has {len(units)} units)"
                    )
                block = units[unit - 1]
                for name in cfg.convs:
                    attr = {"a": "conv1", "c": "conv3"}[name]
                    conv2d: nn.Conv2d = getattr(block, attr)
                    temporal = TemporalConv(
                        conv2d.in_channels, conv2d.out_channels, cfg.kernel, cfg.padding
                    )
                    with torch.no_grad():
                        temporal.weight.copy_(
                            inflate_1x1(conv2d.weight, cfg.kernel, cfg.init).squeeze(-1)
                        )
                    setattr(block, attr, temporal)

    def stage(self, number: int) -> nn.Sequential:
        """Stage ``conv{number}_x`` of the paper (2..5) = torchvision's ``layer{number - 1}``."""
        return getattr(self, f"layer{number - 1}")

    def stages(self) -> Iterator[nn.Sequential]:
        return (self.stage(n) for n in (2, 3, 4, 5))

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def features(self, x: Tensor, num_frames: int = 1) -> Tensor:
        """Frames ``(B*T, C, H, W)`` -> the last stage's output ``(B*T, C', H', W')``."""
        x = self.stem(x)
        for stage in self.stages():
            for block in stage:
                x = block(x, num_frames)
        return x

    def head(self, x: Tensor, num_frames: int = 1) -> Tensor:
        """Last-stage output ``(B*T, C, h, w)`` -> clip logits ``(B, K)``.

        Temporal pooling first (max or avg over a window of time steps), then spatial average
        pooling, dropout and the classifier on every remaining time step; their logits are
        averaged. A window longer than the clip is shortened to the clip.
        """
        clips = x.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (B, C, T, h, w)
        if self.pool.kind != "none":
            window = min(self.pool.window, num_frames)
            pool3d = F.max_pool3d if self.pool.kind == "max" else F.avg_pool3d
            clips = pool3d(clips, (window, 1, 1), (self.pool.stride, 1, 1))
        steps = clips.mean(dim=(3, 4)).transpose(1, 2)  # (B, T', C)
        return self.fc(self.dropout(steps)).mean(dim=1)

    def forward(self, x: Tensor, num_frames: int = 1) -> Tensor:
        """Frames ``(B*T, C, H, W)`` of ``B`` clips -> logits ``(B, K)``.

        With ``num_frames=1`` this is torchvision's ``ResNet.forward`` on images.
        """
        return self.head(self.features(x, num_frames), num_frames)
