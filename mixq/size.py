"""Size accounting, the budget's ground truth (methods.md 1.1.3 and 2.1.2).

weight size  = sum over weight slices of (slice elements x slice bits) + bias elements x bias bits
act sum size = sum over activation sites of (per-sample elements x bits)
act max size = max over activation sites of the same
bn16         = 2 x 16 bits per channel of every BatchNorm left in the model (scale and bias)

Sizes are integer numbers of bits (bytes = bits / 8, exact); during training they are tensors on the
model's device, differentiable in the quantizer parameters through the straight-through bit
inference, and never leave the device in the training step. KiB/MiB are 1024-based, kB/MB
1000-based, and every report names its unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import functional as F
from .batched import batch_small_ops
from .config import UNITS
from .convert import quant_sites
from .layers import QUANTIZED_LAYERS
from .quantizers import UniformQuantizer


@torch.no_grad()
def measure_(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Record the per-sample element count of every activation site by one forward pass.

    `example_input` is a batch (N, ...) on the model's device. Returns {site: elements}.
    """
    sites = [s for s in quant_sites(model) if s.role != "weight"]
    counts: dict[str, int] = {}
    handles = []
    for s in sites:
        def hook(module, args, s=s):
            x = args[0]
            if s.quant in seen:
                raise ValueError(f"activation quantizer of {s.fqn} runs twice in one forward; "
                                 "give each use its own module")
            seen.add(s.quant)
            counts[f"{s.fqn}:{s.role}"] = x[0].numel()
            s.quant.numel.fill_(x[0].numel() / s.quant.slices)
        handles.append(s.quant.register_forward_pre_hook(hook))
    seen: set = set()
    saved = [(s.quant, s.quant.observer) for s in sites]
    for s in sites:
        s.quant.start_observing()  # pass-through, so measuring needs no calibration
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for q, observer in saved:
            q.observer = observer
    missing = [f"{s.fqn}:{s.role}" for s in sites if f"{s.fqn}:{s.role}" not in counts]
    if missing:
        raise ValueError(f"these activation sites were not reached by the forward pass: {missing}")
    return counts


def _bias_bits(model: nn.Module) -> int:
    return sum(m.bias.numel() * m.bias_bits for m in model.modules()
               if isinstance(m, QUANTIZED_LAYERS) and m.bias is not None)


def _bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _site_bits(quants, cache: dict) -> Tensor:
    """Size in bits of every site, differentiable: `q.size_bits()` for each quantizer, with the U3
    uniform quantizers that share (signedness, bits_min, pow2_scale) done in one batch (the same
    per-slice formula on their concatenated parameters, then one sum per site), so the penalty
    costs a few ops per group instead of a few per quantizer. Sites come grouped, not in order.
    `cache` keeps the slice-to-site index of each group on its device (built once, no host copy
    per step)."""
    groups: dict[tuple, list] = {}
    parts = []
    for q in quants:
        if type(q) is UniformQuantizer and q.cfg.param == "u3":
            key = (bool(q.signed), q.cfg.bits_min, q.cfg.pow2_scale, q.scale.device)
            groups.setdefault(key, []).append(q)
        else:
            parts.append(q.size_bits().reshape(1))
    for (signed, bits_min, pow2, device), qs in groups.items():
        if len(qs) == 1 or not batch_small_ops(device, sum(q.scale.numel() for q in qs)):
            parts += [q.size_bits().reshape(1) for q in qs]
            continue
        scale = torch.cat([q.scale for q in qs])
        if pow2 and all(q.shared_step is not None for q in qs):  # inside batched.shared_steps
            step = torch.cat([q.shared_step for q in qs])
        else:
            step = F.pow2_ste(scale) if pow2 else scale
        bits = F.uniform_bits(step, torch.cat([q.qmax for q in qs]), signed, bits_min)
        per_slice = torch.cat([q.numel for q in qs]) * bits
        counts = tuple(q.scale.numel() for q in qs)
        site = cache.get((counts, scale.device))
        if site is None:
            site = torch.repeat_interleave(torch.arange(len(qs)), torch.tensor(counts)).to(scale.device)
            cache[(counts, scale.device)] = site
        parts.append(per_slice.new_zeros(len(qs)).index_add(0, site, per_slice))
    return torch.cat(parts)


class SizeAccount:
    """Differentiable sizes of a prepared model, in bits; build once, call every step.

    `account()` returns a dict of 0-d tensors: weight_bits (bias included), act_sum_bits,
    act_max_bits, bn16_bits. No host synchronisation.
    """

    def __init__(self, model: nn.Module):
        sites = quant_sites(model)
        if not sites:
            raise ValueError("model has no quantizers: call mixq.prepare_(model, config) first")
        self.weights = [s.quant for s in sites if s.role == "weight"]
        self.acts = [s.quant for s in sites if s.role != "weight"]
        if any(bool((q.numel == 0).any()) for q in self.acts):
            raise ValueError("activation sizes are unknown: call mixq.measure_(model, batch) or "
                             "prepare_(model, config, example_input=batch) first")
        self.bias_bits = _bias_bits(model)
        self.bn16_bits = 32 * _bn_channels(model)
        self._index: dict = {}

    def __call__(self) -> dict[str, Tensor]:
        weight = _site_bits(self.weights, self._index).sum() + self.bias_bits
        device = weight.device
        if self.acts:
            act = _site_bits(self.acts, self._index)  # one entry per site (in no particular order)
            act_sum, act_max = act.sum(), act.amax()
        else:
            act_sum = act_max = torch.zeros((), device=device)
        return {"weight_bits": weight, "act_sum_bits": act_sum, "act_max_bits": act_max,
                "bn16_bits": torch.full((), float(self.bn16_bits), device=device)}  # a fill, no copy


def format_bytes(num_bytes: float, unit: str = "KiB") -> str:
    """'70.12 KiB': bytes in an explicit unit (KiB/MiB = 1024-based, kB/MB = 1000-based)."""
    return f"{num_bytes / UNITS[unit]:.2f} {unit}"


@dataclass
class LayerSize:
    """One row of the size report: a layer's weights and the activation sites it owns."""

    fqn: str
    layer: str
    weight_elements: int = 0
    weight_slices: int = 0
    weight_bits_min: float = 0
    weight_bits_mean: float = 0
    weight_bits_max: float = 0
    weight_bytes: float = 0.0
    bias_bytes: float = 0.0
    act_elements: int = 0
    act_bits_min: float = 0
    act_bits_mean: float = 0
    act_bits_max: float = 0
    act_bytes: float = 0.0


@torch.no_grad()
def size_report(model: nn.Module) -> dict:
    """Per-layer and total sizes of a prepared, measured model, as plain data (bytes, bits).

    Keys: weight_bytes (codes + bias), bias_bytes, act_sum_bytes, act_max_bytes, bn16_bytes,
    weight_elements, weight_bits_mean (over all weight elements, bias excluded), layers.
    """
    rows: dict[str, LayerSize] = {}
    for s in quant_sites(model):
        q = s.quant
        bits = q.bits_per_slice().detach().double().cpu()
        numel = q.numel.double().cpu()
        layer = "ReLU6" if s.role == "act" and s.layer.cap else type(s.layer).__name__
        row = rows.setdefault(s.fqn, LayerSize(s.fqn, layer.removeprefix("Q").removeprefix("Act")
                                               or "ReLU"))
        total_bits = float((bits * numel).sum())
        elements = int(numel.sum())
        stats = (float(bits.min()), float((bits * numel).sum() / max(elements, 1)), float(bits.max()))
        if s.role == "weight":
            row.weight_elements, row.weight_slices = elements, q.slices
            row.weight_bits_min, row.weight_bits_mean, row.weight_bits_max = stats
            bias = s.layer.bias
            row.bias_bytes = bias.numel() * s.layer.bias_bits / 8 if bias is not None else 0.0
            row.weight_bytes = total_bits / 8 + row.bias_bytes
        else:  # a layer with both input and output quantizers reports their sum
            row.act_elements += elements
            row.act_bits_min, row.act_bits_mean, row.act_bits_max = stats
            row.act_bytes += total_bits / 8
    layers = list(rows.values())
    weight_elements = sum(r.weight_elements for r in layers)
    code_bytes = sum(r.weight_bytes - r.bias_bytes for r in layers)
    acts = [r.act_bytes for r in layers if r.act_elements]
    return {
        "weight_bytes": sum(r.weight_bytes for r in layers),
        "bias_bytes": sum(r.bias_bytes for r in layers),
        "act_sum_bytes": sum(acts),
        "act_max_bytes": max(acts, default=0.0),
        "bn16_bytes": 4 * _bn_channels(model),
        "weight_elements": weight_elements,
        "weight_bits_mean": 8 * code_bytes / max(weight_elements, 1),
        "layers": [r.__dict__.copy() for r in layers],
    }


def format_report(report: dict, unit: str = "KiB") -> str:
    """The size report as a table, sizes in `unit`."""
    head = (f"{'layer':<30} {'type':<7} {'weights':>9} {'w bits min/mean/max':>20} "
            f"{'w size':>12} {'act elems':>10} {'a bits':>7} {'act size':>12}")
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        wbits = (f"{r['weight_bits_min']:g}/{r['weight_bits_mean']:.2f}/{r['weight_bits_max']:g}"
                 if r["weight_elements"] else "-")
        abits = f"{r['act_bits_mean']:.2f}" if r["act_elements"] else "-"
        lines.append(
            f"{r['fqn']:<30} {r['layer']:<7} {r['weight_elements']:>9} {wbits:>20} "
            f"{format_bytes(r['weight_bytes'], unit):>12} {r['act_elements']:>10} {abits:>7} "
            f"{format_bytes(r['act_bytes'], unit):>12}")
    lines.append("-" * len(head))
    lines.append(
        f"weights {format_bytes(report['weight_bytes'], unit)} (bias "
        f"{format_bytes(report['bias_bytes'], unit)}, {report['weight_bits_mean']:.3f} bits per "
        f"weight) | activations sum {format_bytes(report['act_sum_bytes'], unit)}, max "
        f"{format_bytes(report['act_max_bytes'], unit)} | BatchNorm at 16 bits "
        f"{format_bytes(report['bn16_bytes'], unit)}")
    return "\n".join(lines)
