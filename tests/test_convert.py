"""prepare_, rules, ReLU replacement, fold_bn_, calibrate_, bias grid and state_dict round trips on
a network defined here (depthwise and grouped convs, BatchNorm, ReLU/ReLU6, Linear)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as tF

import mixq
from mixq import ActQuant, LayerRule, QConv2d, QLinear, QuantConfig


class Net(nn.Module):
    """conv 3->8 (bias) - BN - ReLU - depthwise 3x3 - BN - ReLU6 - grouped 1x1 8->16 (2 groups)
    - BN - global pool - fc 16->10.  Input quantizers see: the raw image (signed), a ReLU output
    (unsigned), a ReLU6 output (unsigned), a pooled BN output (signed)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU6()
        self.gconv = nn.Conv2d(8, 16, 1, groups=2)
        self.bn3 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.dw(x)))
        x = self.bn3(self.gconv(x))
        return self.fc(self.pool(x).flatten(1))


LAYERS = ("conv1", "dw", "gconv", "fc")


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    # non-trivial BatchNorm statistics and affine parameters
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net


def batch(seed=1, n=8):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2


def prepared(config=None, seed=0):
    net = make_net(seed)
    x = batch()
    plan = mixq.prepare_(net, config or QuantConfig(), example_input=x)
    mixq.calibrate_(net, [x])
    return net, plan, x


def quantizer_params(net):
    return {f"{s.fqn}:{s.role}": s.quant for s in mixq.quant_sites(net)}


def test_defaults_forward_backward_reach_weights_and_quantizers():
    net, _, x = prepared()
    for name in LAYERS:
        assert type(getattr(net, name)) is (QLinear if name == "fc" else QConv2d)
    # on the calibration data (eval mode, as calibrated) the 99.9th percentile range clips the top
    # values, so every activation range gets a gradient too
    net.eval()
    tF.cross_entropy(net(x), torch.arange(8) % 10).backward()
    for key, q in quantizer_params(net).items():
        if key.endswith("input"):
            assert q.qmax.grad.abs().sum() > 0, key
    # a training step: every parameter, weights and quantizer parameters alike, gets a gradient
    net.zero_grad()
    net.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no lazy-calibration warning
        out = net(x)
    assert out.shape == (8, 10)
    tF.cross_entropy(out, torch.arange(8) % 10).backward()
    names = {n for n, _ in net.named_parameters()}
    assert {f"{n}.{k}_quant.{p}" for n in LAYERS for k in ("w", "in") for p in ("scale", "qmax")} <= names
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for name in LAYERS:
        assert getattr(net, name).weight.grad.abs().sum() > 0, name
    for key, q in quantizer_params(net).items():
        assert q.scale.grad.abs().sum() > 0, key


def test_plan_rows():
    net, plan, _ = prepared()
    rows = {(r.fqn, r.role): r for r in plan}
    assert [(r.fqn, r.role) for r in plan] == [(n, role) for n in LAYERS for role in ("input", "weight")]
    # weights: per output channel, elements = numel of the weight
    #   conv1 8*3*3*3 = 216, dw 8*1*3*3 = 72, gconv 16*4*1*1 = 64, fc 10*16 = 160
    want_w = {"conv1": (8, 216), "dw": (8, 72), "gconv": (16, 64), "fc": (10, 160)}
    for name, (slices, elements) in want_w.items():
        r = rows[(name, "weight")]
        assert (r.granularity, r.slices, r.elements, r.signed) == ("channel", slices, elements, True)
        assert r.layer == ("Linear" if name == "fc" else "Conv2d")
        assert (r.bits_init, r.bits_min, r.bits_max) == (4, 2, 8)
    # inputs: per tensor, per-sample elements 3*8*8 = 192, 8*8*8 = 512, 512, 16
    want_a = {"conv1": 192, "dw": 512, "gconv": 512, "fc": 16}
    for name, elements in want_a.items():
        r = rows[(name, "input")]
        assert (r.granularity, r.slices, r.elements) == ("tensor", 1, elements)
        assert (r.bits_init, r.bits_min, r.bits_max) == (4, 1, 8)
    assert "gconv" in str(plan) and plan.to_dicts()[0]["fqn"] == "conv1"
    # before measurement (no example input) activation elements are unknown (-1)
    plan2 = mixq.prepare_(make_net(), QuantConfig())
    assert {r.elements for r in plan2 if r.role == "input"} == {-1}
    assert {r.fqn: r.signed for r in plan2 if r.role == "input"} == dict.fromkeys(LAYERS)


def test_per_channel_activations_count_all_input_channels():
    """An input quantizer per channel needs the layer's full input channel count, also for grouped
    and depthwise convs (weight.shape[1] is only in_channels / groups)."""
    act = QuantConfig().act.replace(granularity="channel")
    net, x = make_net(), batch()
    for name in LAYERS:  # no biases: see test_per_channel_input_quantizer_with_bias
        getattr(net, name).bias = None
    plan = mixq.prepare_(net, QuantConfig(act=act), example_input=x)
    mixq.calibrate_(net, [x])
    rows = {r.fqn: r for r in plan if r.role == "input"}
    assert {n: r.slices for n, r in rows.items()} == {"conv1": 3, "dw": 8, "gconv": 8, "fc": 16}
    # per-sample elements are split evenly over the slices: 192/3, 512/8, 512/8, 16/16 each
    assert [int(net.dw.in_quant.numel[0]), int(net.fc.in_quant.numel[0])] == [64, 1]
    assert rows["dw"].elements == 512 and torch.isfinite(net(x)).all()


def test_per_channel_input_quantizer_with_bias():
    # the bias grid of a layer with per-channel input steps is the finest input step x weight step
    act = QuantConfig().act.replace(granularity="channel")
    net, x = make_net(), batch()
    mixq.prepare_(net, QuantConfig(act=act), example_input=x)
    mixq.calibrate_(net, [x])
    assert torch.isfinite(net(x)).all()
    layer = net.conv1
    grid = layer.in_quant.grid_step().min() * layer.channel_step()
    _, bias = layer.quantized_weight_and_bias()
    codes = bias.detach().double() / grid.double()
    assert torch.equal(codes, torch.round(codes))


def test_rules_first_skip_and_patterns():
    rules = (LayerRule("@first", weight_bits=8, act_bits=8), LayerRule("fc", skip=True),
             LayerRule("*conv*", weight_bits=3), LayerRule("d?", act_bits=6))
    net, plan, _ = prepared(QuantConfig(rules=rules))
    assert type(net.fc) is nn.Linear  # skipped: stays float
    assert {r.fqn for r in plan} == {"conv1", "dw", "gconv"}
    q = quantizer_params(net)
    cfg = q["conv1:weight"].cfg  # "@first" and later "*conv*" both match; the later rule wins
    assert (cfg.bits_init, cfg.bits_min, cfg.bits_max) == (3, 3, 3)
    assert (q["conv1:input"].cfg.bits_min, q["conv1:input"].cfg.bits_max) == (8, 8)
    assert q["gconv:weight"].cfg.bits_max == 3 and q["gconv:input"].cfg.bits_max == 8
    assert q["dw:weight"].cfg.bits_max == 8 and q["dw:input"].cfg.bits_max == 6
    assert (q["conv1:weight"].bits_per_slice() == 3).all()
    assert (q["conv1:input"].bits_per_slice() == 8).all()
    # "@last" is the last quantizable layer in module order
    net2 = make_net()
    mixq.prepare_(net2, QuantConfig(rules=(LayerRule("@last", weight_bits=8),)))
    assert net2.fc.w_quant.cfg.bits_min == 8 and net2.conv1.w_quant.cfg.bits_min == 2


def test_act_site_relu_replaces_every_relu():
    net = make_net()
    x = batch()
    plan = mixq.prepare_(net, QuantConfig(act_site="relu"), example_input=x)
    assert isinstance(net.relu1, ActQuant) and net.relu1.cap is None
    assert isinstance(net.relu2, ActQuant) and net.relu2.cap == 6.0
    assert not any(type(m) in (nn.ReLU, nn.ReLU6) for m in net.modules())
    assert all(getattr(net, n).in_quant is None for n in LAYERS)
    acts = [r for r in plan if r.role == "act"]
    assert [(r.fqn, r.layer, r.signed, r.elements) for r in acts] == [
        ("relu1", "ReLU", False, 512), ("relu2", "ReLU6", False, 512)]
    mixq.calibrate_(net, [x])
    out = net(x)
    assert torch.isfinite(out).all()
    # the quantizer clips at 0 (replacing the ReLU) and the ReLU6 cap still applies, also when
    # the quantizer's own range reaches beyond 6
    q = net.relu2.quant
    with torch.no_grad():
        q.scale.fill_(2.0**-3)
        q.qmax.fill_(2.0**-3 * 63)  # 7.875
        h = net.relu2(torch.linspace(-10, 10, 101))
    assert h.min() == 0 and h.max() == 6.0


def test_unsupported_layers_stay_float_and_are_named():
    class WithConv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv1d(3, 3, 3, padding=1)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    net = WithConv1d()
    with pytest.warns(UserWarning, match=r"pre \(Conv1d\)"):
        plan = mixq.prepare_(net)
    assert type(net.pre) is nn.Conv1d and isinstance(net.conv, QConv2d)
    assert [r.fqn for r in plan] == ["conv", "conv"]


def test_fold_bn_matches_unfolded_in_eval_mode():
    net = make_net().eval()
    net.bn2.eps = 0.05  # a non-default eps must enter the folded weights too
    x = batch()
    with torch.no_grad():
        want = net(x)
    w_before = net.conv1.weight.detach().clone()
    folded = mixq.fold_bn_(net)
    assert folded == [("conv1", "bn1"), ("dw", "bn2"), ("gconv", "bn3")]
    for name in ("bn1", "bn2", "bn3"):
        assert isinstance(getattr(net, name), nn.Identity)
    assert net.dw.bias is not None  # created for the bias-free depthwise conv
    with torch.no_grad():
        got = net(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # folding changed the weights (the BatchNorms are not identities)
    assert not torch.allclose(net.conv1.weight, w_before, atol=1e-3)


def test_calibrate_signedness_and_bits_init():
    net, _, x = prepared()
    q = quantizer_params(net)
    assert [q[f"{n}:input"].signed for n in LAYERS] == [True, False, False, True]
    for key, quant in q.items():
        assert quant.calibrated, key
        assert (quant.bits_per_slice() == 4).all(), key
    # (x, y) batches are accepted and max_batches stops early
    assert mixq.calibrate_(net, [(batch(5), torch.zeros(8))] * 3, max_batches=2) == 2


def test_bias_lies_on_the_accumulator_grid():
    net, _, x = prepared()
    for name in ("conv1", "gconv", "fc"):  # the layers with a bias
        layer = getattr(net, name)
        with torch.no_grad():
            w_hat, b_hat = layer.quantized_weight_and_bias()
            step = layer.in_quant.grid_step() * layer.channel_step()
        assert step.shape == (layer.weight.shape[0],)
        codes = b_hat / step
        assert torch.equal(codes, codes.round()), name
        assert not torch.equal(b_hat, layer.bias.detach()), name  # it was really rounded
        assert (b_hat - layer.bias).abs().max() <= step.max() / 2 * (1 + 1e-6)
    # the forward pass adds exactly that bias
    layer = net.conv1
    with torch.no_grad():
        w_hat, b_hat = layer.quantized_weight_and_bias()
        xq = layer.in_quant(x)
        torch.testing.assert_close(layer(x), tF.conv2d(xq, w_hat, b_hat, padding=1), atol=0, rtol=0)


def test_state_dict_round_trip_reproduces_outputs():
    net, _, x = prepared()
    # move parameters away from their calibrated values, as training would
    with torch.no_grad():
        for q in quantizer_params(net).values():
            q.qmax.mul_(1.3)
        net.fc.weight.add_(0.01)
    net.eval()
    with torch.no_grad():
        want = net(x)
    fresh = make_net(seed=7)
    mixq.prepare_(fresh, QuantConfig(), example_input=x)
    assert all(q.signed is None and not q.calibrated
               for k, q in quantizer_params(fresh).items() if k.endswith("input"))
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    for k, q in quantizer_params(fresh).items():
        assert q.signed == quantizer_params(net)[k].signed and q.calibrated, k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            got = fresh(x)
    assert torch.equal(got, want)


def test_preparing_twice_raises():
    net = make_net()
    mixq.prepare_(net)
    with pytest.raises(ValueError, match="already prepared"):
        mixq.prepare_(net)
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        mixq.prepare_(nn.Sequential(nn.ReLU()))
