"""Fused uniform fake-quantizer kernels: the plain math of `mixq.functional`, compiled by
torch.compile (inductor) into one forward pass and one backward pass per call.

The plain path runs every formula as its own ATen op, about 5 passes over the tensor in forward and
25 in backward (with the ATanh modifier); on a 2-core CPU that made the quantizers cost more than
the float network. Here the very same Python functions (`_uniform_forward`, `_uniform_grad_terms`)
are compiled once per (signedness, modifier, delta, layout kind, dtypes, device) with dynamic
shapes, so one kernel serves every site of a layout. The tensor is viewed as (A, S, B) with its per-
slice parameters as (1, S, 1): per-tensor sites are (1, 1, numel), per-output-channel weights (1,
C_out, rest), per-channel activations (N, C, H W). Inductor's CPU code does not use fast-math or FMA
contraction, so every element of the output and of dL/dx is bit-identical to the plain path (atanh
is built from arithmetic and bit operations for that, see `functional._atanh`); the slice sums of
dL/dscale and dL/dqmax are taken inside the kernel, in a different summation order than ATen's
`sum`, so they agree to rounding (a few ulps), not bitwise.

Used only in eager mode (under torch.compile the plain ops are traced and fused by the outer
compiler), on the devices in `devices`, and on the CPU for tensors of at least `min_numel` elements
(below that the kernel's overhead is not worth it there), and for the modifiers whose ops compile
bit-identically (ste, ewgs, atanh, psgd; tanh and acos use tanh/sin, which inductor implements
differently, so they stay on the plain path). If compiling fails (no C++ compiler, an unsupported
platform) a warning is given once and that variant uses the plain path from then on.

On CUDA `cuda_backend` picks the hand-written Triton kernels of `mixq._triton` ("triton", the
default: x_hat and codes bit for bit) or this module's inductor-compiled functions ("inductor":
inductor's CUDA division is not correctly rounded, so codes can differ at exact rounding ties).
Where Triton is missing, or for float64, CUDA tensors take the plain ops. On CUDA the kernels take
tensors of any size: an eager step there is bound by the host launching kernels, and a quantizer
call is one or two Triton launches against about 8 plain ops forward and 25 backward. Measured on
an H100, eager ResNet-20 step, same run (`benchmarks/results/train_step_cuda_h100.md`): 2.55x float
with the Triton kernels against 3.18x with the plain ops (fp32), 2.87x against 3.46x (bf16), and
1.26x against 2.21x float's peak memory (bf16; the 8-bit saved codes); inductor's kernels took
7.4x in the run before (`train_step_cuda_h100_before.md`). `devices=("cpu",)` turns CUDA off.

A quantized layer also asks the forward kernel for the 8-bit codes of x_hat (same pass) and saves
those for its backward instead of x_hat (see `saved_code_hooks`): a quarter of the memory, rebuilt
bit for bit. Compile time: about 10 s for the first step of a ResNet-20 on a cold inductor cache
(3 variants), about 1 s with the on-disk cache warm.

Settings: `set_fast_kernels(enabled=..., min_numel=..., devices=..., pack_saved=...)`, the context
manager `fast_kernels(...)`, or the environment variables MIXQ_FAST_KERNELS=0, MIXQ_FAST_MIN_NUMEL
and MIXQ_PACK_SAVED=0.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import types
import warnings

import torch
from torch import Tensor

FAST_MODIFIERS = ("ste", "ewgs", "atanh", "psgd")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_settings = {
    "enabled": os.environ.get("MIXQ_FAST_KERNELS", "1") != "0",
    "min_numel": int(os.environ.get("MIXQ_FAST_MIN_NUMEL", 1 << 15)),
    "devices": ("cpu", "cuda"),
    "pack_saved": os.environ.get("MIXQ_PACK_SAVED", "1") != "0",
    "cuda_backend": os.environ.get("MIXQ_CUDA_BACKEND", "triton"),
}
CUDA_BACKENDS = ("triton", "inductor")
_failed: list[str] = []  # the first compile error, once one happened
_failed_keys: set = set()  # the kernel variants that failed: those run the plain ops
_compiled: dict[tuple, tuple] = {}


def set_fast_kernels(enabled: bool | None = None, min_numel: int | None = None,
                     devices: tuple[str, ...] | None = None, pack_saved: bool | None = None,
                     cuda_backend: str | None = None) -> dict:
    """Change the fused-kernel settings; returns the previous ones (for restoring). `pack_saved`:
    quantized layer inputs saved for backward as 8-bit codes (see `saved_code_hooks`).
    `cuda_backend`: on CUDA, the hand-written Triton kernels of `mixq._triton` ("triton", where
    Triton is installed) or the inductor-compiled plain math ("inductor")."""
    if cuda_backend is not None and cuda_backend not in CUDA_BACKENDS:
        raise ValueError(f"cuda_backend {cuda_backend!r}: choose one of {', '.join(CUDA_BACKENDS)}")
    previous = dict(_settings)
    for key, value in (("enabled", enabled), ("min_numel", min_numel), ("devices", devices),
                       ("pack_saved", pack_saved), ("cuda_backend", cuda_backend)):
        if value is not None:
            _settings[key] = tuple(value) if key == "devices" else value
    return previous


@contextlib.contextmanager
def fast_kernels(enabled: bool = True, min_numel: int | None = None,
                 devices: tuple[str, ...] | None = None, pack_saved: bool | None = None,
                 cuda_backend: str | None = None):
    """Temporarily turn the fused kernels on or off (tests, benchmarks)."""
    previous = set_fast_kernels(enabled, min_numel, devices, pack_saved, cuda_backend)
    try:
        yield
    finally:
        _settings.update(previous)


def fast_kernel_status() -> dict:
    """The settings, whether compiling failed (and why), and the kernel variants built so far."""
    return {**_settings, "failed": _failed[0] if _failed else None, "variants": len(_compiled)}


def _renamed(fn, name: str):
    """A copy of `fn` with its own code object: dynamo keeps its compile cache (and its recompile
    limit) per code object, so every variant gets its own."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _build(signed: bool, modifier: str, delta: float, *layout_and_types):
    from .functional import _uniform_codes, _uniform_forward, _uniform_grad_terms

    def forward(x, s, q):
        return _uniform_forward(x, s, q, signed)

    def forward_codes(x, s, q):  # x_hat and its 8-bit codes in one pass
        code = _uniform_codes(x, s, q, signed)
        x_hat = (code * s.to(code.dtype)).to(x.dtype)
        return x_hat, code.to(torch.int8 if signed else torch.uint8)

    def backward(x, g, s, q):
        grad_x, t_s, t_q = _uniform_grad_terms(x, g, s, q, signed, modifier, delta)
        return grad_x, t_s.sum(dim=(0, 2)), t_q.sum(dim=(0, 2))

    tag = f"{'s' if signed else 'u'}_{modifier}_{delta!r}_{len(_compiled)}"
    tag = "".join(c if c.isalnum() else "_" for c in tag)
    compile_ = dict(dynamic=True, fullgraph=True)
    return (torch.compile(_renamed(forward, f"mixq_uniform_fwd_{tag}"), **compile_),
            torch.compile(_renamed(backward, f"mixq_uniform_bwd_{tag}"), **compile_),
            torch.compile(_renamed(forward_codes, f"mixq_uniform_fwdc_{tag}"), **compile_))


def _layout(x: Tensor, scale: Tensor, qmax: Tensor):
    """(A, S, B, permutation) viewing x as (A, S, B) with the parameters as (1, S, 1), or None."""
    if scale.shape != qmax.shape or (scale.dim() and scale.dim() != x.dim()):
        return None
    axes = [d for d in range(scale.dim()) if scale.shape[d] != 1]
    if not axes:  # per tensor: any dense layout (channels_last included) is one flat run
        perm = sorted(range(x.dim()), key=lambda d: -x.stride(d))
        if not x.permute(perm).is_contiguous():
            return None
        return 1, 1, x.numel(), perm
    if len(axes) != 1 or scale.shape[axes[0]] != x.shape[axes[0]] or not x.is_contiguous():
        return None
    k = axes[0]
    return math.prod(x.shape[:k]), x.shape[k], math.prod(x.shape[k + 1:]), None


class UniformKernel:
    """The compiled forward and backward for one call site's (layout, signedness, modifier)."""

    __slots__ = ("key", "fwd", "bwd", "fwd_codes", "shape3", "perm")

    def __init__(self, key, fns, shape3, perm):
        self.key, self.shape3, self.perm = key, shape3, perm
        self.fwd, self.bwd, self.fwd_codes = fns

    def _view(self, t: Tensor) -> Tensor:
        if self.perm is not None:
            t = t.permute(self.perm)
        return t.reshape(self.shape3)

    def _unview(self, t: Tensor, like: Tensor) -> Tensor:
        if self.perm is None:
            return t.view(like.shape)
        permuted = [like.shape[d] for d in self.perm]
        return t.view(permuted).permute(_inverse(self.perm))

    def forward(self, x: Tensor, scale: Tensor, qmax: Tensor) -> Tensor:
        s, q = _slice_params(scale), _slice_params(qmax)
        return self._unview(self._run(self.key, self.fwd, self._view(x.detach()), s, q), x)

    def forward_codes(self, x: Tensor, scale: Tensor, qmax: Tensor):
        """x_hat and its codes (int8 signed, uint8 unsigned; viewed as (A, S, B)), one pass."""
        s, q = _slice_params(scale), _slice_params(qmax)
        x_hat, codes = self._run(self.key, self.fwd_codes, self._view(x.detach()), s, q)
        return self._unview(x_hat, x), codes

    def backward(self, x: Tensor, g: Tensor, scale: Tensor, qmax: Tensor):
        s, q = _slice_params(scale), _slice_params(qmax)
        grad_x, g_s, g_q = self._run(self.key, self.bwd, self._view(x.detach()), self._view(g), s, q)
        return self._unview(grad_x, x), g_s.view(scale.shape), g_q.view(qmax.shape)

    @staticmethod
    def _run(key, fn, *args):
        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a compiler that is missing or fails: use the plain ops
            _failed_keys.add(key)
            if not _failed:
                _failed.append(f"{type(err).__name__}: {err}"[:2000])
                warnings.warn("mixq: compiling a fused quantizer kernel failed; that case uses the "
                              f"plain (slower) ops from now on. The error was: {_failed[0][:500]}",
                              stacklevel=4)
            raise KernelFallback from err


def _slice_params(p: Tensor) -> Tensor:
    """Per-slice parameters as the (1, S, 1) input of a compiled kernel: detached, and copied when
    they are a view into a larger tensor (`batched.shared_steps`). Dynamo guards on requires_grad
    and specializes a storage offset of 0 or 1, so either would compile the kernel anew."""
    p = p.detach()
    return (p.clone() if p.storage_offset() else p).reshape(1, -1, 1)


class KernelFallback(Exception):
    """Raised by a kernel whose compilation failed; the caller runs the plain ops instead."""


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _applies(x: Tensor) -> bool:
    """Whether the fast path may take tensor `x`: enabled, large enough, on a listed device, a float
    dtype it compiles for, and not already inside torch.compile (which fuses the plain ops itself)."""
    device = x.device.type
    return (_settings["enabled"] and (device != "cpu" or x.numel() >= _settings["min_numel"])
            and x.dtype in _FLOATS and device in _settings["devices"]
            and not torch.compiler.is_compiling())


def _triton_interpret() -> bool:
    """TRITON_INTERPRET=1 with "triton" listed in the devices: the Triton kernels run on CPU
    tensors through Triton's interpreter (how they are tested without a GPU)."""
    return "triton" in _settings["devices"] and os.environ.get("TRITON_INTERPRET") == "1"


def _kind(a: int, s: int) -> str:
    """The slice layout of an (a, s, b) view: one slice, slices leading (weights), or in between."""
    return "tensor" if s == 1 else "out" if a == 1 else "in"


def uniform_kernel(x: Tensor, scale: Tensor, qmax: Tensor, signed: bool, modifier: str,
                   delta: float) -> UniformKernel | None:
    """The fused kernel for this call, or None where the plain ops run (see the module doc)."""
    if (not _applies(x) or modifier not in FAST_MODIFIERS or scale.dtype not in _FLOATS
            or qmax.dtype != scale.dtype):
        return None
    layout = _layout(x, scale, qmax)
    if layout is None:
        return None
    a, s, b, perm = layout
    # one compiled function per key, each with its own code object and so its own compile cache:
    # within a key only the sizes change, which dynamic shapes cover
    kind = _kind(a, s)
    key = (bool(signed), modifier, float(delta), kind, x.dtype, scale.dtype, x.device.type)
    if (x.device.type == "cuda" or _triton_interpret()) and _settings["cuda_backend"] == "triton" \
            and x.dtype != torch.float64:
        from . import _triton

        tkey = (*key, "triton")
        if _triton.available() and tkey not in _failed_keys and _triton.TritonUniformKernel.fits((a, s, b)):
            return _triton.TritonUniformKernel(tkey, (a, s, b), perm, signed, modifier, delta)
    if x.device.type == "cuda" and _settings["cuda_backend"] != "inductor":
        return None  # no Triton (or float64, or too long a slice): the plain ops
    if key in _failed_keys:
        return None
    if key not in _compiled:
        _compiled[key] = _build(*key)
    return UniformKernel(key, _compiled[key], (a, s, b), perm)


# ---------------------------------------------------------------------------------------------
# Saved quantized inputs as 8-bit codes. A conv or linear keeps its (fake-quantized) input for the
# weight gradient; in float32 that is one more activation-sized tensor per layer than the float
# model holds. x_hat = code * step exactly, so the layer can save the codes (int8 / uint8, a
# quarter of the bytes) and rebuild x_hat bit for bit in backward: code = round(x_hat / step)
# (x_hat / step is the integer itself for a power-of-two step, and within 2^-9 * 255 < 1/2 of it
# otherwise, bf16 included), x_hat = (code * step).to(dtype), the forward's own last two ops.


def _to_codes(x_hat, s, signed: bool):
    dtype = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    return torch.round(x_hat.to(dtype) / s.to(dtype)).to(torch.int8 if signed else torch.uint8)


def _from_codes(codes, s, out_dtype: torch.dtype):
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    return (codes * s.to(dtype)).to(out_dtype)  # int8 x float: one op, the codes converted exactly


_code_kernels: dict[tuple, tuple] = {}


def _code_fns(key):
    """(pack, unpack) for a (signed, layout kind, dtype, device) key: compiled on the CPU (one fused
    pass each); on CUDA the plain ops (unpack is one multiply, and a compiled function's call costs
    the host far more than that kernel)."""
    if key[3] == "cuda":
        signed = key[0]
        return (lambda x_hat, s: _to_codes(x_hat, s, signed)), _from_codes
    if key not in _code_kernels:
        tag = "".join(c if c.isalnum() else "_" for c in f"{key}_{len(_code_kernels)}")
        signed = key[0]

        def pack(x_hat, s):
            return _to_codes(x_hat, s, signed)

        def unpack(codes, s, out_dtype):
            return _from_codes(codes, s, out_dtype)

        opts = dict(dynamic=True, fullgraph=True)
        _code_kernels[key] = (torch.compile(_renamed(pack, f"mixq_pack_{tag}"), **opts),
                              torch.compile(_renamed(unpack, f"mixq_unpack_{tag}"), **opts))
    return _code_kernels[key]


_local = threading.local()


class CodeSlot:
    """Where the forward kernel leaves the codes of the x_hat it produced (see `capture_codes`)."""

    __slots__ = ("x_hat", "codes")

    def __init__(self):
        self.x_hat = self.codes = None


@contextlib.contextmanager
def capture_codes():
    """Within this context, a fused uniform quantizer forward also writes its 8-bit codes (in the
    same pass) into the yielded slot, for `saved_code_hooks`. Eager mode only."""
    slot, previous = CodeSlot(), getattr(_local, "slot", None)
    _local.slot = slot
    try:
        yield slot
    finally:
        _local.slot = previous


def code_slot() -> CodeSlot | None:
    return getattr(_local, "slot", None)


def saved_code_hooks(x_hat: Tensor, step: Tensor, signed: bool, slot: CodeSlot | None = None):
    """(pack, unpack) for torch.autograd.graph.saved_tensors_hooks that store `x_hat` (the output of
    a uniform quantizer with at most 8-bit codes and broadcastable per-slice `step`) as 8-bit codes;
    None where that does not apply (settings, small tensors, no grad, under torch.compile)."""
    if not _applies(x_hat) or not _settings.get("pack_saved", True) or not x_hat.requires_grad:
        return None
    if x_hat.device.type == "cuda":  # inductor's CUDA code for packing is Triton
        from . import _triton

        if not _triton.available():
            return None
    layout = _layout(x_hat, step, step)
    if layout is None:
        return None
    a, s_count, b, perm = layout
    kind = _kind(a, s_count)
    key = (bool(signed), kind, x_hat.dtype, x_hat.device.type)
    if key in _failed_keys:
        return None
    pack_fn, unpack_fn = _code_fns(key)
    view = UniformKernel(key, (None, None, None), (a, s_count, b), perm)
    s3 = _slice_params(step)
    ref = [x_hat, slot.codes if slot is not None and slot.x_hat is x_hat else None]

    def pack(t):
        if t is not ref[0]:
            return t
        codes, ref[:] = ref[1], [None, None]  # used once; hold nothing afterwards
        if codes is not None:  # written by the forward kernel
            return _Codes(codes, t)
        try:
            return _Codes(view._run(key, pack_fn, view._view(t), s3), t)
        except KernelFallback:
            return t

    def unpack(obj):
        if not isinstance(obj, _Codes):
            return obj
        flat = view._run(key, unpack_fn, obj.codes, s3, obj.dtype)
        return view._unview(flat, obj)

    return pack, unpack


class _Codes:
    """What is saved instead of x_hat: its codes (viewed as (A, S, B)), shape and dtype."""

    __slots__ = ("codes", "shape", "dtype")

    def __init__(self, codes, like):
        self.codes, self.shape, self.dtype = codes, like.shape, like.dtype
