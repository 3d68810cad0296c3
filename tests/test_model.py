"""The ST-ResNet model: 2D equivalence, weight loading, cross-stream and temporal switches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from stresnet.backbone import TemporalConv, inflate_1x1
from cluster.config import load_config
from stresnet.config import ConfigError
from stresnet.model import STResNet, build_model
from stresnet.weights import WeightsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small(*overrides: str, width: float = 0.125):
    """A CPU-sized model config: width 1/8, 5 classes, L=2 flow fields (4 channels)."""
    base = [f"model.width={width}", "model.num_classes=5", "model.flow_length=2"]
    return load_config(None, base + list(overrides)).model


def clips(batch: int = 2, frames: int = 3, size: int = 32, flow_channels: int = 4):
    return torch.randn(batch, frames, 3, size, size), torch.randn(batch, frames, flow_channels, size, size)


def save_stream_file(stream: nn.Module, path: Path) -> str:
    """A torchvision-style state-dict file of one stream."""
    torch.save(stream.state_dict(), path)
    return str(path)


def save_checkpoint(model: nn.Module, path: Path) -> str:
    torch.save({"model": model.state_dict(), "config": {}}, path)
    return str(path)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Max abs difference within ``tol`` of the expected tensor's scale (float32 round-off)."""
    scale = expected.abs().max().clamp(min=1.0)
    diff = (actual - expected).abs().max()
    assert diff <= tol * scale, f"max diff {diff:.3g} (scale {scale:.3g})"


def tv_features(net: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def randomize_bn_stats(net: nn.Module) -> None:
    """Non-trivial running stats so that eval-mode BN is not the identity."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


# ---------------------------------------------------------------------------------------------
# (i) identical frames: the spatiotemporal network computes the 2D network
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["average", "center"])
def test_identical_frames_match_torchvision_resnet50(tmp_path, init):
    tv = torchvision.models.resnet50(num_classes=5).eval()
    randomize_bn_stats(tv)
    weights = save_stream_file(tv, tmp_path / "r50.pth")
    cfg = small("model.injection.stages=[]", f"model.temporal.init={init}",
                "model.init.kind=torchvision", f"model.init.torchvision_weights={weights}", width=1.0)
    model = build_model(cfg).eval()
    assert isinstance(model.appearance.layer1[1].conv1, TemporalConv)
    frame = torch.randn(1, 3, 48, 48)
    rgb = frame.unsqueeze(1).expand(1, 3, 3, 48, 48).contiguous()
    with torch.no_grad():
        features = model.appearance.features(rgb.flatten(0, 1), num_frames=3)
        expected = tv_features(tv, frame)
        for t in range(3):  # both clip ends and the middle
            assert_rel_close(features[t : t + 1], expected)
        assert_rel_close(model(rgb, torch.randn(1, 3, 4, 48, 48))["appearance"], tv(frame))


@pytest.mark.parametrize("init", ["average", "center"])
def test_identical_frames_match_own_2d_path_at_small_width(tmp_path, init):
    plain = build_model(small("model.mode=appearance", "model.temporal.stages=[]")).eval()
    randomize_bn_stats(plain)
    weights = save_stream_file(plain.appearance, tmp_path / "plain.pth")
    model = build_model(small("model.mode=appearance", f"model.temporal.init={init}",
                              "model.temporal.units=[1,2]", "model.init.kind=torchvision",
                              f"model.init.torchvision_weights={weights}")).eval()
    frames = torch.randn(2, 1, 3, 48, 48).expand(2, 5, 3, 48, 48).contiguous()
    with torch.no_grad():
        got = model.appearance.features(frames.flatten(0, 1), 5).unflatten(0, (2, 5))
        want = plain.appearance.features(frames[:, 0], 1)
        for t in range(5):
            assert_rel_close(got[:, t], want)
        assert_rel_close(model(frames, None)["appearance"], plain(frames[:, :1], None)["appearance"])


def test_zero_padding_differs_only_at_clip_ends(tmp_path):
    plain = build_model(small("model.mode=appearance", "model.temporal.stages=[]")).eval()
    weights = save_stream_file(plain.appearance, tmp_path / "plain.pth")
    # One temporal conv (stage 5, branch2a): the zero padding reaches exactly one frame in.
    model = build_model(small("model.mode=appearance", "model.temporal.stages=[5]",
                              "model.temporal.convs=[a]", "model.temporal.padding=zero",
                              "model.init.kind=torchvision",
                              f"model.init.torchvision_weights={weights}")).eval()
    frames = torch.randn(1, 1, 3, 48, 48).expand(1, 5, 3, 48, 48).contiguous()
    with torch.no_grad():
        got = model.appearance.features(frames.flatten(0, 1), 5)
        want = plain.appearance.features(frames[:, 0], 1)
    for t in (1, 2, 3):
        assert_rel_close(got[t : t + 1], want)
    for t in (0, 4):
        assert (got[t : t + 1] - want).abs().max() > 1e-3 * want.abs().max()


def test_temporal_conv_sees_neighbouring_frames():
    conv = TemporalConv(2, 3, kernel=3, padding="zero")
    x = torch.randn(2 * 4, 2, 5, 5)
    w = conv.state_dict()["weight"]  # (out, in, kernel, 1, 1)
    assert w.shape == (3, 2, 3, 1, 1)
    y = conv(x, num_frames=4).unflatten(0, (2, 4))
    frames = x.unflatten(0, (2, 4))
    t = 2  # y[t] = W0 x[t-1] + W1 x[t] + W2 x[t+1]
    manual = sum(F.conv2d(frames[:, t - 1 + k], w[:, :, k]) for k in range(3))
    torch.testing.assert_close(y[:, t], manual, rtol=1e-5, atol=1e-5)
    manual_end = sum(F.conv2d(frames[:, 3 - 1 + k], w[:, :, k]) for k in range(2))
    torch.testing.assert_close(y[:, 3], manual_end, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("frames", [1, 2, 4])
@pytest.mark.parametrize("padding", ["replicate", "zero"])
def test_temporal_conv_matches_explicitly_padded_reference(kernel, frames, padding):
    conv = TemporalConv(3, 2, kernel=kernel, padding=padding)
    x = torch.randn(2 * frames, 3, 4, 4, requires_grad=True)
    pad = kernel // 2
    clips = x.unflatten(0, (2, frames)).transpose(1, 2)  # (B, C, T, H, W)
    index = torch.arange(-pad, frames + pad)
    padded = clips[:, :, index.clamp(0, frames - 1)]
    if padding == "zero":
        padded = padded * ((index >= 0) & (index < frames)).float().view(1, 1, -1, 1, 1)
    reference = F.conv3d(padded, conv.weight.unsqueeze(-1)).transpose(1, 2).flatten(0, 1)
    got = conv(x, frames)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, conv.weight), g)
    expected = torch.autograd.grad(reference, (x, conv.weight), g)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inflation_rules():
    w = torch.randn(4, 3, 1, 1)
    avg, centre = inflate_1x1(w, 3, "average"), inflate_1x1(w, 3, "center")
    assert avg.shape == centre.shape == (4, 3, 3, 1, 1)
    torch.testing.assert_close(avg.sum(2), w)
    torch.testing.assert_close(avg[:, :, 0], w / 3)
    assert torch.equal(centre[:, :, 1], w) and not centre[:, :, [0, 2]].any()


# ---------------------------------------------------------------------------------------------
# (ii)/(iii) torchvision weights into both streams; cross-modality conv1
# ---------------------------------------------------------------------------------------------


def test_torchvision_resnet50_loads_into_each_stream(tmp_path):
    tv = torchvision.models.resnet50().eval()
    randomize_bn_stats(tv)
    weights = save_stream_file(tv, tmp_path / "resnet50.pth")
    cfg = small("model.mode=late_fusion", "model.num_classes=1000", "model.flow_length=10",
                "model.init.kind=torchvision", f"model.init.torchvision_weights={weights}",
                width=1.0)
    model = build_model(cfg).eval()  # raises on any missing/unexpected key
    state = tv.state_dict()
    for name in ("appearance", "motion"):
        stream = getattr(model, name).state_dict()
        assert set(stream) == set(state)
        for key, value in stream.items():
            if key == "conv1.weight" and name == "motion":
                continue
            expected = state[key] if value.dim() != 5 else inflate_1x1(state[key], 3, "average")
            assert torch.equal(value, expected), f"{name}.{key}"

    # The motion stream equals torchvision's ResNet-50 with the cross-modality conv1.
    tv_flow = torchvision.models.resnet50().eval()
    tv_flow.load_state_dict(state)
    tv_flow.conv1 = nn.Conv2d(20, 64, 7, 2, 3, bias=False)
    tv_flow.conv1.weight.data = state["conv1.weight"].mean(1, keepdim=True).repeat(1, 20, 1, 1)
    rgb, flow = torch.randn(1, 1, 3, 64, 64), torch.randn(1, 1, 20, 64, 64)
    with torch.no_grad():
        out = model(rgb, flow)
        assert_rel_close(out["appearance"], tv(rgb[:, 0]))
        assert_rel_close(out["motion"], tv_flow(flow[:, 0]))


def test_imagenet_uses_torchvisions_weights_enum(monkeypatch):
    """``torchvision_weights: imagenet`` asks torchvision's enum (a download; faked here)."""
    fake = torchvision.models.resnet50().state_dict()
    asked = []

    def get_state_dict(self, *args, **kwargs):
        asked.append(self)
        return fake

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", get_state_dict)
    model = build_model(small("model.mode=appearance", "model.init.kind=torchvision",
                              "model.init.torchvision_weights=imagenet", width=1.0))
    assert asked == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1]
    assert torch.equal(model.appearance.layer4[2].conv3.weight, fake["layer4.2.conv3.weight"])


def test_cross_modality_conv1_is_the_channel_mean(tmp_path):
    rgb_net = build_model(small("model.mode=appearance"))
    weights = save_stream_file(rgb_net.appearance, tmp_path / "rgb.pth")
    model = build_model(small("model.flow_length=3", "model.init.kind=torchvision",
                              f"model.init.torchvision_weights={weights}"))
    w = rgb_net.appearance.conv1.weight
    got = model.motion.conv1.weight
    assert got.shape == (w.shape[0], 6, 7, 7)
    for c in range(6):
        torch.testing.assert_close(got[:, c], w.mean(dim=1), rtol=0, atol=1e-7)
    assert torch.equal(model.appearance.conv1.weight, w)


def test_classifier_reinitialised_when_class_count_differs(tmp_path):
    src = build_model(small("model.mode=appearance", "model.num_classes=9"))
    weights = save_stream_file(src.appearance, tmp_path / "nine.pth")
    model = build_model(small("model.init.kind=torchvision",
                              f"model.init.torchvision_weights={weights}"))
    assert model.appearance.fc.weight.shape == (5, src.appearance.fc.in_features)
    assert torch.equal(model.appearance.layer4[2].conv3.weight, src.appearance.layer4[2].conv3.weight)


# ---------------------------------------------------------------------------------------------
# Init chain: base streams -> stage 1 -> stage 2
# ---------------------------------------------------------------------------------------------


def test_base_streams_then_checkpoint_chain(tmp_path):
    base = {name: build_model(small(f"model.mode={name}", "model.temporal.stages=[]"))
            for name in ("appearance", "motion")}
    (tmp_path / "motion_run").mkdir()
    a_file = save_checkpoint(base["appearance"], tmp_path / "appearance.pt")
    save_checkpoint(base["motion"], tmp_path / "motion_run" / "model.pt")
    stage1 = build_model(small("model.init.kind=base_streams",
                               f"model.init.appearance_checkpoint={a_file}",
                               f"model.init.motion_checkpoint={tmp_path / 'motion_run'}"))
    for name in ("appearance", "motion"):
        src, dst = getattr(base[name], name), getattr(stage1, name)
        assert torch.equal(dst.conv1.weight, src.conv1.weight)
        assert torch.equal(dst.state_dict()["layer3.1.conv1.weight"],
                           inflate_1x1(src.layer3[1].conv1.weight, 3, "average"))
        assert torch.equal(dst.fc.bias, src.fc.bias)

    # A run folder: the newest checkpoint_* folder is the one loaded.
    run = tmp_path / "stage1_run"
    for step, model in ((90, build_model(small())), (120, stage1)):
        (run / f"checkpoint_{step:07d}").mkdir(parents=True)
        save_checkpoint(model, run / f"checkpoint_{step:07d}" / "model.pt")
    stage2 = build_model(small("model.temporal_pool.kind=max", "model.init.kind=checkpoint",
                               f"model.init.checkpoint={run}"))
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)


# ---------------------------------------------------------------------------------------------
# (vii) loading errors name the file and the keys
# ---------------------------------------------------------------------------------------------


class NotATensor:
    pass


def test_loading_errors_name_file_and_keys(tmp_path):
    good = build_model(small("model.mode=appearance"))
    state = good.appearance.state_dict()

    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(WeightsError) as err:
        build_model(small("model.mode=appearance", "model.init.kind=torchvision",
                          f"model.init.torchvision_weights={path}"))
    message = str(err.value)
    assert str(path) in message and "layer4.0.conv1.weight" in message
    assert "unexpected keys ['extra.weight']" in message

    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match="nowhere.pth: weights file not found"):
        build_model(small("model.init.kind=torchvision", f"model.init.torchvision_weights={missing}"))

    # A base-stream checkpoint of the wrong stream: the motion file has no appearance keys.
    a_file = save_checkpoint(good, tmp_path / "appearance.pt")
    with pytest.raises(WeightsError, match=r"appearance\.pt: no motion stream in this checkpoint"):
        build_model(small("model.init.kind=base_streams", f"model.init.appearance_checkpoint={a_file}",
                          f"model.init.motion_checkpoint={a_file}"))

    # A whole-model checkpoint with streams the model lacks.
    full = save_checkpoint(build_model(small()), tmp_path / "full.pt")
    with pytest.raises(WeightsError, match=r"full\.pt: unexpected keys .*motion\.conv1\.weight"):
        build_model(small("model.mode=appearance", "model.init.kind=checkpoint",
                          f"model.init.checkpoint={full}"))

    # Unsafe pickles are refused (weights_only), and the message names the file.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": NotATensor()}, unsafe)
    with pytest.raises(WeightsError, match=r"unsafe\.pt: cannot load weights"):
        build_model(small("model.init.kind=checkpoint", f"model.init.checkpoint={unsafe}"))

    # Mis-shaped tensors (a different width) are listed with both shapes.
    wide = build_model(small("model.mode=appearance", width=0.25))
    wide_file = save_stream_file(wide.appearance, tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match=r"wide\.pth: .*shape mismatches \['bn1\.bias: file \(16,\) vs model \(8,\)"):
        build_model(small("model.mode=appearance", "model.init.kind=torchvision",
                          f"model.init.torchvision_weights={wide_file}"))


# ---------------------------------------------------------------------------------------------
# (iv) cross-stream connections: gradients and exactly which tensors change
# ---------------------------------------------------------------------------------------------


def grads(module: nn.Module) -> dict[str, float]:
    return {n: 0.0 if p.grad is None else p.grad.abs().sum().item() for n, p in module.named_parameters()}


@pytest.mark.parametrize("mode,stages", [("st_resnet", "[2,3,4,5]"), ("st_resnet", "[]"),
                                         ("late_fusion", "[2,3,4,5]")])
def test_appearance_loss_reaches_motion_only_through_injection(mode, stages):
    model = build_model(small(f"model.mode={mode}", f"model.injection.stages={stages}"))
    rgb, flow = clips()
    label = torch.tensor([1, 3])
    F.cross_entropy(model(rgb, flow)["appearance"], label).backward()
    g = grads(model.motion)
    if mode == "st_resnet" and stages != "[]":
        # Every motion unit up to the last stage's first unit feeds the appearance stream ...
        assert all(v > 0 for n, v in g.items() if n.startswith(("conv1", "layer1", "layer4.0")))
        # ... the units after it and the motion classifier do not.
        assert all(v == 0 for n, v in g.items() if n.startswith(("layer4.1", "layer4.2", "fc")))
    else:
        assert all(v == 0 for v in g.values())


@pytest.mark.parametrize("direction", ["motion_to_appearance", "bidirectional"])
def test_motion_loss_reaches_appearance_only_when_bidirectional(direction):
    model = build_model(small(f"model.injection.direction={direction}"))
    rgb, flow = clips()
    F.cross_entropy(model(rgb, flow)["motion"], torch.tensor([0, 2])).backward()
    g = grads(model.appearance)
    if direction == "bidirectional":
        assert g["layer1.0.conv1.weight"] > 0 and g["layer4.0.conv3.weight"] > 0
        assert g["fc.weight"] == 0
    else:
        assert all(v == 0 for v in g.values())


def branch(unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 2D bottleneck's residual branch F(x), written out layer by layer."""
    out = torch.relu(unit.bn1(unit.conv1(x)))
    out = torch.relu(unit.bn2(unit.conv2(out)))
    return unit.bn3(unit.conv3(out))


def reference_features(model: STResNet, rgb, flow, stages, variant, bidirectional):
    """The cross-stream network by hand, from each variant's stated equation (docs/model.md).

    With s = unit 1's sum before its ReLU, x = relu(s) its output and o the other stream's x:
    code: x + F(s + o); paper: x + F(x + o); direct: (x + o) + F(x + o), then the ReLU.
    """
    A, M = model.appearance, model.motion
    a, m = A.stem(rgb.flatten(0, 1)), M.stem(flow.flatten(0, 1))

    def unit_sum(unit, x, branch_in=None):
        identity = x if unit.downsample is None else unit.downsample(x)
        return branch(unit, x if branch_in is None else branch_in) + identity

    def receive(unit, x, s, other):
        if variant == "code":
            return torch.relu(x + branch(unit, s + other))
        if variant == "paper":
            return torch.relu(x + branch(unit, x + other))
        return torch.relu(x + other + branch(unit, x + other))  # direct

    for number in (2, 3, 4, 5):
        a_units, m_units = A.stage(number), M.stage(number)
        s_a, s_m = unit_sum(a_units[0], a), unit_sum(m_units[0], m)
        a, m = torch.relu(s_a), torch.relu(s_m)
        if number in stages:
            a, m = (receive(a_units[1], a, s_a, m),
                    receive(m_units[1], m, s_m, a) if bidirectional else torch.relu(unit_sum(m_units[1], m)))
        else:
            a, m = torch.relu(unit_sum(a_units[1], a)), torch.relu(unit_sum(m_units[1], m))
        for a_unit, m_unit in zip(a_units[2:], m_units[2:]):
            a, m = torch.relu(unit_sum(a_unit, a)), torch.relu(unit_sum(m_unit, m))
    return a, m


@pytest.mark.parametrize("variant", ["code", "paper", "direct"])
@pytest.mark.parametrize("direction", ["motion_to_appearance", "bidirectional"])
def test_each_injection_variant_computes_its_equation(variant, direction):
    model = build_model(small("model.injection.stages=[3,5]", f"model.injection.variant={variant}",
                              f"model.injection.direction={direction}", "model.temporal.stages=[]"))
    randomize_bn_stats(model)
    model.eval()
    rgb, flow = clips(frames=1)
    with torch.no_grad():
        out = model(rgb, flow)
        a, m = reference_features(model, rgb, flow, {3, 5}, variant, direction == "bidirectional")
        assert_rel_close(out["appearance"], model.appearance.head(a, 1))
        assert_rel_close(out["motion"], model.motion.head(m, 1))
        # The variants differ from each other and from no connection at all.
        others = [reference_features(model, rgb, flow, {3, 5}, v, direction == "bidirectional")[0]
                  for v in ("code", "paper", "direct") if v != variant]
        plain = reference_features(model, rgb, flow, set(), variant, False)[0]
        for other in others + [plain]:
            assert (other - a).abs().max() > 1e-3


def test_variant_names_are_the_configs_choices():
    import typing

    from stresnet.cross_stream import VARIANTS, InjectionConfig

    hint = typing.get_type_hints(InjectionConfig)["variant"]
    assert set(typing.get_args(hint)) == set(VARIANTS)


# ---------------------------------------------------------------------------------------------
# (v) parameter counts, computed from the conv shapes
# ---------------------------------------------------------------------------------------------


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_each_switch_adds_exactly_its_parameters():
    plain = build_model(small("model.injection.stages=[]", "model.temporal.stages=[]"))
    n_plain = count(plain)

    # Cross-stream connections are additions: no parameters, whatever the variant.
    for variant in ("model.injection.variant=paper", "model.injection.variant=direct",
                    "model.injection.direction=bidirectional"):
        assert count(build_model(small("model.temporal.stages=[]", variant))) == n_plain

    def temporal_extra(stages, units, convs, kernel):
        extra = 0
        for name in ("appearance", "motion"):
            for number in stages:
                for unit in units:
                    for c in convs:
                        w = getattr(plain, name).stage(number)[unit - 1].get_submodule(
                            {"a": "conv1", "c": "conv3"}[c]).weight
                        extra += (kernel - 1) * w.shape[0] * w.shape[1]
        return extra

    cases = [([2, 3, 4, 5], [2], ["a", "c"], 3), ([3], [1, 2], ["a"], 5), ([5], [3], ["c"], 3)]
    for stages, units, convs, kernel in cases:
        model = build_model(small(f"model.temporal.stages={stages}", f"model.temporal.units={units}",
                                  f"model.temporal.convs=[{','.join(convs)}]",
                                  f"model.temporal.kernel={kernel}"))
        assert count(model) == n_plain + temporal_extra(stages, units, convs, kernel)

    # Streams: st_resnet = appearance + motion; motion's conv1 has 2L instead of 3 input channels.
    app = build_model(small("model.mode=appearance", "model.temporal.stages=[]"))
    mot = build_model(small("model.mode=motion", "model.temporal.stages=[]", "model.flow_length=7"))
    stem = app.appearance.conv1.weight
    assert count(mot) - count(app) == (14 - 3) * stem.shape[0] * stem.shape[2] * stem.shape[3]
    assert count(app) + count(build_model(small("model.mode=motion", "model.temporal.stages=[]"))) == n_plain
    fc = app.appearance.fc
    wider = build_model(small("model.mode=appearance", "model.temporal.stages=[]", "model.num_classes=8"))
    assert count(wider) - count(app) == 3 * (fc.in_features + 1)


def test_width_one_matches_torchvision_parameter_shapes():
    for depth, ctor in ((50, torchvision.models.resnet50), (101, torchvision.models.resnet101)):
        model = build_model(small("model.mode=appearance", "model.temporal.stages=[]",
                                  "model.num_classes=1000", f"model.depth={depth}", width=1.0))
        ours = {k: v.shape for k, v in model.appearance.state_dict().items()}
        theirs = {k: v.shape for k, v in ctor().state_dict().items()}
        assert ours == theirs


# ---------------------------------------------------------------------------------------------
# (vi) outputs: modes x pooling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["st_resnet", "late_fusion", "appearance", "motion"])
@pytest.mark.parametrize("pool", ["none", "max", "avg"])
def test_output_shapes(mode, pool):
    model = build_model(small(f"model.mode={mode}", f"model.temporal_pool.kind={pool}",
                              "model.temporal_pool.window=3", "model.temporal_pool.stride=2"))
    rgb, flow = clips(batch=2, frames=5)
    if mode == "appearance":
        flow = None
    if mode == "motion":
        rgb = None
    out = model(rgb, flow)
    streams = {"st_resnet": ["appearance", "motion"], "late_fusion": ["appearance", "motion"]}.get(mode, [mode])
    assert sorted(out) == sorted(streams + ["fused"])
    assert all(v.shape == (2, 5) for v in out.values())
    torch.testing.assert_close(out["fused"].sum(-1), torch.ones(2))
    if len(streams) == 1:
        torch.testing.assert_close(out["fused"], out[mode].softmax(-1))
    # A clip shorter than the pooling window still works (the window shrinks to the clip).
    short = [None if x is None else x[:, :2] for x in (rgb, flow)]
    assert model(*short)["fused"].shape == (2, 5)


def test_missing_input_is_an_error():
    model = build_model(small())
    with pytest.raises(ValueError, match="needs the motion input"):
        model(torch.randn(1, 1, 3, 32, 32), None)
    with pytest.raises(ValueError, match=r"differ in \(batch, frames\): \(1, 2\) vs \(1, 3\)"):
        model(torch.randn(1, 2, 3, 32, 32), torch.randn(1, 3, 4, 32, 32))


def test_max_pool_head_classifies_pooled_time_steps():
    model = build_model(small("model.mode=appearance", "model.temporal_pool.kind=max",
                              "model.temporal_pool.window=3", "model.temporal_pool.stride=2")).eval()
    stream = model.appearance
    feats = torch.randn(2 * 7, stream.fc.in_features, 2, 2)
    per_step = feats.unflatten(0, (2, 7)).mean(dim=(3, 4))  # (B, T, C): no temporal pooling
    clips5d = feats.unflatten(0, (2, 7))  # (B, T, C, h, w)
    pooled = torch.stack([clips5d[:, s : s + 3].amax(1) for s in (0, 2, 4)], 1)  # windows at 0, 2, 4
    manual = stream.fc(pooled.mean(dim=(3, 4))).mean(1)
    torch.testing.assert_close(stream.head(feats, 7), manual)
    assert not torch.allclose(manual, stream.fc(per_step).mean(1))


# ---------------------------------------------------------------------------------------------
# GPU-style execution on CPU: channels_last + bf16 autocast
# ---------------------------------------------------------------------------------------------


def test_channels_last_and_bf16_autocast():
    model = build_model(small()).eval()
    rgb, flow = clips(frames=3)
    with torch.no_grad():
        reference = model(rgb, flow)
    model.to(memory_format=torch.channels_last)  # the temporal weights are 4D, so this works
    temporal = model.appearance.layer2[1].conv1
    assert isinstance(temporal, TemporalConv)
    assert temporal.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.state_dict()["appearance.layer2.1.conv1.weight"].dim() == 5
    frames = torch.randn(2 * 3, temporal.weight.shape[1], 8, 8).contiguous(memory_format=torch.channels_last)
    assert temporal(frames, 3).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(rgb, flow)["fused"], reference["fused"], rtol=1e-4, atol=1e-5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(rgb, flow)
        loss = F.cross_entropy(out["appearance"], torch.tensor([0, 1])) + \
            F.cross_entropy(out["motion"], torch.tensor([0, 1]))
    assert out["appearance"].dtype == torch.bfloat16
    loss.backward()
    assert model.motion.layer1[1].conv1.weight.grad.isfinite().all()


def test_state_dict_round_trip_keeps_3d_temporal_weights():
    model = build_model(small())
    state = model.state_dict()
    shapes = {k: v.shape for k, v in state.items()}
    assert shapes["motion.layer4.1.conv3.weight"] == model.motion.layer4[1].conv3.weight.shape + (1,)
    other = build_model(small())
    other.load_state_dict(state)
    assert {k: v.shape for k, v in state.items()} == shapes  # the caller's dict is left alone
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def test_temporal_unit_beyond_the_stage_is_rejected():
    with pytest.raises(ValueError, match=r"model.temporal.units: unit 4 does not exist in stage 2"):
        build_model(small("model.temporal.units=[4]"))


@pytest.mark.parametrize("override,message", [
    ("model.temporal.kernel=2", "model.temporal.kernel: got 2, expected an odd number"),
    ("model.injection.stages=[6]", "model.injection.stages[0]: got 6 (int), expected one of [2, 3, 4, 5]"),
    ("model.temporal_pool.kind=mean", "model.temporal_pool.kind: got 'mean' (str), expected one of"),
    ("model.init.kind=base_streams", "model.init.appearance_checkpoint: required when init.kind"),
])
def test_bad_model_configs_are_rejected(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_every_yaml_under_configs_loads():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "no configs found"
    for path in files:
        load_config(path)


@pytest.mark.parametrize("dataset,classes", [("ucf101", 101), ("hmdb51", 51)])
def test_paper_configs_chain(dataset, classes):
    folder = REPO / "configs" / dataset
    cfg = {name: load_config(folder / f"{name}.yaml") for name in
           ("appearance_base", "motion_base", "stresnet_stage1", "stresnet_stage2")}
    assert all(c.model.num_classes == classes for c in cfg.values())
    assert cfg["appearance_base"].model.mode == "appearance"
    assert cfg["motion_base"].model.mode == "motion"
    assert cfg["stresnet_stage1"].model.init.kind == "base_streams"
    assert cfg["stresnet_stage2"].model.init.kind == "checkpoint"
    s1, s2 = cfg["stresnet_stage1"], cfg["stresnet_stage2"]
    assert (s1.sampling.train_positions, s1.sampling.stride_min, s1.sampling.stride_max) == (5, 5, 15)
    assert (s2.sampling.train_positions, s2.sampling.stride_min, s2.sampling.stride_max) == (11, 1, 15)
    assert (s2.model.temporal_pool.kind, s2.model.temporal_pool.window, s2.model.temporal_pool.stride) == ("max", 5, 2)
    # Stage 1 reads the base runs' checkpoints; stage 2 reads stage 1's.
    for base in ("appearance_base", "motion_base"):
        assert cfg[base].train.run_name and cfg[base].train.run_name in getattr(
            s1.model.init, f"{base.split('_')[0]}_checkpoint")
    assert s1.train.run_name in s2.model.init.checkpoint


def test_full_frame_input_runs_fully_convolutionally():
    """``sampling.test_crops: full_frame`` feeds the uncropped 320x240 frame: every stream still
    gives (B, K); on a frame of exactly the input size it is the centre-crop input itself, so the
    outputs are equal."""
    from cluster.config import load_config
    from stresnet.model import build_model
    from stresnet.sampling import eval_plan

    cfg = load_config(None, ["model.width=0.0625", "model.num_classes=7", "model.flow_length=2",
                             "model.init.kind=random"])
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(2, 2, 3, 240, 320, generator=g), torch.randn(2, 2, 4, 240, 320, generator=g))
    assert out["appearance"].shape == out["motion"].shape == out["fused"].shape == (2, 7)
    full = dataclasses.replace(cfg.sampling, input_size=224, test_crops="full_frame")
    centre = dataclasses.replace(cfg.sampling, input_size=224, test_crops="center_flip")
    frame = torch.randn(1, 2, 3, 224, 224, generator=g), torch.randn(1, 2, 4, 224, 224, generator=g)

    def crop(plan, x):
        b = plan.box
        assert plan.size == (224, 224)  # no resize either way
        return x[..., b.y:b.y + b.h, b.x:b.x + b.w]

    for view in (0, 1):
        p_full, p_centre = (eval_plan(c, 2, view, 50, 224, 224) for c in (full, centre))
        with torch.no_grad():
            a = model(*(crop(p_full, x) for x in frame))
            b = model(*(crop(p_centre, x) for x in frame))
        for name in ("appearance", "motion"):
            torch.testing.assert_close(a[name], b[name])
