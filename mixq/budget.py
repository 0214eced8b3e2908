"""Memory budgets: the papers' quadratic penalty with its ramp, an adaptive multiplier that makes
the final model meet every budget whatever the optimizer, and the feasibility check.

Penalty for budget k (methods.md 1.1.3, 2.1.2), sizes in `unit`:

    P = ramp(t) * sum_k  c_k * lambda_k * relu(S_k - T_k)^2

lambda_k is the papers' constant (0.1 per KiB^2 in Uhlich, 1e-4 per kB^2 in Schaefer); c_k is the
adaptive factor. Adam-type optimizers normalize a constant penalty's gradient away (anchors.md 5.1),
so a constant lambda does not say where training ends. The controller is a PI controller on
log c_k with error e_k = S_k / (T_k (1 - margin)) - 1: c_k grows geometrically while the size is
over the slightly lowered target and relaxes once it is under, so every budget is met at the end
of the mixed phase. Everything stays on the device: no host sync per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import UNITS, parse_bytes
from .convert import quant_sites
from .size import SizeAccount

BUDGET_KEYS = ("weight", "act_sum", "act_max")


@dataclass(frozen=True)
class Budgets:
    """Targets in bytes; None means unconstrained."""

    weight_bytes: float | None = None
    act_sum_bytes: float | None = None
    act_max_bytes: float | None = None

    def items(self):
        """(key, target bytes) of the set budgets."""
        return [(k, getattr(self, f"{k}_bytes")) for k in BUDGET_KEYS
                if getattr(self, f"{k}_bytes") is not None]

    def met(self, sizes_bytes: dict[str, float]) -> dict[str, bool]:
        return {k: sizes_bytes[f"{k}_bytes"] <= t for k, t in self.items()}


def ramp(progress: float, start: float = 0.01, fraction: float = 0.5) -> float:
    """Penalty strength (Schaefer 2.1.2): linear from `start` to 1 over the first `fraction` of the
    phase, then 1. `progress` is the fraction of the phase done, in [0, 1]."""
    if fraction <= 0:
        return 1.0
    return start + (1.0 - start) * min(progress / fraction, 1.0)


class BudgetPenalty(nn.Module):
    """The penalty with its adaptive factors; call with the size dict of `SizeAccount` (bits).

    `lambdas` maps budget keys to the papers' constants in 1/unit^2. `controller` is "pi" or
    "none" (constant lambda, the papers' setting). Buffers hold log c_k, the last error and the
    integral, so the controller state is checkpointed with the model.
    """

    def __init__(self, budgets: Budgets, lambdas: dict[str, float] | None = None, unit: str = "KiB",
                 controller: str = "pi", margin: float = 0.01, kp: float = 2.0, ki: float = 0.05,
                 log_factor_max: float = 30.0):
        super().__init__()
        self.targets = dict(budgets.items())
        if not self.targets:
            raise ValueError("no budget set: give at least one of weight, act_sum, act_max")
        self.keys = list(self.targets)
        self.unit = UNITS[unit]
        self.lambdas = [float((lambdas or {}).get(k, 0.1)) for k in self.keys]
        self.controller, self.margin, self.kp, self.ki = controller, margin, kp, ki
        self.log_factor_max = log_factor_max
        n = len(self.keys)
        self.register_buffer("log_factor", torch.zeros(n))
        self.register_buffer("last_error", torch.zeros(n))
        # c_k of the current call, kept apart from log_factor: under torch.compile the backward may
        # recompute exp(log_factor) from the buffer after the controller has updated it in place
        self.register_buffer("_factor", torch.ones(n), persistent=False)
        # the targets and constants as device tensors made once: a tensor built from Python numbers
        # in every step is a host-to-device copy, which synchronizes a CUDA stream
        self.register_buffer("_goal", torch.tensor([self.targets[k] / self.unit for k in self.keys]),
                             persistent=False)
        self.register_buffer("_lam", torch.tensor(self.lambdas), persistent=False)

    def forward(self, sizes_bits: dict[str, Tensor], strength: float | Tensor = 1.0) -> Tensor:
        """The penalty (a 0-d tensor); with the PI controller, also one controller update.
        `strength` is the ramp's factor: a number, or a 0-d device tensor (a CUDA graph's input)."""
        sizes = torch.stack([sizes_bits[f"{k}_bits"] for k in self.keys]) / (8 * self.unit)
        goal, lam = self._goal, self._lam
        factor = self._factor.copy_(torch.exp(self.log_factor)).clone()
        penalty = strength * (factor * lam * torch.relu(sizes - goal * (1 - self.margin)) ** 2).sum()
        if self.controller == "pi" and self.training:
            with torch.no_grad():
                error = sizes.detach() / (goal * (1 - self.margin)) - 1
                step = self.kp * (error - self.last_error) + self.ki * error
                self.log_factor.add_(step).clamp_(0.0, self.log_factor_max)
                self.last_error.copy_(error)
        return penalty

    def factors(self) -> dict[str, float]:
        """Current adaptive factors c_k (host values, for logging)."""
        return {k: math.exp(v) for k, v in zip(self.keys, self.log_factor.tolist(), strict=True)}


def minimum_sizes_bytes(model: nn.Module) -> dict[str, float]:
    """The smallest sizes the allowed bit widths reach: every slice at its lowest countable width.

    A signed uniform slice holds at least the codes -1, 0, 1 (2 bits); unsigned at least 0, 1.
    """
    weight_bits, acts = 0.0, []
    for s in quant_sites(model):
        bits = float(s.quant.numel.sum()) * minimum_bits(s.quant)
        if s.role == "weight":
            weight_bits += bits
            if s.layer.bias is not None:
                weight_bits += s.layer.bias.numel() * s.layer.bias_bits
        else:
            acts.append(bits)
    return {"weight_bytes": weight_bits / 8, "act_sum_bytes": sum(acts) / 8,
            "act_max_bytes": max(acts, default=0.0) / 8}


def check_feasible(model: nn.Module, budgets: Budgets, unit: str = "KiB") -> None:
    """Refuse a budget below what the smallest allowed bit widths reach, naming that minimum."""
    floor = minimum_sizes_bytes(model)
    for key, target in budgets.items():
        least = floor[f"{key}_bytes"]
        if target < least:
            raise ValueError(
                f"the {key} budget {target / UNITS[unit]:.2f} {unit} ({target:.0f} B) is below the "
                f"smallest {key} size the allowed bit widths reach: {least / UNITS[unit]:.2f} {unit} "
                f"({least:.0f} B, every slice at its minimum bits, fixed-width layers and biases "
                f"included); raise the budget or lower bits_min / the fixed widths"
            )


def element_counts(model: nn.Module) -> dict[str, int]:
    """Weight elements (bias included), summed and largest per-sample activation elements."""
    weights, acts = 0, []
    for s in quant_sites(model):
        n = int(s.quant.numel.sum())
        if s.role == "weight":
            weights += n + (s.layer.bias.numel() if s.layer.bias is not None else 0)
        else:
            acts.append(n)
    return {"weight": weights, "act_sum": sum(acts), "act_max": max(acts, default=0)}


def resolve_budgets(spec: dict[str, str | None], model: nn.Module) -> Budgets:
    """Budgets in bytes from strings: sizes with units ('70.1 KiB') or 'B bpe', B bits per element
    of that quantity (weights incl. bias; all activation elements; the largest activation site)."""
    counts = element_counts(model)
    resolved = {}
    for key in BUDGET_KEYS:
        text = spec.get(key)
        if text is None:
            continue
        text = str(text).strip()
        if text.endswith("bpe"):
            bits = float(text[:-3])
            if bits <= 0:
                raise ValueError(f"{key} budget {text!r} must be positive")
            resolved[f"{key}_bytes"] = bits * counts[key] / 8
        else:
            resolved[f"{key}_bytes"] = parse_bytes(text)
    return Budgets(**resolved)


def squared_gradients(model: nn.Module, loader, batches: int, params: list[Tensor]) -> list[Tensor]:
    """Mean over the first `batches` batches of `loader` of the squared gradient of the
    cross-entropy loss for each of `params`, the model in eval mode: the diagonal of the empirical
    Fisher of batch gradients. A small weight error e raises the loss by about 1/2 F e^2."""
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    was, used = model.training, 0
    model.eval()
    try:
        for x, y in loader:
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
            for a, g in zip(acc, grads, strict=True):
                a += g.double() ** 2
            used += 1
            if used >= batches:
                break
    finally:
        model.train(was)
    return [a / max(used, 1) for a in acc]


def weight_importance(model: nn.Module, loader, batches: int) -> dict[str, Tensor]:
    """`squared_gradients` of every quantized layer's weight, by layer name (for enforce_budgets_)."""
    sites = [s for s in quant_sites(model) if s.role == "weight"]
    grads = squared_gradients(model, loader, batches, [s.layer.weight for s in sites])
    return {s.fqn: g.to(s.layer.weight.dtype) for s, g in zip(sites, grads, strict=True)}


def _slice_error(quant, x: Tensor, importance: Tensor | None = None) -> Tensor:
    """Per-slice sum of squared quantization error of `x` (a tensor as the quantizer sees it),
    each element's error weighted by `importance` (same shape) when given."""
    err = (quant(x) - x) ** 2
    return quant.slice_rows(err if importance is None else importance * err).sum(dim=1)


@torch.no_grad()
def enforce_budgets_(model: nn.Module, budgets: Budgets, batch: Tensor,
                     importance: dict[str, Tensor] | None = None) -> list[str]:
    """Lower bit widths greedily until every budget is met; returns what was lowered.

    While a budget is exceeded, among the slices that count toward it, lower by one bit the one
    whose step adds the least squared quantization error per bit saved (on the weights, or on the
    activations that `batch` produces). `importance` (layer name -> weight-shaped tensor, e.g.
    `weight_importance`) weights each weight's squared error, so the criterion estimates the loss
    increase 1/2 sum F e^2 instead of treating every weight alike. The fallback that makes a model
    meet its budgets whatever the optimizer did, and the allocation of `greedy_start` phases.
    Raises ValueError if no slice can go lower.
    """
    sites = quant_sites(model)
    samples: dict[int, Tensor] = {}
    handles = [s.quant.register_forward_pre_hook(
        lambda m, args: samples.setdefault(id(m), args[0].detach().float()))
        for s in sites if s.role != "weight"]
    was_training = model.training
    try:
        model.eval()
        model(batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    weights = {}
    for s in sites:
        if s.role == "weight":
            samples[id(s.quant)] = s.layer.weight.detach().float()
            if importance is not None and s.fqn in importance:
                weights[id(s.quant)] = importance[s.fqn].float()
    account, lowered = SizeAccount(model), []
    floors = {id(s.quant): minimum_bits(s.quant) for s in sites}
    cache: dict[int, tuple | None] = {}  # per quantizer: its cheapest one-bit step
    while True:
        sizes = {k.replace("_bits", "_bytes"): float(v) / 8 for k, v in account().items()}
        over = [k for k, t in budgets.items() if sizes[f"{k}_bytes"] > t]
        if not over:
            return lowered
        key = over[0]
        pool = [s for s in sites if (s.role == "weight") == (key == "weight")]
        if key == "act_max":
            pool = [max(pool, key=lambda s: float(s.quant.size_bits()))]
        best = None
        for s in pool:
            if id(s.quant) not in cache and id(s.quant) in samples:
                cache[id(s.quant)] = _cheapest_step(s.quant, samples[id(s.quant)], floors[id(s.quant)],
                                                    weights.get(id(s.quant)))
            option = cache.get(id(s.quant))
            if option is not None and (best is None or option[0] < best[0][0]):
                best = (option, s)
        if best is None:
            raise ValueError(f"cannot meet the {key} budget: every slice is at its minimum width")
        (_, cand, i), s = best
        for k, v in cand.items():
            getattr(s.quant, k)[i] = v[i]
        del cache[id(s.quant)]
        lowered.append(f"{s.fqn}:{s.role}[{i}]")


def _cheapest_step(q, x: Tensor, floor: float, importance: Tensor | None = None):
    """(error added per bit saved, candidate, slice) of the cheapest one-bit step of `q`, or None."""
    bits, base, best = q.bits_per_slice(), _slice_error(q, x, importance), None
    for cand in q.one_bit_less():
        saved_values = {k: getattr(q, k).detach().clone() for k in cand}
        for k, v in cand.items():
            getattr(q, k).copy_(v)
        new_bits, err = q.bits_per_slice(), _slice_error(q, x, importance)
        for k, v in saved_values.items():
            getattr(q, k).copy_(v)
        saved = (bits - new_bits) * q.numel
        ok = (saved > 0) & (new_bits >= floor)
        cost = torch.where(ok, (err - base).clamp(min=0) / saved.clamp(min=1e-9), torch.inf)
        i = int(cost.argmin())
        if math.isfinite(float(cost[i])) and (best is None or float(cost[i]) < best[0]):
            best = (float(cost[i]), cand, i)
    return best


def minimum_bits(quant) -> float:
    """The lowest width a slice of `quant` can be counted at."""
    cfg = quant.cfg
    if cfg.kind == "uniform" and cfg.param == "u3":
        return max(cfg.bits_min, 2 if quant.signed else 1)
    return cfg.bits_min
