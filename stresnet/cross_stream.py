"""The cross-stream residual connections of ST-ResNet (spec section 2), as one module.

In every configured stage (``conv2_x`` .. ``conv5_x``) the first residual unit's output of the
sending stream enters the second unit of the receiving stream. Everything about that connection
lives here: its config (:class:`InjectionConfig`), which stages and which unit, the direction, and
how the two streams combine (:data:`VARIANTS`). ``Bottleneck`` only takes an optional extra tensor
for its residual branch. In the spirit of pytorchvideo's fusion modules: the streams stay plain
ResNets, the connection between them is a module of its own. To add a variant, add a function to
:data:`VARIANTS` and its name to ``InjectionConfig.variant``, both in this file.

Notation (appearance receiving; swap the roles for the motion stream when bidirectional): unit 1
of the stage computes ``s_a = F1(x) + identity`` (its sum before the ReLU) and ``x_a = relu(s_a)``;
``x_m`` is the motion stream's unit-1 output (after its ReLU); ``F`` is unit 2's residual branch.
Unit 2's output before its own ReLU is then

============  ==============================  ===============================================
variant       unit 2                          where
============  ==============================  ===============================================
``code``      ``x_a + F(s_a + x_m)``          authors' MatConvNet code (default)
``paper``     ``x_a + F(x_a + x_m)``          the paper's equation (spec section 2)
``direct``    ``(x_a + x_m) + F(x_a + x_m)``  ablation: into the identity path too
============  ==============================  ===============================================

``code``: ``STResNet_stage1.m`` inserts a ``dagnn.Sum`` of the motion ``resNa_relu`` output and
the appearance ``resNa`` output (the unit's Sum, before its ReLU) with ``addLayerAt`` right after
the appearance ``resNa_relu`` layer, and rewires only the next layer, ``resNb_branch2a``, to read
it (the fork's ``matlab/+dagnn/@DagNN/addLayerAt.m`` inserts *after* the given index). Unit b's
identity input, the ``resNb`` Sum, still reads ``resNa_relu``: the appearance ReLU's output. So the
residual branch sees the appearance features *before* their ReLU, and the identity path is
untouched. See ``docs/model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor, nn

# How unit 2 combines its stream's unit-1 output with the other stream's:
# (unit 2, x = own unit-1 output, s = own unit-1 sum before ReLU, other, num_frames) -> output
Combine = Callable[[nn.Module, Tensor, Tensor, Tensor, int], Tensor]


def code_variant(unit: nn.Module, x: Tensor, s: Tensor, other: Tensor, num_frames: int) -> Tensor:
    """``x + F(s + other)``: the authors' code."""
    return unit(x, num_frames, branch_input=s + other)


def paper_variant(unit: nn.Module, x: Tensor, s: Tensor, other: Tensor, num_frames: int) -> Tensor:
    """``x + F(x + other)``: the paper's equation."""
    return unit(x, num_frames, branch_input=x + other)


def direct_variant(unit: nn.Module, x: Tensor, s: Tensor, other: Tensor, num_frames: int) -> Tensor:
    """``(x + other) + F(x + other)``: into the identity path too (ablation)."""
    return unit(x + other, num_frames)


VARIANTS: dict[str, Combine] = {"code": code_variant, "paper": paper_variant, "direct": direct_variant}

RECEIVING_UNIT = 1  # 0-based: the second unit of a stage receives the first unit's output


@dataclass
class InjectionConfig:
    """Cross-stream residual connections (``model.injection``; spec section 2)."""

    stages: list[Literal[2, 3, 4, 5]] = field(default_factory=lambda: [2, 3, 4, 5])  # [] disables
    variant: Literal["code", "paper", "direct"] = "code"  # the names of VARIANTS
    direction: Literal["motion_to_appearance", "bidirectional"] = "motion_to_appearance"

    RENAMED: ClassVar[dict[str, str]] = {"kind": "variant (kind: residual is variant: paper)"}


class CrossStreamConnection(nn.Module):
    """Runs one stage of both streams unit by unit, joining them per :class:`InjectionConfig`.

    Has no parameters: the connections are additions. Stages not configured run each stream on
    its own.
    """

    def __init__(self, cfg: InjectionConfig) -> None:
        super().__init__()
        self.stages = frozenset(cfg.stages)
        self.variant = cfg.variant  # a name, not the function: the module stays picklable
        self.bidirectional = cfg.direction == "bidirectional"

    def forward(
        self, number: int, a_units: nn.Sequential, m_units: nn.Sequential, a: Tensor, m: Tensor,
        num_frames: int,
    ) -> tuple[Tensor, Tensor]:
        """Stage ``number`` (2..5) of the appearance and motion streams on ``a`` and ``m``."""
        if number not in self.stages:
            for a_unit, m_unit in zip(a_units, m_units):
                a, m = a_unit(a, num_frames), m_unit(m, num_frames)
            return a, m
        for index, (a_unit, m_unit) in enumerate(zip(a_units, m_units)):
            if index == RECEIVING_UNIT - 1:  # the sending unit: keep its sums before the ReLU
                s_a, s_m = a_unit.residual_sum(a, num_frames), m_unit.residual_sum(m, num_frames)
                a, m = torch.relu(s_a), torch.relu(s_m)
            elif index == RECEIVING_UNIT:
                combine = VARIANTS[self.variant]
                a, m = (
                    combine(a_unit, a, s_a, m, num_frames),
                    combine(m_unit, m, s_m, a, num_frames) if self.bidirectional
                    else m_unit(m, num_frames),
                )
            else:
                a, m = a_unit(a, num_frames), m_unit(m, num_frames)
        return a, m

    def extra_repr(self) -> str:
        direction = "bidirectional" if self.bidirectional else "motion_to_appearance"
        return f"stages={sorted(self.stages)}, variant={self.variant}, direction={direction}"

