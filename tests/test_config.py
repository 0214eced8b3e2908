"""Invalid configuration fails at construction with a ValueError that names the bad value, the
allowed values and, for names, the closest match."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mixq
from mixq import LayerRule, QuantConfig, QuantizerConfig, UniformQuantizer
from mixq.config import from_dict


def raises(match: str):
    return pytest.raises(ValueError, match=match)


@pytest.mark.parametrize("name", ["bits_init", "bits_min", "bits_max"])
@pytest.mark.parametrize("value", [0, -1])
def test_bits_below_one(name, value):
    with raises(rf"{name} must be an integer >= 1, got {value}"):
        QuantizerConfig(**{name: value})


def test_bits_not_integer():
    with raises(r"bits_init must be an integer >= 1, got 4\.5"):
        QuantizerConfig(bits_init=4.5)


def test_bits_min_above_bits_max():
    with raises(r"bits_min \(6\) must be <= bits_max \(4\)"):
        QuantizerConfig(bits_min=6, bits_max=4, bits_init=4)
    with raises(r"bits_init \(9\) must lie in \[bits_min, bits_max\] = \[2, 8\]"):
        QuantizerConfig(bits_init=9)
    with raises(r"bits_max \(17\) must be <= 16"):
        QuantizerConfig(bits_max=17)


@pytest.mark.parametrize(
    ("kwargs", "what", "bad", "allowed", "closest"),
    [
        ({"param": "u4"}, "uniform parametrization", "u4", "u1, u2, u3", "u3"),
        ({"kind": "pow2", "param": "p4"}, "pow2 parametrization", "p4", "p1, p2, p3", "p3"),
        ({"modifier": "ewsg"}, "rounding-gradient modifier", "ewsg", "ste, ewgs, atanh, psgd, tanh, acos",
         "ewgs"),
        ({"granularity": "chanel"}, "granularity", "chanel", "tensor, channel, group", "channel"),
        ({"kind": "unifrom"}, "quantizer kind", "unifrom", "uniform, pow2", "uniform"),
        ({"init": "percentil"}, "initialization", "percentil",
         "mean3sigma, pow2_max, percentile, max, fixed", "percentile"),
    ],
)
def test_unknown_names_list_choices_and_closest(kwargs, what, bad, allowed, closest):
    with pytest.raises(ValueError) as err:
        QuantizerConfig(**kwargs)
    msg = str(err.value)
    assert f"unknown {what} {bad!r}" in msg
    assert f"choose one of {allowed}" in msg
    assert msg.endswith(f"did you mean {closest!r}?")


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(ValueError) as err:
        QuantizerConfig(modifier="zzzzzz")
    assert "did you mean" not in str(err.value) and "'zzzzzz'" in str(err.value)


def test_unknown_act_site():
    with pytest.raises(ValueError) as err:
        QuantConfig(act_site="relu6")
    msg = str(err.value)
    assert "unknown activation site 'relu6'" in msg and "choose one of input, relu" in msg
    assert msg.endswith("did you mean 'relu'?")


def test_group_size_must_divide_channels():
    cfg = QuantizerConfig(granularity="group", group_size=3)
    with pytest.raises(ValueError) as err:
        UniformQuantizer(cfg, num_channels=8, where="features.3")
    msg = str(err.value)
    assert "group_size 3 does not divide the 8 channels of features.3" in msg
    assert "allowed group sizes: [2, 4, 8]" in msg
    assert re.search(r"did you mean [24]\?", msg)
    assert UniformQuantizer(cfg, num_channels=9).slices == 3  # and it does divide 9

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 10, 1)

        def forward(self, x):
            return self.conv(x)

    with raises(r"group_size 3 does not divide the 10 channels of conv; allowed group sizes: \[2, 5, 10\]"):
        mixq.prepare_(Net(), QuantConfig(weight=cfg))


def test_group_size_needs_group_granularity():
    with raises(r"granularity 'group' needs group_size >= 2, got 1"):
        QuantizerConfig(granularity="group")
    with raises(r"group_size=4 needs granularity 'group', got 'channel'"):
        QuantizerConfig(group_size=4)


def test_scale_range_above_qmax_range():
    with raises(r"scale_range starts at 200\.0, above the largest qmax 127\.0"):
        QuantizerConfig(scale_range=(200.0, 300.0))
    with raises(r"scale_range must satisfy 0 < low < high, got \(1\.0, 0\.5\)"):
        QuantizerConfig(scale_range=(1.0, 0.5))
    with raises(r"qmax_range must satisfy 0 < low < high, got \(0\.0, 1\.0\)"):
        QuantizerConfig(qmax_range=(0.0, 1.0))


def test_other_scalar_checks():
    with raises(r"percentile must lie in \[50, 100\], got 101"):
        QuantizerConfig(percentile=101)
    with raises(r"delta must be >= 0, got -0\.1"):
        QuantizerConfig(delta=-0.1)
    with raises(r"bias_bits must be an int in 8\.\.32, got 4"):
        QuantConfig(bias_bits=4)
    with raises(r"weight_bits in rule 'fc' must be an int in 1\.\.16"):
        LayerRule("fc", weight_bits=0)
    with raises(r"act_bits in rule '\*' must be an int in 1\.\.16"):
        LayerRule("*", act_bits=17)


def test_from_dict_unknown_key_names_closest():
    with raises(r"unknown key 'weight\.bits_maxx'; allowed: .*bits_max.*did you mean 'bits_max'\?"):
        from_dict(QuantizerConfig, {"bits_maxx": 4}, where="weight.")
    cfg = from_dict(QuantizerConfig, {"scale_range": [0.001, 1.0], "bits_init": 3})
    assert cfg.scale_range == (0.001, 1.0) and cfg.bits_init == 3


def test_relu_site_needs_per_tensor_activations():
    act = QuantizerConfig(granularity="channel", signed=None)
    with raises(r"act_site 'relu' quantizes per tensor.*got granularity 'channel'"):
        mixq.prepare_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), QuantConfig(act=act, act_site="relu"))


def test_valid_configs_construct():
    assert QuantizerConfig().param == "u3"
    assert QuantizerConfig(kind="pow2", param="p3", with_zero=True).kind == "pow2"
    assert QuantConfig(act=None).act is None
    torch.manual_seed(0)
    assert UniformQuantizer(QuantizerConfig(granularity="group", group_size=2), num_channels=8).slices == 4
