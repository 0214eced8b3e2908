"""The competitors' QAT at the mixq sites, for the benchmarks: PyTorch's learnable fake-quant ops
(`to_torch_lsq`) and Brevitas (`to_brevitas`, an optional dependency). Both swap each Conv2d and
Linear of a float model in place, keeping its weights: 4-bit per-channel weights and an 8-bit
per-tensor input, the sites and widths that mixq learns its bits at."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as tF


class _TorchLSQ:
    """PyTorch's learnable fake-quant ops at the mixq sites: per-channel weights
    (torch._fake_quantize_learnable_per_channel_affine, 4-bit signed) and the per-tensor input
    (torch._fake_quantize_learnable_per_tensor_affine, 8-bit), LSQ gradient factor 1/sqrt(N Qp)."""

    def _setup(self, w_bits=4, a_bits=8, signed_input=False):
        w = self.weight.detach()
        c = w.shape[0]
        self.w_min, self.w_max = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
        dev = w.device
        s = w.reshape(c, -1).abs().amax(1).clamp(min=1e-4) / self.w_max
        self.w_scale = nn.Parameter(s.float())
        self.register_buffer("w_zp", torch.zeros(c, device=dev))
        self.a_min, self.a_max = (-(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1) if signed_input else (
            0, 2**a_bits - 1)
        self.a_scale = nn.Parameter(torch.tensor([4.0 / self.a_max], device=dev))
        self.register_buffer("a_zp", torch.zeros(1, device=dev))
        self.w_factor = 1.0 / math.sqrt(w[0].numel() * self.w_max)
        self.a_factor = 1.0 / math.sqrt(self.a_max)

    def _q(self, x):
        x = torch._fake_quantize_learnable_per_tensor_affine(
            x, self.a_scale, self.a_zp, self.a_min, self.a_max, self.a_factor)
        w = torch._fake_quantize_learnable_per_channel_affine(
            self.weight, self.w_scale, self.w_zp, 0, self.w_min, self.w_max, self.w_factor)
        return x, w


class TorchLSQConv2d(_TorchLSQ, nn.Conv2d):
    def forward(self, x):
        x, w = self._q(x)
        return self._conv_forward(x, w, self.bias)


class TorchLSQLinear(_TorchLSQ, nn.Linear):
    def forward(self, x):
        x, w = self._q(x)
        return tF.linear(x, w, self.bias)


def to_torch_lsq(model: nn.Module) -> nn.Module:
    """Swap every Conv2d/Linear for its learnable-fake-quant twin (same weights), in place."""
    first = True
    for m in list(model.modules()):
        if type(m) not in (nn.Conv2d, nn.Linear):
            continue
        cls = TorchLSQConv2d if isinstance(m, nn.Conv2d) else TorchLSQLinear
        m.__class__ = cls
        m._setup(signed_input=first)
        first = False
    return model


def brevitas_version() -> str | None:
    try:
        import brevitas
    except ImportError:
        return None
    return brevitas.__version__


def to_brevitas(model: nn.Module):
    """Brevitas QuantConv2d / QuantLinear at the same sites: 4-bit per-channel weights, 8-bit
    per-tensor input (Int8ActPerTensorFloat), same weights. None when brevitas is not installed."""
    if brevitas_version() is None:
        return None
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat

    for name, m in list(model.named_modules()):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        child = name.rpartition(".")[2]
        if type(m) is nn.Conv2d:
            q = qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                groups=m.groups, bias=m.bias is not None, weight_bit_width=4,
                                weight_scaling_per_output_channel=True,
                                input_quant=Int8ActPerTensorFloat)
        elif type(m) is nn.Linear:
            q = qnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None,
                                weight_bit_width=4, weight_scaling_per_output_channel=True,
                                input_quant=Int8ActPerTensorFloat)
        else:
            continue
        q.load_state_dict(m.state_dict(), strict=False)
        setattr(parent, child, q.to(m.weight.device))
    return model
