"""Quantized layers: a float layer plus its quantizers, and no policy about who gets what.

`QConv2d` and `QLinear` subclass the float layers, so `weight` and `bias` keep their names and
state_dict keys. Each holds a weight quantizer and optionally an input-activation quantizer
(Schaefer's convention) and/or an output quantizer (Uhlich's convention: an unsigned output
quantizer clips at 0, so it replaces a following ReLU). `ActQuant` is a standalone activation
quantizer that replaces a ReLU/ReLU6 module.

The bias: when the layer has an input quantizer, the bias is rounded onto the accumulator grid
(input step x weight step per output channel) and clipped to `bias_bits`, exactly as the integer
export stores it, so the exported model adds the same bias the trained one did.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as tF

from . import _kernels
from .functional import round_ste
from .quantizers import UniformQuantizer


def quantize_bias(bias: Tensor, step: Tensor, bits: int) -> Tensor:
    """bias rounded to multiples of `step` (per channel), codes clipped to signed `bits` bits."""
    top = 2.0 ** (bits - 1) - 1
    step = step.detach()
    return torch.clamp(round_ste(bias / step), -top - 1, top) * step


def _packable(quant) -> bool:
    """Whether the layer may save its quantized input as 8-bit codes: eager training with a uniform
    quantizer whose codes fit 8 bits (the projection keeps round(qmax / step) <= max_code(bits_max);
    U1/U2 widths are clipped to bits_max)."""
    return (isinstance(quant, UniformQuantizer) and quant.cfg.bits_max <= 8 and torch.is_grad_enabled()
            and quant.observer is None and not torch.compiler.is_compiling())


class _QuantizedLayer:
    """Shared by QConv2d and QLinear: quantized weight, input, output and bias."""

    w_quant: nn.Module
    in_quant: nn.Module | None
    out_quant: nn.Module | None
    bias_bits: int

    def _attach(self, w_quant, in_quant, out_quant, bias_bits):
        self.w_quant, self.in_quant, self.out_quant = w_quant, in_quant, out_quant
        self.bias_bits = bias_bits

    def channel_step(self) -> Tensor:
        """Per output channel weight grid step, (C_out,)."""
        step = self.w_quant.grid_step()
        if step.numel() == 1:
            return step.expand(self.weight.shape[0])
        return step.repeat_interleave(self.w_quant.group) if self.w_quant.group > 1 else step

    def accumulator_step(self) -> Tensor:
        """Per output channel step of the accumulator: input step x weight step. With per-channel
        input steps the finest one is used (every input grid is a multiple of it for 2^k steps)."""
        return self.in_quant.grid_step().min() * self.channel_step()

    def quantized_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        w_hat = self.w_quant(self.weight)
        b = self.bias
        if b is not None and self.in_quant is not None:
            b = quantize_bias(b, self.accumulator_step(), self.bias_bits)
        return w_hat, b

    def _quantized_forward(self, x: Tensor, op) -> Tensor:
        hooks = None
        if self.in_quant is not None:
            if _packable(self.in_quant):  # the fused forward also writes the 8-bit codes
                with _kernels.capture_codes() as slot:
                    x = self.in_quant(x)
                step = self.in_quant.step_and_range()[0].detach()
                hooks = _kernels.saved_code_hooks(x, self.in_quant.expand(step, x.dim()),
                                                  bool(self.in_quant.signed), slot)
            else:
                x = self.in_quant(x)
        w_hat, b = self.quantized_weight_and_bias()
        if hooks is None:
            y = op(x, w_hat, b)
        else:  # the op saves its quantized input as 8-bit codes (a quarter of the memory)
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                y = op(x, w_hat, b)
        return self.out_quant(y) if self.out_quant is not None else y


class QConv2d(_QuantizedLayer, nn.Conv2d):
    """nn.Conv2d (any groups, depthwise included) with quantized weight, input/output and bias."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_quant, in_quant=None, out_quant=None, bias_bits=32):
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        q.weight, q.bias = conv.weight, conv.bias
        q._attach(w_quant, in_quant, out_quant, bias_bits)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._quantized_forward(x, self._conv_forward)


class QLinear(_QuantizedLayer, nn.Linear):
    """nn.Linear with quantized weight, input/output and bias."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_quant, in_quant=None, out_quant=None, bias_bits=32):
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight, q.bias = linear.weight, linear.bias
        q._attach(w_quant, in_quant, out_quant, bias_bits)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._quantized_forward(x, tF.linear)


class ActQuant(nn.Module):
    """An activation quantizer in place of a ReLU (cap=None) or ReLU6 (cap=6) module."""

    def __init__(self, quant: nn.Module, cap: float | None = None):
        super().__init__()
        self.quant, self.cap = quant, cap

    def forward(self, x: Tensor) -> Tensor:
        if self.cap is not None:
            x = torch.clamp(x, max=self.cap)
        return self.quant(x)

    def extra_repr(self) -> str:
        return f"cap={self.cap}"


QUANTIZED_LAYERS = (QConv2d, QLinear)
