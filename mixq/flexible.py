"""Flexible quantization (NUUQ, Zacchigna et al. 2024; shared/docs/nuuq.md): k levels on a b-bit
fixed-point grid, the level count decoupled from the bit width.

Per slice: clip alpha, grid step Delta = alpha / G with G = 2^(b-1) (signed) or 2^b (unsigned),
integer level codes m_1 < ... < m_k on the grid {-G .. G-1} (unsigned {0 .. G-1}), levels
v_j = m_j Delta, thresholds t_1 < ... < t_{k-1} (the midpoints of the levels, or learned reals) and

    Q(x) = v_j  for  t_{j-1} <= x < t_j      (t_0 = -inf, t_k = +inf: ties go up)

Zero need not be a level; clipping is implicit (everything past t_{k-1} maps to v_k). The plain
functions below are the calibration-time math in numpy float64: grid snapping, 1-D k-means, the
exact grid-constrained optimum by dynamic programming, MSE and the stored-bits formulas.
`mixq.flexible_quantizer.FlexibleQuantizer` is the module built on them: fake quantization with
straight-through gradients, calibration, projection and counting (docs/math.md section 8).
"""

from __future__ import annotations

import math

import numpy as np

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


def codes_per_word(k: int, word_bits: int = 8) -> int:
    """How many base-k digits fit in a word: floor(word_bits ln 2 / ln k) (5 ternary per byte)."""
    return int(math.floor(word_bits * math.log(2) / math.log(k) + 1e-12))


def base_k_bits_per_code(k: int, word_bits: int = 8) -> float:
    """Stored bits per code with base-k packing in `word_bits`-bit words (1.6 for k=3 in bytes)."""
    return word_bits / codes_per_word(k, word_bits)


def packing_used(k: int, packing: str) -> str:
    """"bits" or "base_k": what `packing` ("auto": whichever stores fewer bits) writes for k levels."""
    if packing == "auto":
        return "base_k" if base_k_bits_per_code(k) < math.ceil(math.log2(k)) else "bits"
    return packing


def stored_bits(k: int, packing: str) -> float:
    """Stored bits per code: ceil(log2 k), or 8 / floor(8 ln2 / ln k) in base k (1.6 for k = 3)."""
    return float(base_k_bits_per_code(k) if packing_used(k, packing) == "base_k" else math.ceil(math.log2(k)))


def code_bytes(n: int, k: int, packing: str) -> int:
    """Bytes of n packed codes as the export writes them (whole bytes per layer)."""
    if packing_used(k, packing) == "base_k":
        return math.ceil(n / codes_per_word(k))
    return math.ceil(n * math.ceil(math.log2(k)) / 8)
