"""Stateless quantizer math: rounding with straight-through and modified gradients, the uniform
fake-quantizer (one fused autograd function for U1/U2/U3), the power-of-two fake-quantizer, and
bit-width inference. No parameters and no modules live here; `docs/math.md` is the spec and
`tests/references.py` re-implements every formula in float64 numpy.

Notation (methods.md 1.1.1): `scale` is the step size d, `qmax` the dynamic range q_max, `bits` the
bit width b, `levels` the largest integer code n = round(qmax / scale).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _kernels

# Rounding-gradient modifiers (methods.md 2.1.3). A modifier multiplies the upstream gradient of
# round(u) by a factor m(r, g) where r = u - round(u) in [-1/2, 1/2] and g is the upstream gradient.
MODIFIERS = ("ste", "ewgs", "atanh", "psgd", "tanh", "acos")
ATANH_ALPHA = 1.9
SQRT2 = math.sqrt(2.0)
HALF_LN2 = 0.5 * math.log(2.0)


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def ceil_ste(x: Tensor) -> Tensor:
    """ceil(x) in the forward pass, identity in the backward pass."""
    return x + (torch.ceil(x) - x).detach()


def pow2_ste(x: Tensor) -> Tensor:
    """2^round(log2 x), straight-through on the round, so d/dx = 2^round(log2 x) / x."""
    return torch.exp2(round_ste(torch.log2(x)))


def modifier_factor(r: Tensor, g: Tensor, modifier: str, delta: float) -> Tensor | float:
    """The factor m by which a modifier scales the gradient of round (methods.md 2.1.3).

    ste: 1;  ewgs: 1 + delta sign(g) r;  atanh: 1 + delta sign(g) 0.5/atanh(a/2) atanh(a r), a=1.9;
    psgd: 1 + delta |r|;  tanh: 1 + delta 0.5 sign(g) tanh(4 r);  acos: 1 + delta 0.5 sin(pi r).
    """
    if modifier == "ste" or delta == 0.0:
        return 1.0
    if modifier == "ewgs":
        return 1.0 + delta * torch.sign(g) * r
    if modifier == "atanh":
        norm = 0.5 / math.atanh(ATANH_ALPHA / 2)
        return 1.0 + delta * torch.sign(g) * norm * _atanh(ATANH_ALPHA * r)
    if modifier == "psgd":
        return 1.0 + delta * torch.abs(r)
    if modifier == "tanh":
        return 1.0 + delta * 0.5 * torch.sign(g) * torch.tanh(4.0 * r)
    if modifier == "acos":
        return 1.0 + delta * 0.5 * torch.sin(math.pi * r)
    raise ValueError(f"unknown modifier {modifier!r}; choose one of {', '.join(MODIFIERS)}")


def _atanh(z: Tensor) -> Tensor:
    """atanh(z) for |z| < 1 from arithmetic, comparisons and bit operations only: eager ATen and
    torch.compile's CPU kernels give the same bits (they implement atanh and log differently), and
    inductor's CPU scheduler, which writes any reused value holding log or log1p to memory,
    recomputes it instead.

    float32: 0.5 log y with y = (1+z) / (1-z) = 2^e m, m in [sqrt(1/2), sqrt(2)), is
    e ln(2) / 2 + atanh(s) with s = (m-1) / (m+1), |s| <= 0.172 (s = z exactly when e = 0), and
    atanh(s) = s + s^3/3 + s^5/5 + s^7/7 + s^9/9 (the next term is below 4e-10). Within 5.1 ulp
    and 1.3e-7 of atanh on |z| <= 0.95 (tests/test_functional.py); about half the cost of log1p on
    the CPU. float64 keeps 0.5 log1p(2z / (1 - z)) (the series would need more terms)."""
    if z.dtype != torch.float32:
        return 0.5 * torch.log1p(2.0 * z / (1.0 - z))
    y = (1.0 + z) / (1.0 - z)
    bits = y.view(torch.int32)
    e = (bits >> 23) - 127  # y = 2^e m, m in [1, 2): y is positive and normal for |z| < 1
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)
    high = m > SQRT2
    m = torch.where(high, m * 0.5, m)
    e = torch.where(high, e + 1, e)
    s = torch.where(e == 0, z, (m - 1.0) / (m + 1.0))
    s2 = s * s
    series = s + s * s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9))))
    return e.to(torch.float32) * HALF_LN2 + series


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Quantizer arithmetic runs in float32 (float64 when given float64): a bf16 x / scale would
    # pick wrong integer codes for anything above 8 bits of levels.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _uniform_codes(x: Tensor, scale: Tensor, qmax: Tensor, signed: bool) -> Tensor:
    """round(clip(x, lo, qmax) / scale) in float32 (float64 for float64)."""
    dtype = _compute_dtype(x)
    xf, s, q = x.to(dtype), scale.to(dtype), qmax.to(dtype)
    lo = -q if signed else torch.zeros_like(q)
    return torch.round(torch.clamp(xf, lo, q) / s)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in `dtype`, and `t` itself, with no `.to` call, when it already is. What an
    autograd.Function's forward returns goes through this: torch 2.11's torch.compile traced the
    backward of a Function whose output came from a no-op `.to(dtype)` with a zero incoming
    gradient, so every gradient through the quantizers was zero (on CUDA and on the CPU; 2.13 is
    not affected)."""
    return t if t.dtype == dtype else t.to(dtype)


def _uniform_forward(x: Tensor, scale: Tensor, qmax: Tensor, signed: bool) -> Tensor:
    """x_hat = scale round(clip(x, lo, qmax) / scale), computed in float32 (float64 for float64)."""
    return as_dtype(_uniform_codes(x, scale, qmax, signed) * scale.to(_compute_dtype(x)), x.dtype)


def _uniform_grad_terms(x: Tensor, g: Tensor, scale: Tensor, qmax: Tensor, signed: bool,
                        modifier: str, delta: float):
    """Per-element backward terms: (dL/dx, dL/dscale terms, dL/dqmax terms), before the slice sums
    and the gradient scale (see `_UniformFakeQuant`)."""
    dtype = _compute_dtype(x)
    xf, s, q, gf = x.to(dtype), scale.to(dtype), qmax.to(dtype), g.to(dtype)
    u = xf / s
    code = torch.round(u)
    lo = -q if signed else torch.zeros_like(q)
    inside = (xf >= lo) & (xf <= q)
    m = modifier_factor(u - code, gf, modifier, delta)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    grad_x = torch.where(inside, gf * m, zero).to(x.dtype)
    t_s = torch.where(inside, gf * (code - m * u), zero)
    above = (xf > q).to(dtype)
    below = (xf < -q).to(dtype) if signed else zero
    t_q = gf * (above - below)
    return grad_x, t_s, t_q


def _uniform_backward(x: Tensor, g: Tensor, scale: Tensor, qmax: Tensor, signed: bool,
                      modifier: str, delta: float):
    """(dL/dx, dL/dscale, dL/dqmax) with the slice sums; the gradient scale is applied by the caller.

    A per-tensor parameter's terms are summed over the whole tensor at once: under torch.compile
    inductor then takes that sum in the loop that writes dL/dx, and nothing else reads the input
    again (BatchNorm folded, as mixq trains: ResNet-20 batch 128, CPU, compiled 1.09x and 1.09x
    float against 1.12x and 1.10x with per-channel sums first; docs/design.md)."""
    grad_x, t_s, t_q = _uniform_grad_terms(x, g, scale, qmax, signed, modifier, delta)
    return grad_x, t_s.sum_to_size(scale.shape), t_q.sum_to_size(qmax.shape)


class _UniformFakeQuant(torch.autograd.Function):
    """Q(x) = scale * round(clip(x, lo, qmax) / scale), lo = -qmax (signed) or 0 (unsigned).

    Backward (methods.md 1.1.1, with the rounding modifier m of 2.1.3 applied to every path
    through the rounding; u = x / scale, inside = lo <= x <= qmax):
        dQ/dx     = m                        inside, 0 outside
        dQ/dscale = round(u) - m u           inside, 0 outside   (= (Q - x) / scale when m = 1)
        dQ/dqmax  = 0 inside; +1 above qmax; -1 below -qmax (signed only)
    The scale and qmax gradients are summed over each slice and multiplied by `grad_scale`.

    Large tensors in eager mode go through `mixq._kernels` (the same math compiled into one fused
    forward pass and one fused backward pass with the slice sums); everything else, and any use
    under torch.compile (which fuses the plain ops itself), runs the plain ops. Only the input x
    (and the per-slice parameters) is saved for backward: x is usually saved by the op before
    (a ReLU keeps its output), so this adds no memory in eager mode.
    """

    @staticmethod
    def forward(ctx, x, scale, qmax, signed: bool, modifier: str, delta: float, grad_scale):
        kernel = _kernels.uniform_kernel(x, scale, qmax, signed, modifier, delta)
        x_hat = None
        if kernel is not None:
            try:
                slot = _kernels.code_slot()  # a quantized layer asks for the 8-bit codes too
                if slot is None:
                    x_hat = kernel.forward(x, scale, qmax)
                else:
                    x_hat, slot.codes = kernel.forward_codes(x, scale, qmax)
                    slot.x_hat = x_hat
            except _kernels.KernelFallback:
                kernel = None
        if x_hat is None:
            x_hat = _uniform_forward(x, scale, qmax, signed)
        ctx.kernel = kernel
        if isinstance(grad_scale, Tensor):
            ctx.save_for_backward(x, scale, qmax, grad_scale)
            ctx.grad_scale = None
        else:  # a Python number stays one: no tensor built per call (a host-to-device copy on CUDA)
            ctx.save_for_backward(x, scale, qmax)
            ctx.grad_scale = float(grad_scale)
        ctx.signed, ctx.modifier, ctx.delta = signed, modifier, delta
        return x_hat

    @staticmethod
    def backward(ctx, g):
        x, scale, qmax, *saved_scale = ctx.saved_tensors
        grad_scale = saved_scale[0] if saved_scale else ctx.grad_scale
        need_x, need_s, need_q = ctx.needs_input_grad[:3]
        grads = None
        if ctx.kernel is not None:
            try:
                grads = ctx.kernel.backward(x, g, scale, qmax)
            except _kernels.KernelFallback:
                pass
        if grads is not None:
            grad_x, g_s, g_q = grads
        elif need_s or need_q:
            grad_x, g_s, g_q = _uniform_backward(x, g, scale, qmax, ctx.signed, ctx.modifier, ctx.delta)
        else:  # only dL/dx: skip the parameter terms
            dtype = _compute_dtype(x)
            xf, s, q, gf = x.to(dtype), scale.to(dtype), qmax.to(dtype), g.to(dtype)
            u = xf / s
            lo = -q if ctx.signed else torch.zeros_like(q)
            m = modifier_factor(u - torch.round(u), gf, ctx.modifier, ctx.delta)
            zero = torch.zeros((), dtype=dtype, device=x.device)
            grad_x = torch.where((xf >= lo) & (xf <= q), gf * m, zero).to(x.dtype)
            g_s = g_q = None
        if not isinstance(grad_scale, Tensor) and grad_scale == 1.0:
            grad_scale = None  # multiplying by one changes no bit: skip the kernel
        grad_s = (g_s if grad_scale is None else g_s * grad_scale).to(scale.dtype) if need_s else None
        grad_q = (g_q if grad_scale is None else g_q * grad_scale).to(qmax.dtype) if need_q else None
        return grad_x if need_x else None, grad_s, grad_q, None, None, None, None


def fake_quant_uniform(
    x: Tensor,
    scale: Tensor,
    qmax: Tensor,
    signed: bool,
    modifier: str = "ste",
    delta: float = 0.0,
    grad_scale: Tensor | float = 1.0,
) -> Tensor:
    """Uniform fake-quantization with learned step `scale` and range `qmax` (U3 semantics).

    `scale` and `qmax` broadcast against `x` (shape (S, 1, ...) or (1, S, 1, 1) for slices). U1 and
    U2 call this with qmax = levels * scale or scale = qmax / levels, and autograd chains through
    those relations, which reproduces their gradients in methods.md 1.1.1 exactly.
    """
    return _UniformFakeQuant.apply(x, scale, qmax, signed, modifier, delta, grad_scale)


def quantize_uniform(x: Tensor, scale: Tensor, qmax: Tensor, signed: bool) -> Tensor:
    """The integer codes of `fake_quant_uniform`: round(clip(x, lo, qmax) / scale), as float."""
    dtype = _compute_dtype(x)
    q = qmax.to(dtype)
    lo = -q if signed else torch.zeros_like(q)
    return torch.round(torch.clamp(x.to(dtype), lo, q) / scale.to(dtype))


def max_code(bits: Tensor | int, signed: bool) -> Tensor | int:
    """Largest integer code at `bits` bits: 2^(bits-1) - 1 signed (symmetric), 2^bits - 1 unsigned."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def uniform_bits(scale: Tensor, qmax: Tensor, signed: bool, bits_min: float) -> Tensor:
    """Inferred bit width (methods.md 2.1.2): max(ceil(log2(round(qmax/scale) + 1)) + signed, bits_min).

    Straight-through on round and ceil, so the result is an integer-valued tensor whose gradient
    with respect to scale and qmax is that of log2(qmax/scale + 1): a size penalty on it trains.
    """
    levels = round_ste(qmax / scale)
    bits = ceil_ste(torch.log2(levels + 1)) + int(signed)
    return torch.clamp(bits, min=bits_min)


def round_bits(bits: Tensor, bits_min: float, bits_max: float) -> Tensor:
    """A learned, continuous bit width made an integer: round(clip(b, b_min, b_max)), straight-through."""
    return round_ste(torch.clamp(bits, bits_min, bits_max))


# ---------------------------------------------------------------------------------------------
# Power-of-two quantizer (methods.md 1.1.2)


class _Pow2FakeQuant(torch.autograd.Function):
    """Q(x) = s * {0 if a < qmin/sqrt2 (with_zero); qmin if a < qmin; 2^round(log2 a) if a < qmax;
    qmax otherwise}, with a = |x|, s = sign(x) (signed) or a = relu(x), s = 1 (unsigned).

    No gradient flows through the region masks or the sign. dQ/dx = 2^round(log2 a) / a in the
    middle region (straight-through on the round in the log domain), 0 elsewhere; dQ/dqmax = s
    above qmax; dQ/dqmin = s in the qmin region.
    """

    @staticmethod
    def forward(ctx, x, qmin, qmax, signed: bool, with_zero: bool):
        dtype = _compute_dtype(x)
        xf, lo, hi = x.to(dtype), qmin.to(dtype), qmax.to(dtype)
        region, mag = _pow2_regions(xf, lo, hi, signed, with_zero)
        sign = torch.where(xf < 0, -1.0, 1.0).to(dtype) if signed else 1.0
        ctx.save_for_backward(x, qmin, qmax)
        ctx.signed, ctx.with_zero = signed, with_zero
        del region
        return as_dtype(sign * mag, x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, qmin, qmax = ctx.saved_tensors
        dtype = _compute_dtype(x)
        xf, gf = x.to(dtype), g.to(dtype)
        region, mag = _pow2_regions(xf, qmin.to(dtype), qmax.to(dtype), ctx.signed, ctx.with_zero)
        sign = torch.where(xf < 0, -1.0, 1.0).to(dtype) if ctx.signed else 1.0
        a = torch.abs(xf) if ctx.signed else torch.relu(xf)
        zero = torch.zeros((), dtype=dtype, device=x.device)
        grad_x = torch.where(region == 2, gf * mag / torch.where(a > 0, a, 1.0), zero)
        grad_lo = torch.where(region == 1, gf * sign, zero).sum_to_size(qmin.shape)
        grad_hi = torch.where(region == 3, gf * sign, zero).sum_to_size(qmax.shape)
        return grad_x.to(x.dtype), grad_lo.to(qmin.dtype), grad_hi.to(qmax.dtype), None, None


def _pow2_regions(x, qmin, qmax, signed, with_zero):
    """Region index (0 zero, 1 qmin, 2 power-of-two, 3 qmax) and output magnitude."""
    a = torch.abs(x) if signed else torch.relu(x)
    exponent = torch.round(torch.log2(torch.where(a > 0, a, qmin)))
    region = torch.full_like(x, 2, dtype=torch.int8)
    region = torch.where(a >= qmax, 3, region)
    region = torch.where(a < qmin, 1, region)
    if with_zero:
        region = torch.where(a < qmin / math.sqrt(2), 0, region)
    mag = torch.where(region == 2, torch.exp2(exponent), torch.zeros_like(x))
    mag = torch.where(region == 1, qmin, mag)
    mag = torch.where(region == 3, qmax, mag)
    return region, mag


def fake_quant_pow2(x: Tensor, qmin: Tensor, qmax: Tensor, signed: bool, with_zero: bool) -> Tensor:
    """Power-of-two fake-quantization; `qmin` and `qmax` must already be powers of two."""
    return _Pow2FakeQuant.apply(x, qmin, qmax, signed, with_zero)


def pow2_bits(qmin: Tensor, qmax: Tensor, signed: bool, with_zero: bool) -> Tensor:
    """Inferred bit width of the power-of-two quantizer (P3, methods.md 1.1.2):
    ceil(log2(log2(qmax/qmin) + 1)) + signed + with_zero, at least 1; straight-through on ceil."""
    exponents = torch.log2(qmax / qmin) + 1
    bits = ceil_ste(torch.log2(exponents)) + int(signed) + int(with_zero)
    return torch.clamp(bits, min=1)


def pow2_exponent_count(bits: Tensor | float, signed: bool, with_zero: bool) -> Tensor:
    """Number of power-of-two magnitudes 2^n that `bits` bits encode, n = bits - signed - with_zero.
    `bits` may be a Python number (calibration and projection pass cfg.bits_init / bits_max)."""
    n = bits - int(signed) - int(with_zero)
    return torch.exp2(n if isinstance(n, Tensor) else torch.tensor(float(n), dtype=torch.float64))
