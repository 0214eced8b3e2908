"""Tests for the float model zoo in mixq.models."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mixq.models import MODELS, DropConnect, create_model, input_shape, list_models

NAMES = sorted(MODELS)
# (name, stem) pairs to exercise.
VARIANTS = [(n, "cifar") for n in NAMES] + [
    (n, "imagenet") for n in ("resnet18", "mobilenetv2", "efficientnet_lite0")
]
IDS = [f"{n}-{s}" for n, s in VARIANTS]
# Reduced spatial sizes for the heavier models, to keep the file fast on a small CPU; the
# natural sizes (32x32 cifar stems, 64x64 imagenet stems) are used by the forward test.
SMALL_HW = {"cifar": 16, "imagenet": 48}
CHEAP = ("fmnist_cnn", "fmnist_vgg", "resnet20")  # natural size (fmnist_vgg: 28x28 only)


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, stem: str = "cifar", num_classes: int = 10, seed: int = 0,
           in_channels: int | None = None, small: bool = True):
    """Model plus a batch-2 input: natural size (64x64 for imagenet stems) or reduced."""
    in_ch = in_channels or (1 if name.startswith("fmnist") else 3)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, in_channels=in_ch, stem=stem)
    c, h, w = input_shape(name, in_ch, stem)
    if name not in CHEAP:
        h = w = SMALL_HW[stem] if small else {"cifar": 32, "imagenet": 64}[stem]
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(123))
    return model, x


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=IDS)
def test_forward_shape_and_finite(name, stem):
    model, x = _build(name, stem, num_classes=7, small=False)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_in_channels_honoured(name):
    model, x = _build(name, num_classes=5, in_channels=2)
    assert x.shape[1] == 2
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=IDS)
def test_backward_reaches_every_parameter(name, stem):
    model, x = _build(name, stem)
    model.train()
    for m in model.modules():  # keep every residual branch alive for this check
        if isinstance(m, DropConnect):
            m.eval()
    loss = F.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=IDS)
def test_fx_trace_matches_eager(name, stem):
    model, x = _build(name, stem)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    # Training-mode tracing (DropConnect's random path) must work too.
    model.train()
    train_traced = torch.fx.symbolic_trace(model)
    assert train_traced(x).shape == (2, 10)


def test_drop_connect_train_and_eval():
    drop = DropConnect(0.5)
    x = torch.ones(64, 3, 2, 2)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    per_sample = y.flatten(1)
    # each sample is either dropped (0) or scaled by 1 / keep = 2, uniformly over the sample
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.fx.symbolic_trace(drop)(x).shape == x.shape


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=IDS)
def test_each_activation_module_called_once(name, stem):
    model, x = _build(name, stem)
    acts = {n: m for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))}
    assert acts, "model has no activation modules"
    assert not any(m.inplace for m in acts.values())
    counts = dict.fromkeys(acts, 0)
    handles = []
    for n, m in acts.items():
        def hook(_mod, _inp, _out, n=n):
            counts[n] += 1
        handles.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert all(c == 1 for c in counts.values()), {n: c for n, c in counts.items() if c != 1}
    # No functional activations hiding in the graph.
    functional = {F.relu, F.relu6, F.hardtanh, torch.relu, torch.clamp, torch.clip}
    methods = {"relu", "relu_", "clamp", "clamp_", "clip", "hardtanh"}
    for node in torch.fx.symbolic_trace(model).graph.nodes:
        assert not (node.op == "call_function" and node.target in functional), node
        assert not (node.op == "call_method" and node.target in methods), node


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=IDS)
def test_relu_runs_after_the_max_pool_and_computes_what_relu_first_did(name, stem):
    """No ReLU feeds a max-pool; putting one back before every pool that a ReLU follows (the
    textbook order: ReLU(max x) = max ReLU(x)) changes no output and no gradient, bit for bit."""
    model, x = _build(name, stem)
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    pools = [n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(mods[n.target], nn.MaxPool2d)]
    for pool in pools:
        src = pool.args[0]
        assert not (src.op == "call_module" and isinstance(mods[src.target], nn.ReLU)), pool.target
    relu_after = [p.target for p in pools if any(
        u.op == "call_module" and isinstance(mods[u.target], nn.ReLU) for u in p.users)]
    if name.startswith("fmnist") or stem == "imagenet" and name.startswith("resnet"):
        assert relu_after, "the ReLU of the conv before each pool runs after the pool"
    model.double().train()

    def step(relu_first: bool):
        handles = [model.get_submodule(t).register_forward_pre_hook(lambda _m, a: (F.relu(a[0]),))
                   for t in relu_after] if relu_first else []
        model.zero_grad()
        torch.manual_seed(0)  # the same DropConnect / Dropout draws in both passes
        out = model(x.double())
        out.square().sum().backward()
        for h in handles:
            h.remove()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = step(relu_first=False)
    ref_out, ref_grads = step(relu_first=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "stem"), VARIANTS, ids=IDS)
def test_batchnorm_follows_bias_free_conv(name, stem):
    model, _ = _build(name, stem)
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    n_bn = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.BatchNorm2d):
            continue
        n_bn += 1
        prev = node.args[0]
        assert isinstance(prev, torch.fx.Node) and prev.op == "call_module", node.target
        conv = mods[prev.target]
        assert isinstance(conv, nn.Conv2d), f"{node.target} follows {type(conv).__name__}"
        assert conv.bias is None, prev.target
        assert conv.out_channels == mods[node.target].num_features
        # The conv output must feed only its BN, so the pair can be folded into one conv.
        assert len(prev.users) == 1, f"conv {prev.target} output used more than once"
    assert n_bn == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_grouped_convs_are_depthwise(name):
    model, _ = _build(name)
    for mname, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            assert m.groups == m.in_channels == m.out_channels, mname
    has_dw = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    assert has_dw == (name in ("mobilenetv2", "efficientnet_lite0"))


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_init_and_state_dict_round_trip(name):
    model_a, x = _build(name, seed=0)
    model_a2, _ = _build(name, seed=0)
    for (ka, va), (kb, vb) in zip(model_a.state_dict().items(), model_a2.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    model_b, _ = _build(name, seed=1)
    model_a.train()
    with torch.no_grad():  # move BN running stats away from their defaults
        model_a(x)
    model_a.eval()
    model_b.load_state_dict(model_a.state_dict())
    model_b.eval()
    with torch.no_grad():
        torch.testing.assert_close(model_b(x), model_a(x), rtol=0, atol=0)


def test_parameter_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    # ResNet-20 (10 classes), conv weights 3*3*cin*cout, BN 2*c, FC 64*10 + 10:
    #   stem      3*3*3*16                 =     432   BN 1x32  =  32
    #   stage 1   6 convs 3*3*16*16        =  13,824   BN 6x32  = 192
    #   stage 2   3*3*16*32 + 5*3*3*32*32  =  50,688   BN 6x64  = 384
    #   stage 3   3*3*32*64 + 5*3*3*64*64  = 202,752   BN 6x128 = 768
    #   FC        64*10 + 10               =     650
    #   total = 432+32+13,824+192+50,688+384+202,752+768+650 = 269,722 (option A: no params)
    assert count(create_model("resnet20")) == 269_722
    # fmnist_vgg (1 input channel): convs 9*(1*32 + 32*32 + 32*64 + 64*64 + 64*128 + 128*128)
    #   = 285,984, BN 2*(32+32+64+64+128+128) = 896, Linear 1152*2048 + 2048 = 2,361,344,
    #   2048*512 + 512 = 1,049,088, 512*10 + 10 = 5,130: total 3,702,442 (3,698,976 weights)
    assert count(create_model("fmnist_vgg", in_channels=1)) == 3_702_442
    # torchvision reference counts (1000 classes, ImageNet stem).
    assert count(create_model("resnet18", num_classes=1000, stem="imagenet")) == 11_689_512
    assert count(create_model("mobilenetv2", num_classes=1000, stem="imagenet")) == 3_504_872
    # EfficientNet-Lite0 is ~4.65M parameters.
    n = count(create_model("efficientnet_lite0", num_classes=1000, stem="imagenet"))
    assert abs(n - 4_650_000) / 4_650_000 < 0.02
    # The stem choice changes strides only, never parameter counts.
    assert count(create_model("mobilenetv2")) == count(create_model("mobilenetv2",
                                                                     stem="imagenet"))


def test_resnet20_option_a_and_resnet18_stems():
    r20 = create_model("resnet20")
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in r20.modules())
    r18_c = create_model("resnet18")
    r18_i = create_model("resnet18", stem="imagenet")
    first_c = next(m for m in r18_c.modules() if isinstance(m, nn.Conv2d))
    first_i = next(m for m in r18_i.modules() if isinstance(m, nn.Conv2d))
    assert first_c.kernel_size == (3, 3) and first_c.stride == (1, 1)
    assert first_i.kernel_size == (7, 7) and first_i.stride == (2, 2)
    assert any(isinstance(m, nn.MaxPool2d) for m in r18_i.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18_c.modules())


def test_imagenet_stem_full_resolution():
    model = create_model("mobilenetv2", stem="imagenet").eval()
    assert input_shape("mobilenetv2", stem="imagenet") == (3, 224, 224)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_unknown_name_and_stem_errors():
    with pytest.raises(ValueError, match=r"unknown model 'resnet2'.*did you mean 'resnet20'"):
        create_model("resnet2")
    with pytest.raises(ValueError, match="mobilenetv2") as exc:
        create_model("mobilenet_v2")
    assert "did you mean 'mobilenetv2'" in str(exc.value)
    with pytest.raises(ValueError, match="choose one of") as exc:
        create_model("vgg16")
    assert all(n in str(exc.value) for n in NAMES)
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        create_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="unknown stem 'imagenet'"):
        create_model("resnet20", stem="imagenet")
    assert isinstance(create_model("ResNet20"), nn.Module)  # names are case-insensitive
    assert list_models() == NAMES
