"""Configuration of quantizers and of model conversion: frozen dataclasses validated at
construction, so a bad value fails where it is written, with the allowed values and the closest
match. Depends on the standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

PARAMETRIZATIONS = {"uniform": ("u1", "u2", "u3"), "pow2": ("p1", "p2", "p3"), "flexible": ("fq",)}
KINDS = ("uniform", "pow2", "flexible")
THRESHOLDS = ("midpoint", "learned")  # flexible kind only (nuuq.md 4.1)
LEVEL_INITS = ("dp", "kmeans", "uniform")
PACKINGS = ("bits", "base_k", "auto")
GRANULARITIES = ("tensor", "channel", "group")
MODIFIERS = ("ste", "ewgs", "atanh", "psgd", "tanh", "acos")
INITS = ("mean3sigma", "pow2_max", "percentile", "max", "fixed")
ACT_SITES = ("input", "relu")
UNITS = {"B": 1, "kB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2, "GB": 1000**3, "GiB": 1024**3}


def closest(value: str, choices) -> str:
    """' did you mean X?' for the closest of `choices`, or '' when nothing is close."""
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def check_choice(what: str, value, choices) -> None:
    """Raise ValueError naming the bad value, the allowed ones and the closest match."""
    if value not in choices:
        raise ValueError(
            f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}"
            + closest(value, choices)
        )


def parse_bytes(text: str | float | int) -> float:
    """'70.1 KiB' -> 71782.4 bytes. Units: B, kB, MB, GB (1000-based), KiB, MiB, GiB (1024-based).

    A bare number is bytes. 'KB' is refused as ambiguous (the two papers disagree on it).
    """
    if isinstance(text, (int, float)):
        value, unit = float(text), "B"
    else:
        parts = str(text).strip().replace("_", "").split()
        if len(parts) == 1:  # "70.1KiB" or "1000"
            head = parts[0].rstrip("BbiKkMGg")
            parts = [head, parts[0][len(head):] or "B"]
        if len(parts) != 2:
            raise ValueError(f"cannot read size {text!r}; write a number and a unit, e.g. '70.1 KiB'")
        try:
            value = float(parts[0])
        except ValueError:
            raise ValueError(f"cannot read the number in size {text!r}") from None
        unit = parts[1]
    if unit == "KB":
        raise ValueError(f"size unit 'KB' in {text!r} is ambiguous: write 'KiB' (1024 bytes) or "
                         "'kB' (1000 bytes)")
    check_choice("size unit", unit, tuple(UNITS))
    if not value > 0:
        raise ValueError(f"size {text!r} must be positive")
    return value * UNITS[unit]


@dataclass(frozen=True)
class QuantizerConfig:
    """One quantizer site kind (weights or activations). See docs/math.md for every field.

    kind: "uniform" (fixed point, methods.md 1.1.1) or "pow2" (power-of-two levels, 1.1.2).
    param: u1 (bits, scale), u2 (bits, qmax), u3 (scale, qmax; bits inferred); p1/p2/p3 likewise.
    granularity: one (scale, qmax) per tensor, per output channel, or per group of `group_size`
        consecutive output channels (hardware slices); every slice gets its own bit width.
    signed: None decides at calibration (signed if the observed data has negatives).
    pow2_scale: force the step to 2^round(log2 scale) (fixed-point grid, exact integer export).
    modifier, delta: rounding-gradient modifier and its strength (methods.md 2.1.3).
    bits_init: b0, the width that calibration initializes to; bits_min/bits_max bound the
        counted width (bits_min is a floor of the count, bits_max a projection of qmax).
    init: mean3sigma | pow2_max | percentile | max | fixed (methods.md 1.1.4, 2.1.1).
    levels, thresholds, level_init, packing: the "flexible" kind only (NUUQ, nuuq.md; FlexibleQuantizer):
        k levels (2 <= k <= 2^bits_init; bits_init is the grid bits b) on the b-bit grid, thresholds
        "midpoint" or "learned", levels from the exact grid-constrained optimum ("dp"), k-means then
        snap ("kmeans") or a uniform block ("uniform"); codes stored at ceil(log2 k) bits ("bits"),
        in base k ("base_k", e.g. 5 ternary codes per byte) or whichever is smaller ("auto").
        param defaults to "fq" for that kind.
    """

    kind: str = "uniform"
    param: str = "u3"
    granularity: str = "channel"
    group_size: int = 1
    signed: bool | None = True
    pow2_scale: bool = True
    modifier: str = "ewgs"
    delta: float = 5e-3
    bits_init: int = 4
    bits_min: int = 2
    bits_max: int = 8
    scale_range: tuple[float, float] = (2.0**-12, 1.0)
    qmax_range: tuple[float, float] = (2.0**-8, 127.0)
    init: str = "mean3sigma"
    percentile: float = 99.9
    with_zero: bool = False
    lsq_grad_scale: bool = False
    grad_clip: bool = True
    levels: int = 4
    thresholds: str = "midpoint"
    level_init: str = "dp"
    packing: str = "bits"

    def __post_init__(self):
        check_choice("quantizer kind", self.kind, KINDS)
        if self.kind == "flexible" and self.param == "u3":  # the default param: the kind's only one
            object.__setattr__(self, "param", "fq")
        check_choice(f"{self.kind} parametrization", self.param, PARAMETRIZATIONS[self.kind])
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("rounding-gradient modifier", self.modifier, MODIFIERS)
        check_choice("initialization", self.init, INITS)
        for name in ("bits_init", "bits_min", "bits_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.bits_min <= self.bits_max:
            raise ValueError(f"bits_min ({self.bits_min}) must be <= bits_max ({self.bits_max})")
        if not self.bits_min <= self.bits_init <= self.bits_max:
            raise ValueError(
                f"bits_init ({self.bits_init}) must lie in [bits_min, bits_max] = "
                f"[{self.bits_min}, {self.bits_max}]"
            )
        if self.bits_max > 16:
            raise ValueError(f"bits_max ({self.bits_max}) must be <= 16 (int16 export containers)")
        if self.granularity == "group" and self.group_size < 2:
            raise ValueError(f"granularity 'group' needs group_size >= 2, got {self.group_size}")
        if self.granularity != "group" and self.group_size != 1:
            raise ValueError(
                f"group_size={self.group_size} needs granularity 'group', got {self.granularity!r}"
            )
        for name in ("scale_range", "qmax_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo < hi:
                raise ValueError(f"{name} must satisfy 0 < low < high, got {(lo, hi)}")
        if self.scale_range[0] > self.qmax_range[1]:
            raise ValueError(
                f"scale_range starts at {self.scale_range[0]}, above the largest qmax "
                f"{self.qmax_range[1]}: the step d must fit inside the range q_max"
            )
        if not 50.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in [50, 100], got {self.percentile}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        check_choice("threshold mode", self.thresholds, THRESHOLDS)
        check_choice("level initialization", self.level_init, LEVEL_INITS)
        check_choice("packing", self.packing, PACKINGS)
        if self.kind == "flexible" and (not isinstance(self.levels, int) or isinstance(self.levels, bool)
                                        or not 2 <= self.levels <= 2**self.bits_init):
            raise ValueError(f"levels (k) must be an integer in [2, 2^bits_init] = [2, {2**self.bits_init}] "
                             f"for {self.bits_init} grid bits, got {self.levels!r}; raise bits_init or "
                             "lower levels")

    def replace(self, **changes) -> QuantizerConfig:
        return dataclasses.replace(self, **changes)


def default_weight_config() -> QuantizerConfig:
    """Schaefer's weights: U3 per output channel, EWGS, mean +- 3 sigma init (methods.md 2.2)."""
    return QuantizerConfig()


def default_act_config() -> QuantizerConfig:
    """Per-tensor activations: U3, ATanh, 99.9th-percentile init, signedness from the data."""
    return QuantizerConfig(
        granularity="tensor",
        signed=None,
        modifier="atanh",
        bits_min=1,
        scale_range=(2.0**-12, 8.0),
        qmax_range=(2.0**-8, 255.0),
        init="percentile",
    )


@dataclass(frozen=True)
class LayerRule:
    """Overrides for the layers whose module path matches `pattern`.

    pattern: an fnmatch pattern on the module path ("features.*", "fc"), or "@first" / "@last" for
        the first and last quantizable layer in module order.
    skip: leave the layer float. weight_bits / act_bits: fix that site's bit width (bits_min =
        bits_max = bits_init = value; the counted width is then exactly that value).
    levels: a flexible weight quantizer's level count k for these layers (NUUQ per-layer allocations).
    """

    pattern: str
    skip: bool = False
    weight_bits: int | None = None
    act_bits: int | None = None
    levels: int | None = None

    def __post_init__(self):
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= 16):
                raise ValueError(f"{name} in rule {self.pattern!r} must be an int in 1..16")
        if self.levels is not None and (not isinstance(self.levels, int) or self.levels < 2):
            raise ValueError(f"levels in rule {self.pattern!r} must be an int >= 2, got {self.levels!r}")


@dataclass(frozen=True)
class QuantConfig:
    """What `prepare_` does to a model.

    act_site: "input" quantizes the input of every quantized conv/linear (Schaefer's convention,
        what the integer export needs); "relu" replaces every ReLU/ReLU6 module by an unsigned
        quantizer (Uhlich's convention). act=None leaves activations float.
    bias_bits: width of the bias, quantized on the accumulator grid (input step x weight step)
        when the layer has an input quantizer; counted in the weight size at this width.
    """

    weight: QuantizerConfig = field(default_factory=default_weight_config)
    act: QuantizerConfig | None = field(default_factory=default_act_config)
    act_site: str = "input"
    rules: tuple[LayerRule, ...] = ()
    bias_bits: int = 32

    def __post_init__(self):
        check_choice("activation site", self.act_site, ACT_SITES)
        if not isinstance(self.bias_bits, int) or not 8 <= self.bias_bits <= 32:
            raise ValueError(f"bias_bits must be an int in 8..32, got {self.bias_bits!r}")
        object.__setattr__(self, "rules", tuple(self.rules))


def from_dict(cls, data: dict[str, Any], where: str = "", base=None):
    """Build dataclass `cls` from a plain dict (over the defaults of instance `base` when given);
    unknown keys raise with the closest match."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        raise ValueError(
            f"unknown key '{where}{key}'; allowed: {', '.join(sorted(names))}" + closest(key, names)
        )
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
