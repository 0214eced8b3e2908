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
import copy
import dataclasses

import torch
from torch import nn

from . import flexible as fx
from .budget import Budgets
from .config import (
    LayerRule,
    QuantConfig,
)
from .convert import fold_bn_, prepare_, quant_sites
from .flexible_quantizer import FlexibleQuantizer
from .levels import (
    FlexibleOptions,
    allocate_levels,
    budget_bytes,
    candidate_levels,
    fisher_sensitivity,
    flexible_options,
    layer_sse,
    mse_report,
    quantizable_layers,
)
from .loader import DeviceLoader
from .recipe import PhaseConfig
from .size import SizeAccount
from .train import NonFiniteLoss, PhaseProgress, PhaseRunner, StopFlag, evaluate, save_atomic

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


@contextlib.contextmanager
def float_weights(model: nn.Module):
    """Within the block the flexible weight quantizers pass their weights through unchanged."""
    flex = [s.quant for s in quant_sites(model) if isinstance(s.quant, FlexibleQuantizer)]
    saved = [q.enabled for q in flex]
    for q in flex:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(flex, saved, strict=True):
            q.enabled = state


@torch.no_grad()
def calibrate_acts_(model: nn.Module, batches, max_batches: int = 4) -> None:
    """Calibrate the activation quantizers on the float model (flexible weights passed through)."""
    acts = [s.quant for s in quant_sites(model) if s.role != "weight"]
    for q in acts:
        q.start_observing()
    was = model.training
    model.eval()
    try:
        with float_weights(model):
            for i, (x, _) in enumerate(batches):
                model(x)
                if i + 1 >= max_batches:
                    break
    finally:
        model.train(was)
    for q in acts:
        q.finish_observing_()


def acts_only_accuracy(model: nn.Module, loader) -> float:
    """Accuracy (float64) with float weights and the quantized activations: what the b_A-bit
    activations alone cost, so that a table can tell it from what the weights cost."""
    with float_weights(model):
        return evaluate(model, loader, dtype=torch.float64)["acc"]


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
              learn_act_ranges: bool = False, teacher: nn.Module | None = None):
    """One fine-tuning or QAT phase (PhaseRunner), activation ranges frozen unless asked; with
    `teacher` and phase.distill > 0 the loss distills from it."""
    if getattr(hooks, "show", None) is not None:
        hooks.show.begin(phase.name[:12])
    with frozen_act_ranges(model, not learn_act_ranges):
        return PhaseRunner(model, phase, index, train_loader, hooks, stop or StopFlag(),
                           teacher=teacher).run(PhaseProgress())


def ptq_sequential(model: nn.Module, train_loader, val_loader, opts: FlexibleOptions, hooks=None,
                   stop: StopFlag | None = None) -> list[dict]:
    """Layer-sequential PTQ (nuuq.md 2.3), input to output: quantize layer l (calibrated from its
    current weights), measure, fine-tune `finetune_epochs` (the later layers' weights and all
    biases), measure again. Fine-tuning that lowered the validation accuracy by more than
    `opts.finetune_max_drop` (or diverged) is undone and the row says `reverted`: a learning rate too
    high for the network (a BN-folded ResNet-20 at 0.01) must not cost more than quantizing without
    fine-tuning, while the noise of a small validation set does not undo useful steps (the later
    layers' weights move too). Returns one row per layer."""
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
            before = copy.deepcopy(model.state_dict())
            for p in frozen:
                p.requires_grad_(False)
            phase = PhaseConfig(name=f"ft {fqn}", epochs=opts.finetune_epochs, lr=opts.finetune_lr,
                                schedule="cosine", warmup_fraction=0.0,
                                quantizers="learned" if opts.finetune_levels else "frozen")
            try:
                run_phase(model, phase, 100 + i, train_loader, hooks, stop, opts.learn_act_ranges)
                after = hooks.last["acc"]  # the fine-tuning phase ends with an evaluation
            except NonFiniteLoss:  # diverged: undone like any fine-tuning that hurt
                after = float("nan")
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            row["val_acc_after_ft"] = after
            row["reverted"] = not after >= row["val_acc_before_ft"] - opts.finetune_max_drop
            if row["reverted"]:
                model.load_state_dict(before)
                hooks.log({"phase": phase.name, "event": "reverted", **row})
                if hooks.show is not None:
                    hooks.show.message(f"{phase.name}: validation accuracy fell from "
                                       f"{row['val_acc_before_ft']:.4f} to {row['val_acc_after_ft']:.4f}; "
                                       "fine-tuning undone (lower flexible.finetune_lr?)")
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
    from .pipeline import _run_stage, load_checkpoint, load_model_state  # pipeline dispatches here

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
    teacher = copy.deepcopy(model).eval() if any(p.distill for p in recipe.phases) else None
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
    flex["test_acc_acts_only"] = acts_only_accuracy(model, job.test)
    flex["test_acc_no_ft"] = evaluate(model, job.test, dtype=torch.float64)["acc"]
    job.show.message(f"flexible: all layers quantized, no fine-tuning: test acc {flex['test_acc_no_ft']:.4f}")
    hooks = _Hooks(job.evaluate_val, folder, job.show)
    if opts.ptq and opts.finetune_epochs > 0:
        flex["ptq_layers"] = ptq_sequential(model, job.train, job.val or job.test, opts, hooks, job.stop)
        if recipe.phases:  # otherwise it is the run's final quant_acc (add_flexible_summary)
            flex["test_acc_ft"] = evaluate(model, job.test, dtype=torch.float64)["acc"]
    for i, phase in enumerate(recipe.phases):
        run_phase(model, phase, 1 + i, job.train, hooks, job.stop, opts.learn_act_ranges, teacher)
        flex.setdefault("qat_phases", []).append(phase.name)
    results["flexible"] = flex
