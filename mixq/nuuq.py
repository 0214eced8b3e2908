"""NUUQ procedures (nuuq.md 1.5, 1.6, 2.3, 4.3, 4.4): per-layer level allocations, layer-sequential
post-training quantization with optional fine-tuning after each layer, QAT, the storage report,
and `run_flexible`, what the pipeline runs for a recipe with method = "flexible".

Fine-tuning after quantizing layer l (nuuq.md 2.3 leaves it open; our choice): the weights of the
layers after l (not yet quantized) and every bias are trained; the quantized layers' weights stay
frozen (their codes are fixed), and so are the quantizers unless `finetune_levels` (then the
levels and clips of the weight quantizers train too). QAT is the recipe's `phases` run afterwards
with the flexible quantizers in place: alpha, levels (and learned thresholds) train with the
weights; b and k stay fixed. Activations are uniform b_A-bit with the ranges calibrated on the float
model, kept through fine-tuning and QAT unless `learn_act_ranges`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as tF

from . import flexible as fx
from .config import (
    GRANULARITIES,
    LEVEL_INITS,
    PACKINGS,
    THRESHOLDS,
    LayerRule,
    QuantConfig,
    check_choice,
    from_dict,
    parse_bytes,
)
from .convert import FLOAT_LAYERS, prepare_, quant_sites
from .flexible import FlexibleQuantizer
from .layers import QUANTIZED_LAYERS
from .recipe import PhaseConfig
from .train import PhaseProgress, PhaseRunner, StopFlag, evaluate

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
    granularity, level_init, thresholds, packing, pow2_scale: the weight quantizer (mixq.flexible).
    act_bits: uniform activation bits (b_A); None keeps the recipe's quant.act widths.
    learn_act_ranges: let fine-tuning / QAT train the activation quantizers too (default: they keep
        their calibrated ranges; a learned power-of-two step can halve and shrink the range).
    ptq: layer-sequential PTQ with `finetune_epochs` of fine-tuning after each layer (0: none);
        false: all layers at once, then the recipe's phases (QAT). finetune_lr: its learning rate.
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
    acc = {f: 0.0 for f, _ in layers}
    was = model.training
    model.eval()
    used = 0
    for x, y in loader:
        grads = torch.autograd.grad(tF.cross_entropy(model(x), y), [m.weight for _, m in layers])
        for (f, _), g in zip(layers, grads, strict=True):
            acc[f] += float((g.double() ** 2).mean())
        used += 1
        if used >= batches:
            break
    model.train(was)
    return {f: v / max(used, 1) for f, v in acc.items()}


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


# ---------------------------------------------------------------------------------------------
# quantizing a model


def flexible_quant_config(opts: FlexibleOptions, base: QuantConfig, levels: dict[str, int]) -> QuantConfig:
    """The recipe's QuantConfig with flexible weights (k per layer through LayerRule.levels) and
    uniform b_A-bit activations."""
    b = opts.grid_bits
    weight = base.weight.replace(kind="flexible", param="fq", granularity=opts.granularity, group_size=1,
                                 signed=True, pow2_scale=opts.pow2_scale, bits_init=b, bits_min=1,
                                 bits_max=b, levels=opts.k, thresholds=opts.thresholds,
                                 level_init=opts.level_init, packing=opts.packing)
    act = base.act
    if act is not None and opts.act_bits is not None:
        a = opts.act_bits
        act = act.replace(bits_init=a, bits_min=a, bits_max=a)
    rules = (*base.rules, *(LayerRule(f, levels=k) for f, k in levels.items()))
    return dataclasses.replace(base, weight=weight, act=act, rules=rules)


@torch.no_grad()
def calibrate_acts_(model: nn.Module, batches, max_batches: int = 4) -> None:
    """Calibrate the activation quantizers on the float model (flexible weights passed through)."""
    sites = quant_sites(model)
    flex = [s.quant for s in sites if isinstance(s.quant, FlexibleQuantizer)]
    saved = [q.enabled for q in flex]
    acts = [s.quant for s in sites if s.role != "weight"]
    for q in flex:
        q.enabled = False
    for q in acts:
        q.start_observing()
    was = model.training
    model.eval()
    try:
        for i, (x, _) in enumerate(batches):
            model(x)
            if i + 1 >= max_batches:
                break
    finally:
        model.train(was)
        for q, state in zip(flex, saved, strict=True):
            q.enabled = state
    for q in acts:
        q.finish_observing_()


class _Hooks:
    """PhaseRunner callbacks for fine-tuning and QAT inside the flexible procedure (no checkpoints:
    an interrupted flexible run redoes the procedure from its float model)."""

    def __init__(self, evaluate_fn, folder=None, show=None):
        self.evaluate_fn, self.folder, self.show = evaluate_fn, folder, show
        self.last: dict = {}  # the latest evaluation

    def log(self, record):
        if self.folder is not None:
            self.folder.log({"stage": "flexible", **record})

    def progress(self, step, total, text):
        if self.show is not None:
            self.show.update(step, total, text)

    def evaluate(self):
        self.last = self.evaluate_fn()
        return self.last

    def ramp(self, progress):
        return 1.0

    def size_text(self):
        return ""

    def checkpoint(self, state, opt):
        pass

    def save_best(self):
        pass

    def on_step(self, step):
        pass


@contextlib.contextmanager
def frozen_act_ranges(model: nn.Module, frozen: bool = True):
    """Zero the gradients of every activation quantizer while inside (PhaseRunner trains all
    quantizer parameters or none; with zero gradients SGD and Adam leave these unchanged)."""
    params = [p for s in quant_sites(model) if s.role != "weight" for p in s.quant.parameters(recurse=False)]
    handles = [p.register_hook(torch.zeros_like) for p in params] if frozen else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_phase(model, phase: PhaseConfig, index: int, train_loader, hooks, stop: StopFlag | None = None,
              learn_act_ranges: bool = False):
    """One fine-tuning or QAT phase (PhaseRunner), activation ranges frozen unless asked."""
    if getattr(hooks, "show", None) is not None:
        hooks.show.begin(phase.name[:12])
    with frozen_act_ranges(model, not learn_act_ranges):
        return PhaseRunner(model, phase, index, train_loader, hooks, stop or StopFlag()).run(PhaseProgress())


def ptq_sequential(model: nn.Module, train_loader, val_loader, opts: FlexibleOptions, hooks=None,
                   stop: StopFlag | None = None) -> list[dict]:
    """Layer-sequential PTQ (nuuq.md 2.3), input to output: quantize layer l (calibrated from its
    current weights), measure, fine-tune `finetune_epochs` (the later layers' weights and all
    biases), measure again. Returns one row per layer with the validation accuracies."""
    hooks = hooks or _Hooks(lambda: evaluate(model, val_loader))
    layers = [(s.fqn, s.layer) for s in quant_sites(model) if isinstance(s.quant, FlexibleQuantizer)]
    for _, layer in layers:
        layer.w_quant.enabled = False
    rows = []
    for i, (fqn, layer) in enumerate(layers):
        q = layer.w_quant
        if i > 0 and opts.finetune_epochs > 0:  # its weights were fine-tuned since prepare_
            q.calibrate_(q.slice_rows(layer.weight.detach()))
        q.enabled = True
        row = {"layer": fqn, "k": q.k, "grid_bits": q.b, "val_acc_before_ft": hooks.evaluate()["acc"]}
        if opts.finetune_epochs > 0:
            frozen = [m.weight for _, m in layers[:i + 1]]
            for p in frozen:
                p.requires_grad_(False)
            phase = PhaseConfig(name=f"ft {fqn}", epochs=opts.finetune_epochs, lr=opts.finetune_lr,
                                schedule="cosine", warmup_fraction=0.0,
                                quantizers="learned" if opts.finetune_levels else "frozen")
            try:
                run_phase(model, phase, 100 + i, train_loader, hooks, stop, opts.learn_act_ranges)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            row["val_acc_after_ft"] = hooks.last["acc"]  # the fine-tuning phase ends with an evaluation
        rows.append(row)
    return rows


def storage_report(model: nn.Module) -> dict:
    """Per flexible layer and in total (weighted by weight elements): the paper's equivalent bits
    log2 k, the stored bits (as packed, and both ceil(log2 k) and base-k), the packed code bytes
    and the codebook + scale overhead (k b + 8 bits per slice), and the weight MSE."""
    rows = []
    for s in quant_sites(model):
        q = s.quant
        if s.role != "weight" or not isinstance(q, FlexibleQuantizer):
            continue
        n, k = int(q.numel.sum()), q.k
        with torch.no_grad():
            w = s.layer.weight.detach()
            err = float(((q(w).double() - w.double()) ** 2).mean()) if q.enabled else float("nan")
        pack = q.cfg.packing
        rows.append({"fqn": s.fqn, "levels": k, "grid_bits": q.b, "slices": q.slices, "elements": n,
                     "equivalent_bits": fx.equivalent_bits(k), "stored_bits": fx.stored_bits(k, pack),
                     "stored_bits_ceil": fx.stored_bits(k, "bits"),
                     "stored_bits_base_k": fx.stored_bits(k, "base_k"), "packing": fx.packing_used(k, pack),
                     "code_bytes": fx.code_bytes(n, k, pack),
                     "overhead_bytes": float(q.overhead_bits().sum()) / 8, "mse": err})
    n = max(sum(r["elements"] for r in rows), 1)
    totals = {key: sum(r[key] * r["elements"] for r in rows) / n
              for key in ("equivalent_bits", "stored_bits", "stored_bits_ceil", "stored_bits_base_k")}
    return {**totals, "code_bytes": sum(r["code_bytes"] for r in rows),
            "overhead_bytes": sum(r["overhead_bytes"] for r in rows), "layers": rows}


def add_flexible_summary(summary: dict, model: nn.Module, results: dict) -> dict:
    """Add equivalent_bits, stored_bits (totals and per layer rows), overhead and the flexible
    procedure's results to a run summary."""
    report = storage_report(model)
    by_layer = {r["fqn"]: r for r in report["layers"]}
    for row in summary.get("layers", []):
        extra = by_layer.get(row["fqn"], {})
        row.update({k: v for k, v in extra.items() if k != "fqn"})
    summary.update({k: v for k, v in report.items() if k != "layers"})
    if "weight_bytes" in summary:
        summary["weight_bytes_with_overhead"] = summary["weight_bytes"] + report["overhead_bytes"]
    flex = summary["flexible"] = dict(results.get("flexible", {}))
    tuned = flex.get("options", {}).get("ptq") and flex["options"].get("finetune_epochs", 0) > 0
    final = "test_acc_qat" if flex.get("qat_phases") else "test_acc_ft" if tuned else None
    if final and final not in flex:
        flex[final] = summary.get("quant_acc")
    return summary


def quantize_like_(job, state: dict) -> None:
    """Rebuild the quantized model of a flexible run (eval, export): fold_bn_ and prepare_ with the
    level counts that the saved state's `levels_raw` shapes hold."""
    from .convert import fold_bn_
    from .size import SizeAccount

    opts = flexible_options(job.recipe.flexible)
    if job.recipe.fold_bn:
        fold_bn_(job.model)
    levels = {f: int(state[f"{f}.w_quant.levels_raw"].shape[1]) for f, _ in quantizable_layers(job.model)
              if f"{f}.w_quant.levels_raw" in state}
    config = flexible_quant_config(opts, job.recipe.quant, levels)
    prepare_(job.model, config, example_input=job.example_batch())
    job.account = SizeAccount(job.model)


def run_flexible(job, results: dict, state: dict | None = None) -> None:
    """The pipeline's method "flexible": float model (pretrained, or flexible.float_checkpoint),
    fold_bn_, level allocation, prepare_ with flexible weights and b_A-bit activations, accuracy
    without fine-tuning, layer-sequential PTQ with fine-tuning, then the recipe's phases as QAT.
    Leaves job.model quantized and job.account / job.budgets set for `pipeline.finish`."""
    from .budget import Budgets
    from .convert import fold_bn_
    from .data import DeviceLoader
    from .pipeline import _run_stage, load_checkpoint, load_model_state
    from .size import SizeAccount
    from .train import save_atomic

    recipe, folder = job.recipe, job.folder
    opts = flexible_options(recipe.flexible)
    if any(getattr(recipe.budget, key) is not None for key in ("weight", "act_sum", "act_max")):
        raise ValueError("method 'flexible' does not use [budget]: give flexible.allocation = 'budget' and "
                         "flexible.weight_budget instead")
    if any(p.penalty for p in recipe.phases):
        raise ValueError("method 'flexible': QAT phases cannot use the budget penalty (penalty = false)")
    if opts.float_checkpoint:
        path = folder.path.__class__(opts.float_checkpoint)
        load_model_state(job.model, load_checkpoint(path), path)
        save_atomic(job.model.state_dict(), folder.ckpt / "float.pt")
        results["float_acc"] = evaluate(job.model, job.test)["acc"]
        results["float_checkpoint"] = str(path)
    else:
        _run_stage(job, 0, recipe.pretrain, state if state and state.get("stage") == 0 else None, results)
    model = job.model
    if recipe.fold_bn:
        fold_bn_(model)
    clean = DeviceLoader(job.train.x, job.train.y, mean=job.mean, std=job.std, shuffle=False, augment=False,
                         batch_size=recipe.data.batch_size, drop_last=False, seed=0, device=job.device)
    layers = quantizable_layers(model)
    sizes = {f: m.weight.numel() for f, m in layers}
    biases = {f: (m.bias.numel() if m.bias is not None else 0) for f, m in layers}
    bias = {f: n * recipe.quant.bias_bits / 8 for f, n in biases.items()}
    elements = sum(sizes.values()) + sum(biases.values())
    losses, target = None, None
    if opts.allocation == "budget":
        target = budget_bytes(opts.weight_budget, elements)
        fisher = fisher_sensitivity(model, clean, opts.sensitivity_batches)
        cap = min(2**opts.grid_bits, opts.k_max)
        weights = dict(quantizable_layers(model))
        losses = {f: {k: 0.5 * fisher[f] * layer_sse(weights[f].weight, k, opts)
                      for k in candidate_levels(sizes[f], cap, opts.packing)} for f in sizes}
    levels = allocate_levels(sizes, opts, losses, target, bias)
    prepare_(model, flexible_quant_config(opts, recipe.quant, levels), example_input=job.example_batch())
    calibrate_acts_(model, clean)
    job.account = SizeAccount(model)
    job.budgets = Budgets(weight_bytes=target) if target is not None else Budgets()
    flex = {"options": dataclasses.asdict(opts), "levels": levels}
    if opts.report_mse:
        flex["mse"] = mse_report(model, opts)
    flex["test_acc_no_ft"] = evaluate(model, job.test, dtype=torch.float64)["acc"]
    job.show.message(f"flexible: all layers quantized, no fine-tuning: test acc {flex['test_acc_no_ft']:.4f}")
    hooks = _Hooks(job.evaluate_val, folder, job.show)
    if opts.ptq and opts.finetune_epochs > 0:
        flex["ptq_layers"] = ptq_sequential(model, job.train, job.val or job.test, opts, hooks, job.stop)
        if recipe.phases:  # otherwise it is the run's final quant_acc (add_flexible_summary)
            flex["test_acc_ft"] = evaluate(model, job.test, dtype=torch.float64)["acc"]
    for i, phase in enumerate(recipe.phases):
        run_phase(model, phase, 1 + i, job.train, hooks, job.stop, opts.learn_act_ranges)
        flex.setdefault("qat_phases", []).append(phase.name)
    results["flexible"] = flex
