"""Properties of UniformQuantizer and Pow2Quantizer (hypothesis), projection, gradient clipping,
calibration against the reference formulas, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import references as ref
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.testing import assert_close

from mixq import Pow2Quantizer, QuantizerConfig, UniformQuantizer

C = 6  # channels of the test tensors; groups of 2 or 3
REST = (2, 3, 3)
WEIGHT_RANGES = {"scale_range": (2.0**-12, 1.0), "qmax_range": (2.0**-8, 127.0)}
ACT_RANGES = {"scale_range": (2.0**-12, 8.0), "qmax_range": (2.0**-8, 255.0)}


# --------------------------------------------------------------------------------------------
# building blocks


@st.composite
def uniform_configs(draw, params=("u1", "u2", "u3")):
    """(config, axis) for a UniformQuantizer over C channels on axis 0 (weights) or 1 (acts)."""
    signed = draw(st.booleans())
    bits_min = draw(st.integers(2 if signed else 1, 4))
    bits_max = draw(st.integers(bits_min, 8))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    cfg = QuantizerConfig(
        param=draw(st.sampled_from(params)), signed=signed, granularity=gran,
        group_size=draw(st.sampled_from([2, 3])) if gran == "group" else 1,
        pow2_scale=draw(st.booleans()), bits_init=bits_min, bits_min=bits_min, bits_max=bits_max,
        modifier=draw(st.sampled_from(["ste", "ewgs", "atanh"])),
        **draw(st.sampled_from([WEIGHT_RANGES, ACT_RANGES])),
    )
    return cfg, draw(st.sampled_from([0, 1]))


def log_uniform(lo_exp: float, hi_exp: float):
    return st.floats(lo_exp, hi_exp).map(lambda e: 2.0**e)


any_value = st.one_of(log_uniform(-20, 10), st.floats(-1e3, 1e3), st.sampled_from([0.0, -0.0, 1e30]))


def build_uniform(cfg, axis, scale, qmax, bits, dtype=torch.float64):
    m = UniformQuantizer(cfg, num_channels=C, axis=axis).to(dtype)
    S = m.slices
    with torch.no_grad():
        if hasattr(m, "scale"):  # U2 derives its step from qmax and bits
            m.scale.copy_(torch.tensor(scale[:S], dtype=dtype))
        if hasattr(m, "qmax"):
            m.qmax.copy_(torch.tensor(qmax[:S], dtype=dtype))
        if hasattr(m, "bits"):
            m.bits.copy_(torch.tensor(bits[:S], dtype=dtype))
    m.calibrated = True
    return m


def params_lists(n=C):
    return (st.lists(log_uniform(-14, 3), min_size=n, max_size=n),
            st.lists(log_uniform(-10, 8), min_size=n, max_size=n),
            st.lists(st.floats(-1.0, 11.0), min_size=n, max_size=n))


def to_tensor(rows: torch.Tensor, m, axis: int) -> torch.Tensor:
    """The inverse of `slice_rows`: (S, N) rows back to a (C, *REST) or (REST[0], C, ...) tensor."""
    if m.slices == 1:
        return rows.reshape((C, *REST) if axis == 0 else (REST[0], C, *REST[1:]))
    return rows.reshape(C, *REST).movedim(0, axis)


def per_channel(v: torch.Tensor, m, axis: int, ndim: int = 4) -> np.ndarray:
    """A per-slice vector as a numpy array broadcastable over the channel axis, written without
    the module's own `expand` (np.repeat over consecutive channels)."""
    v = v.detach().double().numpy().reshape(-1)
    if m.slices == 1:
        return v.reshape([1] * ndim)
    shape = [1] * ndim
    shape[axis] = C
    return np.repeat(v, C // m.slices).reshape(shape)


def sample_rows(m, seed: int, step, qmax, signed: bool):
    """Rows (S, N): normal samples around each slice's range plus its edges and exact ties."""
    rng = np.random.default_rng(seed)
    S = m.slices
    n = C * int(np.prod(REST)) // S
    step = step.detach().double().numpy().reshape(S, 1)
    qmax = qmax.detach().double().numpy().reshape(S, 1)
    rows = rng.normal(size=(S, n)) * qmax * 0.8
    lo = -qmax if signed else np.zeros_like(qmax)
    k = np.round(qmax / step)
    edges = np.concatenate([qmax, lo, np.zeros_like(qmax), (k - 0.5) * step, 0.5 * step, 3 * qmax,
                            -3 * qmax], axis=1)
    rows[:, : edges.shape[1]] = edges
    return torch.tensor(rows)


# --------------------------------------------------------------------------------------------
# uniform quantizer properties


@given(uniform_configs(), *params_lists(), st.integers(0, 2**32 - 1))
def test_uniform_outputs_on_grid_and_codes_fit_bits(cfg_axis, scale, qmax, bits, seed):
    cfg, axis = cfg_axis
    m = build_uniform(cfg, axis, scale, qmax, bits)
    m.project_()
    signed = bool(cfg.signed)
    step, rng_q = m.step_and_range()
    rows = sample_rows(m, seed, step, rng_q, signed)
    x = to_tensor(rows, m, axis)
    out = m(x).detach()
    # the same values as the reference with per-channel parameters built independently
    step_c, q_c = per_channel(step, m, axis), per_channel(rng_q, m, axis)
    assert_close(out, torch.tensor(ref.fake_quant(x.numpy(), step_c, q_c, signed)), atol=0, rtol=0)
    code = m.slice_rows(out) / step.detach().reshape(-1, 1)
    assert torch.allclose(code, code.round(), atol=1e-9, rtol=0), "output off the grid"
    code = code.round()
    n = torch.round(rng_q / step).detach().reshape(-1, 1)
    assert (code <= n).all() and (code >= (-n if signed else 0)).all()
    b = m.bits_per_slice().detach().reshape(-1, 1)
    top = 2 ** (b - 1) - 1 if signed else 2**b - 1
    if not (cfg.param == "u2" and cfg.pow2_scale):  # see test_u2_pow2_scale_codes_fit_bits
        assert (code.abs() <= top).all(), "integer codes do not fit the bit width"
    assert (b >= cfg.bits_min).all() and (b <= cfg.bits_max).all()
    if cfg.param == "u3":
        want = ref.uniform_bits(step.detach().numpy(), rng_q.detach().numpy(), signed, cfg.bits_min)
    else:
        want = np.round(np.clip(m.bits.detach().numpy(), cfg.bits_min, cfg.bits_max))
    assert_close(m.bits_per_slice().detach(), torch.tensor(want), atol=0, rtol=0)


@given(uniform_configs(), *params_lists(), st.integers(0, 2**32 - 1))
def test_uniform_idempotent_monotone_and_half_step_error(cfg_axis, scale, qmax, bits, seed):
    cfg, axis = cfg_axis
    m = build_uniform(cfg, axis, scale, qmax, bits)
    m.project_()
    signed = bool(cfg.signed)
    step, rng_q = m.step_and_range()
    rows = sample_rows(m, seed, step, rng_q, signed)
    rows = rows.sort(dim=1).values
    x = to_tensor(rows, m, axis)
    with torch.no_grad():
        out = m(x)
        assert torch.equal(m(out), out), "fq(fq(x)) != fq(x)"
        out_rows = m.slice_rows(out)
    assert (out_rows.diff(dim=1) >= 0).all(), "not monotone"
    s, q = step.detach().reshape(-1, 1), rng_q.detach().reshape(-1, 1)
    lo = -q if signed else torch.zeros_like(q)
    inside = (rows >= lo) & (rows <= q)
    err = (out_rows - rows).abs()
    assert (err[inside] <= (s / 2).expand_as(rows)[inside] * (1 + 1e-12)).all()
    # outside, the output is the clipped-and-rounded edge
    n = torch.round(q / s)
    top_val = (n * s).expand_as(rows)
    assert torch.equal(out_rows[rows > q], top_val[rows > q])


@given(uniform_configs(), st.lists(any_value, min_size=C, max_size=C),
       st.lists(any_value, min_size=C, max_size=C), st.lists(st.floats(-20, 40), min_size=C, max_size=C))
def test_project_keeps_ranges_from_arbitrary_values(cfg_axis, scale, qmax, bits):
    cfg, axis = cfg_axis
    m = build_uniform(cfg, axis, scale, qmax, bits, dtype=torch.float32)
    raw = {k: v.detach().clone() for k, v in m.named_parameters()}
    m.project_()
    s_lo, s_hi = cfg.scale_range
    q_lo, q_hi = cfg.qmax_range
    signed = bool(cfg.signed)
    with torch.no_grad():
        step, rng_q = m.step_and_range()
        b = m.bits_per_slice()
    assert torch.isfinite(step).all() and torch.isfinite(rng_q).all()
    if cfg.param in ("u1", "u3"):
        assert ((m.scale >= s_lo) & (m.scale <= s_hi)).all()
    if cfg.param in ("u1", "u2"):
        assert ((m.bits >= cfg.bits_min) & (m.bits <= cfg.bits_max)).all()
    if cfg.param == "u2":
        assert ((m.qmax >= q_lo) & (m.qmax <= q_hi)).all()
    if cfg.param == "u3":
        top_max = ref.max_code(cfg.bits_max, signed)
        # math.md 6: q = clip(q, s', s' max_code(b_max)) comes last, so q may only drop below the
        # qmax range when s' max_code(b_max) itself lies below it
        assert (m.qmax <= q_hi).all()
        assert (m.qmax >= torch.clamp(step * top_max, max=q_lo)).all()
        assert (step <= m.qmax).all(), "effective step above the range"
        s_want, q_want = ref.project_u3(raw["scale"].numpy(), raw["qmax"].numpy(), cfg.scale_range,
                                        cfg.qmax_range, cfg.bits_max, signed, cfg.pow2_scale)
        assert_close(m.scale.detach(), torch.tensor(s_want, dtype=torch.float32), atol=0, rtol=0)
        assert_close(m.qmax.detach(), torch.tensor(q_want, dtype=torch.float32), atol=0, rtol=0)
    assert (b <= cfg.bits_max).all() and (b >= cfg.bits_min).all()
    # projecting again changes none of the effective quantities (the raw step may still move when
    # max_code(b_max) = 1: math.md 6 swaps on the raw s, then clips q to s' < s)
    m.project_()
    with torch.no_grad():
        assert torch.equal(m.step_and_range()[0], step) and torch.equal(m.step_and_range()[1], rng_q)
        assert torch.equal(m.bits_per_slice(), b)


def test_u2_pow2_scale_codes_fit_bits():
    # U2 rounds the derived step q / max_code(b) UP to a power of two, so the codes fit b bits
    cfg = QuantizerConfig(param="u2", granularity="tensor", signed=False, pow2_scale=True,
                          bits_init=2, bits_min=2, bits_max=2)
    m = build_uniform(cfg, 0, [1.0], [1.0], [2.0])
    # s = 1/3 -> s' = 1/2 (rounding to nearest would give 1/4 and the code 4, which needs 3 bits)
    code = m(torch.ones(3, dtype=torch.float64)) / m.step_and_range()[0].detach()
    assert (code <= ref.max_code(int(m.bits_per_slice().item()), False)).all()


def test_project_leaves_valid_parameters_alone():
    cfg = QuantizerConfig(granularity="channel", pow2_scale=True)
    m = build_uniform(cfg, 0, [2.0**-3, 2.0**-5, 2.0**-1, 2.0**-7, 2.0**-4, 2.0**-2],
                      [0.5, 0.3, 0.9, 0.05, 0.2, 3.0], [4] * C, dtype=torch.float32)
    before = m.qmax.clone(), m.scale.clone()
    m.project_()
    assert torch.equal(m.qmax, before[0]) and torch.equal(m.scale, before[1])
    # a step above the range is swapped with it, a range beyond b_max levels is cut back
    with torch.no_grad():
        m.scale[0], m.qmax[0] = 0.5, 0.125
        m.qmax[1] = 100.0
    m.project_()
    assert m.scale[0].item() == 0.125 and m.qmax[0].item() == 0.5
    assert m.qmax[1].item() == 2.0**-5 * 127


@given(uniform_configs(), *params_lists(), st.integers(0, 2**32 - 1), st.booleans())
def test_clip_grads_bounds(cfg_axis, scale, qmax, bits, seed, enabled):
    cfg, axis = cfg_axis
    cfg = cfg.replace(grad_clip=enabled)
    m = build_uniform(cfg, axis, scale, qmax, bits)
    m.project_()
    rng = np.random.default_rng(seed)
    S = m.slices
    grads = {}
    for name in ("scale", "qmax", "bits"):
        if hasattr(m, name):
            g = torch.tensor(rng.normal(size=S) * 10.0 ** rng.integers(-5, 2, S))
            getattr(m, name).grad = g.clone()
            grads[name] = g
    m.clip_grads_()
    # math.md 6: the gradients of s and q are clipped to +-s; s is the learned step for U1/U3 and
    # the derived (effective) step for U2; b is not clipped
    if cfg.param == "u2":
        b = torch.round(torch.clamp(m.bits.detach(), max(cfg.bits_min, 1 + bool(cfg.signed)), cfg.bits_max))
        step = m.qmax.detach() / (2 ** (b - 1) - 1 if cfg.signed else 2**b - 1)
        bound = torch.exp2(torch.ceil(torch.log2(step))) if cfg.pow2_scale else step
    else:
        bound = m.scale.detach()
    for name, g in grads.items():
        got = getattr(m, name).grad
        if enabled and name != "bits" and not (cfg.param == "u2" and name == "scale"):
            assert_close(got, torch.clamp(g, -bound, bound), atol=0, rtol=1e-12)
            assert (got.abs() <= bound * (1 + 1e-12)).all()
        elif name != "scale" or cfg.param != "u2":
            assert torch.equal(got, g), f"{name} gradient changed"


# --------------------------------------------------------------------------------------------
# calibration


@given(st.sampled_from(["mean3sigma", "pow2_max", "percentile", "max", "fixed"]),
       st.sampled_from(["u1", "u2", "u3"]), st.sampled_from([True, False, None]), st.booleans(),
       st.sampled_from(["tensor", "channel", "group"]), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_calibration_gives_bits_init_and_matches_reference(init, param, signed, pow2_scale, gran,
                                                           bits_init, seed):
    assume(not (signed is not False and bits_init < 2))
    cfg = QuantizerConfig(param=param, signed=signed, pow2_scale=pow2_scale, granularity=gran,
                          group_size=2 if gran == "group" else 1, init=init, bits_init=bits_init,
                          bits_min=1 if signed is False else 2, bits_max=8, **ACT_RANGES)
    m = UniformQuantizer(cfg, num_channels=C, axis=0)
    rng = np.random.default_rng(seed)
    S = m.slices
    rows = rng.normal(size=(S, 300)) * rng.uniform(0.1, 0.8, size=(S, 1)) + rng.uniform(-0.1, 0.1, (S, 1))
    if signed is False or (signed is None and rng.random() < 0.5):
        # nonnegative data (math.md 5 writes max abs(x); for x >= 0 that is max x+); for None this
        # also means "unsigned from the data"
        rows = np.abs(rows) * (rng.random(rows.shape) < 0.7)
    m.calibrate_(torch.tensor(rows))
    decided = bool((rows < 0).any()) if signed is None else signed
    assert m.signed is decided and m.calibrated
    s_want, q_want = ref.calibrate_uniform(rows, init, bits_init, decided, cfg.percentile, pow2_scale)
    assume(((s_want >= cfg.scale_range[0]) & (s_want <= cfg.scale_range[1])).all())
    assert (m.bits_per_slice() == bits_init).all(), "calibration must start at exactly bits_init"
    if param == "u3":  # calibrate_ ends with the projection of math.md 6
        s_want, q_want = ref.project_u3(s_want, q_want, cfg.scale_range, cfg.qmax_range, cfg.bits_max,
                                        decided, pow2_scale)
    if param in ("u1", "u3"):
        assert_close(m.scale.detach(), torch.tensor(s_want, dtype=torch.float32), atol=0, rtol=1e-6)
    if param in ("u2", "u3"):
        assert_close(m.qmax.detach(), torch.tensor(q_want, dtype=torch.float32), atol=0, rtol=1e-6)
    if param in ("u1", "u2"):
        assert (m.bits == bits_init).all()
        # the derived quantity: U1 q = max_code(b0) s', U2 s = q / max_code(b0) (then pow2)
        top = ref.max_code(bits_init, decided)
        step, rng_q = (v.detach().double() for v in m.step_and_range())
        if param == "u1":
            assert_close(step, torch.tensor(s_want), atol=0, rtol=1e-6)
            assert_close(rng_q, torch.tensor(s_want * top), atol=0, rtol=1e-6)
        else:
            s_u2 = ref.pow2(q_want / top) if pow2_scale else q_want / top
            assert_close(step, torch.tensor(s_u2), atol=0, rtol=1e-6)
            assert_close(step, torch.tensor(s_want), atol=0, rtol=1e-6)


@pytest.mark.parametrize("init", ["mean3sigma", "percentile", "max"])
def test_range_estimates_match_reference(init, rng):
    from mixq.quantizers import range_estimate

    rows = rng.normal(size=(5, 1001)) + rng.uniform(-1, 1, (5, 1))
    for signed in (True, False):
        got = range_estimate(torch.tensor(rows), init, 99.9, signed)
        if init == "mean3sigma":
            want = [ref.range_mean3sigma(r) for r in rows]
        elif init == "percentile":
            want = [ref.range_percentile(r, 99.9, signed) for r in rows]
        else:
            want = [ref.range_max(r if signed else np.maximum(r, 0)) for r in rows]
        assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    if init == "percentile":  # unsigned uses x+, so it differs from |x| on this data
        assert not torch.allclose(range_estimate(torch.tensor(rows), init, 99.9, True),
                                  range_estimate(torch.tensor(rows), init, 99.9, False))


def test_calibration_pow2_max_rounds_up_above_4_bits_down_otherwise():
    rows = torch.tensor([[0.0, 1.0, -2.6]], dtype=torch.float64)
    for b0, want_step in ((5, 2.0**-2), (4, 2.0**-2), (3, 2.0**-1)):
        # 2.6/15 = 0.173 -> ceil 2^-2; 2.6/7 = 0.371 -> floor 2^-2; 2.6/3 = 0.867 -> floor 2^-1
        cfg = QuantizerConfig(granularity="tensor", init="pow2_max", bits_init=b0, bits_min=2)
        m = UniformQuantizer(cfg)
        m.calibrate_(rows)
        assert m.scale.item() == want_step
        assert m.qmax.item() == want_step * (2 ** (b0 - 1) - 1)


def test_lazy_calibration_warns_and_initializes():
    m = UniformQuantizer(QuantizerConfig(granularity="tensor", signed=None, init="max"))
    with pytest.warns(UserWarning, match="calibrate_"):
        m(torch.rand(4, 3) * 2)
    assert m.calibrated and m.signed is False


# --------------------------------------------------------------------------------------------
# power-of-two quantizer


@st.composite
def pow2_configs(draw):
    signed = draw(st.booleans())
    with_zero = draw(st.booleans())
    need = int(signed) + int(with_zero)
    bits_min = draw(st.integers(max(need, 1), need + 2))
    bits_max = draw(st.integers(bits_min, need + 3))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    return QuantizerConfig(kind="pow2", param=draw(st.sampled_from(["p1", "p2", "p3"])), signed=signed,
                           with_zero=with_zero, granularity=gran,
                           group_size=3 if gran == "group" else 1, bits_init=bits_min,
                           bits_min=bits_min, bits_max=bits_max)


@given(pow2_configs(), st.lists(log_uniform(-12, 0), min_size=C, max_size=C),
       st.lists(log_uniform(-6, 6), min_size=C, max_size=C),
       st.lists(st.floats(0.0, 9.0), min_size=C, max_size=C), st.integers(0, 2**32 - 1))
def test_pow2_outputs_are_signed_powers_of_two_in_range(cfg, qmin, qmax, bits, seed):
    m = Pow2Quantizer(cfg, num_channels=C).double()
    S = m.slices
    with torch.no_grad():
        for name, vals in (("qmin", qmin), ("qmax", qmax), ("bits", bits)):
            if hasattr(m, name):
                getattr(m, name).copy_(torch.tensor(vals[:S]))
    m.calibrated = True
    m.project_()
    lo, hi = (v.detach() for v in m.min_and_max())
    assert (lo <= hi).all()
    for v in (lo, hi):
        assert torch.equal(torch.log2(v), torch.round(torch.log2(v))), "qmin/qmax not powers of two"
    rng = np.random.default_rng(seed)
    spread = 10.0 ** rng.uniform(-3, 0.5, (S, 60))  # from far below qmin to above qmax
    rows = torch.tensor(rng.normal(size=(S, 60)) * hi.numpy().reshape(S, 1) * spread)
    rows[:, :4] = torch.stack([lo, -lo, hi, torch.zeros_like(lo)], dim=1)
    x = rows.reshape(C, -1)  # slices are consecutive channels
    out = m(x).detach()
    o = m.slice_rows(out)
    mag = o.abs()
    nz = mag > 0
    assert torch.equal(torch.log2(mag[nz]), torch.round(torch.log2(mag[nz])))
    lo_b, hi_b = lo.reshape(S, 1).expand_as(mag), hi.reshape(S, 1).expand_as(mag)
    assert (mag[nz] >= lo_b[nz]).all() and (mag[nz] <= hi_b[nz]).all()
    if not cfg.with_zero:
        assert nz.all()
    if cfg.signed:
        assert (torch.sign(o[nz]) == torch.where(rows[nz] < 0, -1.0, 1.0)).all()
    else:
        assert (o >= 0).all()
    want = ref.pow2_quant(rows.numpy(), lo.numpy().reshape(S, 1), hi.numpy().reshape(S, 1),
                          bool(cfg.signed), cfg.with_zero)
    assert_close(o, torch.tensor(want), atol=0, rtol=0)
    b = m.bits_per_slice().detach()
    if cfg.param == "p3":
        want_b = ref.pow2_bits(lo.numpy(), hi.numpy(), bool(cfg.signed), cfg.with_zero, cfg.bits_min)
        assert_close(b, torch.tensor(want_b), atol=0, rtol=0)
    else:
        b_int = np.round(np.clip(m.bits.detach().numpy(), cfg.bits_min, cfg.bits_max))
        assert_close(b, torch.tensor(b_int), atol=0, rtol=0)
        span = torch.log2(hi / lo)
        assert_close(span, torch.tensor(
            [ref.pow2_span(int(v), bool(cfg.signed), cfg.with_zero) for v in b_int], dtype=span.dtype),
            atol=0, rtol=0)
    assert (b <= cfg.bits_max).all() and (b >= cfg.bits_min).all()


@pytest.mark.parametrize("param", ["p1", "p2", "p3"])
@pytest.mark.parametrize("signed,with_zero", [(True, False), (False, True), (True, True)])
def test_pow2_calibration_starts_at_bits_init(param, signed, with_zero, rng):
    cfg = QuantizerConfig(kind="pow2", param=param, signed=signed, with_zero=with_zero,
                          init="max", bits_init=4, bits_min=2, bits_max=6)
    m = Pow2Quantizer(cfg, num_channels=4)
    rows = rng.normal(size=(4, 50)) * np.array([[0.05], [0.2], [0.5], [1.0]])  # qmin, qmax in range
    if not signed:
        rows = np.abs(rows)
    m.calibrate_(torch.tensor(rows))
    lo, hi = (v.detach().double() for v in m.min_and_max())
    want_hi = ref.pow2([ref.range_max(r) for r in rows])
    assert_close(hi, torch.tensor(want_hi), atol=0, rtol=0)
    span = ref.pow2_span(4, signed, with_zero)
    assert_close(lo, torch.tensor(want_hi * 2.0**-span), atol=0, rtol=0)
    assert (m.bits_per_slice() == 4).all()


def test_pow2_clip_grads_to_qmin():
    cfg = QuantizerConfig(kind="pow2", param="p3", granularity="tensor")
    m = Pow2Quantizer(cfg)
    with torch.no_grad():
        m.qmin.fill_(2.0**-5 * 1.1)
        m.qmax.fill_(1.0)
    m.qmin.grad = torch.tensor([5.0])
    m.qmax.grad = torch.tensor([-1e-3])
    m.clip_grads_()
    assert m.qmin.grad.item() == 2.0**-5  # the effective qmin 2^round(log2 qmin), not the raw one
    assert torch.equal(m.qmax.grad, torch.tensor([-1e-3]))


# --------------------------------------------------------------------------------------------
# torch.compile: one graph (no graph break, no .item()), same values as eager


def _compile_case(lsq: bool, param: str = "u3"):
    torch.manual_seed(0)
    cfg = QuantizerConfig(param=param, granularity="channel", lsq_grad_scale=lsq)
    w = torch.randn(4, 3, 3, 3)
    eager = UniformQuantizer(cfg, num_channels=4)
    eager.calibrate_(eager.slice_rows(w))
    eager.numel.fill_(27.0)
    compiled = UniformQuantizer(cfg, num_channels=4)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled, w * 1.5


def _fwd_bwd(module, w, g):
    x = w.clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, module.scale.grad, module.qmax.grad


@pytest.mark.compile
@pytest.mark.parametrize("lsq", [False, True])
def test_compile_fullgraph_forward_backward_no_host_sync(lsq):
    """A graph break or a host sync (.item(), data-dependent Python control flow) in the forward
    or in the custom backward fails fullgraph=True. aot_eager traces forward and backward through
    dynamo/AOTAutograd without paying for code generation."""
    eager, compiled, w = _compile_case(lsq)
    g = torch.randn(w.shape)
    try:
        fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
        got = _fwd_bwd(fn, w, g)
    finally:
        torch._dynamo.reset()
    want = _fwd_bwd(eager, w, g)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, atol=0, rtol=0)


@pytest.mark.compile
def test_compile_inductor_matches_eager():
    """The real compiler (inductor) on forward + backward gives eager's values."""
    eager, compiled, w = _compile_case(True)
    g = torch.randn(w.shape)
    try:
        fn = torch.compile(compiled, fullgraph=True)
        got = _fwd_bwd(fn, w, g)
    finally:
        torch._dynamo.reset()
    want = _fwd_bwd(eager, w, g)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert math.isfinite(float(got[2].abs().sum()))
