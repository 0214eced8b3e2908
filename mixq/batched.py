"""All quantizers at once: the same per-slice formulas on the concatenated parameters of every U3
quantizer that shares a configuration, so a training step costs a dozen small ops per group instead
of a dozen per quantizer. On CUDA an eager step is bound by the host launching kernels, and these
small ops were most of its launches. Results are identical to calling each quantizer's method
(elementwise ops only; tests/test_speed_paths.py compares them bit for bit), except that with
`shared_steps` a step's gradient sums its uses before the chain rule's last factor, not after:
equal to float32 rounding.
"""

from __future__ import annotations

import contextlib

import torch

from . import functional as F
from .quantizers import UniformQuantizer


def batch_small_ops(device: torch.device, numel: int) -> bool:
    """Whether to batch the per-slice bookkeeping (projection, sizes) of quantizers with `numel`
    slices in all. Not on a multi-threaded CPU above 64 slices: there ATen runs log2 (also log,
    sqrt) of more than about 100 elements as an OpenMP parallel region, and on a busy machine one
    such region waits for its second thread for up to a scheduler tick (measured 12-16 ms per op on
    the shared 2-core machine), while the same op on each quantizer's slices runs inline in about a
    microsecond. Elsewhere (CUDA: one launch instead of dozens; one CPU thread; few slices, e.g.
    per-tensor activations) batching is the cheaper way."""
    return device.type != "cpu" or numel <= 64 or torch.get_num_threads() == 1


def _u3_groups(quantizers) -> tuple[dict, list]:
    """U3 uniform quantizers grouped by what their projection / clipping depends on; the rest."""
    groups, rest = {}, []
    for q in quantizers:
        if type(q) is UniformQuantizer and q.cfg.param == "u3":
            cfg = q.cfg
            key = (bool(q.signed), cfg.scale_range, cfg.qmax_range, cfg.pow2_scale, cfg.bits_max,
                   cfg.grad_clip, q.scale.device, q.scale.dtype)
            groups.setdefault(key, []).append(q)
        else:
            rest.append(q)
    return groups, rest


@torch.no_grad()
def project_all_(quantizers) -> None:
    """`project_()` of every quantizer, the U3 ones batched per configuration."""
    groups, rest = _u3_groups(quantizers)
    for (signed, scale_range, qmax_range, pow2, bits_max, _, device, _), qs in groups.items():
        if len(qs) == 1 or not batch_small_ops(device, sum(q.scale.numel() for q in qs)):
            for q in qs:
                q.project_()
            continue
        scales, qmaxs = [q.scale for q in qs], [q.qmax for q in qs]
        sizes = [p.numel() for p in scales]
        s = torch.cat(scales).clamp_(*scale_range)
        qm = torch.cat(qmaxs).clamp_(*qmax_range)
        lo, hi = torch.minimum(s, qm), torch.maximum(s, qm)
        step = torch.exp2(torch.round(torch.log2(lo))) if pow2 else lo
        top = max(F.max_code(bits_max, signed), 1)
        torch._foreach_copy_(scales, lo.split(sizes))
        torch._foreach_copy_(qmaxs, torch.minimum(torch.maximum(hi, step), step * top).split(sizes))
    for q in rest:
        q.project_()


@torch.no_grad()
def clip_grads_all_(quantizers) -> None:
    """`clip_grads_()` of every quantizer, the U3 ones batched per configuration."""
    groups, rest = _u3_groups(quantizers)
    for key, qs in groups.items():
        grad_clip = key[5]
        if not grad_clip:
            continue
        ready = [q for q in qs if q.scale.grad is not None and q.qmax.grad is not None]
        rest += [q for q in qs if q.scale.grad is None or q.qmax.grad is None]
        if len(ready) < 2:
            rest += ready
            continue
        bound = torch.cat([q.scale for q in ready])
        grads = [q.scale.grad for q in ready] + [q.qmax.grad for q in ready]
        sizes = [g.numel() for g in grads]
        both = torch.cat([bound, bound])
        clipped = torch.maximum(torch.minimum(torch.cat(grads), both), -both)
        torch._foreach_copy_(grads, clipped.split(sizes))
    for q in rest:
        q.clip_grads_()


@contextlib.contextmanager
def shared_steps(quantizers):
    """Within this context, the U3 quantizers with power-of-two steps take their effective step
    2^round(log2 scale) from one batched computation per device and dtype, made here, instead of
    computing it at each use (the quantizer's forward, the layer's saved codes, the bias grid, the
    size account): one chain of five ops and one backward instead of one per quantizer and use.
    For one forward (and the size penalty) of a training step; the parameters must not change
    inside. Not used under torch.compile, which fuses the per-quantizer ops itself."""
    groups: dict[tuple, list] = {}
    for q in quantizers:
        if type(q) is UniformQuantizer and q.cfg.param == "u3" and q.cfg.pow2_scale:
            groups.setdefault((q.scale.device, q.scale.dtype), []).append(q)
    shared = []
    for (device, _), qs in groups.items():
        if len(qs) == 1 or not batch_small_ops(device, sum(q.scale.numel() for q in qs)):
            continue
        steps = F.pow2_ste(torch.cat([q.scale for q in qs])).split([q.scale.numel() for q in qs])
        for q, step in zip(qs, steps, strict=True):
            q.shared_step = step.view(q.scale.shape)
        shared += qs
    try:
        yield
    finally:
        for q in shared:
            q.shared_step = None
