"""Float CNN model zoo used as the starting point for mixed-precision quantization.

Every model follows a few structural rules that the quantization tooling relies on:

* every activation is its own ``nn.ReLU`` / ``nn.ReLU6`` module instance (never ``inplace``,
  never functional), called exactly once per forward pass;
* every ``nn.BatchNorm2d`` directly follows a bias-free ``nn.Conv2d`` whose output feeds only
  that BatchNorm (so BN can be folded into the conv with torch.fx);
* depthwise convolutions use ``groups=channels``;
* a ReLU that would feed a max-pool runs after it (conv -> BN -> max-pool -> ReLU): max and ReLU
  commute (both are monotone, ReLU(max x) = max ReLU(x), the gradients agree too), so the function
  is the same, the ReLU touches a quarter of the elements and its backward mask is saved at the
  pooled resolution (under torch.compile on the CPU a saved bool mask costs more than the ReLU);
* ``torch.fx.symbolic_trace`` works (no Python control flow on tensor values).

Use :func:`create_model` (or the :data:`MODELS` registry) to build a model by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "STEMS",
    "ConvBNAct",
    "DropConnect",
    "create_model",
    "input_shape",
    "list_models",
]

STEMS = ("cifar", "imagenet")


def _check_stem(stem: str, allowed: tuple[str, ...] = STEMS) -> None:
    if stem not in allowed:
        raise ValueError(f"unknown stem {stem!r}: choose one of {', '.join(allowed)}")


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0, Linear N(0, 0.01) / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class ConvBNAct(nn.Sequential):
    """Conv2d(bias=False) -> BatchNorm2d -> activation (``nn.ReLU``/``nn.ReLU6`` or none).

    Shapes: (N, in_ch, H, W) -> (N, out_ch, H', W') with H' = ceil(H / stride) ("same" padding).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class DropConnect(nn.Module):
    """Stochastic depth on a residual branch: zero whole samples with probability ``drop_rate``.

    Training: (N, C, H, W) -> same shape, each sample scaled by Bernoulli(1 - p) / (1 - p).
    Eval: identity. fx-traceable (``self.training`` is a constant at trace time).
    """

    def __init__(self, drop_rate: float) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        keep = 1.0 - self.drop_rate
        mask = torch.empty_like(x[:, :1, :1, :1]).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}"


# --------------------------------------------------------------------------- Fashion-MNIST CNN


# 3x3 conv+BN+ReLU widths, "M" = 2x2 max-pool. Only narrow convs run at full resolution.
FMNIST_CNN_LAYOUT: tuple[int | str, ...] = (16, 16, "M", 48, 64, "M", 128, 128)
# A VGG of the NUUQ paper's size (~3.7 M weights, nuuq.md 4.7); 28x28 -> 3x3 after three pools.
FMNIST_VGG_LAYOUT: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class FMNISTCNN(nn.Module):
    """Small, fast CNN for 28x28 Fashion-MNIST (default layout ``FMNIST_CNN_LAYOUT``).

    (N, C, 28, 28) -> conv16, conv16 -> pool -> (N, 16, 14, 14) -> conv48, conv64 -> pool
    -> (N, 64, 7, 7) -> conv128, conv128 -> GAP -> (N, 128) -> Linear -> (N, num_classes).
    Each conv is conv -> BN -> ReLU, except that a conv followed by a pool is conv -> BN and its
    ReLU runs after the pool, in the pool's slot (``features[i] = Sequential(MaxPool2d, ReLU)``):
    the same function, and the parameter names (``features.<i>.0.weight``) are those of before.

    With ``hidden`` widths the head is a VGG classifier instead of GAP: flatten the last feature
    map, then Linear -> ReLU per hidden width, then Linear -> (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 layout: tuple[int | str, ...] = FMNIST_CNN_LAYOUT,
                 hidden: tuple[int, ...] = (), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch, hw = in_channels, 28
        for i, item in enumerate(layout):
            # a conv right before a pool has its ReLU after the pool (module docstring)
            if item == "M":
                after_conv = i > 0 and layout[i - 1] != "M"
                layers.append(nn.Sequential(nn.MaxPool2d(2), nn.ReLU()) if after_conv
                              else nn.MaxPool2d(2))
                hw //= 2
            else:
                pooled = i + 1 < len(layout) and layout[i + 1] == "M"
                layers.append(ConvBNAct(ch, int(item), act=None if pooled else nn.ReLU))
                ch = int(item)
        self.features = nn.Sequential(*layers)
        # GAP, or for a VGG head the whole last feature map
        self.pool = nn.Identity() if hidden else nn.AdaptiveAvgPool2d(1)
        width = ch * hw * hw if hidden else ch
        head: list[nn.Module] = []
        for h in hidden:
            head += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.head = nn.Sequential(*head) if head else None
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)
        for m in head:  # hidden layers feed ReLUs: Kaiming, not the classifier's N(0, 0.01)
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(x if self.head is None else self.head(x))


# --------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """ResNet basic block: (N, in_ch, H, W) -> (N, out_ch, H/stride, W/stride).

    ``shortcut="A"``: parameter-free (subsample + zero-pad channels, CIFAR ResNet-20);
    ``shortcut="B"``: 1x1 strided conv + BN projection when the shape changes (ResNet-18).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.needs_shortcut = stride != 1 or in_ch != out_ch
        self.shortcut_type = shortcut
        self.stride = stride
        self.pad = out_ch - in_ch
        self.downsample: nn.Module | None = None
        if self.needs_shortcut and shortcut == "B":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        elif shortcut not in ("A", "B"):
            raise ValueError(f"unknown shortcut {shortcut!r}: choose 'A' or 'B'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        elif self.needs_shortcut:  # option A: subsample, zero-pad the new channels
            identity = x[:, :, :: self.stride, :: self.stride]
            identity = F.pad(identity, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            identity = x
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """Generic ResNet with BasicBlocks.

    (N, in_channels, H, W) -> stem -> stages (each after the first halves H, W)
    -> GAP -> (N, widths[-1]) -> Linear -> (N, num_classes).
    """

    def __init__(self, depths: list[int], widths: list[int], num_classes: int = 10,
                 in_channels: int = 3, stem: str = "cifar", shortcut: str = "B") -> None:
        super().__init__()
        _check_stem(stem)
        if stem == "cifar":
            self.stem = ConvBNAct(in_channels, widths[0], 3, 1)
        else:
            self.stem = nn.Sequential(
                ConvBNAct(in_channels, widths[0], 7, 2, act=None), nn.MaxPool2d(3, 2, 1), nn.ReLU()
            )  # ReLU after the max-pool: the same function (module docstring)
        blocks: list[nn.Module] = []
        in_ch = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stage = [BasicBlock(in_ch, width, 1 if i == 0 else 2, shortcut)]
            stage += [BasicBlock(width, width, 1, shortcut) for _ in range(depth - 1)]
            blocks.append(nn.Sequential(*stage))
            in_ch = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- MobileNetV2 / Lite0


class InvertedResidual(nn.Module):
    """MBConv / inverted residual block without squeeze-excite, ReLU6 activations.

    (N, in_ch, H, W) -> [1x1 expand to in_ch*expand, skipped if expand == 1]
    -> kxk depthwise (stride) -> 1x1 linear projection -> (N, out_ch, H/stride, W/stride),
    plus the input when stride == 1 and in_ch == out_ch (optionally through DropConnect).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, kernel: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop = DropConnect(drop_rate) if self.use_residual and drop_rate > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if not self.use_residual:
            return out
        if self.drop is not None:
            out = self.drop(out)
        return x + out


class MBNet(nn.Module):
    """Shared body for MobileNetV2 and EfficientNet-Lite0.

    ``config`` rows are (expand, out_ch, repeats, stride, kernel). (N, in_channels, H, W)
    -> stem conv (stride 2, or 1 for the cifar stem) -> blocks -> 1x1 conv to ``head_ch``
    -> GAP -> (N, head_ch) -> Dropout -> Linear -> (N, num_classes). With the cifar stem the
    second stage's stride is also 1, so a 32x32 input reaches the head at 4x4.
    ``drop_connect`` is the final block's drop rate; earlier blocks scale it linearly by
    block index (as in the reference EfficientNet implementation).
    """

    def __init__(self, config: list[tuple[int, int, int, int, int]], stem_ch: int, head_ch: int,
                 num_classes: int = 10, in_channels: int = 3, stem: str = "cifar",
                 dropout: float = 0.2, drop_connect: float = 0.0) -> None:
        super().__init__()
        _check_stem(stem)
        cifar = stem == "cifar"
        layers: list[nn.Module] = [ConvBNAct(in_channels, stem_ch, 3, 1 if cifar else 2,
                                             act=nn.ReLU6)]
        total = sum(row[2] for row in config)
        in_ch, idx = stem_ch, 0
        for stage, (expand, out_ch, repeats, stride, kernel) in enumerate(config):
            if cifar and stage == 1:
                stride = 1
            for r in range(repeats):
                rate = drop_connect * idx / total
                layers.append(InvertedResidual(in_ch, out_ch, stride if r == 0 else 1, expand,
                                               kernel, rate))
                in_ch, idx = out_ch, idx + 1
        layers.append(ConvBNAct(in_ch, head_ch, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_ch, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# (expand t, channels c, repeats n, stride s, kernel k)
MOBILENETV2_CONFIG = [
    (1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 4, 2, 3),
    (6, 96, 3, 1, 3), (6, 160, 3, 2, 3), (6, 320, 1, 1, 3),
]
EFFICIENTNET_LITE0_CONFIG = [
    (1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3),
]


# --------------------------------------------------------------------------- registry


def fmnist_cnn(num_classes: int = 10, in_channels: int = 1, stem: str = "cifar") -> nn.Module:
    """Small CNN for 28x28 inputs (the only stem is its own; ``stem`` must be "cifar")."""
    _check_stem(stem, ("cifar",))
    return FMNISTCNN(num_classes, in_channels)


def fmnist_vgg(num_classes: int = 10, in_channels: int = 1, stem: str = "cifar") -> nn.Module:
    """VGG-like CNN for 28x28 inputs with 3.70 M weights, the size of the NUUQ paper's model:
    conv 32, 32, pool, 64, 64, pool, 128, 128, pool -> flatten 1152 -> 2048 -> 512 -> classes.
    Most weights sit in the two hidden Linear layers (``stem`` must be "cifar")."""
    _check_stem(stem, ("cifar",))
    return FMNISTCNN(num_classes, in_channels, FMNIST_VGG_LAYOUT, hidden=(2048, 512), dropout=0.2)


def resnet20(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016): 3x3 BasicBlocks, 16/32/64, option-A shortcuts."""
    _check_stem(stem, ("cifar",))
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels, "cifar", shortcut="A")


def resnet18(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> nn.Module:
    """ResNet-18 with projection shortcuts; cifar (3x3, no max-pool) or imagenet stem."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, stem, "B")


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> nn.Module:
    """MobileNetV2 1.0 (torchvision layout), ReLU6, 1280-channel head, dropout 0.2."""
    return MBNet(MOBILENETV2_CONFIG, 32, 1280, num_classes, in_channels, stem, dropout=0.2)


def efficientnet_lite0(num_classes: int = 10, in_channels: int = 3,
                       stem: str = "cifar") -> nn.Module:
    """EfficientNet-Lite0: B0 table, ReLU6, no SE, dropout 0.2, drop-connect up to 0.2."""
    return MBNet(EFFICIENTNET_LITE0_CONFIG, 32, 1280, num_classes, in_channels, stem,
                 dropout=0.2, drop_connect=0.2)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": fmnist_cnn,
    "fmnist_vgg": fmnist_vgg,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
    "efficientnet_lite0": efficientnet_lite0,
}

_INPUT_HW = {"fmnist_cnn": 28, "fmnist_vgg": 28, "resnet20": 32}


def list_models() -> list[str]:
    """Sorted names accepted by :func:`create_model`."""
    return sorted(MODELS)


def _check_name(name: str) -> str:
    key = name.lower()
    if key not in MODELS:
        msg = f"unknown model {name!r}: choose one of {', '.join(list_models())}"
        close = difflib.get_close_matches(key, list_models(), n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        raise ValueError(msg)
    return key


def create_model(name: str, num_classes: int = 10, in_channels: int = 3,
                 stem: str = "cifar") -> nn.Module:
    """Build a freshly initialised float model by (case-insensitive) name.

    ``stem`` is "cifar" (32x32 inputs, or 28x28 for fmnist_cnn and fmnist_vgg) or "imagenet"
    (224x224 or smaller, e.g. 64x64); fmnist_cnn, fmnist_vgg and resnet20 only have the "cifar" stem.
    Raises ValueError for unknown names (suggesting the closest match) or stems.
    """
    return MODELS[_check_name(name)](num_classes=num_classes, in_channels=in_channels, stem=stem)


def input_shape(name: str, in_channels: int = 3, stem: str = "cifar") -> tuple[int, int, int]:
    """Natural (C, H, W) input for a model: 28x28 fmnist_cnn, 32x32 cifar, 224x224 imagenet."""
    key = _check_name(name)
    _check_stem(stem)
    hw = _INPUT_HW.get(key, 32 if stem == "cifar" else 224)
    return (in_channels, hw, hw)
