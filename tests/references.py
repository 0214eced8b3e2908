"""Plain float64 reference implementations of docs/math.md (and methods.md 1.1, 2.1).

Written from the formulas, element by element where that is clearer, with Python floats and numpy
only: nothing here imports mixq, so a mistake in the library cannot leak into its own reference.
Conventions: `s` is the step (scale), `q` the range (qmax), `b` the bit width, `g` the upstream
gradient. Per-slice parameters are arrays that broadcast against x (shape (S,1,1,1), (1,S,1,1),
or scalars); gradients of parameters are summed back to the parameter's shape.
"""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2.0)
ATANH_ALPHA = 1.9
MODIFIERS = ("ste", "ewgs", "atanh", "psgd", "tanh", "acos")


# --------------------------------------------------------------------------------------------
# helpers


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def sum_to(a: np.ndarray, shape) -> np.ndarray:
    """Sum `a` over the axes that `shape` broadcasts (the inverse of broadcasting)."""
    shape = tuple(shape)
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead > 0 else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True).reshape(shape)


def _sign(v: float) -> float:
    return 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)


def max_code(b: int, signed: bool) -> int:
    """2^(b-1) - 1 signed (symmetric narrow grid), 2^b - 1 unsigned (math.md 2)."""
    return 2 ** (b - 1) - 1 if signed else 2**b - 1


def dmax_code_db(b: int, signed: bool) -> float:
    """d max_code / d b at integer b (straight-through round): 2^(b-1) ln2 or 2^b ln2."""
    return 2.0 ** (b - 1) * LN2 if signed else 2.0**b * LN2


def pow2(v):
    """2^round(log2 v), round half to even."""
    return np.exp2(np.round(np.log2(np.asarray(v, dtype=np.float64))))


def pow2_up(v):
    """2^ceil(log2 v): U2's power-of-two step, rounded up so that round(q / s') <= max_code(b)."""
    return np.exp2(np.ceil(np.log2(np.asarray(v, dtype=np.float64))))


def pow2_grad(v):
    """d pow2(v) / dv with a straight-through round: s'/s (math.md 2)."""
    v = np.asarray(v, dtype=np.float64)
    return pow2(v) / v


# --------------------------------------------------------------------------------------------
# uniform quantizer, forward (math.md 2)


def _fq_scalar(x: float, s: float, q: float, signed: bool) -> tuple[float, float]:
    lo = -q if signed else 0.0
    c = min(max(x, lo), q)
    code = float(round(c / s))  # Python round: half to even, like torch and numpy
    return code * s, code


def fake_quant(x, s, q, signed: bool) -> np.ndarray:
    """x_hat = s round(clip(x, lo, q) / s), lo = -q signed, 0 unsigned."""
    x, s, q = np.broadcast_arrays(*_f64(x, s, q))
    out = np.empty(x.shape)
    for i in np.ndindex(x.shape):
        out[i] = _fq_scalar(float(x[i]), float(s[i]), float(q[i]), signed)[0]
    return out


def codes(x, s, q, signed: bool) -> np.ndarray:
    """round(clip(x, lo, q) / s): integers in [-n, n] or [0, n], n = round(q / s)."""
    x, s, q = np.broadcast_arrays(*_f64(x, s, q))
    out = np.empty(x.shape)
    for i in np.ndindex(x.shape):
        out[i] = _fq_scalar(float(x[i]), float(s[i]), float(q[i]), signed)[1]
    return out


# --------------------------------------------------------------------------------------------
# rounding-gradient modifiers (math.md 3, methods.md 2.1.3)


def modifier(r: float, g: float, name: str, delta: float) -> float:
    """m(r, g): the factor on the gradient of round, r = u - round(u) in [-1/2, 1/2]."""
    sg = _sign(g)
    if name == "ste":
        return 1.0
    if name == "ewgs":
        return 1.0 + delta * sg * r
    if name == "atanh":
        return 1.0 + delta * sg * (0.5 / math.atanh(ATANH_ALPHA / 2)) * math.atanh(ATANH_ALPHA * r)
    if name == "psgd":
        return 1.0 + delta * abs(r)
    if name == "tanh":
        return 1.0 + delta * 0.5 * sg * math.tanh(4.0 * r)
    if name == "acos":
        return 1.0 + delta * 0.5 * math.sin(math.pi * r)
    raise ValueError(name)


# --------------------------------------------------------------------------------------------
# U3 gradients (math.md 2, "Backward")


def u3_grads(x, s, q, signed: bool, g, name: str = "ste", delta: float = 0.0, grad_scale=1.0):
    """(dL/dx, dL/ds, dL/dq) of L = sum(g * Q(x; s, q)); dL/ds, dL/dq summed per slice and
    multiplied by `grad_scale` (broadcast like s)."""
    x0, s0, q0, g0 = _f64(x, s, q, g)
    x, s, q, g = np.broadcast_arrays(x0, s0, q0, g0)
    gx, gs, gq = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        xi, si, qi, gi = float(x[i]), float(s[i]), float(q[i]), float(g[i])
        lo = -qi if signed else 0.0
        u = xi / si
        k = float(round(u))
        if lo <= xi <= qi:
            m = modifier(u - k, gi, name, delta)
            gx[i] = gi * m
            gs[i] = gi * (k - m * u)
        elif xi > qi:
            gq[i] = gi
        elif signed:  # below -q
            gq[i] = -gi
    scale = np.asarray(grad_scale, dtype=np.float64)
    return gx, sum_to(gs, s0.shape) * scale, sum_to(gq, q0.shape) * scale


def lsq_grad_scale(n_slice, s, q):
    """LSQ gradient scale per slice: 1 / sqrt(N_slice round(q / s))."""
    n_slice, s, q = _f64(n_slice, s, q)
    return 1.0 / np.sqrt(n_slice * np.round(q / s))


# --------------------------------------------------------------------------------------------
# U1 / U2 closed forms (methods.md 1.1.1 "For comparison", generalised to unsigned; STE)


def _outside_sign(x: float, q: float, signed: bool) -> float:
    """+1 above q, -1 below -q (signed), 0 inside or below 0 (unsigned)."""
    if x > q:
        return 1.0
    if signed and x < -q:
        return -1.0
    return 0.0


def u1_grads(x, b, s, signed: bool, g, pow2_scale: bool = False):
    """U1 (learned integer-valued b and step s; q = max_code(b) s'), STE rounding.

    inside: dQ/dx = 1, dQ/db = 0, dQ/ds' = (Q - x)/s';  outside: dQ/dx = 0,
    dQ/db = 2^(b-1) ln2 s' sign(x) (unsigned: 2^b ln2 s'), dQ/ds' = max_code(b) sign(x).
    With pow2_scale, s' = 2^round(log2 s) and dL/ds = dL/ds' s'/s. Returns (gx, gb, gs).
    """
    x0, b0, s0, g0 = _f64(x, b, s, g)
    x, b, s, g = np.broadcast_arrays(x0, b0, s0, g0)
    gx, gb, gs = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        xi, bi, si, gi = float(x[i]), int(b[i]), float(s[i]), float(g[i])
        sp = float(pow2(si)) if pow2_scale else si
        top = max_code(bi, signed)
        q = top * sp
        lo = -q if signed else 0.0
        if lo <= xi <= q:
            qx = _fq_scalar(xi, sp, q, signed)[0]
            gx[i] = gi
            gs[i] = gi * (qx - xi) / sp
        else:
            sgn = _outside_sign(xi, q, signed)
            gb[i] = gi * dmax_code_db(bi, signed) * sp * sgn
            gs[i] = gi * top * sgn
        if pow2_scale:
            gs[i] *= sp / si
    return gx, sum_to(gb, b0.shape), sum_to(gs, s0.shape)


def u2_grads(x, b, q, signed: bool, g, pow2_scale: bool = False):
    """U2 (learned integer-valued b and range q; s = q / max_code(b)), STE rounding.

    inside: dQ/dx = 1, dQ/dq = (Q - x)/q, dQ/db = -(2^(b-1) ln2 / (2^(b-1) - 1)) (Q - x)
    (unsigned: 2^b ln2 / (2^b - 1)); outside: dQ/dq = sign(x), dQ/db = 0, dQ/dx = 0.
    With pow2_scale the step is s' = pow2_up(q / max_code(b)) and the inside terms follow the chain
    rule through ds'/ds = s'/s: dQ/dq = (Q - x)/s' (s'/s) / max_code(b) and
    dQ/db = (Q - x)/s' (s'/s) (-q / max_code(b)^2) d max_code/db. Returns (gx, gb, gq).
    """
    x0, b0, q0, g0 = _f64(x, b, q, g)
    x, b, q, g = np.broadcast_arrays(x0, b0, q0, g0)
    gx, gb, gq = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        xi, bi, qi, gi = float(x[i]), int(b[i]), float(q[i]), float(g[i])
        top = max_code(bi, signed)
        lo = -qi if signed else 0.0
        if lo <= xi <= qi:
            gx[i] = gi
            if pow2_scale:
                s = qi / top
                sp = float(pow2_up(s))
                dq_dsp = (_fq_scalar(xi, sp, qi, signed)[0] - xi) / sp
                gq[i] = gi * dq_dsp * (sp / s) / top
                gb[i] = gi * dq_dsp * (sp / s) * (-qi / top**2) * dmax_code_db(bi, signed)
            else:
                qx = _fq_scalar(xi, qi / top, qi, signed)[0]
                gq[i] = gi * (qx - xi) / qi
                gb[i] = -gi * (dmax_code_db(bi, signed) / top) * (qx - xi)
        else:
            gq[i] = gi * _outside_sign(xi, qi, signed)
    return gx, sum_to(gb, b0.shape), sum_to(gq, q0.shape)


# --------------------------------------------------------------------------------------------
# bit inference (math.md 2 and 4)


def uniform_bits(s, q, signed: bool, bits_min: int) -> np.ndarray:
    """b = max(ceil(log2(round(q/s) + 1)) + signed, b_min), per element of s, q."""
    s, q = np.broadcast_arrays(*_f64(s, q))
    out = np.empty(s.shape)
    for i in np.ndindex(s.shape):
        n = round(float(q[i]) / float(s[i]))
        out[i] = max(math.ceil(math.log2(n + 1)) + int(signed), bits_min)
    return out


def pow2_bits(qmin, qmax, signed: bool, with_zero: bool, bits_min: int) -> np.ndarray:
    """P3: b = max(ceil(log2(log2(qmax/qmin) + 1)) + signed + with_zero, b_min)."""
    lo, hi = np.broadcast_arrays(*_f64(qmin, qmax))
    out = np.empty(lo.shape)
    for i in np.ndindex(lo.shape):
        e = math.log2(float(hi[i]) / float(lo[i])) + 1
        out[i] = max(math.ceil(math.log2(e)) + int(signed) + int(with_zero), bits_min)
    return out


def bits_from_codes(code_abs_max: int, signed: bool) -> int:
    """Smallest b with max_code(b) >= code_abs_max."""
    b = 1
    while max_code(b, signed) < code_abs_max:
        b += 1
    return b


# --------------------------------------------------------------------------------------------
# power-of-two quantizer (math.md 4, methods.md 1.1.2)


def _p2_scalar(x: float, qmin: float, qmax: float, signed: bool, with_zero: bool):
    """(x_hat, region, sign); region 0 zero, 1 qmin, 2 power of two, 3 qmax."""
    if signed:
        a, sg = abs(x), (-1.0 if x < 0 else 1.0)
    else:
        a, sg = max(x, 0.0), 1.0
    if with_zero and a < qmin / math.sqrt(2.0):
        return 0.0, 0, sg
    if a < qmin:
        return sg * qmin, 1, sg
    if a < qmax:
        return sg * 2.0 ** round(math.log2(a)), 2, sg
    return sg * qmax, 3, sg


def pow2_quant(x, qmin, qmax, signed: bool, with_zero: bool) -> np.ndarray:
    x, lo, hi = np.broadcast_arrays(*_f64(x, qmin, qmax))
    out = np.empty(x.shape)
    for i in np.ndindex(x.shape):
        out[i] = _p2_scalar(float(x[i]), float(lo[i]), float(hi[i]), signed, with_zero)[0]
    return out


def pow2_grads(x, qmin, qmax, signed: bool, with_zero: bool, g):
    """(dL/dx, dL/dqmin, dL/dqmax): dx = g 2^round(log2 a)/a in the middle region; dqmin = g sign
    in the qmin region; dqmax = g sign at or above qmax; nothing through masks or sign."""
    x0, lo0, hi0, g0 = _f64(x, qmin, qmax, g)
    x, lo, hi, g = np.broadcast_arrays(x0, lo0, hi0, g0)
    gx, glo, ghi = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        xi, gi = float(x[i]), float(g[i])
        val, region, sg = _p2_scalar(xi, float(lo[i]), float(hi[i]), signed, with_zero)
        if region == 2:
            gx[i] = gi * abs(val) / abs(xi)
        elif region == 1:
            glo[i] = gi * sg
        elif region == 3:
            ghi[i] = gi * sg
    return gx, sum_to(glo, lo0.shape), sum_to(ghi, hi0.shape)


def pow2_span(b: int, signed: bool, with_zero: bool) -> int:
    """log2(qmax/qmin) = 2^n - 1, n = b - signed - with_zero."""
    return 2 ** (b - int(signed) - int(with_zero)) - 1


def p1_grads(x, b, qmax_raw, signed, with_zero, g):
    """P1 (b, qmax): qmax' = pow2(qmax), qmin = qmax' 2^-(2^n - 1). Returns (gx, gb, gqmax)."""
    b = np.asarray(b, dtype=np.float64)
    hi = pow2(qmax_raw)
    n = b - int(signed) - int(with_zero)
    span = np.exp2(n) - 1
    lo = hi * np.exp2(-span)
    gx, glo, ghi = pow2_grads(x, lo, hi, signed, with_zero, g)
    g_qmax = (ghi + glo * np.exp2(-span)) * pow2_grad(qmax_raw)
    g_b = glo * lo * (-LN2) * (np.exp2(n) * LN2)
    return gx, g_b, g_qmax


def p2_grads(x, b, qmin_raw, signed, with_zero, g):
    """P2 (b, qmin): qmin' = pow2(qmin), qmax = qmin' 2^(2^n - 1). Returns (gx, gb, gqmin)."""
    b = np.asarray(b, dtype=np.float64)
    lo = pow2(qmin_raw)
    n = b - int(signed) - int(with_zero)
    span = np.exp2(n) - 1
    hi = lo * np.exp2(span)
    gx, glo, ghi = pow2_grads(x, lo, hi, signed, with_zero, g)
    g_qmin = (glo + ghi * np.exp2(span)) * pow2_grad(qmin_raw)
    g_b = ghi * hi * LN2 * (np.exp2(n) * LN2)
    return gx, g_b, g_qmin


def p3_grads(x, qmin_raw, qmax_raw, signed, with_zero, g):
    """P3 (qmin, qmax), both snapped to powers of two. Returns (gx, gqmin, gqmax)."""
    lo, hi = pow2(qmin_raw), pow2(qmax_raw)
    gx, glo, ghi = pow2_grads(x, lo, hi, signed, with_zero, g)
    return gx, glo * pow2_grad(qmin_raw), ghi * pow2_grad(qmax_raw)


# --------------------------------------------------------------------------------------------
# range estimates and calibration (math.md 5)


def range_mean3sigma(row) -> float:
    row = np.asarray(row, dtype=np.float64)
    mu, sigma = row.mean(), row.std(ddof=0)  # population sigma
    return max(abs(mu - 3 * sigma), abs(mu + 3 * sigma))


def range_percentile(row, p: float, signed: bool) -> float:
    row = np.asarray(row, dtype=np.float64)
    mags = np.abs(row) if signed else np.maximum(row, 0.0)
    return float(np.percentile(mags, p, method="linear"))


def range_max(row) -> float:
    return float(np.max(np.abs(np.asarray(row, dtype=np.float64))))


def calibrate_uniform(rows, init: str, bits_init: int, signed: bool, percentile: float = 99.9,
                      pow2_scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(s, q) per row of `rows` (S, N) at b0 = bits_init, math.md 5 (before projection)."""
    top = max_code(bits_init, signed)
    s_out, q_out = [], []
    for row in np.asarray(rows, dtype=np.float64):
        if init == "fixed":
            s = 2.0**-3
            q = s * top
        elif init == "pow2_max":
            ratio = math.log2(range_max(row) / top)
            s = 2.0 ** (math.ceil(ratio) if bits_init > 4 else math.floor(ratio))
            q = s * top
        else:
            if init == "mean3sigma":
                q = range_mean3sigma(row)
            elif init == "percentile":
                q = range_percentile(row, percentile, signed)
            else:
                q = range_max(row)
            s = q / top
        if pow2_scale:
            s = 2.0 ** round(math.log2(s))
        q = min(q, s * top)
        s_out.append(s)
        q_out.append(q)
    return np.array(s_out), np.array(q_out)


def project_u3(s, q, scale_range, qmax_range, bits_max: int, signed: bool, pow2_scale: bool):
    """math.md 6, per slice: clamp s and q to their ranges, swap where s > q, then
    q = clip(q, s', s' max_code(b_max)), s' the effective (power-of-two) step."""
    s_out, q_out = [], []
    for si, qi in zip(np.asarray(s, dtype=np.float64).reshape(-1),
                      np.asarray(q, dtype=np.float64).reshape(-1), strict=True):
        si = min(max(float(si), scale_range[0]), scale_range[1])
        qi = min(max(float(qi), qmax_range[0]), qmax_range[1])
        if si > qi:
            si, qi = qi, si
        sp = 2.0 ** round(math.log2(si)) if pow2_scale else si
        qi = min(max(qi, sp), sp * max_code(bits_max, signed))
        s_out.append(si)
        q_out.append(qi)
    return np.array(s_out), np.array(q_out)


# --------------------------------------------------------------------------------------------
# size (math.md 7)


def weight_bits(slices, bias_numels=(), bias_bits: int = 32) -> int:
    """sum over (numel, bits) slices of numel * bits, plus every bias at bias_bits."""
    return int(sum(n * b for n, b in slices) + sum(bias_numels) * bias_bits)


def act_sum_bits(sites) -> int:
    """sum over (per-sample numel, bits) sites."""
    return int(sum(n * b for n, b in sites))


def act_max_bits(sites) -> int:
    return int(max(n * b for n, b in sites))


def bn16_bits(bn_channels) -> int:
    """2 (scale, bias) x 16 bits per BatchNorm channel."""
    return int(sum(2 * c * 16 for c in bn_channels))


# --------------------------------------------------------------------------------------------
# flexible quantization, NUUQ (math.md 8, nuuq.md 2.1 and 4.1)


def fq_grid(b: int, signed: bool) -> tuple[int, int, int]:
    """(m_min, m_max, G): codes -2^(b-1)..2^(b-1)-1 (signed) or 0..2^b-1, step = alpha / G."""
    g = 2 ** (b - 1) if signed else 2**b
    return (-g if signed else 0), g - 1, g


def fq_snap(values, step: float, mmin: int, mmax: int) -> np.ndarray:
    """Nearest grid code, ties to even, clamped."""
    out = []
    for v in np.asarray(values, dtype=np.float64).ravel():
        u = v / step
        lo = math.floor(u)
        r = u - lo
        code = lo + 1 if r > 0.5 or (r == 0.5 and lo % 2 == 1) else lo
        out.append(min(max(code, mmin), mmax))
    return np.array(out, dtype=np.int64)


def fq_forward(x, levels, thresholds) -> np.ndarray:
    """Q(x) = levels[j] with j = the number of thresholds <= x (ties go to the upper level)."""
    out = np.empty(len(x))
    for i, xi in enumerate(x):
        out[i] = levels[sum(1 for t in thresholds if t <= xi)]
    return out


def fq_midpoints(levels) -> list[float]:
    return [(levels[j] + levels[j + 1]) / 2 for j in range(len(levels) - 1)]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def fq_grads(x, g, codes, alpha_raw: float, b: int, signed: bool, pow2: bool,
             thr_raw=None, temperature: float = 1.0, learn_levels: bool = True) -> dict:
    """Gradients of sum(g * Q(x)) for one slice (math.md 8): x straight-through inside
    [-a, a) ([0, a) unsigned); dL/dv_j = sum of g over the elements at level j; v_j = m_j a / G with
    m_j = round(levels_raw_j G) straight-through, so dv_j/dlevels_raw_j = a and dv_j/da = m_j / G;
    learned thresholds t_j = thr_raw_j a with the surrogate dQ/dt_j = -(v_{j+1} - v_j)
    s (1 - s) / T, s = sigmoid((x - t_j) / T), T = temperature a / G; a = 2^round(log2 alpha_raw)
    (pow2, da/dalpha_raw = a / alpha_raw) or alpha_raw. `thr_raw` sorted."""
    mmin, mmax, gg = fq_grid(b, signed)
    a = float(pow2_scalar(alpha_raw)) if pow2 else alpha_raw
    step = a / gg
    v = [m * step for m in codes]
    t = fq_midpoints(v) if thr_raw is None else [r * a for r in thr_raw]
    lo = -a if signed else 0.0
    dx, dv, dt = np.zeros(len(x)), np.zeros(len(v)), np.zeros(len(t))
    temp = temperature * step
    for i, (xi, gi) in enumerate(zip(x, g, strict=True)):
        j = sum(1 for tj in t if tj <= xi)
        dv[j] += gi
        dx[i] = gi if lo <= xi < a else 0.0
        if thr_raw is not None:
            for jj, tj in enumerate(t):
                s = _sigmoid((xi - tj) / temp)
                dt[jj] += gi * (v[jj + 1] - v[jj]) * (-s * (1 - s) / temp)
    da = sum(dv[j] * codes[j] / gg for j in range(len(v)))
    if thr_raw is not None:
        da += sum(dt[j] * thr_raw[j] for j in range(len(t)))
    out = {"x": dx, "levels_raw": dv * a if learn_levels else np.zeros(len(v)),
           "alpha": da * (a / alpha_raw if pow2 else 1.0)}
    if thr_raw is not None:
        out["thresholds_raw"] = dt * a
    return out


def pow2_scalar(v: float) -> float:
    return float(2.0 ** np.round(np.log2(v)))


def fq_mse(x, levels) -> float:
    """MSE with midpoint thresholds (nearest level)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean((fq_forward(x, levels, fq_midpoints(levels)) - x) ** 2))


def fq_brute_force_grid(x, k: int, step: float, mmin: int, mmax: int) -> float:
    """Least MSE over every set of k distinct grid codes (small grids only)."""
    import itertools

    return min(fq_mse(x, [m * step for m in c]) for c in itertools.combinations(range(mmin, mmax + 1), k))


def fq_brute_force_free(x, k: int) -> float:
    """Least MSE with k free levels: every split of the sorted values into k contiguous groups at
    their means (small samples only)."""
    import itertools

    xs = sorted(float(v) for v in x)
    n, best = len(xs), math.inf
    for cuts in itertools.combinations(range(1, n), min(k, n) - 1):
        edges = (0, *cuts, n)
        err = 0.0
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            mu = sum(xs[lo:hi]) / (hi - lo)
            err += sum((v - mu) ** 2 for v in xs[lo:hi])
        best = min(best, err / n)
    return best


def fq_lloyd_step(x, centroids) -> np.ndarray:
    """One Lloyd step of 1-D k-means: nearest centroid (ties up), then means (empty keep)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.sort(np.asarray(centroids, dtype=np.float64))
    t = fq_midpoints(list(c))
    groups = [[] for _ in c]
    for xi in x:
        groups[sum(1 for tj in t if tj <= xi)].append(xi)
    return np.array([sum(gr) / len(gr) if gr else c[j] for j, gr in enumerate(groups)])


def base_k_bits(k: int, word: int = 8) -> float:
    """Bits per code with base-k digits packed into `word`-bit words: word / floor(word log 2 / log k)."""
    per = 0
    while k ** (per + 1) <= 2**word:
        per += 1
    return word / per
