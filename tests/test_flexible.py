"""Flexible quantization (NUUQ): the quantizer against float64 references (forward, gradients),
grid snapping, k-means, the exact DP against brute force, the invariants of nuuq.md 4.1
(hypothesis), storage formulas, level allocations, export parity and a small end-to-end PTQ."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import references as ref
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import mixq.flexible as fx
import mixq.flexible_quantizer as fxq
from mixq import QuantConfig, QuantizerConfig, UniformQuantizer, fold_bn_, prepare_
from mixq.config import default_act_config
from mixq.levels import (
    FlexibleOptions,
    allocate_levels,
    budget_allocation,
    candidate_levels,
    flexible_options,
)
from mixq.loader import DeviceLoader
from mixq.nuuq import calibrate_acts_, ptq_sequential, storage_report
from mixq.quantizers import make_quantizer
from mixq.train import evaluate

FIXTURE = Path(__file__).parent / "fixtures" / "fmnist_small.npz"
MEAN, STD = (0.286,), (0.353,)


@pytest.fixture(autouse=True)
def _small_and_plain():
    """One thread (these tensors are small: on a shared 2-core machine a second thread mostly waits)
    and no compiled uniform kernels (their first compile takes ~30 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from mixq._kernels import fast_kernels
    except ImportError:
        yield
    else:
        with fast_kernels(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)


def flex_cfg(**kw) -> QuantizerConfig:
    b = kw.pop("bits", 4)
    return QuantizerConfig(kind="flexible", bits_init=b, bits_min=1, bits_max=max(b, 1), **kw)


def build(codes, alpha, b, signed=True, thresholds="midpoint", thr_raw=None, pow2=True, level_init="dp"):
    """A one-slice float64 FlexibleQuantizer with the given integer codes and raw alpha."""
    k = len(codes)
    q = make_quantizer(flex_cfg(bits=b, levels=k, signed=signed, granularity="tensor", thresholds=thresholds,
                                pow2_scale=pow2, level_init=level_init)).double()
    g = fx.grid_codes(b, signed)[2]
    with torch.no_grad():
        q.alpha.fill_(alpha)
        q.levels_raw.copy_(torch.tensor([codes], dtype=torch.float64) / g)
        if thr_raw is not None:
            q.thresholds_raw.copy_(torch.tensor([thr_raw], dtype=torch.float64))
    q.calibrated = True
    return q


@st.composite
def grid_levels(draw, max_bits=5):
    """(b, signed, sorted distinct codes) with 2 <= k <= 2^b."""
    b = draw(st.integers(1, max_bits))
    signed = draw(st.booleans())
    mmin, mmax, _ = fx.grid_codes(b, signed)
    k = draw(st.integers(2, 2**b))
    codes = sorted(draw(st.lists(st.integers(mmin, mmax), min_size=k, max_size=k, unique=True)))
    return b, signed, codes


values = st.lists(st.floats(-8, 8, allow_nan=False), min_size=1, max_size=40)


# --------------------------------------------------------------------------------------------
# the quantizer against the references


@given(grid_levels(), st.floats(0.05, 6.0), values)
def test_forward_matches_reference_and_outputs_are_grid_levels(spec, alpha, xs):
    b, signed, codes = spec
    q = build(codes, alpha, b, signed)
    x = torch.tensor(xs, dtype=torch.float64)
    out = q(x).detach().numpy()
    step = ref.pow2_scalar(alpha) / ref.fq_grid(b, signed)[2]
    levels = [m * step for m in codes]
    expect = ref.fq_forward(xs, levels, ref.fq_midpoints(levels))
    assert np.array_equal(out, expect)  # invariant 1: every output is one of the k levels
    on_grid = out / step  # invariant 2: on the grid, within [m_min, m_max]
    assert np.array_equal(on_grid, np.round(on_grid))
    mmin, mmax, _ = ref.fq_grid(b, signed)
    assert on_grid.min() >= mmin and on_grid.max() <= mmax
    # invariant 5: nearest level in midpoint mode
    dist = np.abs(np.array(levels)[None, :] - np.array(xs)[:, None]).min(axis=1)
    assert np.all(np.abs(out - np.array(xs)) <= dist + 1e-12)


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("learned", [False, True])
def test_gradients_match_reference(pow2, signed, learned, rng):
    b, codes = 4, ([-7, -2, 1, 5] if signed else [0, 3, 7, 12])
    alpha = 1.37
    a = ref.pow2_scalar(alpha) if pow2 else alpha
    thr = None
    if learned:
        g = ref.fq_grid(b, signed)[2]
        thr = [(codes[j] + codes[j + 1]) / (2 * g) + 0.3 / g * (-1) ** j for j in range(3)]
    q = build(codes, alpha, b, signed, "learned" if learned else "midpoint", thr, pow2)
    q.temperature = 0.7
    x_np = rng.uniform(-1.3 * a, 1.3 * a, size=200)
    g_np = rng.normal(size=200)
    x = torch.tensor(x_np, requires_grad=True)
    (q(x) * torch.tensor(g_np)).sum().backward()
    expect = ref.fq_grads(x_np, g_np, codes, alpha, b, signed, pow2, thr, 0.7)
    assert_close(x.grad.numpy(), expect["x"], rtol=0, atol=0)
    assert_close(q.levels_raw.grad[0].numpy(), expect["levels_raw"], rtol=1e-12, atol=1e-12)
    assert_close(float(q.alpha.grad[0]), float(expect["alpha"]), rtol=1e-12, atol=1e-12)
    if learned:
        assert_close(q.thresholds_raw.grad[0].numpy(), expect["thresholds_raw"], rtol=1e-10, atol=1e-12)


def test_uniform_levels_get_no_level_gradient():
    q = build([-1, 0, 1], 1.0, 2, level_init="uniform")
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    q(x).sum().backward()
    assert q.levels_raw.grad is None and q.alpha.grad is not None


@given(st.integers(1, 6), st.booleans(), st.integers(-6, 2),
       st.lists(st.floats(-40, 40), min_size=1, max_size=50))
def test_k_equal_2_to_b_uniform_levels_equal_the_uniform_quantizer(b, signed, exp, xs):
    """Invariant 4: unsigned k = 2^b (the whole grid) and signed k = 2^b - 1 (the symmetric narrow
    grid the UniformQuantizer uses) with midpoints are the uniform quantizer, bit for bit, away from
    exact ties (where round-half-even and 'ties go up' differ by construction)."""
    assume(signed or b >= 1)
    assume(not signed or b >= 2)
    step = 2.0**exp
    assume(all(abs(v / step - math.floor(v / step) - 0.5) > 1e-9 for v in xs))
    mmin, mmax, g = fx.grid_codes(b, signed)
    codes = list(range(-(2 ** (b - 1) - 1), 2 ** (b - 1))) if signed else list(range(2**b))
    f = build(codes, step * g, b, signed, level_init="uniform")
    cfg = QuantizerConfig(signed=signed, granularity="tensor", bits_init=b, bits_min=1, bits_max=max(b, 2),
                          scale_range=(2.0**-12, 8.0), qmax_range=(2.0**-12, 255.0))
    u = UniformQuantizer(cfg).double()
    with torch.no_grad():
        u.scale.fill_(step)
        u.qmax.fill_(step * (2 ** (b - 1) - 1 if signed else 2**b - 1))
    u.calibrated = True
    x = torch.tensor(xs, dtype=torch.float64)
    assert torch.equal(f(x), u(x))


def test_grid_snapping_matches_reference(rng):
    for b, signed in ((3, True), (4, False), (8, True)):
        mmin, mmax, g = fx.grid_codes(b, signed)
        assert (mmin, mmax, g) == ref.fq_grid(b, signed)
        v = np.concatenate([rng.normal(size=200) * 2, np.arange(-10, 10) * 0.125 + 0.0625])
        assert np.array_equal(fx.snap(v, 0.125, mmin, mmax), ref.fq_snap(v, 0.125, mmin, mmax))


@given(st.lists(st.integers(-9, 9), min_size=2, max_size=8), st.integers(3, 5))
def test_distinct_codes_sorted_distinct_in_range(codes, b):
    mmin, mmax, _ = fx.grid_codes(b, True)
    m = fx.distinct_codes(np.clip(codes, mmin, mmax), mmin, mmax)
    assert np.all(np.diff(m) > 0) and m.min() >= mmin and m.max() <= mmax
    t = fxq._distinct_torch(torch.tensor(np.clip(codes, mmin, mmax), dtype=torch.float64), mmin, mmax)
    assert np.array_equal(t.numpy(), m)


# --------------------------------------------------------------------------------------------
# level selection: k-means, DP, invariant 6


@given(st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=14), st.integers(1, 3),
       st.booleans(), st.integers(-2, 0), st.data())
def test_grid_dp_is_optimal_against_brute_force(xs, b, signed, exp, data):
    mmin, mmax, _ = fx.grid_codes(b, signed)
    k = data.draw(st.integers(2, 2**b))
    step = 2.0**exp
    codes = fx.grid_dp(np.array(xs), k, step, mmin, mmax)
    assert len(codes) == k and np.all(np.diff(codes) > 0) and mmin <= codes.min() and codes.max() <= mmax
    best = ref.fq_brute_force_grid(xs, k, step, mmin, mmax)
    assert ref.fq_mse(xs, [m * step for m in codes]) <= best * (1 + 1e-12) + 1e-14


@given(st.lists(st.floats(-4, 4, allow_nan=False), min_size=2, max_size=10), st.integers(2, 4))
def test_unconstrained_optimum_against_brute_force(xs, k):
    levels, err = fx.optimal_levels(np.array(xs), k)
    best = ref.fq_brute_force_free(xs, k)
    assert err == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert ref.fq_mse(xs, sorted(levels)) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_kmeans_is_a_lloyd_fixed_point_and_beats_its_quantile_start(rng):
    x = np.concatenate([rng.normal(-1, 0.3, 300), rng.normal(1.5, 0.5, 500)])
    for k in (2, 3, 5):
        c, err = fx.kmeans_1d(x, k)
        assert_close(ref.fq_lloyd_step(x, c), c, rtol=1e-12, atol=1e-12)
        assert err == pytest.approx(ref.fq_mse(x, list(c)), rel=1e-9)
        start = np.quantile(x, (np.arange(k) + 0.5) / k)
        for _ in range(100):
            start = ref.fq_lloyd_step(x, start)
        assert err <= ref.fq_mse(x, list(start)) * (1 + 1e-12)


def test_constrained_mse_at_least_unconstrained_and_approaches_it(rng):
    """Invariant 6 (nuuq.md 1.4: 1.58 / 1.065 / 1.004 at b = 3 / 5 / 7 for its sample)."""
    x = np.concatenate([rng.normal(-1.2, 0.35, 60), rng.normal(0.9, 0.5, 90)])
    k = 5
    _, free = fx.optimal_levels(x, k)
    ratios = []
    for b in range(3, 9):
        mmin, mmax, g = fx.grid_codes(b, True)
        alpha = 4.0
        codes = fx.grid_dp(x, k, alpha / g, mmin, mmax)
        err = ref.fq_mse(x, list(codes * alpha / g))
        assert err >= free * (1 - 1e-12)
        snapped = fx.kmeans_codes(x, k, alpha / g, mmin, mmax)
        assert err <= ref.fq_mse(x, list(snapped * alpha / g)) * (1 + 1e-12)  # the DP dominates
        ratios.append(err / free)
    assert all(a >= b - 1e-12 for a, b in zip(ratios, ratios[1:], strict=False))  # finer grids nest
    assert ratios[0] > 1.01 and ratios[-1] < 1.005


def test_calibration_fits_every_slice_and_projection_keeps_levels_valid(gen):
    scales = torch.linspace(0.1, 2, 6, dtype=torch.float64)[:, None, None, None]
    w = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64) * scales
    for init in ("dp", "kmeans", "uniform"):
        q = make_quantizer(flex_cfg(bits=4, levels=3, level_init=init)).double()
        q.calibrate_(q.slice_rows(w))
        m = q.codes().detach()
        assert torch.all(m[:, 1:] > m[:, :-1]) and torch.equal(m, torch.round(m))
        alpha = q.alpha_eff().detach()
        assert torch.equal(alpha, torch.exp2(torch.round(torch.log2(alpha))))
    with torch.no_grad():  # collisions and disorder after an optimizer step are repaired
        q = make_quantizer(flex_cfg(bits=3, levels=4, thresholds="learned")).double()
        q.calibrate_(q.slice_rows(w))
        q.levels_raw[:, 1] = q.levels_raw[:, 0]
        q.levels_raw[:, 3] = 5.0
        q.thresholds_raw.copy_(torch.randn(q.thresholds_raw.shape, generator=gen))
        q.project_()
    m = q.codes()
    assert torch.all(m[:, 1:] > m[:, :-1]) and m.max() <= 3 and m.min() >= -4
    t = q.thresholds().detach()  # invariant 3: strictly increasing, every level reachable
    v = q.levels().detach()
    assert torch.all(t[:, 1:] > t[:, :-1]) and torch.all(t > v[:, :-1]) and torch.all(t < v[:, 1:])


def test_pow2_step_change_keeps_the_real_levels():
    q = build([-6, -1, 2, 7], 2.0, 4)
    q.alpha_seen.fill_(2.0)
    before = q.levels().detach().clone()
    with torch.no_grad():
        q.alpha.fill_(4.1)  # the effective alpha doubles
        q.project_()
    assert torch.allclose(q.levels().detach(), before, atol=float(q.grid_step()))


# --------------------------------------------------------------------------------------------
# storage, config, allocations


def test_storage_formulas():
    assert fx.stored_bits(3, "base_k") == ref.base_k_bits(3) == 1.6
    assert [fx.stored_bits(k, "bits") for k in (2, 3, 4, 5, 8, 9, 16)] == [1, 2, 2, 3, 3, 4, 4]
    for k in range(2, 17):
        assert fx.stored_bits(k, "base_k") == pytest.approx(ref.base_k_bits(k))
        assert fx.stored_bits(k, "auto") == min(math.ceil(math.log2(k)), ref.base_k_bits(k))
        assert fx.equivalent_bits(k) == pytest.approx(math.log2(k))
    assert fx.code_bytes(1000, 3, "base_k") == 200 and fx.code_bytes(1001, 3, "base_k") == 201
    assert fx.code_bytes(1000, 3, "bits") == 250 and fx.code_bytes(1000, 8, "auto") == 375
    q = make_quantizer(flex_cfg(bits=8, levels=3, packing="base_k", granularity="channel"), 4)
    q.numel.fill_(10)
    assert float(q.size_bits()) == pytest.approx(4 * 10 * 1.6)
    assert torch.all(q.overhead_bits() == 3 * 8 + 8) and torch.all(q.equivalent_bits() == math.log2(3))
    assert q.one_bit_less() == []


def test_config_validation():
    assert QuantizerConfig(kind="flexible").param == "fq"
    with pytest.raises(ValueError, match=r"levels \(k\) must be an integer in \[2, 2\^bits_init\] = \[2, 8\]"
                       ):
        QuantizerConfig(kind="flexible", bits_init=3, levels=9)
    with pytest.raises(ValueError, match="did you mean 'midpoint'"):
        QuantizerConfig(kind="flexible", thresholds="midpiont")
    with pytest.raises(ValueError, match="did you mean 'base_k'"):
        QuantizerConfig(kind="flexible", packing="basek")
    with pytest.raises(ValueError, match="did you mean 'grid_bits'"):
        flexible_options({"grid_bit": 4})
    with pytest.raises(ValueError, match="flexible.k must be an int in"):
        flexible_options({"k": 20, "grid_bits": 4})
    with pytest.raises(ValueError, match="weight_budget"):
        flexible_options({"allocation": "budget"})
    with pytest.raises(ValueError, match=r"finetune_max_drop must be a fraction in \[0, 1\].*got 5"):
        flexible_options({"finetune_max_drop": 5})


SIZES = {"a": 144, "b": 2304, "c": 6912, "d": 27648, "e": 73728, "f": 147456, "g": 1280}


def test_allocations():
    opts = FlexibleOptions(k=4, grid_bits=4)
    assert set(allocate_levels(SIZES, opts).values()) == {4}
    edges = allocate_levels(SIZES, FlexibleOptions(k=4, grid_bits=4, allocation="edges_double"))
    assert [edges[f] for f in SIZES] == [8, 8, 8, 4, 8, 8, 8]
    inv = allocate_levels(SIZES, FlexibleOptions(k=4, grid_bits=8, allocation="inverse_size"))
    order = sorted(SIZES, key=SIZES.get)
    assert all(inv[a] >= inv[b] for a, b in zip(order, order[1:], strict=False))  # monotone in size
    total = sum(SIZES[f] * math.log2(inv[f]) for f in SIZES)
    assert total <= sum(SIZES.values()) * 2 + 1e-6 and max(inv.values()) <= 16 and min(inv.values()) >= 2


def test_budget_allocation_meets_the_budget_and_beats_uniform():
    rng = np.random.default_rng(0)
    sens = {f: float(rng.uniform(0.1, 10)) for f in SIZES}
    losses = {f: {k: sens[f] * n / k**2 for k in candidate_levels(n, 16, "auto")} for f, n in SIZES.items()}
    bias = dict.fromkeys(SIZES, 64.0)
    for budget in (40_000.0, 70_000.0, 120_000.0):
        alloc = budget_allocation(SIZES, losses, budget, "auto", bias)
        used = sum(fx.code_bytes(n, alloc[f], "auto") for f, n in SIZES.items()) + sum(bias.values())
        assert used <= budget
    uniform_bytes = sum(fx.code_bytes(n, 4, "auto") for n in SIZES.values()) + sum(bias.values())
    alloc = budget_allocation(SIZES, losses, uniform_bytes, "auto", bias)
    assert sum(losses[f][alloc[f]] for f in SIZES) <= sum(losses[f][4] for f in SIZES)
    with pytest.raises(ValueError, match="below the smallest size"):
        budget_allocation(SIZES, losses, 1000.0, "auto", bias)


# --------------------------------------------------------------------------------------------
# models: export parity, end-to-end PTQ


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def fixture_loaders():
    d = np.load(FIXTURE)
    train = DeviceLoader(torch.tensor(d["train_x"]), torch.tensor(d["train_y"]), MEAN, STD, batch_size=50,
                         shuffle=True, augment=False, drop_last=True, seed=0)
    test = DeviceLoader(torch.tensor(d["test_x"]), torch.tensor(d["test_y"]), MEAN, STD, batch_size=250)
    return train, test


def quantize(model, loader, levels=4, bits=4, packing="bits", granularity="channel"):
    model.eval()
    fold_bn_(model)
    act = default_act_config().replace(bits_init=8, bits_min=8, bits_max=8)
    w = flex_cfg(bits=bits, levels=levels, granularity=granularity, packing=packing)
    prepare_(model, QuantConfig(weight=w, act=act), example_input=next(iter(loader))[0][:2])
    calibrate_acts_(model, loader)
    return model


@pytest.mark.parametrize(("levels", "bits", "packing", "granularity"),
                         [(4, 4, "bits", "channel"), (3, 8, "base_k", "tensor"), (5, 3, "auto", "channel")])
def test_export_parity_exact_logits(levels, bits, packing, granularity):
    from mixq.export import IntModel, export

    _, test = fixture_loaders()
    model = quantize(small_cnn(), test, levels, bits, packing, granularity)
    int_model = export(model, (1, 28, 28), normalize=test.normalize)
    x8 = test.x[:100]
    with torch.no_grad():
        ref_logits = model.double()(test.normalize(x8).double()).numpy()
    model.float()
    for m in (int_model, IntModel(int_model.manifest, int_model.tensors)):
        out = m.run(x8.numpy()).to_float()
        assert np.array_equal(out, ref_logits)  # exact, not within a step
    first = int_model.manifest["layers"]["0"]
    assert first["codebook"] and first["levels"] == levels
    assert first["packing"] == fx.packing_used(levels, packing)
    assert int_model.tensors["0.codebook"].dtype == np.int16
    assert first["code_bytes"] == fx.code_bytes(8 * 9, levels, packing)


def test_end_to_end_ptq_with_fine_tuning_on_real_data():
    from mixq.nuuq import _Hooks
    from mixq.recipe import PhaseConfig
    from mixq.train import PhaseProgress, PhaseRunner, StopFlag

    train, test = fixture_loaders()
    model = small_cnn()
    phase = PhaseConfig(epochs=6, lr=0.1, schedule="onecycle", label_smoothing=0.0)
    hooks = _Hooks(lambda: evaluate(model, test))
    PhaseRunner(model, phase, 0, train, hooks, StopFlag()).run(PhaseProgress())
    float_acc = evaluate(model, test)["acc"]
    assert float_acc > 0.6
    quantize(model, train, levels=3, bits=4)
    no_ft = evaluate(model, test, dtype=torch.float64)["acc"]
    rows = ptq_sequential(model, train, test, FlexibleOptions(k=3, grid_bits=4, finetune_epochs=0.5))
    ft = evaluate(model, test, dtype=torch.float64)["acc"]
    assert [r["layer"] for r in rows] == ["0", "4", "8", "12"] and all("val_acc_after_ft" in r for r in rows)
    assert ft > 0.5 and ft >= no_ft - 0.05
    rep = storage_report(model)
    assert rep["equivalent_bits"] == pytest.approx(math.log2(3)) and rep["stored_bits"] == 2
    assert rep["stored_bits_base_k"] == 1.6 and {r["fqn"] for r in rep["layers"]} == {"0", "4", "8", "12"}


def test_acts_only_accuracy_passes_the_weights_through_and_restores_them():
    from mixq.convert import quant_sites
    from mixq.nuuq import acts_only_accuracy

    train, test = fixture_loaders()
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # a little training: predictions that depend on the input
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    float_model = copy.deepcopy(model)
    model = quantize(model, train, levels=2, bits=4)  # two levels: the weights change a lot
    weights = [s.quant for s in quant_sites(model) if s.role == "weight"]
    weights[1].enabled = False  # a layer left float stays float afterwards
    quantized = evaluate(model, test, dtype=torch.float64)
    acts_only = acts_only_accuracy(model, test)
    assert [q.enabled for q in weights] == [True, False, True, True]
    assert evaluate(model, test, dtype=torch.float64)["loss"] == quantized["loss"]
    for q in weights:
        q.enabled = False
    reference = evaluate(model, test, dtype=torch.float64)  # float weights, quantized activations
    assert acts_only == reference["acc"]
    assert not reference["predictions"].equal(quantized["predictions"])
    # and the activations were quantized in it: the float model's loss differs
    assert evaluate(float_model, test, dtype=torch.float64)["loss"] != reference["loss"]


def test_fine_tuning_that_hurts_is_undone():
    """A learning rate far too high wrecks every layer's fine-tuning: each is undone, and the model
    ends exactly where quantization without fine-tuning left it."""
    from mixq.nuuq import _Hooks
    from mixq.recipe import PhaseConfig
    from mixq.train import PhaseProgress, PhaseRunner, StopFlag

    train, test = fixture_loaders()
    model = small_cnn()
    phase = PhaseConfig(epochs=3, lr=0.1, schedule="onecycle", label_smoothing=0.0)
    hooks = _Hooks(lambda: evaluate(model, test))
    PhaseRunner(model, phase, 0, train, hooks, StopFlag()).run(PhaseProgress())
    quantize(model, train, levels=3, bits=4)
    opts = FlexibleOptions(k=3, grid_bits=4, finetune_epochs=0.2, finetune_lr=1e3)
    no_ft = evaluate(model, test)
    rows = ptq_sequential(model, train, test, opts)
    assert len(rows) == 4
    assert all(r["reverted"] and not r["val_acc_after_ft"] >= r["val_acc_before_ft"] - opts.finetune_max_drop
               for r in rows)
    final = evaluate(model, test)  # the same weights and quantizers: the same predictions
    assert final["acc"] == no_ft["acc"] and torch.equal(final["predictions"], no_ft["predictions"])


def test_qat_learns_levels_and_thresholds_and_keeps_them_valid():
    from mixq.nuuq import _Hooks, run_phase
    from mixq.recipe import PhaseConfig

    train, test = fixture_loaders()
    model = small_cnn()
    model.eval()
    fold_bn_(model)
    act = default_act_config().replace(bits_init=8, bits_min=8, bits_max=8)
    w = flex_cfg(bits=4, levels=3, thresholds="learned")
    prepare_(model, QuantConfig(weight=w, act=act), example_input=next(iter(train))[0][:2])
    calibrate_acts_(model, train)
    quants = [m.w_quant for m in model.modules() if hasattr(m, "w_quant")]
    before = [(q.alpha.detach().clone(), q.levels_raw.detach().clone(), q.thresholds_raw.detach().clone())
              for q in quants]
    acts = [m.in_quant.scale.detach().clone() for m in model.modules() if hasattr(m, "w_quant")]
    phase = PhaseConfig(name="qat", epochs=0.5, lr=0.01, quant_lr=0.01, schedule="constant")
    run_phase(model, phase, 1, train, _Hooks(lambda: evaluate(model, test)))
    after = [m.in_quant.scale for m in model.modules() if hasattr(m, "w_quant")]
    assert all(torch.equal(a, b) for a, b in zip(acts, after, strict=True))  # activation ranges kept
    moved = [not torch.equal(b[2], q.thresholds_raw) for b, q in zip(before, quants, strict=True)]
    assert any(moved)
    assert any(not torch.equal(b[1], q.levels_raw) for b, q in zip(before, quants, strict=True))
    for q in quants:  # b and k fixed, levels on the grid, thresholds strictly inside their intervals
        m, t, v = q.codes().detach(), q.thresholds().detach(), q.levels().detach()
        assert m.shape[1] == 3 and q.b == 4 and torch.all(m[:, 1:] > m[:, :-1]) and torch.equal(m, m.round())
        assert torch.all(t > v[:, :-1]) and torch.all(t < v[:, 1:])


def test_pipeline_flexible_run_reports_bits_meets_its_budget_and_exports_exactly(fmnist_dir, tmp_path):
    from mixq.export.check import export_run
    from mixq.pipeline import train_run
    from mixq.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "method": "flexible", "data": {"batch_size": 100, "eval_batch_size": 250, "val_size": 100},
        "pretrain": {"epochs": 1, "lr": 0.1},
        "quant": {"act": {"granularity": "tensor", "init": "percentile"}},
        "flexible": {"k": 3, "grid_bits": 4, "allocation": "budget", "weight_budget": "1.9 bpe",
                     "sensitivity_batches": 2, "finetune_epochs": 0.1, "granularity": "tensor"},
        "phases": [{"name": "qat", "epochs": 0.1, "lr": 0.005, "quant_lr": 0.001, "schedule": "constant"}],
    })
    summary = train_run(recipe, tmp_path / "run", data_root=fmnist_dir, progress=False, device="cpu")
    assert summary["all_budgets_met"] and summary["weight_bytes"] <= summary["budgets"]["weight_bytes"]
    layers = [r for r in summary["layers"] if "levels" in r]
    assert len(layers) == 7 and len({r["levels"] for r in layers}) > 1  # the budget mixes level counts
    n = sum(r["elements"] for r in layers)
    equivalent = sum(r["elements"] * math.log2(r["levels"]) for r in layers) / n
    assert summary["equivalent_bits"] == pytest.approx(equivalent)
    assert summary["stored_bits"] == pytest.approx(sum(r["elements"] * r["stored_bits"] for r in layers) / n)
    assert summary["weight_bytes_with_overhead"] == summary["weight_bytes"] + summary["overhead_bytes"]
    flex = summary["flexible"]
    assert {"test_acc_acts_only", "test_acc_no_ft", "test_acc_ft", "test_acc_qat", "ptq_layers",
            "mse"} <= set(flex)
    assert flex["test_acc_qat"] == summary["quant_acc"]
    report = export_run(tmp_path / "run", tmp_path / "model.mixq", data_root=fmnist_dir, parity_images=100)
    assert report["parity"]["agree"] == 100 and report["parity"]["max_logit_diff_steps"] == 0
    assert report["budgets_met"]


def test_qat_phase_distills_from_the_teacher_when_asked():
    """With distill = 1 the labels do not enter the loss: trained on labels that are all class 0,
    the student keeps the teacher's predictions; without a teacher it learns to answer 0."""
    from mixq.nuuq import _Hooks, run_phase
    from mixq.recipe import PhaseConfig

    train, test = fixture_loaders()
    teacher = small_cnn()
    run_phase(teacher, PhaseConfig(name="float", epochs=2, lr=0.05, schedule="constant"), 0, train,
              _Hooks(lambda: evaluate(teacher, test)))
    teacher.eval()
    wrong = DeviceLoader(train.x, torch.zeros_like(train.y), MEAN, STD, batch_size=50, shuffle=True,
                         augment=False, drop_last=True, seed=0)
    phase = PhaseConfig(name="qat", epochs=1, lr=0.01, schedule="constant", distill=1.0)
    agree = {}
    for with_teacher in (True, False):
        model = copy.deepcopy(teacher)
        quantize(model, train, levels=4, bits=8)
        run_phase(model, phase, 1, wrong, _Hooks(lambda m=model: evaluate(m, test)),
                  teacher=teacher if with_teacher else None)
        model.eval()
        with torch.no_grad():
            x = next(iter(test))[0]
            agree[with_teacher] = float((model(x).argmax(1) == teacher(x).argmax(1)).float().mean())
            if not with_teacher:
                assert float((model(x).argmax(1) == 0).float().mean()) > 0.9
    assert agree[True] > 0.7 and agree[False] < 0.3
