"""Size accounting (math.md 7) against counts written by hand, units, and the differentiable
SizeAccount."""

from __future__ import annotations

import functools

import pytest
import references as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mixq
from mixq import QuantConfig, SizeAccount, parse_bytes, size_report
from mixq.size import format_bytes, measure_

CYCLE = (2, 3, 4, 8)  # weight bits of output channels 0, 1, 2, 3, 4, ... (4 channels sum to 17)


class SmallNet(nn.Module):
    """conv(3->4, 3x3, bias) - relu - conv(4->6, 3x3, stride 2, no bias) - relu - fc(96->5)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(96, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """Basic block, 3x3 - BN - ReLU - 3x3 - BN, with a strided 1x1 conv + BN shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block(self.relu(self.bn(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def set_bits(q, bits) -> None:
    """Give slice i of U3 quantizer `q` exactly bits[i] bits: step 2^-4, range step * max_code."""
    signed = bool(q.signed)
    with torch.no_grad():
        q.scale.fill_(2.0**-4)
        q.qmax.copy_(torch.tensor([2.0**-4 * ref.max_code(int(b), signed) for b in bits]))
    assert q.bits_per_slice().tolist() == [float(b) for b in bits]


def cycle_bits(n):
    return [CYCLE[i % 4] for i in range(n)]


def prepared(net_cls, bias_bits=32):
    torch.manual_seed(0)
    model = net_cls()
    x = torch.randn(2, 3, 8, 8)
    plan = mixq.prepare_(model, QuantConfig(bias_bits=bias_bits), example_input=x)
    mixq.calibrate_(model, [x])
    return model, plan, x


def sites(model):
    return {f"{s.fqn}:{s.role}": s.quant for s in mixq.quant_sites(model)}


# --------------------------------------------------------------------------------------------
# (a) two convs and a linear layer


@pytest.mark.parametrize("bias_bits", [32, 16])
def test_small_net_sizes_by_hand(bias_bits):
    model, plan, x = prepared(SmallNet, bias_bits)
    q = sites(model)
    # per-sample activation elements at each conv/linear input:
    #   conv1 input 3*8*8 = 192, conv2 input 4*8*8 = 256, fc input 6*4*4 = 96
    assert measure_(model, x) == {"conv1:input": 192, "conv2:input": 256, "fc:input": 96}
    # weight elements: conv1 4*3*3*3 = 108 (27 per channel), conv2 6*4*3*3 = 216 (36 per channel),
    # fc 5*96 = 480 (96 per row); biases conv1 4 + fc 5 = 9
    assert [int(q[k].numel.sum()) for k in ("conv1:weight", "conv2:weight", "fc:weight")] == [108, 216, 480]
    assert {r.fqn: r.elements for r in plan if r.role == "weight"} == {"conv1": 108, "conv2": 216, "fc": 480}
    assert {r.fqn: r.elements for r in plan if r.role == "input"} == {"conv1": 192, "conv2": 256, "fc": 96}
    # signedness from the data: the raw input has negatives, the others follow a ReLU
    assert [q[k].signed for k in ("conv1:input", "conv2:input", "fc:input")] == [True, False, False]

    set_bits(q["conv1:weight"], cycle_bits(4))  # 2,3,4,8       sum 17
    set_bits(q["conv2:weight"], cycle_bits(6))  # 2,3,4,8,2,3   sum 22
    set_bits(q["fc:weight"], cycle_bits(5))  # 2,3,4,8,2     sum 19
    set_bits(q["conv1:input"], [8])
    set_bits(q["conv2:input"], [4])
    set_bits(q["fc:input"], [6])
    # weights: 27*17 + 36*22 + 96*19 = 459 + 792 + 1824 = 3075 code bits, + 9 biases at bias_bits
    weight_bits = 3075 + 9 * bias_bits
    assert weight_bits == ref.weight_bits(
        [(27, b) for b in cycle_bits(4)] + [(36, b) for b in cycle_bits(6)]
        + [(96, b) for b in cycle_bits(5)], [4, 5], bias_bits)
    # activations: 192*8 + 256*4 + 96*6 = 1536 + 1024 + 576 = 3136; max 1536
    act_sites = [(192, 8), (256, 4), (96, 6)]
    assert (ref.act_sum_bits(act_sites), ref.act_max_bits(act_sites)) == (3136, 1536)

    acct = SizeAccount(model)()
    assert acct["weight_bits"].item() == weight_bits
    assert acct["act_sum_bits"].item() == 3136
    assert acct["act_max_bits"].item() == 1536
    assert acct["bn16_bits"].item() == 0

    rep = size_report(model)
    assert rep["weight_bytes"] == weight_bits / 8
    assert rep["bias_bytes"] == 9 * bias_bits / 8
    assert rep["act_sum_bytes"] == 3136 / 8 and rep["act_max_bytes"] == 1536 / 8
    assert rep["bn16_bytes"] == 0
    assert rep["weight_elements"] == 804  # 108 + 216 + 480
    assert rep["weight_bits_mean"] == pytest.approx(3075 / 804, abs=1e-12)
    layers = {r["fqn"]: r for r in rep["layers"]}
    assert layers["conv1"]["weight_bytes"] == (459 + 4 * bias_bits) / 8
    assert layers["conv2"]["weight_bytes"] == 792 / 8 and layers["conv2"]["bias_bytes"] == 0
    assert (layers["conv2"]["weight_bits_min"], layers["conv2"]["weight_bits_max"]) == (2, 8)
    assert layers["conv2"]["weight_bits_mean"] == pytest.approx(22 / 6, abs=1e-12)
    assert layers["fc"]["act_elements"] == 96 and layers["fc"]["act_bytes"] == 576 / 8
    assert layers["conv1"]["weight_slices"] == 4
    # the report is the account: same numbers in bytes
    for key in ("weight", "act_sum", "act_max", "bn16"):
        assert rep[f"{key}_bytes"] == acct[f"{key}_bits"].item() / 8


# --------------------------------------------------------------------------------------------
# (b) a ResNet-style network with a strided 1x1 shortcut


def test_resnet_block_sizes_by_hand():
    model, plan, x = prepared(ResNetish)
    q = sites(model)
    # activation inputs (per sample): stem 3*8*8 = 192; block.conv1 8*8*8 = 512;
    # block.conv2 16*4*4 = 256 (after the stride-2 conv1); block.shortcut.0 8*8*8 = 512 (the block
    # input, quantized again by the shortcut's own quantizer); fc 16 (after the global pool)
    assert measure_(model, x) == {"stem:input": 192, "block.conv1:input": 512, "block.conv2:input": 256,
                                  "block.shortcut.0:input": 512, "fc:input": 16}
    # weight elements: stem 8*3*3*3 = 216 (27/channel), block.conv1 16*8*3*3 = 1152 (72/channel),
    # block.conv2 16*16*3*3 = 2304 (144/channel), shortcut 16*8*1*1 = 128 (8/channel),
    # fc 10*16 = 160 (16/row) + 10 biases
    w_elems = {"stem": 216, "block.conv1": 1152, "block.conv2": 2304, "block.shortcut.0": 128, "fc": 160}
    assert {r.fqn: r.elements for r in plan if r.role == "weight"} == w_elems
    assert {r.fqn: r.slices for r in plan if r.role == "weight"} == {
        "stem": 8, "block.conv1": 16, "block.conv2": 16, "block.shortcut.0": 16, "fc": 10}
    for name in w_elems:
        set_bits(q[f"{name}:weight"], cycle_bits(int(q[f"{name}:weight"].slices)))
    for name, b in (("stem", 8), ("block.conv1", 4), ("block.conv2", 3), ("block.shortcut.0", 5),
                    ("fc", 6)):
        set_bits(q[f"{name}:input"], [b])
    # weight bits: stem 27*(2*17) = 918; conv1 72*(4*17) = 4896; conv2 144*68 = 9792;
    # shortcut 8*68 = 544; fc 16*(17+17+2+3) = 16*39 = 624; bias 10*32 = 320
    # total 918 + 4896 + 9792 + 544 + 624 + 320 = 17094
    # act bits: 192*8 + 512*4 + 256*3 + 512*5 + 16*6 = 1536 + 2048 + 768 + 2560 + 96 = 7008, max 2560
    # BatchNorm channels 8 + 16 + 16 + 16 = 56 -> 56 * 2 * 16 = 1792 bits = 224 bytes
    assert ref.bn16_bits([8, 16, 16, 16]) == 1792
    acct = SizeAccount(model)()
    assert acct["weight_bits"].item() == 17094
    assert acct["act_sum_bits"].item() == 7008
    assert acct["act_max_bits"].item() == 2560
    assert acct["bn16_bits"].item() == 1792
    rep = size_report(model)
    assert rep["weight_bytes"] == 17094 / 8 and rep["bias_bytes"] == 40
    assert rep["act_sum_bytes"] == 876 and rep["act_max_bytes"] == 320 and rep["bn16_bytes"] == 224
    assert rep["weight_elements"] == 3960  # 216 + 1152 + 2304 + 128 + 160
    assert "block.shortcut.0" in mixq.format_report(rep)


def test_bn16_disappears_after_folding():
    torch.manual_seed(0)
    model = ResNetish().eval()
    folded = mixq.fold_bn_(model)
    assert len(folded) == 4
    x = torch.randn(2, 3, 8, 8)
    mixq.prepare_(model, QuantConfig(), example_input=x)
    mixq.calibrate_(model, [x])
    assert SizeAccount(model)()["bn16_bits"].item() == 0


# --------------------------------------------------------------------------------------------
# units


def test_parse_bytes_units():
    assert parse_bytes("70.1 KiB") == pytest.approx(70.1 * 1024)
    assert parse_bytes("70.1KiB") == pytest.approx(70.1 * 1024)
    assert parse_bytes("1 kB") == 1000 and parse_bytes("1kB") == 1000
    assert parse_bytes("1.5 MB") == 1.5e6 and parse_bytes("2 MiB") == 2 * 1024**2
    assert parse_bytes("3 GiB") == 3 * 1024**3 and parse_bytes("1 GB") == 1e9
    assert parse_bytes("512") == 512 and parse_bytes(100) == 100 and parse_bytes("7 B") == 7
    with pytest.raises(ValueError, match="ambiguous.*KiB.*kB"):
        parse_bytes("70 KB")
    with pytest.raises(ValueError, match="ambiguous"):
        parse_bytes("70KB")
    with pytest.raises(ValueError, match="'kb'.*did you mean 'kB'"):
        parse_bytes("70 kb")
    with pytest.raises(ValueError, match="positive"):
        parse_bytes("0 kB")
    with pytest.raises(ValueError, match="number"):
        parse_bytes("lots kB")


def test_format_bytes_units():
    assert format_bytes(2048) == "2.00 KiB"
    assert format_bytes(2048, "kB") == "2.05 kB"
    assert format_bytes(1500, "kB") == "1.50 kB"
    assert format_bytes(3 * 1024**2, "MiB") == "3.00 MiB"
    assert format_bytes(4.14e6, "MB") == "4.14 MB"
    assert format_bytes(parse_bytes("70.1 KiB"), "KiB") == "70.10 KiB"


# --------------------------------------------------------------------------------------------
# differentiable account


def test_size_penalty_reaches_scale_and_qmax():
    model, _, _ = prepared(SmallNet)
    for k, q in sites(model).items():
        set_bits(q, cycle_bits(q.slices) if k.endswith("weight") else [4])
    acct = SizeAccount(model)
    sizes = acct()
    target = 0.5 * (sizes["weight_bits"].detach() + sizes["act_sum_bits"].detach())
    penalty = torch.relu(sizes["weight_bits"] + sizes["act_sum_bits"] - target) ** 2
    penalty.backward()
    for k, q in sites(model).items():
        # more levels cost bits: the size grows with qmax and shrinks with the step, in every slice
        assert (q.qmax.grad > 0).all(), k
        assert (q.scale.grad < 0).all(), k


def test_act_max_gradient_goes_to_the_argmax_site_only():
    model, _, _ = prepared(SmallNet)
    q = sites(model)
    for k, quant in q.items():
        set_bits(quant, cycle_bits(quant.slices) if k.endswith("weight") else [4])
    # conv2 input: 256 * 4 = 1024 bits, the largest (conv1 input 192 * 4, fc input 96 * 4)
    SizeAccount(model)()["act_max_bits"].backward()
    assert q["conv2:input"].qmax.grad.abs().sum() > 0
    assert q["conv1:input"].qmax.grad is None or (q["conv1:input"].qmax.grad == 0).all()
    assert q["fc:input"].qmax.grad is None or (q["fc:input"].qmax.grad == 0).all()


@functools.lru_cache(maxsize=1)
def _small_model():
    return prepared(SmallNet)[0]


@given(st.lists(st.integers(2, 8), min_size=15, max_size=15), st.lists(st.integers(1, 8), min_size=3,
       max_size=3), st.integers(0, 14))
def test_size_additive_over_layers_and_monotone_in_bits(wbits, abits, bump):
    model = _small_model()
    q = sites(model)
    per_layer = {"conv1": (wbits[:4], 27, 4), "conv2": (wbits[4:10], 36, 0), "fc": (wbits[10:], 96, 5)}
    for name, (bits, _, _) in per_layer.items():
        set_bits(q[f"{name}:weight"], bits)
    for name, b in zip(("conv1", "conv2", "fc"), abits, strict=True):
        set_bits(q[f"{name}:input"], [b])
    acct = SizeAccount(model)
    sizes = {k: v.item() for k, v in acct().items()}
    want = sum(ref.weight_bits([(n, b) for b in bits], [nb], 32) for bits, n, nb in per_layer.values())
    assert sizes["weight_bits"] == want
    act = list(zip((192, 256, 96), abits, strict=True))
    assert sizes["act_sum_bits"] == ref.act_sum_bits(act)
    assert sizes["act_max_bits"] == ref.act_max_bits(act)
    layers = {r["fqn"]: r for r in size_report(model)["layers"]}
    for name, (bits, n, nb) in per_layer.items():
        assert layers[name]["weight_bytes"] * 8 == sum(n * b for b in bits) + nb * 32
    # one more bit in one slice adds exactly that slice's elements; one fewer never adds
    bumped = list(wbits)
    bumped[bump] = min(bumped[bump] + 1, 8)
    name = "conv1" if bump < 4 else ("conv2" if bump < 10 else "fc")
    lo = {"conv1": 0, "conv2": 4, "fc": 10}[name]
    set_bits(q[f"{name}:weight"], bumped[lo:lo + len(per_layer[name][0])])
    after = acct()["weight_bits"].item()
    assert after - sizes["weight_bits"] == (bumped[bump] - wbits[bump]) * per_layer[name][1]
    assert after >= sizes["weight_bits"]
