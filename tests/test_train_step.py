"""The training step: parameter groups, learning-rate schedule, accumulation, summed losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stresnet.config import ConfigError, TrainConfig
from stresnet.train_step import (
    accumulation_steps,
    build_optimizer,
    forward_backward,
    learning_rate,
    stream_losses,
)


class TinyTwoStream(nn.Module):
    """A two-stream stand-in with the model interface: conv + norm + classifier per stream."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.appearance = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, num_classes),
        )
        self.motion = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, num_classes),
        )

    def forward(self, rgb, flow):
        b, t = rgb.shape[:2]
        app = self.appearance(rgb.flatten(0, 1)).view(b, t, -1).mean(1)
        mot = self.motion(flow.flatten(0, 1)).view(b, t, -1).mean(1)
        return {"appearance": app, "motion": mot, "fused": (app.softmax(1) + mot.softmax(1)) / 2}


def make_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randn(n, 2, 3, 8, 8, generator=g),
        "flow": torch.randn(n, 2, 2, 8, 8, generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),
    }


def test_no_weight_decay_on_biases_and_norms():
    model = TinyTwoStream()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=5e-4, momentum=0.9))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    decayed = {name for name, p in model.named_parameters() if id(p) in by_decay[5e-4]}
    undecayed = {name for name, p in model.named_parameters() if id(p) in by_decay[0.0]}
    assert decayed == {"appearance.0.weight", "appearance.4.weight", "motion.0.weight", "motion.4.weight"}
    assert undecayed == {
        "appearance.0.bias", "appearance.1.weight", "appearance.1.bias", "appearance.4.bias",
        "motion.0.bias", "motion.1.weight", "motion.1.bias", "motion.4.bias",
    }
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_learning_rate_steps_divide_by_decay_at_each_boundary():
    cfg = TrainConfig(lr=1e-3, lr_steps=[10, 20, 30], lr_decay=10.0)
    got = [learning_rate(cfg, s) for s in (0, 9, 10, 19, 20, 29, 30, 1000)]
    assert got == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])
    assert learning_rate(TrainConfig(lr=0.1, lr_steps=[]), 10**6) == 0.1


def test_accumulation_steps_reach_global_batch_exactly():
    assert accumulation_steps(128, 8, 2) == 8
    assert accumulation_steps(16, 16, 1) == 1
    with pytest.raises(ConfigError, match=r"train.global_batch_size: got 100.*8 x 2 = 16"):
        accumulation_steps(100, 8, 2)


def test_both_stream_losses_are_summed():
    outputs = {
        "appearance": torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
        "motion": torch.tensor([[0.0, 3.0], [1.0, 1.0]]),
        "fused": torch.zeros(2, 2),
    }
    labels = torch.tensor([0, 1])
    losses = stream_losses(outputs, labels)
    ce = nn.functional.cross_entropy
    assert losses["appearance"] == pytest.approx(float(ce(outputs["appearance"], labels)))
    assert losses["motion"] == pytest.approx(float(ce(outputs["motion"], labels)))
    assert losses["total"] == pytest.approx(float(losses["appearance"] + losses["motion"]))
    # Single-stream models train on their one loss.
    single = stream_losses({"motion": outputs["motion"], "fused": outputs["fused"]}, labels)
    assert set(single) == {"motion", "total"}


def test_accumulated_micro_batches_give_the_large_batch_gradient():
    torch.manual_seed(0)
    # GroupNorm-only model: BatchNorm statistics legitimately differ between batch sizes.
    model = TinyTwoStream()
    model.appearance[1] = nn.GroupNorm(2, 4)
    big = make_batch(12, seed=1)
    cpu = torch.device("cpu")

    model.zero_grad()
    forward_backward(model, big, accumulation=1, device=cpu)
    large = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    for i in range(3):
        part = {k: v[4 * i : 4 * (i + 1)] for k, v in big.items()}
        stats = forward_backward(model, part, accumulation=3, device=cpu)
        assert stats.clips == 4
    accumulated = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(large, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_micro_batches_do_not_read_device_values_until_the_step_is_read(monkeypatch):
    """forward_backward and StepTotals.add never pull a value to the host (on a GPU that would
    synchronise every micro-batch); StepTotals.read gives the exact step means."""
    from stresnet.train_step import StepTotals, stream_losses

    torch.manual_seed(0)
    model = TinyTwoStream()
    parts = [make_batch(4, seed=s) for s in (1, 2, 3)]
    cpu = torch.device("cpu")
    totals = StepTotals(cpu)
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
            def forbidden(*args, _name=name, **kwargs):
                raise AssertionError(f"Tensor.{_name} called during a micro-batch")

            m.setattr(torch.Tensor, name, forbidden)
        for part in parts:
            stats = forward_backward(model, part, accumulation=3, device=cpu)
            totals.add(stats)
    assert isinstance(stats.loss, torch.Tensor) and stats.loss.device == cpu
    metrics = totals.read()
    with torch.no_grad():
        outputs = [model(p["rgb"], p["flow"]) for p in parts]
    losses = [float(stream_losses(o, p["label"])["total"]) for o, p in zip(outputs, parts)]
    correct = sum(int((o["fused"].argmax(1) == p["label"]).sum()) for o, p in zip(outputs, parts))
    assert totals.clips == 12 and metrics["flag"] == 0
    assert metrics["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert metrics["accuracy"] == correct / 12
