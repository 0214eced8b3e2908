"""Recipes: a TOML file validated into frozen dataclasses, plus `--set key=value` overrides.

A recipe names the model, the data, the float pretraining, the quantization config, the budgets
and the QAT phases. Unknown keys and bad values are errors with the allowed names and the closest
match. `Recipe.to_dict()` is the resolved form each run folder keeps as recipe.json.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    LayerRule,
    QuantConfig,
    QuantizerConfig,
    check_choice,
    closest,
    default_act_config,
    default_weight_config,
    from_dict,
    parse_bytes,
)

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
QUANTIZER_MODES = ("learned", "frozen")
METHODS = ("learned", "flexible")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "fmnist_cnn"
    stem: str = "cifar"
    num_classes: int | None = None  # None: from the data set


@dataclass(frozen=True)
class DataConfig:
    """name: fashion_mnist | cifar10 | imagefolder; root: None searches (see mixq.data)."""

    name: str = "fashion_mnist"
    root: str | None = None
    image_size: int | None = None
    batch_size: int = 256
    eval_batch_size: int = 1000
    augment: bool = True
    pad: int = 2
    flip: bool = True
    val_size: int = 5000
    num_train: int | None = None
    num_test: int | None = None


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase. quantizers: learned (updated every `update_every` steps) or frozen.

    quant_momentum: the quantizer parameters' momentum (SGD, RMSProp; None = `momentum`). 0 stops
    a budget-driven descent of the bit widths the step the penalty lets go, instead of coasting
    on momentum well below the budget.

    penalty: apply the budget penalty (the mixed phase). reload_best: start from the best
    checkpoint of the previous phase that met every budget (Schaefer's phase 3).
    greedy_start: before the phase, lower bit widths one slice at a time, each time the slice whose
    step adds the least squared quantization error per bit saved (weighted as
    `budget.greedy_criterion` says), until every budget is met (`budget.enforce_budgets_`); the
    phase then trains, and learns, inside its budgets.
    """

    name: str = "float"
    epochs: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.1
    quant_lr: float = 0.01
    momentum: float = 0.9
    quant_momentum: float | None = None
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.25
    label_smoothing: float = 0.1
    quantizers: str = "learned"
    update_every: int = 1
    penalty: bool = False
    reload_best: bool = False
    greedy_start: bool = False
    distill: float = 0.0
    distill_temperature: float = 4.0
    evals_per_epoch: int = 1

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("quantizer mode", self.quantizers, QUANTIZER_MODES)
        if (self.epochs <= 0 or self.lr < 0 or self.quant_lr < 0 or (self.quant_momentum or 0) < 0
                or self.update_every < 1 or self.evals_per_epoch < 1):
            raise ValueError(f"phase {self.name!r}: epochs must be > 0, lr, quant_lr and quant_momentum "
                             ">= 0, update_every and evals_per_epoch >= 1")
        if not 0 <= self.distill <= 1:
            raise ValueError(f"phase {self.name!r}: distill must lie in [0, 1], got {self.distill}")


GREEDY_CRITERIA = ("fisher", "mse")


@dataclass(frozen=True)
class BudgetConfig:
    """Budgets as strings with units ('70.1 KiB', '4.14 MB') or per element ('2.5 bpe': bits per
    weight element, bias included, or per activation element), resolved to bytes on the model.

    greedy_criterion: what the greedy lowering of bits (`greedy_start`, and the enforcement when a
    phase ends above its budgets) minimizes per bit saved: "fisher", each weight's squared error
    weighted by the empirical Fisher diagonal from `fisher_batches` training batches (an estimate of
    the loss increase), or "mse", the plain squared error. Activation slices use the plain error."""

    weight: str | None = None
    act_sum: str | None = None
    act_max: str | None = None
    unit: str = "KiB"
    lambdas: dict = field(default_factory=lambda: {"weight": 0.1, "act_sum": 0.1, "act_max": 0.1})
    controller: str = "pi"
    margin: float = 0.01
    ramp_start: float = 0.01
    ramp_fraction: float = 0.5
    greedy_criterion: str = "fisher"
    fisher_batches: int = 20

    def __post_init__(self):
        check_choice("budget controller", self.controller, ("pi", "none"))
        check_choice("budget greedy_criterion", self.greedy_criterion, GREEDY_CRITERIA)
        if self.fisher_batches < 1:
            raise ValueError(f"budget fisher_batches must be >= 1, got {self.fisher_batches}")
        for key in ("weight", "act_sum", "act_max"):
            value = getattr(self, key)
            if value is not None and not str(value).strip().endswith("bpe"):
                parse_bytes(value)  # validates now, resolves later
        for key in self.lambdas:
            check_choice("budget key in lambdas", key, ("weight", "act_sum", "act_max"))


@dataclass(frozen=True)
class Recipe:
    """A whole run. cuda_graphs: on a CUDA device, each training step's forward and backward is
    captured once as a CUDA graph and replayed (`mixq.graphs`); false keeps every step eager."""

    seed: int = 0
    method: str = "learned"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    fold_bn: bool = True
    start_bits: str | int | None = None
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    phases: tuple[PhaseConfig, ...] = ()
    flexible: dict = field(default_factory=dict)
    cuda_graphs: bool = True

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.start_bits not in (None, "auto") and not isinstance(self.start_bits, int):
            raise ValueError(f"start_bits must be 'auto', an int or absent, got {self.start_bits!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _quant_from_dict(data: dict) -> QuantConfig:
    """[quant]: [quant.weight] and [quant.act] change the defaults of their own site kind
    (default_weight_config, default_act_config: e.g. activations take their sign from the data),
    not the bare QuantizerConfig defaults."""
    data = dict(data)
    if "weight" in data:
        data["weight"] = from_dict(QuantizerConfig, data["weight"], "quant.weight.",
                                   base=default_weight_config())
    if "act" in data:
        data["act"] = None if data["act"] in (None, "none", False) else from_dict(
            QuantizerConfig, data["act"], "quant.act.", base=default_act_config())
    if "rules" in data:
        data["rules"] = tuple(from_dict(LayerRule, r, "quant.rules[].") for r in data["rules"])
    return from_dict(QuantConfig, data, "quant.")


def recipe_from_dict(data: dict) -> Recipe:
    """Build a Recipe from nested plain data (a parsed TOML file or recipe.json)."""
    data = dict(data)
    sections = {"model": ModelConfig, "data": DataConfig, "pretrain": PhaseConfig,
                "budget": BudgetConfig}
    for name, cls in sections.items():
        if name in data:
            data[name] = from_dict(cls, data[name], f"{name}.")
    if "quant" in data:
        data["quant"] = _quant_from_dict(data["quant"])
    if "phases" in data:
        data["phases"] = tuple(from_dict(PhaseConfig, p, f"phases[{i}].")
                               for i, p in enumerate(data["phases"]))
    return from_dict(Recipe, data)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply 'a.b.c=value' overrides (TOML values; phases.1.epochs indexes the phase list)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. pretrain.epochs=3")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for key in keys[:-1]:
            if isinstance(node, list):
                node = node[int(key)]
            else:
                node = node.setdefault(key, {})
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = _parse_value(text)
        else:
            node[last] = _parse_value(text)
    return data


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str | None) -> Path:
    """A recipe path, or the name of a shipped recipe (with or without .toml)."""
    if name is None:
        name = "fmnist_default"
    path = Path(name)
    if path.is_file():
        return path
    for folder in (Path("recipes"), RECIPES_DIR):
        candidate = folder / f"{path.stem}.toml"
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    raise ValueError(f"no recipe file {name!r}; shipped recipes: {', '.join(shipped)}"
                     + closest(path.stem, shipped))


def load_recipe(name: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe (a path or a shipped name), apply overrides, validate."""
    path = find_recipe(name)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"recipe {path} is not valid TOML: {err}") from None
    return recipe_from_dict(apply_overrides(data, list(overrides or [])))
