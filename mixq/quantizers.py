"""Quantizers: `nn.Module`s that own learnable step sizes and ranges, one per slice.

A slice is the whole tensor, one output channel, or a group of G consecutive output channels
(`QuantizerConfig.granularity`); every slice has its own parameters and therefore its own bit
width. Parameters exist from `__init__`; `calibrate_` fills them from data before an optimizer is
built; `project_` keeps them in range after every optimizer step (methods.md 1.1.3).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import functional as F
from .config import QuantizerConfig

_OBSERVE_COLUMNS = 1 << 16  # samples kept per slice from each observed batch


def num_slices(cfg: QuantizerConfig, num_channels: int, where: str = "") -> int:
    """Slices of a site with `num_channels` channels; raises if the group size does not divide."""
    if cfg.granularity == "tensor":
        return 1
    if cfg.granularity == "channel":
        return num_channels
    if num_channels % cfg.group_size:
        divisors = [d for d in range(2, num_channels + 1) if num_channels % d == 0]
        best = min(divisors, key=lambda d: abs(d - cfg.group_size)) if divisors else None
        raise ValueError(
            f"group_size {cfg.group_size} does not divide the {num_channels} channels of "
            f"{where or 'this site'}; allowed group sizes: {divisors}"
            + (f"; did you mean {best}?" if best else "")
        )
    return num_channels // cfg.group_size


def range_estimate(rows: Tensor, init: str, percentile: float, signed: bool) -> Tensor:
    """Per-row estimate of the dynamic range q_max from samples `rows` (S, N).

    mean3sigma: max(|mu - 3 sigma|, |mu + 3 sigma|) (methods.md 2.1.1; population sigma);
    percentile: the given percentile of |x| (x+ when unsigned; linear interpolation as numpy);
    max, pow2_max: max |x|.
    """
    rows = rows.to(torch.float64)
    if init == "mean3sigma":
        mu, sigma = rows.mean(dim=1), rows.std(dim=1, unbiased=False)
        return torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs())
    mags = rows.abs() if signed else rows.clamp(min=0)
    if init == "percentile":
        return torch.quantile(mags, percentile / 100.0, dim=1)
    return mags.amax(dim=1)


class SliceQuantizer(nn.Module):
    """What every quantizer shares: slices, signedness, calibration by observation, counting.

    `axis` is the channel axis of the tensors it sees: 0 for weights, 1 for activations (N, C, ...).
    `numel` (buffer, per slice) is the number of elements each slice quantizes: weight elements, or
    per-sample activation elements once `mixq.size.measure_` has run a forward pass.
    """

    def __init__(self, cfg: QuantizerConfig, num_channels: int = 1, axis: int = 0, where: str = ""):
        super().__init__()
        self.cfg = cfg
        self.axis = axis
        self.num_channels = num_channels
        self.slices = num_slices(cfg, num_channels, where)
        self.group = num_channels // self.slices if self.slices > 1 else 1
        self.signed = cfg.signed
        self.calibrated = False
        self.observer: list[Tensor] | None = None
        self.register_buffer("numel", torch.zeros(self.slices))

    # -- slices -----------------------------------------------------------------------------
    def expand(self, p: Tensor, ndim: int) -> Tensor:
        """A per-slice tensor (S,) made broadcastable against an `ndim`-d tensor."""
        if self.slices == 1:
            return p.reshape([1] * ndim)
        if self.group > 1:
            p = p.repeat_interleave(self.group)
        shape = [1] * ndim
        shape[self.axis] = -1
        return p.reshape(shape)

    def slice_rows(self, x: Tensor) -> Tensor:
        """x rearranged as (S, elements of that slice)."""
        if self.slices == 1:
            return x.reshape(1, -1)
        return x.movedim(self.axis, 0).reshape(self.slices, -1)

    # -- calibration ------------------------------------------------------------------------
    def observe(self, x: Tensor) -> None:
        """Keep a strided sample of `x` per slice for calibration (called in forward)."""
        rows = self.slice_rows(x.detach()).float()
        step = max(1, rows.shape[1] // _OBSERVE_COLUMNS)
        self.observer.append(rows[:, ::step])

    def start_observing(self) -> None:
        self.observer = []

    def finish_observing_(self) -> None:
        """Calibrate from everything observed since `start_observing`."""
        rows, self.observer = torch.cat(self.observer, dim=1), None
        self.calibrate_(rows)

    def _decide_sign(self, rows: Tensor) -> None:
        if self.signed is None:
            self.signed = bool((rows < 0).any())

    def _maybe_calibrate_lazily(self, x: Tensor) -> None:
        if not self.calibrated and self.observer is None:
            warnings.warn(
                f"{type(self).__name__} was not calibrated; calibrating it from this batch. Call "
                "mixq.calibrate_(model, batches) before building the optimizer.",
                stacklevel=3,
            )
            with torch.no_grad():
                self.calibrate_(self.slice_rows(x.detach()).float())

    # -- counting (subclasses define bits_per_slice, grid_step, calibrate_, project_) ------------
    def size_bits(self) -> Tensor:
        """Differentiable size of this site in bits: sum over slices of numel x bits."""
        return (self.numel * self.bits_per_slice()).sum()

    def get_extra_state(self):
        return {"signed": self.signed, "calibrated": self.calibrated}

    def set_extra_state(self, state):
        self.signed, self.calibrated = state["signed"], state["calibrated"]

    def extra_repr(self) -> str:
        sign = {True: "signed", False: "unsigned", None: "sign from data"}[self.signed]
        text = f"{self.cfg.param}, {self.cfg.granularity}, slices={self.slices}, {sign}"
        if self.calibrated:
            with torch.no_grad():
                b = self.bits_per_slice()
            text += f", bits={b.min().item():g}..{b.max().item():g}"
        return text


class UniformQuantizer(SliceQuantizer):
    """Uniform fixed-point quantizer (methods.md 1.1.1) with three parametrizations:

    u3: learned scale d and range qmax, bits inferred (Uhlich's recommended one);
    u1: learned bits b and scale d, qmax = max_code(b) d;  u2: learned b and qmax, d = qmax/max_code(b).
    With `pow2_scale` the step is 2^round(log2 d) (straight-through). Forward:
    x_hat = d round(clip(x, -qmax or 0, qmax) / d), see `functional.fake_quant_uniform`.
    """

    def __init__(self, cfg: QuantizerConfig, num_channels: int = 1, axis: int = 0, where: str = ""):
        super().__init__(cfg, num_channels, axis, where)
        signed = True if self.signed is None else self.signed
        scale0 = 2.0**-3  # Uhlich's initial step (methods.md 1.1.4), until calibration
        if cfg.param in ("u1", "u3"):
            self.scale = nn.Parameter(torch.full((self.slices,), scale0))
        if cfg.param in ("u2", "u3"):
            top = scale0 * F.max_code(cfg.bits_init, signed)
            self.qmax = nn.Parameter(torch.full((self.slices,), float(top)))
        if cfg.param in ("u1", "u2"):
            self.bits = nn.Parameter(torch.full((self.slices,), float(cfg.bits_init)))
        self.shared_step: Tensor | None = None  # set only inside `batched.shared_steps`

    def learned_bits(self) -> Tensor:
        """U1/U2: the integer width round(clip(b)); a signed slice keeps at least 2 bits (-1, 0, 1)."""
        cfg = self.cfg
        return F.round_bits(self.bits, max(cfg.bits_min, 1 + bool(self.signed)), cfg.bits_max)

    def step_and_range(self) -> tuple[Tensor, Tensor]:
        """Per-slice (effective step, range), differentiable in the learned parameters."""
        cfg, signed = self.cfg, bool(self.signed)
        if cfg.param == "u3":
            if not torch.compiler.is_compiling() and self.shared_step is not None:
                return self.shared_step, self.qmax  # from `batched.shared_steps`
            step = F.pow2_ste(self.scale) if cfg.pow2_scale else self.scale
            return step, self.qmax
        bits = self.learned_bits()
        top = torch.exp2(bits - 1) - 1 if signed else torch.exp2(bits) - 1
        if cfg.param == "u1":
            step = F.pow2_ste(self.scale) if cfg.pow2_scale else self.scale
            return step, top * step
        step = self.qmax / top
        if cfg.pow2_scale:  # round the step up, so that round(qmax / step) <= max_code(b) holds
            step = torch.exp2(F.ceil_ste(torch.log2(step)))
        return step, self.qmax

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observe(x)
            return x
        self._maybe_calibrate_lazily(x)
        step, qmax = self.step_and_range()
        grad_scale = 1.0
        if self.cfg.lsq_grad_scale:  # LSQ: 1 / sqrt(N Q_p) per slice
            levels = torch.round(qmax / step).detach().clamp(min=1)
            grad_scale = self.expand(torch.rsqrt(self.numel.clamp(min=1) * levels), x.dim())
        return F.fake_quant_uniform(
            x,
            self.expand(step, x.dim()),
            self.expand(qmax, x.dim()),
            bool(self.signed),
            self.cfg.modifier,
            self.cfg.delta,
            grad_scale,
        )

    def bits_per_slice(self) -> Tensor:
        if self.cfg.param == "u3":
            step, qmax = self.step_and_range()
            return F.uniform_bits(step, qmax, bool(self.signed), self.cfg.bits_min)
        return self.learned_bits()

    def grid_step(self) -> Tensor:
        return self.step_and_range()[0].detach()

    @torch.no_grad()
    def calibrate_(self, rows: Tensor) -> None:
        """Initialize from samples (S, N) at bits_init (methods.md 1.1.4 and 2.1.1)."""
        cfg = self.cfg
        self._decide_sign(rows)
        top = F.max_code(cfg.bits_init, bool(self.signed))
        if cfg.init == "fixed":
            step = torch.full((self.slices,), 2.0**-3, dtype=torch.float64)
            qmax = step * top
        else:
            qmax = range_estimate(rows, cfg.init, cfg.percentile, bool(self.signed))
            qmax = qmax.clamp(min=cfg.qmax_range[0])
            step = qmax / top
            if cfg.init == "pow2_max":  # Uhlich: round the step up for b0 > 4, down otherwise
                step = torch.exp2(torch.ceil(torch.log2(step)) if cfg.bits_init > 4 else
                                  torch.floor(torch.log2(step)))
                qmax = step * top
        if cfg.pow2_scale:
            step = torch.exp2(torch.round(torch.log2(step)))
        step = step.clamp(*cfg.scale_range)
        qmax = torch.minimum(qmax, step * top)  # exactly bits_init bits at the start
        if cfg.param in ("u1", "u3"):
            self.scale.copy_(step)
        if cfg.param in ("u2", "u3"):
            self.qmax.copy_(qmax)
        if cfg.param in ("u1", "u2"):
            self.bits.fill_(cfg.bits_init)
        self.calibrated = True
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        """Keep scale <= qmax (swap), parameters in their ranges, and bits <= bits_max."""
        cfg = self.cfg
        if cfg.param in ("u1", "u3"):
            self.scale.clamp_(*cfg.scale_range)
        if cfg.param in ("u1", "u2"):
            self.bits.clamp_(max(cfg.bits_min, 1 + bool(self.signed)), cfg.bits_max)
        if cfg.param == "u1":
            return
        self.qmax.clamp_(*cfg.qmax_range)
        if cfg.param == "u3":
            lo, hi = torch.minimum(self.scale, self.qmax), torch.maximum(self.scale, self.qmax)
            self.scale.copy_(lo)
            step = torch.exp2(torch.round(torch.log2(lo))) if cfg.pow2_scale else lo
            top = max(F.max_code(cfg.bits_max, bool(self.signed)), 1)
            self.qmax.copy_(torch.minimum(torch.maximum(hi, step), step * top))

    @torch.no_grad()
    def one_bit_less(self) -> list[dict[str, Tensor]]:
        """Candidate parameter values that lower every slice by one bit: fewer levels at the same
        step (a narrower range) or, for U3, twice the step at the same range. Used by
        `budget.enforce_budgets_`; slices already at their floor are filtered there."""
        if self.cfg.param != "u3":
            return [{"bits": self.bits - 1}]
        signed = bool(self.signed)
        step, qmax = self.step_and_range()
        raw = F.uniform_bits(step, qmax, signed, 1)
        top = F.max_code(torch.clamp(raw - 1, min=1 + int(signed)), signed)
        coarse = step * 2
        return [{"qmax": step * top},
                {"scale": coarse, "qmax": torch.maximum(torch.minimum(qmax, coarse * top), coarse)}]

    @torch.no_grad()
    def clip_grads_(self) -> None:
        """Clip the scale and qmax gradients to +-s (methods.md 1.1.3): s is the learned step (U1,
        U3) or, for U2, the derived step."""
        if not self.cfg.grad_clip:
            return
        bound = self.step_and_range()[0] if self.cfg.param == "u2" else self.scale
        for p in (getattr(self, "scale", None), getattr(self, "qmax", None)):
            if p is not None and p.grad is not None:
                torch.maximum(torch.minimum(p.grad, bound), -bound, out=p.grad)


class Pow2Quantizer(SliceQuantizer):
    """Power-of-two quantizer (methods.md 1.1.2): levels 0 (optional), +-qmin ... +-qmax, all powers
    of two. p1: learned bits and qmax; p2: learned bits and qmin; p3: learned qmin and qmax, bits
    inferred as ceil(log2(log2(qmax/qmin) + 1)) + signed + with_zero.
    """

    def __init__(self, cfg: QuantizerConfig, num_channels: int = 1, axis: int = 0, where: str = ""):
        super().__init__(cfg, num_channels, axis, where)
        if cfg.bits_init < int(cfg.signed is not False) + int(cfg.with_zero):
            raise ValueError(f"bits_init {cfg.bits_init} leaves no bit for the magnitudes")
        if cfg.param in ("p1", "p3"):
            self.qmax = nn.Parameter(torch.ones(self.slices))
        if cfg.param in ("p2", "p3"):
            self.qmin = nn.Parameter(torch.full((self.slices,), 2.0**-7))
        if cfg.param in ("p1", "p2"):
            self.bits = nn.Parameter(torch.full((self.slices,), float(cfg.bits_init)))

    def _magnitudes(self, bits: Tensor | float) -> Tensor:
        """Number of power-of-two magnitudes minus one: 2^n - 1 with n = bits - signed - zero."""
        return F.pow2_exponent_count(bits, bool(self.signed), self.cfg.with_zero) - 1

    def min_and_max(self) -> tuple[Tensor, Tensor]:
        """Per-slice (qmin, qmax), both powers of two, differentiable in the learned parameters."""
        cfg = self.cfg
        if cfg.param == "p3":
            return F.pow2_ste(self.qmin), F.pow2_ste(self.qmax)
        span = self._magnitudes(F.round_bits(self.bits, cfg.bits_min, cfg.bits_max))
        if cfg.param == "p1":
            qmax = F.pow2_ste(self.qmax)
            return qmax * torch.exp2(-span), qmax
        qmin = F.pow2_ste(self.qmin)
        return qmin, qmin * torch.exp2(span)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observe(x)
            return x
        self._maybe_calibrate_lazily(x)
        qmin, qmax = self.min_and_max()
        return F.fake_quant_pow2(
            x, self.expand(qmin, x.dim()), self.expand(qmax, x.dim()), bool(self.signed),
            self.cfg.with_zero,
        )

    def bits_per_slice(self) -> Tensor:
        cfg = self.cfg
        if cfg.param == "p3":
            qmin, qmax = self.min_and_max()
            bits = F.pow2_bits(qmin, qmax, bool(self.signed), cfg.with_zero)
            return torch.clamp(bits, min=cfg.bits_min)
        return F.round_bits(self.bits, cfg.bits_min, cfg.bits_max)

    def grid_step(self) -> Tensor:
        return self.min_and_max()[0].detach()

    @torch.no_grad()
    def calibrate_(self, rows: Tensor) -> None:
        """qmax = 2^round(log2 range), qmin = qmax / 2^(2^n - 1) at bits_init (methods.md 1.1.4)."""
        cfg = self.cfg
        self._decide_sign(rows)
        init = "max" if cfg.init in ("fixed", "pow2_max") else cfg.init
        qmax = range_estimate(rows, init, cfg.percentile, bool(self.signed))
        qmax = torch.exp2(torch.round(torch.log2(qmax.clamp(min=cfg.qmax_range[0]))))
        qmin = qmax * torch.exp2(-self._magnitudes(float(cfg.bits_init)))
        if cfg.param in ("p1", "p3"):
            self.qmax.copy_(qmax)
        if cfg.param in ("p2", "p3"):
            self.qmin.copy_(qmin)
        if cfg.param in ("p1", "p2"):
            self.bits.fill_(cfg.bits_init)
        self.calibrated = True
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        """Keep qmin <= qmax (swap), both in range, and the counted bits <= bits_max."""
        cfg = self.cfg
        if cfg.param in ("p1", "p2"):
            self.bits.clamp_(cfg.bits_min, cfg.bits_max)
        if cfg.param in ("p1", "p3"):
            self.qmax.clamp_(*cfg.qmax_range)
        if cfg.param in ("p2", "p3"):
            self.qmin.clamp_(*cfg.scale_range)
        if cfg.param == "p3":
            lo, hi = torch.minimum(self.qmin, self.qmax), torch.maximum(self.qmin, self.qmax)
            floor = torch.exp2(torch.round(torch.log2(hi))) * torch.exp2(
                -self._magnitudes(float(cfg.bits_max)))
            self.qmin.copy_(torch.maximum(lo, floor))
            self.qmax.copy_(hi)

    @torch.no_grad()
    def one_bit_less(self) -> list[dict[str, Tensor]]:
        """Candidate parameter values one bit narrower per slice (see UniformQuantizer)."""
        if self.cfg.param != "p3":
            return [{"bits": self.bits - 1}]
        qmin, qmax = self.min_and_max()
        bits = F.pow2_bits(qmin, qmax, bool(self.signed), self.cfg.with_zero)
        return [{"qmin": torch.minimum(qmax * torch.exp2(-self._magnitudes(bits - 1)), qmax)}]

    @torch.no_grad()
    def clip_grads_(self) -> None:
        """Clip the qmin and qmax gradients to +-qmin (methods.md 1.1.3, P3)."""
        if not self.cfg.grad_clip:
            return
        bound = self.min_and_max()[0]
        for p in (getattr(self, "qmin", None), getattr(self, "qmax", None)):
            if p is not None and p.grad is not None:
                torch.maximum(torch.minimum(p.grad, bound), -bound, out=p.grad)


QUANTIZERS = {"uniform": UniformQuantizer, "pow2": Pow2Quantizer}


def make_quantizer(cfg: QuantizerConfig, num_channels: int = 1, axis: int = 0, where: str = ""):
    """The quantizer that `cfg.kind` names, for a site with `num_channels` channels on `axis`."""
    if cfg.kind == "flexible":  # imported here: FlexibleQuantizer subclasses SliceQuantizer
        from .flexible_quantizer import FlexibleQuantizer

        return FlexibleQuantizer(cfg, num_channels, axis, where)
    return QUANTIZERS[cfg.kind](cfg, num_channels, axis, where)
