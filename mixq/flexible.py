"""Flexible quantization (NUUQ, Zacchigna et al. 2024; shared/docs/nuuq.md): k levels on a b-bit
fixed-point grid, the level count decoupled from the bit width.

Per slice: clip alpha, grid step Delta = alpha / G with G = 2^(b-1) (signed) or 2^b (unsigned),
integer level codes m_1 < ... < m_k on the grid {-G .. G-1} (unsigned {0 .. G-1}), levels
v_j = m_j Delta, thresholds t_1 < ... < t_{k-1} (the midpoints of the levels, or learned reals) and

    Q(x) = v_j  for  t_{j-1} <= x < t_j      (t_0 = -inf, t_k = +inf: ties go up)

Zero need not be a level; clipping is implicit (everything past t_{k-1} maps to v_k). The plain
functions below are the calibration-time math in numpy float64: grid snapping, 1-D k-means, the
exact grid-constrained optimum by dynamic programming, MSE and the stored-bits formulas.
`FlexibleQuantizer` is the module: fake quantization with straight-through gradients, calibration,
projection and counting (docs/math.md section 8).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from . import functional as F
from .config import QuantizerConfig
from .quantizers import SliceQuantizer

DP_MAX_BINS = 1024  # the DP is exact up to b = 9 grid bits; finer grids merge neighbouring bins
ALPHA_CANDIDATES = 6  # alpha search: a0, a0/2, ..., a0/32


# ---------------------------------------------------------------------------------------------
# grid, levels, error


def grid_codes(bits: int, signed: bool) -> tuple[int, int, int]:
    """(m_min, m_max, G) of the b-bit grid: codes m_min..m_max, step Delta = alpha / G."""
    g = 2 ** (bits - 1) if signed else 2**bits
    return (-g if signed else 0), g - 1, g


def snap(values, step: float, mmin: int, mmax: int) -> np.ndarray:
    """The grid codes nearest to `values` (round half to even), clamped to [mmin, mmax]."""
    return np.clip(np.round(np.asarray(values, dtype=np.float64) / step), mmin, mmax).astype(np.int64)


def distinct_codes(m, mmin: int, mmax: int) -> np.ndarray:
    """Sorted, strictly increasing codes in [mmin, mmax] (last axis): a repeated code moves up to
    the next free grid point; codes pushed past mmax move back down. Needs k <= mmax - mmin + 1."""
    m = np.sort(np.asarray(m, dtype=np.int64), axis=-1)
    j = np.arange(m.shape[-1])
    m = np.maximum.accumulate(m - j, axis=-1) + j
    return np.minimum(m, mmax - (m.shape[-1] - 1) + j)


def quantize_levels(x, levels, thresholds=None) -> np.ndarray:
    """Q(x) for sorted `levels`: the level of the interval [t_{j-1}, t_j) holding x, ties up;
    thresholds default to the midpoints (then Q is the nearest level)."""
    levels = np.asarray(levels, dtype=np.float64)
    t = (levels[:-1] + levels[1:]) / 2 if thresholds is None else np.asarray(thresholds, np.float64)
    return levels[np.searchsorted(t, np.asarray(x, dtype=np.float64), side="right")]


def mse(x, levels, thresholds=None) -> float:
    """Mean squared quantization error of `x` with `levels` (midpoint thresholds by default)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(np.mean((quantize_levels(x, levels, thresholds) - x) ** 2))


# ---------------------------------------------------------------------------------------------
# unconstrained 1-D k-means, and the exact optimum by dynamic programming


def _kmeanspp(xs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    c = [xs[rng.integers(xs.size)]]
    d = (xs - c[0]) ** 2
    for _ in range(1, k):
        total = d.sum()
        c.append(xs[rng.choice(xs.size, p=d / total)] if total > 0 else xs[rng.integers(xs.size)])
        d = np.minimum(d, (xs - c[-1]) ** 2)
    return np.sort(np.array(c))


def kmeans_1d(x, k: int, restarts: int = 4, iters: int = 100, seed: int = 0) -> tuple[np.ndarray, float]:
    """1-D k-means (Lloyd): one quantile initialization and `restarts - 1` k-means++ ones, the best
    by MSE. Returns (k sorted centroids, MSE). On sorted data a Lloyd step is a searchsorted of the
    k-1 midpoints and prefix sums: O(k log N). A local optimum, as every k-means."""
    xs = np.sort(np.asarray(x, dtype=np.float64).ravel())
    uniq = np.unique(xs)
    if uniq.size <= k:
        return np.concatenate([uniq, np.full(k - uniq.size, uniq[-1])]), 0.0
    p1 = np.concatenate([[0.0], np.cumsum(xs)])
    p2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    rng, best = np.random.default_rng(seed), None
    for r in range(restarts):
        c = np.quantile(xs, (np.arange(k) + 0.5) / k) if r == 0 else _kmeanspp(xs, k, rng)
        edges = None
        for _ in range(iters):
            new = np.concatenate([[0], np.searchsorted(xs, (c[:-1] + c[1:]) / 2, side="left"), [xs.size]])
            if edges is not None and np.array_equal(new, edges):
                break
            edges = new
            cnt, s = np.diff(edges), p1[edges[1:]] - p1[edges[:-1]]
            c = np.sort(np.where(cnt > 0, s / np.maximum(cnt, 1), c))
        cnt, s = np.diff(edges), p1[edges[1:]] - p1[edges[:-1]]
        err = float(np.maximum(p2[edges[1:]] - p2[edges[:-1]] - 2 * c * s + cnt * c * c, 0).sum()) / xs.size
        if best is None or err < best[1]:
            best = (c, err)
    return best


def partition_dp(cnt, s1, s2, k: int, level) -> tuple[np.ndarray, float]:
    """The best split of B ordered atoms (count, sum, sum of squares) into at most k contiguous
    groups, each group at level(its mean) (`level` is vectorized: the identity, or the nearest grid
    point). O(k B^2) with prefix sums. Returns (the groups' first atoms, total squared error)."""
    b = len(cnt)
    c, s, q = (np.concatenate([[0.0], np.cumsum(np.asarray(a, dtype=np.float64))]) for a in (cnt, s1, s2))
    n, ss, qq = c[None, :] - c[:, None], s[None, :] - s[:, None], q[None, :] - q[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = level(ss / n)  # NaN below the diagonal (n = 0): masked next
        cost = qq - 2 * v * ss + n * v * v
    cost = np.where(n > 0.5, np.maximum(cost, 0.0), np.inf)
    best, args, totals = cost[0].copy(), [], [cost[0, b]]
    for _ in range(1, min(k, b)):
        total = best[:, None] + cost
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(b + 1)]
        args.append(arg)
        totals.append(best[b])
    groups = int(np.argmin(totals))  # the fewest groups among equal errors
    starts, j = [], b
    for arg in reversed(args[:groups]):
        j = int(arg[j])
        starts.append(j)
    return np.array([0, *starts[::-1]], dtype=np.int64), float(totals[groups])


def _group_means(cnt, s1, starts) -> np.ndarray:
    ends = np.append(starts[1:], len(cnt))
    c, s = np.concatenate([[0.0], np.cumsum(cnt)]), np.concatenate([[0.0], np.cumsum(s1)])
    return (s[ends] - s[starts]) / (c[ends] - c[starts])


def optimal_levels(x, k: int) -> tuple[np.ndarray, float]:
    """The exact unconstrained optimum (k real levels, least MSE) by the DP over the sorted
    distinct values: O(k U^2), for small samples (tests, references). Returns (levels, MSE)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    uniq, inv = np.unique(x, return_inverse=True)
    cnt = np.bincount(inv).astype(np.float64)
    starts, sse = partition_dp(cnt, cnt * uniq, cnt * uniq * uniq, k, lambda m: m)
    levels = _group_means(cnt, cnt * uniq, starts)
    return np.concatenate([levels, np.full(k - levels.size, levels[-1])]), sse / x.size


def grid_dp(x, k: int, step: float, mmin: int, mmax: int, max_bins: int = DP_MAX_BINS) -> np.ndarray:
    """The k grid codes of least squared error for samples `x` (midpoint thresholds), exactly.

    With nearest-level assignment every threshold is the midpoint of two grid points, a multiple of
    Delta/2, so the groups of an optimal solution are unions of the cells between consecutive
    multiples of Delta/2 (the two outer cells extend to +-inf). The DP over those cells (their
    count, sum and sum of squares; empty cells dropped), each group at the grid point nearest its
    mean, is therefore exact. Grids with more than `max_bins` cells (b > 9) merge neighbouring
    cells, which makes it approximate. Returns k sorted distinct codes."""
    x = np.asarray(x, dtype=np.float64).ravel()
    merge = 1
    while 2 * (mmax - mmin) > max_bins * merge:
        merge *= 2
    cell = (np.clip(np.floor(x * (2.0 / step)), 2 * mmin, 2 * mmax - 1) - 2 * mmin).astype(np.int64) // merge
    cnt, s1, s2 = np.bincount(cell), np.bincount(cell, x), np.bincount(cell, x * x)
    keep = cnt > 0
    cnt, s1, s2 = cnt[keep].astype(np.float64), s1[keep], s2[keep]
    starts, _ = partition_dp(cnt, s1, s2, k, lambda m: np.clip(np.round(m / step), mmin, mmax) * step)
    codes = snap(_group_means(cnt, s1, starts), step, mmin, mmax)
    return distinct_codes(np.concatenate([codes, np.full(k - codes.size, codes[-1])]), mmin, mmax)


def kmeans_codes(x, k: int, step: float, mmin: int, mmax: int, seed: int = 0) -> np.ndarray:
    """The paper's way: k-means on the clipped samples, centroids snapped to the grid, duplicates
    moved to free grid points (nuuq.md 2.2). Returns k sorted distinct codes."""
    x = np.clip(np.asarray(x, dtype=np.float64), mmin * step, mmax * step)
    centroids, _ = kmeans_1d(x, k, seed=seed)
    return distinct_codes(snap(centroids, step, mmin, mmax), mmin, mmax)


def uniform_codes(k: int, mmin: int, mmax: int) -> np.ndarray:
    """A uniform block of k consecutive codes around zero: -(k//2) .. k - k//2 - 1 (signed; k = 3
    is the symmetric {-1, 0, 1}, k = 2^b the whole grid), 0 .. k-1 unsigned."""
    start = max(-(k // 2), mmin)
    return np.arange(start, start + k, dtype=np.int64)


def fit_levels(x, k: int, bits: int, signed: bool, init: str = "dp", pow2: bool = True,
               alphas: int = ALPHA_CANDIDATES, seed: int = 0) -> tuple[float, np.ndarray, float]:
    """Clip alpha and k level codes for the samples `x` of one slice, by least squared error.

    alpha candidates: a0 = the largest magnitude (of x+ when unsigned) rounded up to a power of two
    (pow2; otherwise scaled so that it is the top grid point), then a0/2, ..., a0/2^(alphas-1)
    until one is worse than the best so far (the error is unimodal in alpha in practice; ties go on,
    the larger alpha kept); levels by
    `init` (dp | kmeans | uniform) for each. Returns (alpha, codes, squared error)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    mmin, mmax, g = grid_codes(bits, signed)
    top = max(float(np.abs(x).max() if signed else x.max(initial=0.0)), 2.0**-20)
    a0 = 2.0 ** math.ceil(math.log2(top)) if pow2 else top * g / max(mmax, 1)
    best = None
    for i in range(alphas):
        alpha = a0 / 2**i
        step = alpha / g
        if init == "dp":
            codes = grid_dp(x, k, step, mmin, mmax)
        elif init == "kmeans":
            codes = kmeans_codes(x, k, step, mmin, mmax, seed=seed)
        else:
            codes = uniform_codes(k, mmin, mmax)
        sse = float(((quantize_levels(x, codes * step) - x) ** 2).sum())
        if best is not None and sse > best[2]:
            break
        if best is None or sse < best[2]:
            best = (alpha, codes, sse)
    return best


# ---------------------------------------------------------------------------------------------
# storage


def equivalent_bits(k: int) -> float:
    """The paper's bits per weight: log2 k (1.58 for k = 3)."""
    return math.log2(k)


def packing_used(k: int, packing: str) -> str:
    """"bits" or "base_k": what `packing` ("auto": whichever stores fewer bits) writes for k levels."""
    from .export.pack import base_k_bits_per_code

    if packing == "auto":
        return "base_k" if base_k_bits_per_code(k) < math.ceil(math.log2(k)) else "bits"
    return packing


def stored_bits(k: int, packing: str) -> float:
    """Stored bits per code: ceil(log2 k), or 8 / floor(8 ln2 / ln k) in base k (1.6 for k = 3)."""
    from .export.pack import base_k_bits_per_code

    return float(base_k_bits_per_code(k) if packing_used(k, packing) == "base_k" else math.ceil(math.log2(k)))


def code_bytes(n: int, k: int, packing: str) -> int:
    """Bytes of n packed codes as the export writes them (whole bytes per layer)."""
    from .export.pack import codes_per_word

    if packing_used(k, packing) == "base_k":
        return math.ceil(n / codes_per_word(k))
    return math.ceil(n * math.ceil(math.log2(k)) / 8)


# ---------------------------------------------------------------------------------------------
# the module


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
