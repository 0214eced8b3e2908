"""Hand-written Triton kernels for the uniform fake-quantizer on CUDA: one forward pass (x_hat,
and optionally its 8-bit codes) and one backward pass (dL/dx plus per-block partial sums of the
dL/dscale and dL/dqmax terms) per call, the math of `mixq.functional._uniform_grad_terms`.

The tensor is viewed as (A, S, B) with per-slice parameters (S,), as in `mixq._kernels`. The grid is
(A S rows, blocks of B); a row's slice is row mod S. The slice sums are taken deterministically: each
program writes its block's partial sums, and one `sum` over (A, blocks) follows (no atomics, so two
runs give the same bits). Arithmetic in float32 for float32, bfloat16 and float16 inputs (float64
runs the plain ops). Division is round-to-nearest (`div_rn`) and round(v) is half-to-even built
from floor, so x_hat and the codes are exactly those of the plain ATen ops; dL/dx and the slice sums
may differ in the last bits (the compiler contracts multiply-adds; partial sums in another order; the
ATanh modifier's atanh goes through `tl.log`, where the plain path builds it from bit operations,
`functional._atanh`: the two agree to about 1e-7, which the factor 1 + delta ... scales down).

The default for CUDA tensors in eager mode (`mixq._kernels`; `cuda_backend="inductor"` or
MIXQ_CUDA_BACKEND=inductor picks the other backend, `devices=("cpu",)` the plain ops);
`available()` is false without Triton, and the kernels also run under TRITON_INTERPRET=1 on CPU
tensors (how the tests check them on a machine without a GPU).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._kernels import UniformKernel
from .functional import ATANH_ALPHA

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with CUDA builds of PyTorch only
    triton = tl = None

MODIFIER_IDS = {"ste": 0, "ewgs": 1, "atanh": 2, "psgd": 3}
MAX_BLOCKS = 65535  # CUDA's limit on the second grid axis


def available() -> bool:
    return triton is not None


def block_size(b: int) -> int:
    return max(32, min(2048, triton.next_power_of_2(b)))


if triton is not None:

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)  # exact for |v| < 2^22, which every code here is
        half = r * 0.5
        r = tl.where((r - v == 0.5) & (half != tl.floor(half)), r - 1.0, r)
        return tl.where(r == 0.0, v * 0.0, r)  # keeps the sign of zero, as torch.round does

    @triton.jit
    def _fwd_kernel(x_ptr, s_ptr, q_ptr, out_ptr, codes_ptr, S, B,
                    SIGNED: tl.constexpr, WRITE_CODES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < B
        idx = row.to(tl.int64) * B + offs
        s = tl.load(s_ptr + row % S).to(tl.float32)
        q = tl.load(q_ptr + row % S).to(tl.float32)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        lo = -q if SIGNED else 0.0
        code = _round_half_even(tl.div_rn(tl.minimum(tl.maximum(x, lo), q), s))
        tl.store(out_ptr + idx, (code * s).to(out_ptr.dtype.element_ty), mask=mask)  # RTNE
        if WRITE_CODES:
            tl.store(codes_ptr + idx, code.to(codes_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(x_ptr, g_ptr, s_ptr, q_ptr, gx_ptr, ps_ptr, pq_ptr, S, B, n_blocks, delta, alpha, norm,
                    SIGNED: tl.constexpr, MODIFIER: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < B
        idx = row.to(tl.int64) * B + offs
        s = tl.load(s_ptr + row % S).to(tl.float32)
        q = tl.load(q_ptr + row % S).to(tl.float32)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        u = tl.div_rn(x, s)
        code = _round_half_even(u)
        r = u - code
        sign_g = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        if MODIFIER == 1:  # ewgs: 1 + delta sign(g) r
            m = 1.0 + delta * sign_g * r
        elif MODIFIER == 2:  # atanh: 1 + delta sign(g) norm atanh(alpha r)
            z = alpha * r
            m = 1.0 + delta * sign_g * norm * (0.5 * tl.log(1.0 + 2.0 * z / (1.0 - z)))
        elif MODIFIER == 3:  # psgd: 1 + delta |r|
            m = 1.0 + delta * tl.abs(r)
        else:
            m = tl.full([BLOCK], 1.0, tl.float32)
        lo = -q if SIGNED else 0.0
        inside = (x >= lo) & (x <= q)
        tl.store(gx_ptr + idx, tl.where(inside, g * m, 0.0).to(gx_ptr.dtype.element_ty), mask=mask)
        t_s = tl.where(inside & mask, g * (code - m * u), 0.0)
        t_q = tl.where(x > q, g, 0.0)
        if SIGNED:
            t_q = t_q - tl.where(x < -q, g, 0.0)
        t_q = tl.where(mask, t_q, 0.0)
        out = row.to(tl.int64) * n_blocks + blk
        tl.store(ps_ptr + out, tl.sum(t_s, axis=0))
        tl.store(pq_ptr + out, tl.sum(t_q, axis=0))


class TritonUniformKernel(UniformKernel):
    """The Triton forward and backward for one call's (A, S, B) view, with the interface (and the
    views) of `mixq._kernels.UniformKernel`; a launch that fails makes that key use the plain ops."""

    __slots__ = ("signed", "modifier", "delta", "block", "n_blocks")

    def __init__(self, key, shape3, perm, signed: bool, modifier: str, delta: float):
        super().__init__(key, (None, None, None), shape3, perm)
        self.signed, self.modifier, self.delta = bool(signed), modifier, float(delta)
        self.block = block_size(shape3[2])
        self.n_blocks = triton.cdiv(shape3[2], self.block)

    @staticmethod
    def fits(shape3) -> bool:
        return triton is not None and triton.cdiv(shape3[2], block_size(shape3[2])) <= MAX_BLOCKS

    def _grid(self):
        a, s, _ = self.shape3
        return (a * s, self.n_blocks)

    def _forward(self, x: Tensor, scale: Tensor, qmax: Tensor, codes: bool):
        return self._run(self.key, self._launch_forward, x, scale, qmax, codes)

    def _launch_forward(self, x: Tensor, scale: Tensor, qmax: Tensor, codes: bool):
        x3 = self._view(x).contiguous()
        out = torch.empty_like(x3)
        code_t = (torch.empty(x3.shape, dtype=torch.int8 if self.signed else torch.uint8, device=x.device)
                  if codes else out)
        _fwd_kernel[self._grid()](x3, scale.reshape(-1).contiguous(), qmax.reshape(-1).contiguous(), out,
                                  code_t, self.shape3[1], self.shape3[2], SIGNED=self.signed,
                                  WRITE_CODES=codes, BLOCK=self.block)
        return self._unview(out, x), (code_t if codes else None)

    def forward(self, x: Tensor, scale: Tensor, qmax: Tensor) -> Tensor:
        return self._forward(x, scale, qmax, False)[0]

    def forward_codes(self, x: Tensor, scale: Tensor, qmax: Tensor):
        """x_hat and its codes (int8 signed, uint8 unsigned; viewed as (A, S, B)), one pass."""
        return self._forward(x, scale, qmax, True)

    def backward(self, x: Tensor, g: Tensor, scale: Tensor, qmax: Tensor):
        return self._run(self.key, self._launch_backward, x, g, scale, qmax)

    def _launch_backward(self, x: Tensor, g: Tensor, scale: Tensor, qmax: Tensor):
        a, s, _ = self.shape3
        x3, g3 = self._view(x).contiguous(), self._view(g).contiguous()
        grad_x = torch.empty_like(x3)
        partial = torch.empty((2, a, s, self.n_blocks), dtype=torch.float32, device=x.device)
        norm = 0.5 / math.atanh(ATANH_ALPHA / 2)
        _bwd_kernel[self._grid()](x3, g3, scale.reshape(-1).contiguous(), qmax.reshape(-1).contiguous(),
                                  grad_x, partial[0], partial[1], s, self.shape3[2], self.n_blocks,
                                  self.delta if self.modifier != "ste" else 0.0, ATANH_ALPHA, norm,
                                  SIGNED=self.signed, MODIFIER=MODIFIER_IDS[self.modifier],
                                  BLOCK=self.block)
        sums = partial.sum(dim=(1, 3))
        return (self._unview(grad_x, x), sums[0].to(scale.dtype).view(scale.shape),
                sums[1].to(qmax.dtype).view(qmax.shape))

