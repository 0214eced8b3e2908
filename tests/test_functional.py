"""mixq.functional (and the U1/U2 chains of UniformQuantizer) against the float64 references.

Library in float64 vs tests/references.py: atol 1e-12, rtol 0, for outputs and for autograd
gradients with a random upstream gradient of both signs, on inputs that contain the range edges,
exact ties, zero and values far outside the range.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import references as ref
import torch
from torch.testing import assert_close

import mixq.functional as F
from mixq import QuantizerConfig, UniformQuantizer

TIGHT = {"atol": 1e-12, "rtol": 0.0}
# (parameter shape, x shape, slice axis): per tensor (0-d and 4-d parameters), per output slice
# (S,1,1,1) and per input-channel slice (1,S,1,1).
LAYOUTS = {
    "tensor0d": ((), (2, 3, 4, 5), None),
    "tensor4d": ((1, 1, 1, 1), (2, 3, 4, 5), None),
    "slice0": ((4, 1, 1, 1), (4, 3, 4, 5), 0),
    "slice1": ((1, 4, 1, 1), (2, 4, 4, 5), 1),
}


def _params(rng: np.random.Generator, shape, signed: bool):
    """Steps (half powers of two, half arbitrary) and ranges (some integer multiples of the step,
    some not) with a few to a few hundred levels."""
    n = int(np.prod(shape)) if shape else 1
    s = np.where(np.arange(n) % 2 == 0, 2.0 ** rng.integers(-6, -1, n), rng.uniform(0.01, 0.3, n))
    levels = rng.uniform(1.0, 40.0 if signed else 80.0, n)
    levels = np.where(np.arange(n) % 3 == 0, np.round(levels), levels)
    q = s * levels
    return s.reshape(shape), q.reshape(shape)


def _slices(a: np.ndarray, axis):
    """Views of `a`, one per slice, flattened (writes go through to `a`)."""
    if axis is None:
        return [a.reshape(-1)]
    moved = np.moveaxis(a, axis, 0)
    return [moved[j].reshape(-1) for j in range(moved.shape[0])]


def _edge_values(s: float, q: float, signed: bool) -> list[float]:
    """Range edges, zero, exact ties (k + 1/2) s, just inside/outside, and far outside."""
    n = round(q / s)
    ties = [(k + 0.5) * s for k in (0, 1, n // 2, max(n - 1, 0))]
    vals = [q, 0.0, q * (1 - 1e-9), q * (1 + 1e-9), 10 * q, 1e3, *ties, 0.5 * s]
    if signed:
        vals += [-q, -10 * q, -1e3, -q * (1 + 1e-9), *(-t for t in ties)]
    else:
        vals += [-1e-3, -q, -1e3]
    return vals


def make_case(rng: np.random.Generator, layout: str, signed: bool):
    """x (float64 numpy) with every slice holding its own edge values, s, q, and g (both signs)."""
    pshape, xshape, axis = LAYOUTS[layout]
    s, q = _params(rng, pshape, signed)
    x = rng.normal(size=xshape) * np.broadcast_to(q, xshape) * 0.7
    sb, qb = np.broadcast_to(s, xshape).copy(), np.broadcast_to(q, xshape).copy()
    for xs, ss, qs in zip(_slices(x, axis), _slices(sb, axis), _slices(qb, axis), strict=True):
        edges = _edge_values(float(ss[0]), float(qs[0]), signed)
        xs[: len(edges)] = edges
    g = rng.normal(size=xshape)
    g[g == 0] = 1.0
    return x, s, q, g


def _t(a, requires_grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("signed", [True, False])
def test_forward_and_codes_match_reference(layout, signed, rng):
    x, s, q, _ = make_case(rng, layout, signed)
    out = F.fake_quant_uniform(_t(x), _t(s), _t(q), signed)
    assert_close(out, _t(ref.fake_quant(x, s, q, signed)), **TIGHT)
    code = F.quantize_uniform(_t(x), _t(s), _t(q), signed)
    assert_close(code, _t(ref.codes(x, s, q, signed)), **TIGHT)
    # the edges are really there: some elements clip on each side that exists, some sit at 0
    expected = ref.codes(x, s, q, signed)
    n = np.broadcast_to(np.round(q / s), x.shape)
    assert (expected == n).any() and (expected == 0).any()
    assert ((expected == -n).any()) == signed


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("modifier", F.MODIFIERS)
@pytest.mark.parametrize("delta", [0.0, 5e-3, 0.3])
def test_u3_gradients_match_reference(layout, signed, modifier, delta, rng):
    x, s, q, g = make_case(rng, layout, signed)
    xt, st, qt = _t(x, True), _t(s, True), _t(q, True)
    F.fake_quant_uniform(xt, st, qt, signed, modifier, delta).backward(_t(g))
    gx, gs, gq = ref.u3_grads(x, s, q, signed, g, modifier, delta)
    assert_close(xt.grad, _t(gx), **TIGHT)
    assert_close(st.grad, _t(gs), **TIGHT)
    assert_close(qt.grad, _t(gq), **TIGHT)
    assert st.grad.shape == st.shape and qt.grad.shape == qt.shape


@pytest.mark.parametrize("layout", ["tensor0d", "slice0", "slice1"])
@pytest.mark.parametrize("modifier", ["ste", "ewgs", "atanh"])
def test_lsq_grad_scale_multiplies_parameter_gradients(layout, modifier, rng):
    signed = True
    x, s, q, g = make_case(rng, layout, signed)
    n_slice = x.size // (np.size(s))
    scale = ref.lsq_grad_scale(n_slice, s, q)
    xt, st, qt = _t(x, True), _t(s, True), _t(q, True)
    F.fake_quant_uniform(xt, st, qt, signed, modifier, 0.3, _t(scale)).backward(_t(g))
    gx, gs, gq = ref.u3_grads(x, s, q, signed, g, modifier, 0.3, grad_scale=scale)
    assert_close(xt.grad, _t(gx), **TIGHT)  # the input gradient is not scaled
    assert_close(st.grad, _t(gs), **TIGHT)
    assert_close(qt.grad, _t(gq), **TIGHT)


def test_modifier_factor_matches_reference(rng):
    r = np.concatenate([rng.uniform(-0.5, 0.5, 200), [-0.5, 0.0, 0.5]])
    g = np.concatenate([rng.normal(size=200), [1.0, -1.0, 0.0]])
    for name in F.MODIFIERS:
        for delta in (0.0, 5e-3, 0.3):
            got = F.modifier_factor(_t(r), _t(g), name, delta)
            got = torch.as_tensor(got, dtype=torch.float64).expand(len(r))
            want = [ref.modifier(float(ri), float(gi), name, delta) for ri, gi in zip(r, g, strict=True)]
            assert_close(got, _t(want), **TIGHT)
    with pytest.raises(ValueError, match="ewgs"):
        F.modifier_factor(_t(r), _t(g), "ewsg", 0.1)


def _ulp32(v: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(v).astype(np.float32)).astype(np.float64)


def test_float32_atanh_within_a_few_ulp_of_float64():
    """The float32 atanh (bit operations and a series, `functional._atanh`) against numpy's float64
    arctanh on every 100th float32 in [-0.95, 0.95] (the modifier's range: alpha |r| <= 0.95), the
    reduction's branch points and zero: at most 5.1 ulp measured, asserted 6; absolute error at
    most 1.3e-7, 10x under the log1p formula it replaced (1.2e-6 at z = -0.92)."""
    bits = np.arange(0, np.float32(0.95).view(np.int32) + 1, 100, dtype=np.int32)
    z = bits.view(np.float32)
    edges = [0.95, 1 / 3, 0.171572875, 0.1716, np.sqrt(2) - 1, 1e-30, 1e-8, 2.0**-126, 0.0]
    z = np.concatenate([z, np.float32(edges)])
    z = np.concatenate([z, -z])
    got = F._atanh(torch.from_numpy(z)).double().numpy()
    want = np.arctanh(z.astype(np.float64))
    err = np.abs(got - want)
    nonzero = want != 0
    assert (err[nonzero] / _ulp32(want[nonzero])).max() <= 6.0
    assert err.max() <= 1.3e-7
    assert np.all(got[~nonzero] == 0.0) and np.all(np.sign(got) == np.sign(want))


@pytest.mark.parametrize("delta,max_ulp", [(5e-3, 0.75), (0.3, 1.25), (1.0, 2.5)])
def test_float32_atanh_factor_within_an_ulp_or_two(delta, max_ulp, rng):
    """What the modifier needs: its float32 factor 1 + delta sign(g) norm atanh(alpha r) near the
    float64 reference for r across [-1/2, 1/2]. Measured 0.51, 1.05 and 2.14 ulp for delta 5e-3,
    0.3 and 1 (the float32 products round too); the log1p formula it replaced: 0.52, 2.2, 6.3."""
    r = np.concatenate([rng.uniform(-0.5, 0.5, 200_000), [-0.5, -0.25, 0.0, 0.25, 0.5]]).astype(np.float32)
    g = np.where(rng.uniform(size=r.size) < 0.5, -1.0, 1.0).astype(np.float32)
    got = F.modifier_factor(torch.from_numpy(r), torch.from_numpy(g), "atanh", delta).double().numpy()
    want = 1.0 + delta * g * (0.5 / math.atanh(F.ATANH_ALPHA / 2)) * np.arctanh(
        np.float32(F.ATANH_ALPHA) * r.astype(np.float64))
    assert (np.abs(got - want) / _ulp32(want)).max() <= max_ulp


def test_float32_atanh_compiles_to_the_same_bits():
    """torch.compile (inductor, dynamic shapes as in mixq._kernels) gives the eager bits."""
    z = torch.linspace(-0.95, 0.95, 400_001, dtype=torch.float32)
    compiled = torch.compile(F._atanh, dynamic=True, fullgraph=True)
    assert torch.equal(compiled(z), F._atanh(z))
    assert torch.equal(compiled(z[:1001]), F._atanh(z[:1001]))  # a second, smaller size


def test_pow2_ste_forward_and_chain_rule(rng):
    s = np.concatenate([rng.uniform(1e-4, 2.0, 50), [0.25, 0.3, 2.0**-12]])
    st = _t(s, True)
    out = F.pow2_ste(st)
    assert_close(out, _t(ref.pow2(s)), **TIGHT)
    assert torch.equal(torch.log2(out), torch.round(torch.log2(out)))  # exact powers of two
    out.backward(torch.ones_like(out))
    assert_close(st.grad, _t(ref.pow2_grad(s)), **TIGHT)  # ds'/ds = s'/s


@pytest.mark.parametrize("signed", [True, False])
def test_uniform_bits_match_reference(signed, rng):
    s = 2.0 ** rng.integers(-8, 0, 300) * rng.choice([1.0, 1.3], 300)
    levels = np.concatenate([rng.integers(0, 300, 250), [0, 1, 2, 3, 4, 7, 8, 15, 16, 127, 128, 255,
                                                          256, 0.49, 0.5, 1.5, 2.5, 3.49, 6.5, 7.5]
                             + list(rng.uniform(0, 300, 30))])
    q = s * levels
    for bits_min in (1, 2, 4):
        got = F.uniform_bits(_t(s), _t(q), signed, bits_min)
        assert_close(got, _t(ref.uniform_bits(s, q, signed, bits_min)), **TIGHT)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("with_zero", [True, False])
def test_pow2_bits_match_reference(signed, with_zero, rng):
    e_lo = rng.integers(-14, 0, 200)
    qmin = 2.0 ** e_lo
    qmax = 2.0 ** (e_lo + rng.integers(0, 140, 200))
    got = F.pow2_bits(_t(qmin), _t(qmax), signed, with_zero)
    assert_close(got, _t(ref.pow2_bits(qmin, qmax, signed, with_zero, 1)), **TIGHT)
    # a span of 2^n - 1 octaves needs exactly n magnitude bits
    for n in range(0, 6):
        span = np.array([2.0 ** (2**n - 1)])
        got = F.pow2_bits(_t([1.0]), _t(span), signed, with_zero)
        assert got.item() == max(n + signed + with_zero, 1)


# --------------------------------------------------------------------------------------------
# power-of-two quantizer


def _pow2_case(rng, layout, signed, with_zero):
    pshape, xshape, axis = LAYOUTS[layout]
    n = int(np.prod(pshape)) if pshape else 1
    qmin = 2.0 ** rng.integers(-8, -4, n)
    qmax = (qmin * 2.0 ** rng.integers(0, 8, n)).reshape(pshape)
    qmin = qmin.reshape(pshape)
    x = rng.normal(size=xshape) * np.broadcast_to(qmax, xshape)
    lo_b = np.broadcast_to(qmin, xshape).copy()
    hi_b = np.broadcast_to(qmax, xshape).copy()
    for xs, lo, hi in zip(_slices(x, axis), _slices(lo_b, axis), _slices(hi_b, axis), strict=True):
        a, b = float(lo[0]), float(hi[0])
        edges = [a, b, 0.0, a / math.sqrt(2) * (1 - 1e-9), a / math.sqrt(2), a * 0.99, b * 1.01, 1e3,
                 -a, -b, -1e3, -a * 0.8]
        xs[: len(edges)] = edges
    g = rng.normal(size=xshape)
    return x, qmin, qmax, g


@pytest.mark.parametrize("layout", ["tensor0d", "slice0", "slice1"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("with_zero", [True, False])
def test_pow2_forward_and_gradients_match_reference(layout, signed, with_zero, rng):
    x, qmin, qmax, g = _pow2_case(rng, layout, signed, with_zero)
    xt, lo, hi = _t(x, True), _t(qmin, True), _t(qmax, True)
    out = F.fake_quant_pow2(xt, lo, hi, signed, with_zero)
    assert_close(out, _t(ref.pow2_quant(x, qmin, qmax, signed, with_zero)), **TIGHT)
    out.backward(_t(g))
    gx, glo, ghi = ref.pow2_grads(x, qmin, qmax, signed, with_zero, g)
    assert_close(xt.grad, _t(gx), **TIGHT)
    assert_close(lo.grad, _t(glo), **TIGHT)
    assert_close(hi.grad, _t(ghi), **TIGHT)
    if with_zero:
        assert (out.detach() == 0).any()


def _pow2_module(param, signed, with_zero, slices, bits_max=8):
    from mixq import Pow2Quantizer

    cfg = QuantizerConfig(kind="pow2", param=param, signed=signed, with_zero=with_zero,
                          granularity="channel", bits_init=4, bits_min=2, bits_max=bits_max)
    m = Pow2Quantizer(cfg, num_channels=slices).double()
    m.calibrated = True
    return m


@pytest.mark.parametrize("param", ["p1", "p2", "p3"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("with_zero", [True, False])
def test_pow2_parametrizations_chain_rule(param, signed, with_zero, rng):
    S = 4
    m = _pow2_module(param, signed, with_zero, S)
    x = rng.normal(size=(S, 3, 4, 4)) * 0.5
    x[:, 0, 0, :2] = [1e3, -1e3]
    x[:, 0, 1, :2] = [1e-7, -1e-7]
    g = rng.normal(size=x.shape)
    b = np.array([3.2, 4.0, 3.0, 4.4]) + int(with_zero) + int(signed) - 1  # integer-valued after round
    b_int = np.round(b)
    qmax_raw = np.array([0.9, 1.3, 0.6, 2.2])
    qmin_raw = np.array([2.0**-6 * 1.2, 2.0**-7, 2.0**-5 * 0.8, 2.0**-6])
    with torch.no_grad():
        if param in ("p1", "p2"):
            m.bits.copy_(_t(b))
        if param in ("p1", "p3"):
            m.qmax.copy_(_t(qmax_raw))
        if param in ("p2", "p3"):
            m.qmin.copy_(_t(qmin_raw))
    xt = _t(x, True)
    m(xt).backward(_t(g))
    col = (S, 1, 1, 1)
    if param == "p1":
        gx, gb, gp = ref.p1_grads(x, b_int.reshape(col), qmax_raw.reshape(col), signed, with_zero, g)
        assert_close(m.bits.grad, _t(gb.reshape(S)), **TIGHT)
        assert_close(m.qmax.grad, _t(gp.reshape(S)), **TIGHT)
    elif param == "p2":
        gx, gb, gp = ref.p2_grads(x, b_int.reshape(col), qmin_raw.reshape(col), signed, with_zero, g)
        assert_close(m.bits.grad, _t(gb.reshape(S)), **TIGHT)
        assert_close(m.qmin.grad, _t(gp.reshape(S)), **TIGHT)
    else:
        gx, glo, ghi = ref.p3_grads(x, qmin_raw.reshape(col), qmax_raw.reshape(col), signed,
                                    with_zero, g)
        assert_close(m.qmin.grad, _t(glo.reshape(S)), **TIGHT)
        assert_close(m.qmax.grad, _t(ghi.reshape(S)), **TIGHT)
    assert_close(xt.grad, _t(gx), **TIGHT)


# --------------------------------------------------------------------------------------------
# UniformQuantizer: U3 with pow2 step and LSQ, U1 and U2 closed forms


def _uniform_module(param, signed, pow2_scale, slices, modifier="ste", delta=0.0, lsq=False):
    cfg = QuantizerConfig(param=param, signed=signed, pow2_scale=pow2_scale, granularity="channel",
                          modifier=modifier, delta=delta, bits_init=4, bits_min=2, bits_max=8,
                          lsq_grad_scale=lsq)
    m = UniformQuantizer(cfg, num_channels=slices).double()
    m.calibrated = True
    return m


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("pow2_scale", [True, False])
@pytest.mark.parametrize("lsq", [True, False])
def test_u3_module_pow2_step_and_lsq(signed, pow2_scale, lsq, rng):
    S = 4
    m = _uniform_module("u3", signed, pow2_scale, S, "ewgs", 0.3, lsq)
    s_raw = np.array([0.07, 0.1, 2.0**-4, 0.011])
    q = np.array([0.9, 1.37, 0.5, 0.3])
    with torch.no_grad():
        m.scale.copy_(_t(s_raw))
        m.qmax.copy_(_t(q))
        m.numel.fill_(48.0)
    x, _, _, g = make_case(rng, "slice0", signed)
    xt = _t(x * 3, True)  # scaled so a part of every slice lies outside
    out = m(xt)
    s_eff = ref.pow2(s_raw) if pow2_scale else s_raw
    col = (S, 1, 1, 1)
    assert_close(out, _t(ref.fake_quant(x * 3, s_eff.reshape(col), q.reshape(col), signed)), **TIGHT)
    out.backward(_t(g))
    scale = ref.lsq_grad_scale(48.0, s_eff, q) if lsq else 1.0
    gx, gs, gq = ref.u3_grads(x * 3, s_eff.reshape(col), q.reshape(col), signed, g, "ewgs", 0.3)
    gs, gq = gs.reshape(S) * scale, gq.reshape(S) * scale
    if pow2_scale:
        gs = gs * ref.pow2_grad(s_raw)  # chain rule ds'/ds = s'/s
    assert_close(xt.grad, _t(gx), **TIGHT)
    assert_close(m.scale.grad, _t(gs), **TIGHT)
    assert_close(m.qmax.grad, _t(gq), **TIGHT)


def _u12_case(rng, signed):
    S = 5
    x = rng.normal(size=(S, 3, 4, 4))
    x[:, 0, 0, :4] = [0.0, 1e3, -1e3, 1e-3]
    g = rng.normal(size=x.shape)
    # learned bits: integers, non-integers (rounded), a tie (4.5 -> 4), and one above bits_max
    b = np.array([3.0, 4.3, 2.0, 4.5, 9.2])
    return S, x, g, b


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_u1_module_matches_closed_forms(signed, pow2_scale, rng):
    S, x, g, b = _u12_case(rng, signed)
    m = _uniform_module("u1", signed, pow2_scale, S)
    s = np.array([0.1, 0.07, 0.25, 2.0**-5, 0.003])
    with torch.no_grad():
        m.bits.copy_(_t(b))
        m.scale.copy_(_t(s))
    b_int = np.round(np.clip(b, 2, 8))
    col = (S, 1, 1, 1)
    x = x * np.array([0.5, 0.5, 0.3, 0.2, 0.4]).reshape(col)  # some of every slice outside
    xt = _t(x, True)
    out = m(xt)
    s_eff = ref.pow2(s) if pow2_scale else s
    q_eff = np.array([ref.max_code(int(v), signed) for v in b_int]) * s_eff
    assert_close(out, _t(ref.fake_quant(x, s_eff.reshape(col), q_eff.reshape(col), signed)), **TIGHT)
    out.backward(_t(g))
    gx, gb, gs = ref.u1_grads(x, b_int.reshape(col), s.reshape(col), signed, g, pow2_scale)
    gb = gb.reshape(S) * ((b >= 2) & (b <= 8))  # clip(b) passes no gradient outside its range
    assert_close(xt.grad, _t(gx), **TIGHT)
    assert_close(m.bits.grad, _t(gb), **TIGHT)
    assert_close(m.scale.grad, _t(gs.reshape(S)), **TIGHT)
    assert (gb[:4] != 0).all()  # the bits get a gradient from the clipped elements


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_u2_module_matches_closed_forms(signed, pow2_scale, rng):
    S, x, g, b = _u12_case(rng, signed)
    m = _uniform_module("u2", signed, pow2_scale, S)
    q = np.array([1.1, 0.8, 1.9, 0.6, 1.3])
    with torch.no_grad():
        m.bits.copy_(_t(b))
        m.qmax.copy_(_t(q))
    b_int = np.round(np.clip(b, 2, 8))
    col = (S, 1, 1, 1)
    xt = _t(x, True)
    out = m(xt)
    top = np.array([ref.max_code(int(v), signed) for v in b_int])
    s_eff = ref.pow2_up(q / top) if pow2_scale else q / top
    assert_close(out, _t(ref.fake_quant(x, s_eff.reshape(col), q.reshape(col), signed)), **TIGHT)
    out.backward(_t(g))
    gx, gb, gq = ref.u2_grads(x, b_int.reshape(col), q.reshape(col), signed, g, pow2_scale)
    gb = gb.reshape(S) * ((b >= 2) & (b <= 8))
    assert_close(xt.grad, _t(gx), **TIGHT)
    assert_close(m.bits.grad, _t(gb), **TIGHT)
    assert_close(m.qmax.grad, _t(gq.reshape(S)), **TIGHT)
    assert (gb[:4] != 0).all()


# --------------------------------------------------------------------------------------------
# float32 against the float64 reference


@pytest.mark.parametrize("signed", [True, False])
def test_float32_codes_differ_only_at_near_ties(signed, rng):
    S = 16
    s = np.concatenate([2.0 ** rng.integers(-8, -1, S // 2), rng.uniform(0.003, 0.3, S // 2)])
    q = s * rng.uniform(2, 120, S)
    s32, q32 = s.astype(np.float32), q.astype(np.float32)
    col = (S, 1)
    x = rng.normal(size=(S, 4000)) * q32.reshape(col) * 0.6
    # a quarter of the samples within a few float32 ulps of a tie (k + 1/2) s
    k = rng.integers(-40, 40, size=(S, 1000)) if signed else rng.integers(0, 40, size=(S, 1000))
    x[:, :1000] = (k + 0.5 + rng.uniform(-3e-7, 3e-7, size=k.shape)) * s32.reshape(col)
    x32 = x.astype(np.float32)
    got = F.quantize_uniform(torch.from_numpy(x32), torch.from_numpy(s32).reshape(col),
                             torch.from_numpy(q32).reshape(col), signed)
    assert got.dtype == torch.float32
    want = ref.codes(x32.astype(np.float64), s32.astype(np.float64).reshape(col),
                     q32.astype(np.float64).reshape(col), signed)
    diff = got.double().numpy() != want
    lo = -q32.astype(np.float64).reshape(col) if signed else 0.0
    u = np.clip(x32.astype(np.float64), lo, q32.astype(np.float64).reshape(col)) / s32.reshape(col)
    dist_to_tie = np.abs(np.abs(u - np.floor(u)) - 0.5)
    near_tie = dist_to_tie <= 4 * np.finfo(np.float32).eps * np.maximum(np.abs(u), 1.0)
    print(f"float32 codes that differ from float64 ({'signed' if signed else 'unsigned'}): "
          f"{int(diff.sum())} of {diff.size}, near-ties {int(near_tie.sum())}")
    assert not (diff & ~near_tie).any(), "float32 codes differ away from a rounding tie"
    assert (np.abs(got.double().numpy() - want) <= 1).all()
    # the fake-quantized values agree with the float64 reference up to float32 rounding, except
    # where the code moved by one step at a near-tie
    out = F.fake_quant_uniform(torch.from_numpy(x32), torch.from_numpy(s32).reshape(col),
                               torch.from_numpy(q32).reshape(col), signed).double().numpy()
    ref_out = ref.fake_quant(x32.astype(np.float64), s32.astype(np.float64).reshape(col),
                             q32.astype(np.float64).reshape(col), signed)
    ok = np.isclose(out, ref_out, rtol=2e-7, atol=0) | diff
    assert ok.all()
