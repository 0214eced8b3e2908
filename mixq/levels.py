"""NUUQ options and level allocation (nuuq.md 1.6, 4.4): the recipe's `flexible` table validated
into `FlexibleOptions`; how many levels k each layer gets (the same k everywhere, double k in the
first and last three layers, k inversely proportional to layer size, or the k per layer that meets
a weight budget in bytes with the least Fisher-weighted loss); and the weight-MSE report of the
level fits (grid DP, k-means then snap) against unconstrained k-means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import flexible as fx
from .budget import squared_gradients
from .config import GRANULARITIES, LEVEL_INITS, PACKINGS, THRESHOLDS, check_choice, from_dict, parse_bytes
from .convert import FLOAT_LAYERS, quant_sites
from .flexible_quantizer import FlexibleQuantizer
from .layers import QUANTIZED_LAYERS

ALLOCATIONS = ("uniform", "edges_double", "inverse_size", "budget")


@dataclass(frozen=True)
class FlexibleOptions:
    """The recipe's [flexible] section.

    k, grid_bits: levels and grid bits b per layer (the allocations change k per layer).
    allocation: uniform (same k everywhere), edges_double (2k in the first three and last three
        layers), inverse_size (k_l ~ 1/N_l, scaled so that sum N_l log2 k_l <= sum N_l log2 k), or
        budget (k per layer meeting `weight_budget` with the least predicted loss); k <= k_max.
    weight_budget: for allocation "budget": bytes with a unit ('30 KiB') or 'B bpe' (bits per weight
        element, biases included); counts packed codes + biases, as weight_bytes does.
    granularity, level_init, thresholds, packing, pow2_scale: the weight quantizer (mixq.flexible_quantizer).
    act_bits: uniform activation bits (b_A); None keeps the recipe's quant.act widths.
    learn_act_ranges: let fine-tuning / QAT train the activation quantizers too (default: they keep
        their calibrated ranges; a learned power-of-two step can halve and shrink the range).
    ptq: layer-sequential PTQ with `finetune_epochs` of fine-tuning after each layer (0: none);
        false: all layers at once, then the recipe's phases (QAT). finetune_lr: its learning rate.
    finetune_max_drop: a layer's fine-tuning that lowers the validation accuracy by more than this
        (a fraction: 0.01 = one point) or diverges is undone; 1.0 keeps every fine-tuning.
    float_checkpoint: a float model state (e.g. RUN/ckpt/float.pt) used instead of pretraining.
    sensitivity_batches: training batches of the Fisher sensitivity (allocation "budget").
    report_mse: record the weight MSE of DP, k-means then snap, and unconstrained k-means.
    """

    k: int = 4
    grid_bits: int = 8
    allocation: str = "uniform"
    weight_budget: str | None = None
    k_max: int = 16
    granularity: str = "channel"
    level_init: str = "dp"
    thresholds: str = "midpoint"
    packing: str = "auto"
    pow2_scale: bool = True
    act_bits: int | None = 8
    learn_act_ranges: bool = False
    ptq: bool = True
    finetune_epochs: float = 0.25
    finetune_lr: float = 0.01
    finetune_max_drop: float = 0.01
    finetune_levels: bool = False
    float_checkpoint: str | None = None
    sensitivity_batches: int = 8
    report_mse: bool = True

    def __post_init__(self):
        check_choice("flexible allocation", self.allocation, ALLOCATIONS)
        check_choice("flexible granularity", self.granularity, GRANULARITIES[:2])
        check_choice("flexible level_init", self.level_init, LEVEL_INITS)
        check_choice("flexible thresholds", self.thresholds, THRESHOLDS)
        check_choice("flexible packing", self.packing, PACKINGS)
        if not isinstance(self.grid_bits, int) or not 1 <= self.grid_bits <= 16:
            raise ValueError(f"flexible.grid_bits must be an int in 1..16, got {self.grid_bits!r}")
        if not isinstance(self.k, int) or not 2 <= self.k <= 2**self.grid_bits:
            raise ValueError(f"flexible.k must be an int in [2, 2^grid_bits] = [2, {2**self.grid_bits}], "
                             f"got {self.k!r}")
        if self.k_max < 2 or self.finetune_epochs < 0 or self.finetune_lr < 0:
            raise ValueError("flexible: k_max must be >= 2, finetune_epochs and finetune_lr >= 0")
        if not 0.0 <= self.finetune_max_drop <= 1.0:
            raise ValueError(f"flexible.finetune_max_drop must be a fraction in [0, 1] (0.01 = one point "
                             f"of accuracy), got {self.finetune_max_drop!r}")
        if self.act_bits is not None and not 1 <= self.act_bits <= 16:
            raise ValueError(f"flexible.act_bits must lie in 1..16, got {self.act_bits}")
        if (self.allocation == "budget") != (self.weight_budget is not None):
            raise ValueError("flexible.weight_budget is needed by, and only by, allocation 'budget'")


def flexible_options(data: dict) -> FlexibleOptions:
    """Validated options from the recipe's flexible dict (unknown keys: error with closest match)."""
    return from_dict(FlexibleOptions, dict(data), "flexible.")


# ---------------------------------------------------------------------------------------------
# level allocations (nuuq.md 1.6, 4.4)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The float or quantized conv/linear layers, in module order."""
    kinds = (*FLOAT_LAYERS, *QUANTIZED_LAYERS)
    return [(f, m) for f, m in model.named_modules() if type(m) in kinds]


def allocate_levels(sizes: dict[str, int], opts: FlexibleOptions, losses: dict | None = None,
                    budget: float | None = None, bias_bytes: dict | None = None) -> dict[str, int]:
    """k per layer. `sizes`: weight elements per layer in order. uniform: k; edges_double: 2k in the
    first three and last three layers; inverse_size: k_l = clamp(round(c / N_l), 2, k_cap) with
    the largest c such that sum N_l log2 k_l <= sum N_l log2 k (the paper's bit count stays that of
    the uniform allocation); budget: `budget_allocation` with `losses` {layer: {k: loss}} and the
    `budget` in bytes (codes + `bias_bytes`)."""
    cap = min(2**opts.grid_bits, max(opts.k_max, opts.k))
    names = list(sizes)
    if opts.allocation == "uniform":
        return dict.fromkeys(names, opts.k)
    if opts.allocation == "edges_double":
        edges = set(names[:3]) | set(names[-3:])
        return {f: min(2 * opts.k, 2**opts.grid_bits) if f in edges else opts.k for f in names}
    if opts.allocation == "inverse_size":
        n = np.array([sizes[f] for f in names], dtype=np.float64)
        target = float((n * math.log2(opts.k)).sum())

        def ks(c):
            return np.clip(np.round(c / n), 2, cap)

        lo, hi = 0.0, float(n.max() * cap * 2)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (n * np.log2(ks(mid))).sum() <= target + 1e-9 else (lo, mid)
        return {f: int(v) for f, v in zip(names, ks(lo), strict=True)}
    if losses is None or budget is None:
        raise ValueError("allocation 'budget' needs the per-layer losses and the budget in bytes")
    return budget_allocation(sizes, losses, budget, opts.packing, bias_bytes or {})


def budget_bytes(text: str, elements: int) -> float:
    """A weight budget in bytes: a size with a unit, or 'B bpe' (B bits per weight element, biases
    included, over `elements`), as budget.resolve_budgets reads it."""
    text = str(text).strip()
    if text.endswith("bpe"):
        bits = float(text[:-3])
        if bits <= 0:
            raise ValueError(f"flexible.weight_budget {text!r} must be positive")
        return bits * elements / 8
    return parse_bytes(text)


def candidate_levels(n: int, cap: int, packing: str) -> list[int]:
    """The level counts worth considering: for each stored size, the largest k (more levels at
    the same bytes never quantize worse); ascending."""
    best: dict[int, int] = {}
    for k in range(2, cap + 1):
        best[fx.code_bytes(n, k, packing)] = k
    return sorted(best.values())


def budget_allocation(sizes: dict[str, int], losses: dict, budget: float, packing: str,
                      bias_bytes: dict[str, float]) -> dict[str, int]:
    """k per layer with packed codes + biases <= `budget` bytes and the least total loss, greedily:
    from the largest candidate k everywhere, lower the layer that adds the least loss per byte
    saved until the budget holds, then raise layers while the budget allows (best loss saved per
    byte first). A multiple-choice knapsack solved approximately; `losses[layer][k]` must cover
    the candidate levels."""
    cands = {f: sorted(losses[f]) for f in sizes}
    cost = {f: [fx.code_bytes(sizes[f], k, packing) for k in cands[f]] for f in sizes}
    loss = {f: [losses[f][k] for k in cands[f]] for f in sizes}
    idx = {f: len(cands[f]) - 1 for f in sizes}
    fixed = sum(bias_bytes.values())

    def total():
        return fixed + sum(cost[f][idx[f]] for f in sizes)

    least = fixed + sum(cost[f][0] for f in sizes)
    if budget < least:
        raise ValueError(f"flexible.weight_budget {budget:.0f} B is below the smallest size of these "
                         f"layers, {least:.0f} B (k = 2 everywhere, biases included)")
    while total() > budget:
        f = min((f for f in sizes if idx[f] > 0), key=lambda f: (loss[f][idx[f] - 1] - loss[f][idx[f]])
                / max(cost[f][idx[f]] - cost[f][idx[f] - 1], 1e-9))
        idx[f] -= 1
    while True:
        room = budget - total()
        ups = [f for f in sizes
               if idx[f] + 1 < len(cands[f]) and cost[f][idx[f] + 1] - cost[f][idx[f]] <= room]
        if not ups:
            return {f: cands[f][idx[f]] for f in sizes}
        f = max(ups, key=lambda f: (loss[f][idx[f]] - loss[f][idx[f] + 1])
                / max(cost[f][idx[f] + 1] - cost[f][idx[f]], 1e-9))
        idx[f] += 1


def fisher_sensitivity(model: nn.Module, loader, batches: int) -> dict[str, float]:
    """Mean squared gradient of the loss per layer weight (empirical Fisher diagonal, averaged):
    the loss increase of a small weight error d is ~ 1/2 F d^2, so layer l at k levels is charged
    1/2 F_l SSE_l(k) (the 'loss' of the budget allocation)."""
    layers = quantizable_layers(model)
    fisher = squared_gradients(model, loader, batches, [m.weight for _, m in layers])
    return {f: float(g.mean()) for (f, _), g in zip(layers, fisher, strict=True)}


def weight_rows(weight: torch.Tensor, granularity: str) -> np.ndarray:
    w = weight.detach().double().cpu()
    return (w.reshape(1, -1) if granularity == "tensor" else w.reshape(w.shape[0], -1)).numpy()


def layer_sse(weight: torch.Tensor, k: int, opts: FlexibleOptions, init: str | None = None) -> float:
    """Least squared weight error of a layer at k levels (summed over slices), as calibration fits."""
    return sum(fx.fit_levels(x, k, opts.grid_bits, True, init or opts.level_init, opts.pow2_scale, seed=i)[2]
               for i, x in enumerate(weight_rows(weight, opts.granularity)))


def mse_report(model: nn.Module, opts: FlexibleOptions) -> dict:
    """Per layer at its k: weight MSE of the exact DP, of k-means then snap (the paper's way) and of
    unconstrained 1-D k-means (4 restarts, a local optimum), per slice as calibrated, and the
    ratios to k-means (nuuq.md 1.4 reports ~1.58 / 1.06 / 1.004 at b = 3 / 5 / 7). The DP's error
    is read off the quantizers, so call this right after calibrating them with level_init "dp"."""
    rows = []
    for s in quant_sites(model):
        if s.role != "weight" or not isinstance(s.quant, FlexibleQuantizer):
            continue
        k, data = s.quant.k, weight_rows(s.layer.weight, opts.granularity)
        n = data.size
        with torch.no_grad():
            w = s.layer.weight.detach().double()
            dp = float(((s.quant.double()(w) - w) ** 2).mean()) if opts.level_init == "dp" else \
                layer_sse(s.layer.weight, k, opts, "dp") / n
            s.quant.float()
        km = layer_sse(s.layer.weight, k, opts, "kmeans") / n
        free = sum(fx.kmeans_1d(x, k, seed=i)[1] * x.size for i, x in enumerate(data)) / n
        rows.append({"layer": s.fqn, "k": k, "grid_bits": opts.grid_bits, "mse_dp": dp, "mse_kmeans_snap": km,
                     "mse_kmeans": free, "dp_over_kmeans": dp / free if free else float("nan"),
                     "kmeans_snap_over_kmeans": km / free if free else float("nan")})
    return {"layers": rows, **{f"{key}_mean": float(np.mean([r[key] for r in rows]))
                               for key in ("dp_over_kmeans", "kmeans_snap_over_kmeans")}}
