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
    set_learning_rate,
    steps_per_pass,
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

    def forward(self, rgb, flow, per_step=False):
        b, t = rgb.shape[:2]
        app = self.appearance(rgb.flatten(0, 1)).view(b, t, -1)
        mot = self.motion(flow.flatten(0, 1)).view(b, t, -1)
        fused = (app.mean(1).softmax(1) + mot.mean(1).softmax(1)) / 2
        if per_step:
            return {"appearance": app, "motion": mot, "fused": fused}
        return {"appearance": app.mean(1), "motion": mot.mean(1), "fused": fused}


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
    by_decay: dict = {}
    for g in optimizer.param_groups:
        by_decay.setdefault(g["weight_decay"], set()).update(id(p) for p in g["params"])
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


def test_biases_learn_at_twice_the_learning_rate():
    """The authors' setLrWd(..., 'biasesLRWD', [2 0]): biases 2x lr, other parameters 1x."""
    model = TinyTwoStream()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, bias_lr_factor=2.0))
    set_learning_rate(optimizer, 1e-4)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 2e-4 if name.endswith(".bias") else 1e-4
        assert lr_of[id(p)] == pytest.approx(expected), name


def test_learning_rate_drops_at_epoch_boundaries():
    cfg = TrainConfig(lr=1e-3, lr_epochs=[3, 6], lr_decay=10.0)
    got = [learning_rate(cfg, s, steps_per_epoch=10) for s in (0, 29, 30, 59, 60, 79)]
    assert got == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    with pytest.raises(ValueError, match="steps per epoch"):
        learning_rate(cfg, 0)


def test_steps_per_pass_matches_the_loader_and_accumulation():
    # ceil(ceil(9537 / 1) / 8) = 1193 micro-batches, 16 per step -> 74 steps
    assert steps_per_pass(9537, 128, 8, 1) == 74
    # 2 workers: ceil(9537/2) = 4769 samples -> 597 micro-batches of 8, 8 per step -> 74
    assert steps_per_pass(9537, 128, 8, 2) == 74
    assert steps_per_pass(100, 10, 10, 1) == 10


def _temporal_model(**overrides):
    from cluster.config import load_config
    from stresnet.model import build_model

    base = ["model.width=0.0625", "model.num_classes=5", "model.flow_length=2",
            "model.dropout_motion=0.0", "model.init.kind=random"]
    return build_model(load_config(None, base + [f"{k}={v}" for k, v in overrides.items()]).model)


def _clip(still: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if still:
        rgb = torch.randn(2, 1, 3, 16, 16, generator=g).expand(2, 4, 3, 16, 16).contiguous()
        flow = torch.randn(2, 1, 4, 16, 16, generator=g).expand(2, 4, 4, 16, 16).contiguous()
    else:
        rgb = torch.randn(2, 4, 3, 16, 16, generator=g) * torch.arange(1.0, 5.0).view(1, 4, 1, 1, 1)
        flow = torch.randn(2, 4, 4, 16, 16, generator=g)
    return rgb, flow


@pytest.mark.parametrize("pool", ["none", "max"])
def test_per_step_loss_equals_clip_mean_on_still_clips_and_differs_otherwise(pool):
    torch.manual_seed(0)
    model = _temporal_model(**{"model.temporal_pool.kind": pool, "model.temporal_pool.window": 3,
                               "model.temporal_pool.stride": 1})
    model.train()  # batch statistics: eval-mode BN with fresh running stats saturates the logits
    labels = torch.tensor([1, 3])
    for still in (True, False):
        rgb, flow = _clip(still)
        with torch.no_grad():
            steps = model(rgb, flow, per_step=True)
            clip = model(rgb, flow)
        assert steps["appearance"].shape[:2] == (2, 4 if pool == "none" else 2)
        torch.testing.assert_close(steps["fused"], clip["fused"])
        per_step = stream_losses(steps, labels, "per_step")["total"]
        clip_mean = stream_losses(steps, labels, "clip_mean")["total"]
        # clip_mean on per-step logits is the loss of the time-averaged logits.
        assert float(clip_mean) == pytest.approx(float(stream_losses(clip, labels)["total"]), rel=1e-6)
        if still:  # every time step computes the same logits
            assert float(per_step) == pytest.approx(float(clip_mean), rel=1e-5)
        else:  # cross-entropy is convex: the mean of per-step losses exceeds the loss of the mean
            assert float(per_step) > float(clip_mean) * (1 + 1e-3)


@pytest.mark.parametrize("loss", ["per_step", "clip_mean"])
def test_both_losses_give_finite_gradients_to_every_temporal_conv(loss):
    from stresnet.backbone import TemporalConv

    torch.manual_seed(0)
    model = _temporal_model()
    rgb, flow = _clip(still=False, seed=1)
    batch = {"rgb": rgb, "flow": flow, "label": torch.tensor([0, 4])}
    forward_backward(model, batch, accumulation=1, device=torch.device("cpu"), loss=loss)
    temporal = [(n, m) for n, m in model.named_modules() if isinstance(m, TemporalConv)]
    assert len(temporal) == 2 * 4 * 2  # 2 streams x 4 stages x (branch2a, branch2c)
    for name, module in temporal:
        for p in module.parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


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
            stats = forward_backward(model, part, accumulation=3, device=cpu, loss="clip_mean")
            totals.add(stats)
    assert isinstance(stats.loss, torch.Tensor) and stats.loss.device == cpu
    metrics = totals.read()
    with torch.no_grad():
        outputs = [model(p["rgb"], p["flow"]) for p in parts]
    losses = [float(stream_losses(o, p["label"], "clip_mean")["total"]) for o, p in zip(outputs, parts)]
    correct = sum(int((o["fused"].argmax(1) == p["label"]).sum()) for o, p in zip(outputs, parts))
    assert totals.clips == 12 and metrics["flag"] == 0
    assert metrics["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert metrics["accuracy"] == correct / 12
