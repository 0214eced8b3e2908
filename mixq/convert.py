"""Model conversion: `prepare_` swaps float layers for quantized ones by module-path rules,
`fold_bn_` folds BatchNorm into the preceding conv/linear, `calibrate_` fills the quantizer
parameters from data, and `quant_plan` describes what was done, one row per quantized site.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import LayerRule, QuantConfig, QuantizerConfig
from .layers import QUANTIZED_LAYERS, ActQuant, QConv2d, QLinear
from .quantizers import SliceQuantizer, make_quantizer

FLOAT_LAYERS = {nn.Conv2d: QConv2d, nn.Linear: QLinear}


@dataclass(frozen=True)
class Site:
    """One quantized tensor: `role` is weight, input, output or act (an ActQuant module)."""

    fqn: str
    role: str
    quant: SliceQuantizer
    layer: nn.Module


def quant_sites(model: nn.Module) -> list[Site]:
    """Every quantizer of a prepared model, in module order."""
    sites = []
    for fqn, module in model.named_modules():
        if isinstance(module, QUANTIZED_LAYERS):
            for role, q in (("input", module.in_quant), ("weight", module.w_quant),
                            ("output", module.out_quant)):
                if q is not None:
                    sites.append(Site(fqn, role, q, module))
        elif isinstance(module, ActQuant):
            sites.append(Site(fqn, "act", module.quant, module))
    return sites


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _matching_rules(fqn: str, rules, first: str | None, last: str | None) -> list[LayerRule]:
    special = {"@first": first, "@last": last}
    return [r for r in rules if (special[r.pattern] == fqn if r.pattern in special
                                 else fnmatch.fnmatchcase(fqn, r.pattern))]


def _fixed(cfg: QuantizerConfig | None, bits: int | None) -> QuantizerConfig | None:
    if cfg is None or bits is None:
        return cfg
    return cfg.replace(bits_init=bits, bits_min=bits, bits_max=bits)


def prepare_(model: nn.Module, config: QuantConfig | None = None,
             example_input: Tensor | None = None) -> QuantPlan:
    """Swap every nn.Conv2d / nn.Linear of `model` (in place) for QConv2d / QLinear.

    Rules (`config.rules`, later ones win) match module paths and can skip a layer or fix its
    bits. Weight quantizers are initialized from the weights at once; activation quantizers need
    `calibrate_`. With `example_input` (a batch), per-sample activation sizes are measured too.
    Returns the plan: one row per quantized site. Layers with weights that cannot be quantized stay
    float and are named in a warning.
    """
    config = config or QuantConfig()
    if any(isinstance(m, (*QUANTIZED_LAYERS, ActQuant)) for m in model.modules()):
        raise ValueError("model is already prepared (it holds quantized layers); prepare_ it once")
    layers = [(fqn, m) for fqn, m in model.named_modules() if type(m) in FLOAT_LAYERS]
    if not layers:
        raise ValueError("model has no nn.Conv2d or nn.Linear layer to quantize")
    first, last = layers[0][0], layers[-1][0]
    unsupported = [f"{fqn} ({type(m).__name__})" for fqn, m in model.named_modules()
                   if type(m) not in FLOAT_LAYERS and getattr(m, "weight", None) is not None
                   and isinstance(m.weight, Tensor) and m.weight.dim() >= 2]
    if unsupported:
        warnings.warn("these layers stay float (mixq quantizes Conv2d and Linear): "
                      + ", ".join(unsupported), stacklevel=2)
    act_input = config.act if config.act_site == "input" else None
    for fqn, layer in layers:
        rules = _matching_rules(fqn, config.rules, first, last)
        if any(r.skip for r in rules):
            continue
        wbits = next((r.weight_bits for r in reversed(rules) if r.weight_bits), None)
        abits = next((r.act_bits for r in reversed(rules) if r.act_bits), None)
        wcfg, acfg = _fixed(config.weight, wbits), _fixed(act_input, abits)
        levels = next((r.levels for r in reversed(rules) if r.levels), None)
        if levels is not None:  # a flexible (NUUQ) quantizer's level count k for this layer
            wcfg = wcfg.replace(levels=levels)
        device = layer.weight.device  # quantizers live where the layer lives (a model on CUDA)
        w_quant = make_quantizer(wcfg, layer.weight.shape[0], 0, where=fqn).to(device)
        w_quant.numel.fill_(layer.weight.numel() / w_quant.slices)
        in_channels = layer.weight.shape[1] * getattr(layer, "groups", 1)
        in_quant = make_quantizer(acfg, in_channels, 1, where=fqn).to(device) if acfg else None
        qlayer = FLOAT_LAYERS[type(layer)].from_float(layer, w_quant, in_quant,
                                                      bias_bits=config.bias_bits)
        w_quant.calibrate_(w_quant.slice_rows(layer.weight.detach()))
        _set_module(model, fqn, qlayer)
    if config.act_site == "relu" and config.act is not None:
        _replace_relus(model, config)
    if example_input is not None:
        from .size import measure_

        measure_(model, example_input)
    return quant_plan(model)


def _replace_relus(model: nn.Module, config: QuantConfig) -> None:
    acfg = config.act.replace(signed=False)
    if acfg.granularity != "tensor":
        raise ValueError("act_site 'relu' quantizes per tensor (a ReLU module has no channel "
                         f"count); got granularity {acfg.granularity!r}: use act_site 'input'")
    relus = [(f, m) for f, m in model.named_modules() if type(m) in (nn.ReLU, nn.ReLU6)]
    device = next(model.parameters()).device
    for fqn, relu in relus:
        rules = _matching_rules(fqn, config.rules, None, None)
        if any(r.skip for r in rules):
            continue
        abits = next((r.act_bits for r in reversed(rules) if r.act_bits), None)
        cap = 6.0 if isinstance(relu, nn.ReLU6) else None
        quant = make_quantizer(_fixed(acfg, abits), where=fqn).to(device)
        _set_module(model, fqn, ActQuant(quant, cap))


@torch.no_grad()
def fold_bn_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a conv/linear (whose output feeds only it) into
    that layer's weight and bias, using the running statistics; the BatchNorm becomes Identity.

    W' = W gamma / sqrt(var + eps) per output channel, b' = (b - mean) gamma / sqrt(var + eps) + beta.
    Needs a torch.fx-traceable model. Returns the folded (layer, batchnorm) module paths.
    """
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many kinds; say what it means for the user
        raise ValueError(f"fold_bn_ needs a torch.fx-traceable model; tracing failed: {err}") from err
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm1d)) or not bn.track_running_stats:
            continue
        src = node.args[0]
        layer = modules.get(src.target) if src.op == "call_module" else None
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or len(src.users) != 1:
            continue
        inv = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        factor = gamma * inv
        layer.weight.mul_(factor.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)
        _set_module(model, node.target, nn.Identity())
        folded.append((src.target, node.target))
    return folded


@torch.no_grad()
def calibrate_(model: nn.Module, batches, max_batches: int | None = None) -> int:
    """Initialize every quantizer from data, before the optimizer is built.

    Weight quantizers are initialized from the weights; activation quantizers observe the float
    activations of `batches` (tensors or (x, y) tuples; weights already quantized) and are then
    initialized at their `bits_init` (methods.md 1.1.4, 2.1.1). Returns the batches used.
    """
    sites = quant_sites(model)
    if not sites:
        raise ValueError("model has no quantizers: call mixq.prepare_(model, config) first")
    for s in sites:
        if s.role == "weight":
            s.quant.calibrate_(s.quant.slice_rows(s.layer.weight.detach()))
    acts = [s.quant for s in sites if s.role != "weight"]
    for q in acts:
        q.start_observing()
    was_training, used = model.training, 0
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
            if max_batches is not None and used >= max_batches:
                break
    finally:
        model.train(was_training)
    if acts and used == 0:
        for q in acts:
            q.observer = None
        raise ValueError("calibrate_ got no batches: pass an iterable of input tensors")
    for q in acts:
        if q.observer:
            q.finish_observing_()
        else:  # never reached by the data (an unused branch): keep its defaults, say so
            q.observer = None
            warnings.warn(f"a quantizer saw no data during calibration: {q}", stacklevel=2)
    return used


@dataclass(frozen=True)
class PlanRow:
    fqn: str
    role: str
    layer: str
    granularity: str
    slices: int
    signed: bool | None
    elements: int
    bits_init: int
    bits_min: int
    bits_max: int


class QuantPlan(list):
    """One `PlanRow` per quantized site; `str(plan)` is a table, `plan.to_dicts()` the data."""

    def to_dicts(self) -> list[dict]:
        return [row.__dict__.copy() for row in self]

    def __str__(self) -> str:
        head = f"{'site':<34} {'role':<6} {'layer':<7} {'slices':>9} {'elements':>10} {'bits':>7}"
        lines = [head, "-" * len(head)]
        for r in self:
            gran = "tensor" if r.granularity == "tensor" else f"{r.slices}x{r.granularity[:2]}"
            elements = "?" if r.elements < 0 else str(r.elements)
            bits = f"{r.bits_init}" + ("" if r.bits_min == r.bits_max else
                                       f"[{r.bits_min},{r.bits_max}]")
            lines.append(f"{r.fqn:<34} {r.role:<6} {r.layer:<7} {gran:>9} {elements:>10} {bits:>7}")
        return "\n".join(lines)


def quant_plan(model: nn.Module) -> QuantPlan:
    """The plan of a prepared model; activation elements are per sample (-1 until measured)."""
    rows = QuantPlan()
    for s in quant_sites(model):
        cfg, q = s.quant.cfg, s.quant
        elements = int(q.numel.sum().item()) if bool((q.numel > 0).all()) else -1
        layer = type(s.layer).__name__.removeprefix("Q") if s.role != "act" else (
            "ReLU6" if s.layer.cap is not None else "ReLU")
        rows.append(PlanRow(s.fqn, s.role, layer, cfg.granularity, q.slices, q.signed, elements,
                            cfg.bits_init, cfg.bits_min, cfg.bits_max))
    return rows
