"""The NUUQ fake-quantizer module (Zacchigna et al. 2024; shared/docs/nuuq.md 4.1), built on the
calibration-time math of `mixq.flexible`: k learned levels on a b-bit grid per slice, a clip alpha,
midpoint or learned thresholds (docs/math.md section 8)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from . import functional as F
from .config import QuantizerConfig
from .flexible import distinct_codes, equivalent_bits, fit_levels, grid_codes, stored_bits
from .quantizers import SliceQuantizer


def _distinct_torch(m: Tensor, mmin: int, mmax: int) -> Tensor:
    j = torch.arange(m.shape[-1], dtype=m.dtype, device=m.device)
    m = torch.cummax(torch.sort(m, dim=-1).values - j, dim=-1).values + j
    return torch.minimum(m, mmax - (m.shape[-1] - 1) + j)


class FlexibleQuantizer(SliceQuantizer):
    """NUUQ fake-quantizer (nuuq.md 4.1): per slice a clip alpha (a power of two with `pow2_scale`,
    so Delta is too), k level codes on the b-bit grid (b = cfg.bits_init, k = cfg.levels) and
    thresholds (midpoints, or learned with cfg.thresholds = "learned").

    Parameters: `alpha` (S,); `levels_raw` (S, k), the levels in units of alpha (m = clamp(round(
    levels_raw G))); `thresholds_raw` (S, k-1) in units of alpha (learned mode). Gradients:
      x:          straight-through inside [-alpha, alpha) ([0, alpha) unsigned), 0 outside;
      levels v:   exact (the output is a gather of v), then straight-through onto the grid:
                  dv/dlevels_raw = alpha, dv/dalpha = m / G (times 2^round(log2 a)/a with pow2);
      thresholds: surrogate dQ/dt_j = -(v_{j+1} - v_j) sigma'((x - t_j)/T) / T with T =
                  `temperature` grid steps (Q is piecewise constant in t; N2UQ-like, nuuq.md 4.1).
    `enabled = False` passes the weights through unquantized (layer-sequential PTQ). level_init
    "uniform" keeps the levels fixed (a uniform quantizer with an MSE-chosen step).
    """

    def __init__(self, cfg: QuantizerConfig, num_channels: int = 1, axis: int = 0, where: str = ""):
        super().__init__(cfg, num_channels, axis, where)
        if cfg.kind != "flexible":
            raise ValueError(f"FlexibleQuantizer needs kind 'flexible', got {cfg.kind!r}")
        self.k, self.b = cfg.levels, cfg.bits_init
        mmin, mmax, g = self._grid()
        start = distinct_codes(np.round(np.linspace(mmin, mmax, self.k)), mmin, mmax) / g
        self.alpha = nn.Parameter(torch.ones(self.slices))
        self.levels_raw = nn.Parameter(torch.tensor(start, dtype=torch.float32).repeat(self.slices, 1))
        if cfg.thresholds == "learned":
            mid = (start[:-1] + start[1:]) / 2
            self.thresholds_raw = nn.Parameter(torch.tensor(mid, dtype=torch.float32).repeat(self.slices, 1))
        self.register_buffer("alpha_seen", torch.ones(self.slices))  # alpha_eff at the last projection
        self.enabled = True
        self.temperature = 1.0

    # -- the quantizer -------------------------------------------------------------------------
    def _grid(self) -> tuple[int, int, int]:
        return grid_codes(self.b, self.signed is not False)

    def alpha_eff(self) -> Tensor:
        return F.pow2_ste(self.alpha) if self.cfg.pow2_scale else self.alpha

    def step(self) -> Tensor:
        """Grid step Delta per slice, differentiable."""
        return self.alpha_eff() / self._grid()[2]

    def codes(self) -> Tensor:
        """Integer level codes m (S, k) as floats, straight-through to levels_raw."""
        mmin, mmax, g = self._grid()
        raw = self.levels_raw.detach() if self.cfg.level_init == "uniform" else self.levels_raw
        return torch.clamp(F.round_ste(raw * g), mmin, mmax)

    def levels(self) -> Tensor:
        return self.codes() * self.step()[:, None]

    def thresholds(self, levels: Tensor | None = None) -> Tensor:
        """Sorted thresholds (S, k-1): midpoints of the levels (no gradient), or the learned ones."""
        if self.cfg.thresholds == "midpoint":
            v = (self.levels() if levels is None else levels).detach()
            return (v[:, :-1] + v[:, 1:]) / 2
        t = self.thresholds_raw * self.alpha_eff()[:, None]
        return torch.sort(t, dim=1).values if levels is None else torch.sort(t.to(levels.dtype), dim=1).values

    def _from_rows(self, rows: Tensor, x: Tensor) -> Tensor:
        if self.slices == 1:
            return rows.reshape(x.shape)
        return rows.reshape(x.movedim(self.axis, 0).shape).movedim(0, self.axis)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        self._maybe_calibrate_lazily(x)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = self.slice_rows(x).to(dtype)
        v = self.levels().to(dtype)
        t = self.thresholds(v)
        idx = torch.searchsorted(t.detach().contiguous(), rows.detach().contiguous(), right=True)
        out = torch.gather(v, 1, idx)
        alpha = self.alpha_eff().detach().to(dtype)[:, None]
        lo = -alpha if self.signed is not False else torch.zeros_like(alpha)
        inside = (rows >= lo) & (rows < alpha)
        out = out + torch.where(inside, rows - rows.detach(), torch.zeros((), dtype=dtype, device=x.device))
        if self.cfg.thresholds == "learned" and torch.is_grad_enabled():
            temp = (self.temperature * self.step().detach()).to(dtype)[:, None, None]
            z = torch.sigmoid((rows.detach()[:, :, None] - t[:, None, :]) / temp)
            jump = (v[:, 1:] - v[:, :-1]).detach()[:, None, :]
            out = out + ((z - z.detach()) * jump).sum(dim=2)
        return self._from_rows(out, x).to(x.dtype)

    @torch.no_grad()
    def indices(self, x: Tensor) -> Tensor:
        """Level indices (S, N) of `x` as the float64 forward picks them (what the export stores)."""
        v = self.levels().double()
        t = self.thresholds(v)
        return torch.searchsorted(t.contiguous(), self.slice_rows(x).double().contiguous(), right=True)

    # -- counting ----------------------------------------------------------------------------
    def bits_per_slice(self) -> Tensor:
        """STORED bits per element: ceil(log2 k), or base-k packed (cfg.packing); no gradient."""
        return torch.full((self.slices,), stored_bits(self.k, self.cfg.packing), device=self.alpha.device)

    def equivalent_bits(self) -> Tensor:
        """The paper's bits per element, log2 k, per slice."""
        return torch.full((self.slices,), equivalent_bits(self.k), device=self.alpha.device)

    def overhead_bits(self) -> Tensor:
        """Per slice: the codebook (k codes of b bits) and the scale (an 8-bit exponent with
        pow2_scale, else a 32-bit float)."""
        scale = 8 if self.cfg.pow2_scale else 32
        return torch.full((self.slices,), float(self.k * self.b + scale), device=self.alpha.device)

    def grid_step(self) -> Tensor:
        return self.step().detach()

    # -- calibration and projection -------------------------------------------------------------
    @torch.no_grad()
    def calibrate_(self, rows: Tensor) -> None:
        """alpha and the levels from samples (S, N): cfg.level_init "dp" (the exact grid-constrained
        optimum, default), "kmeans" (k-means then snap, the paper's way) or "uniform"; alpha by the
        least squared error over power-of-two candidates (`fit_levels`). Thresholds: midpoints."""
        self._decide_sign(rows)
        signed, g = bool(self.signed), self._grid()[2]
        data = rows.detach().double().cpu().numpy()
        fits = [fit_levels(x, self.k, self.b, signed, self.cfg.level_init, self.cfg.pow2_scale, seed=i)
                for i, x in enumerate(data)]
        alpha = torch.tensor([f[0] for f in fits], dtype=self.alpha.dtype, device=self.alpha.device)
        codes = torch.tensor(np.stack([f[1] for f in fits]), dtype=torch.float64)
        self.alpha.copy_(alpha)
        self.alpha_seen.copy_(self.alpha_eff())
        self.levels_raw.copy_(codes / g)
        if self.cfg.thresholds == "learned":
            self.thresholds_raw.copy_((codes[:, :-1] + codes[:, 1:]) / (2 * g))
        self.calibrated = True
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        """alpha in range; with pow2_scale, a step that changed by a power of two rescales the
        levels (their real values stay); levels sorted, on the grid and distinct (a collided code
        moves to the next free grid point); learned thresholds sorted, each inside
        [v_j + Delta/4, v_{j+1} - Delta/4] so every level stays reachable."""
        mmin, mmax, g = self._grid()
        self.alpha.clamp_(self.cfg.scale_range[0] * g, self.cfg.qmax_range[1])
        eff = self.alpha_eff()
        if self.cfg.pow2_scale and self.cfg.level_init != "uniform":
            ratio = (self.alpha_seen / eff)[:, None]
            self.levels_raw.mul_(ratio)
            if self.cfg.thresholds == "learned":
                self.thresholds_raw.mul_(ratio)
        self.alpha_seen.copy_(eff)
        raw = torch.sort(self.levels_raw, dim=1).values.clamp((mmin - 0.49) / g, (mmax + 0.49) / g)
        m = torch.round(raw * g)
        fixed = _distinct_torch(m, mmin, mmax)
        self.levels_raw.copy_(torch.where(fixed != m, fixed / g, raw))
        if self.cfg.thresholds == "learned":
            t = torch.sort(self.thresholds_raw, dim=1).values
            t = torch.minimum(torch.maximum(t, (fixed[:, :-1] + 0.25) / g), (fixed[:, 1:] - 0.25) / g)
            self.thresholds_raw.copy_(t)

    @torch.no_grad()
    def clip_grads_(self) -> None:
        """Clip the alpha gradient to +-Delta and the level/threshold gradients to +-1/G (one grid
        step in units of alpha), as the uniform quantizer clips to +-s (methods.md 1.1.3)."""
        if not self.cfg.grad_clip:
            return
        if self.alpha.grad is not None:
            step = self.grid_step().to(self.alpha.grad.dtype)
            torch.maximum(torch.minimum(self.alpha.grad, step), -step, out=self.alpha.grad)
        for p in (self.levels_raw, getattr(self, "thresholds_raw", None)):
            if p is not None and p.grad is not None:
                p.grad.clamp_(-1.0 / self._grid()[2], 1.0 / self._grid()[2])

    @torch.no_grad()
    def one_bit_less(self) -> list[dict[str, Tensor]]:
        """None: k is fixed per layer; flexible budgets are met by the level allocation
        (mixq.levels.allocate_levels, allocation "budget"), not by budget.enforce_budgets_."""
        return []

    def get_extra_state(self):
        return {**super().get_extra_state(), "enabled": self.enabled}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.enabled = state.get("enabled", True)

    def extra_repr(self) -> str:
        return (f"fq k={self.k}, b={self.b}, {self.cfg.granularity}, slices={self.slices}, "
                f"thresholds={self.cfg.thresholds}, packing={self.cfg.packing}"
                + ("" if self.enabled else ", disabled"))
