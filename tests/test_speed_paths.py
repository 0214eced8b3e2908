"""The fast paths give what the plain paths give: the fused (compiled) quantizer kernels against
the plain ATen ops, the batched projection / clipping / size accounting against the per-quantizer
methods; and the training-step pieces compile into one graph (no graph break, no host sync).

Bitwise (torch.equal on the values and on the bit patterns): the fake-quantized output and dL/dx of
the fused kernel, every batched projection and clipping result. The per-slice dL/dscale and dL/dqmax
are sums that the kernel takes in its own order: they must agree to the rounding of a sum
(|diff| <= 4 n eps sum|terms|), and exactly when every term is exact. No timings here.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mixq
import mixq.batched
import mixq.functional as F
from mixq import QuantConfig, QuantizerConfig, UniformQuantizer, _kernels
from mixq.batched import clip_grads_all_, project_all_
from mixq.budget import BudgetPenalty, Budgets
from mixq.layers import QConv2d
from mixq.size import SizeAccount

# (x shape, parameter shape): per tensor (0-d and 4-d parameters, 2-d linear input), per output
# channel (weights, 4-d and 2-d), per input channel (activations, axis 1)
LAYOUTS = {
    "tensor0d": ((3, 5, 9, 7), ()),
    "tensor4d": ((3, 5, 9, 7), (1, 1, 1, 1)),
    "tensor2d": ((40, 33), (1, 1)),
    "weight4d": ((12, 5, 3, 3), (12, 1, 1, 1)),
    "weight2d": ((10, 64), (10, 1)),
    "act_channel": ((4, 6, 7, 5), (1, 6, 1, 1)),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _case(layout: str, signed: bool, dtype, seed: int = 0):
    """x with range edges, exact ties (k + 1/2) s, zero, values just inside/outside and far out,
    per slice; power-of-two and arbitrary steps; an upstream gradient of both signs."""
    xshape, pshape = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    n = int(np.prod(pshape)) if pshape else 1
    s = np.where(np.arange(n) % 2 == 0, 2.0 ** rng.integers(-6, -1, n), rng.uniform(0.01, 0.3, n))
    levels = rng.uniform(1.0, 40.0, n)
    levels = np.where(np.arange(n) % 3 == 0, np.round(levels), levels)
    q = s * levels
    scale = torch.tensor(s, dtype=dtype).reshape(pshape)
    qmax = torch.tensor(q, dtype=dtype).reshape(pshape)
    sb, qb = torch.broadcast_to(scale, xshape), torch.broadcast_to(qmax, xshape)
    x = torch.tensor(rng.normal(size=xshape), dtype=dtype) * qb * 0.8
    flat_x, flat_s, flat_q = x.reshape(-1), sb.reshape(-1), qb.reshape(-1)
    idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[: x.numel() // 3]
    kind = torch.arange(idx.numel()) % 9
    si, qi = flat_s[idx], flat_q[idx]
    k = torch.floor(qi / si * 0.5)
    edge = torch.stack([qi, qi * (1 - 1e-6), qi * (1 + 1e-6), (k + 0.5) * si, 0.5 * si,
                        torch.zeros_like(qi), 10 * qi, -qi, -(k + 0.5) * si], 0)
    flat_x[idx] = edge.gather(0, kind.reshape(1, -1)).reshape(-1)
    g = torch.tensor(rng.normal(size=xshape), dtype=dtype)
    return x, scale, qmax, g


def _run(x, scale, qmax, g, signed, modifier, delta, fast: bool, grad_scale=1.0):
    xt, st, qt = (t.clone().requires_grad_() for t in (x, scale, qmax))
    with _kernels.fast_kernels(fast, min_numel=0):
        kernel = _kernels.uniform_kernel(xt, st, qt, signed, modifier, delta)
        assert (kernel is not None) == fast
        y = F.fake_quant_uniform(xt, st, qt, signed, modifier, delta, grad_scale)
        y.backward(g)
    return y.detach(), xt.grad, st.grad, qt.grad


def _sum_bound(terms: torch.Tensor, shape) -> torch.Tensor:
    n = max(terms.numel() // max(int(np.prod(shape)) if shape else 1, 1), 1)
    eps = torch.finfo(terms.dtype).eps
    return 4 * n * eps * terms.abs().sum_to_size(shape) + torch.finfo(terms.dtype).tiny


# every layout in both dtypes; the (signedness, modifier) pairs rotate so that each compiled
# variant (signedness, modifier, layout kind, dtype) is built about once: compiling is the cost here
F32, F64 = torch.float32, torch.float64
CASES = [
    ("tensor0d", False, "atanh", F32), ("tensor4d", False, "atanh", F32),
    ("tensor2d", False, "atanh", F32), ("weight4d", True, "ewgs", F32),
    ("weight2d", True, "ewgs", F32), ("act_channel", False, "psgd", F32),
    ("tensor4d", True, "ewgs", F64), ("tensor2d", True, "ewgs", F64), ("weight4d", False, "ste", F64),
    ("weight2d", False, "ste", F64), ("act_channel", True, "atanh", F64),
]


@pytest.mark.compile
@pytest.mark.parametrize("layout,signed,modifier,dtype", CASES)
def test_fused_kernel_matches_plain_path(layout, signed, modifier, dtype):
    x, scale, qmax, g = _case(layout, signed, dtype)
    delta = 5e-3 if modifier != "psgd" else 0.3
    fast = _run(x, scale, qmax, g, signed, modifier, delta, True)
    plain = _run(x, scale, qmax, g, signed, modifier, delta, False)
    for a, b in zip(fast[:2], plain[:2], strict=True):  # output and dL/dx: bit for bit
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b))
    # dL/dscale, dL/dqmax: the same terms summed in another order
    _, t_s, t_q = F._uniform_grad_terms(x, g, scale, qmax, signed, modifier, delta)
    for got, want, terms in ((fast[2], plain[2], t_s), (fast[3], plain[3], t_q)):
        assert got.shape == want.shape == scale.shape
        assert ((got - want).abs() <= _sum_bound(terms, scale.shape)).all()


@pytest.mark.compile
def test_fused_kernel_compiles_once_for_views_and_grad_modes():
    """Parameters that are views at offsets 0, 1 and more into one tensor that requires grad (what
    `shared_steps` hands out) and inputs with and without requires_grad run one compiled forward and
    one compiled backward: dynamo specializes storage offsets 0 and 1 and guards on requires_grad,
    so without `_kernels._slice_params` these compile anew (in the full test suite until the
    recompile limit turned the fast path off)."""
    from torch._dynamo.utils import counters

    x, scale, qmax, g = _case("tensor4d", False, torch.float32, seed=5)
    flat = torch.rand(8, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.05
    outs = []
    with _kernels.fast_kernels(True, min_numel=0):
        kernel = _kernels.uniform_kernel(x, scale, qmax, False, "atanh", 5e-3)
        kernel.forward(x, scale, qmax), kernel.backward(x, g, scale, qmax)  # compiled here
        before = counters["stats"]["unique_graphs"]
        for start, grad in ((0, True), (1, True), (2, False), (4, True)):
            s = flat.clone().requires_grad_(grad)[start:start + 1].reshape(scale.shape)
            xt = x.clone().requires_grad_(grad)
            outs.append((kernel.forward(xt, s, qmax), kernel.backward(xt, g, s, qmax)[0]))
        assert counters["stats"]["unique_graphs"] == before
    assert all(o[0].shape == x.shape and o[1].shape == x.shape for o in outs)


@pytest.mark.compile
def test_fused_kernel_bf16_channels_last_and_grad_scale():
    """bf16 input (float32 arithmetic inside), a channels_last per-tensor site (the output keeps the
    layout), and an LSQ-style gradient scale tensor."""
    x, scale, qmax, g = _case("tensor4d", False, torch.float32, seed=3)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    g = g.to(torch.bfloat16)
    gs = torch.tensor(0.37).reshape(1, 1, 1, 1)
    fast = _run(x, scale, qmax, g, False, "atanh", 5e-3, True, gs)
    plain = _run(x, scale, qmax, g, False, "atanh", 5e-3, False, gs)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    assert fast[0].dtype == torch.bfloat16
    for a, b in zip(fast[:2], plain[:2], strict=True):
        assert torch.equal(a.view(torch.int16), b.contiguous(memory_format=torch.channels_last)
                           .view(torch.int16)) or torch.equal(a, b)
    torch.testing.assert_close(fast[2], plain[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[3], plain[3], rtol=1e-5, atol=1e-6)


def test_sums_exact_when_terms_are_exact():
    """With a power-of-two step, small integer-valued upstream gradients and STE, every term and
    every partial sum is exact, so the fused kernel's parameter gradients equal the plain ones."""
    x, scale, qmax, _ = _case("weight4d", True, torch.float32, seed=5)
    scale = torch.exp2(torch.round(torch.log2(scale)))
    x = torch.round(x / scale * 8) * scale / 8  # on a grid of s/8: every term a multiple of 1/8
    g = torch.randint(-3, 4, x.shape).float()
    fast = _run(x, scale, qmax, g, True, "ste", 0.0, True)
    plain = _run(x, scale, qmax, g, True, "ste", 0.0, False)
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b)


def test_plain_path_for_unsupported_cases():
    """tanh / acos modifiers, small tensors, mismatched parameter shapes: no kernel."""
    x, scale, qmax, _ = _case("tensor4d", True, torch.float32)
    with _kernels.fast_kernels(True, min_numel=0):
        assert _kernels.uniform_kernel(x, scale, qmax, True, "tanh", 0.1) is None
        assert _kernels.uniform_kernel(x, scale, qmax, True, "acos", 0.1) is None
        assert _kernels.uniform_kernel(x, scale, qmax.reshape(()), True, "ste", 0.0) is None
    with _kernels.fast_kernels(True, min_numel=x.numel() + 1):
        assert _kernels.uniform_kernel(x, scale, qmax, True, "ste", 0.0) is None
    with _kernels.fast_kernels(False, min_numel=0):
        assert _kernels.uniform_kernel(x, scale, qmax, True, "ste", 0.0) is None


def test_compile_failure_falls_back_to_plain_path(monkeypatch):
    def broken(*key):
        def fail(*args):
            raise RuntimeError("no compiler")
        return fail, fail, fail

    monkeypatch.setattr(_kernels, "_build", broken)
    monkeypatch.setattr(_kernels, "_compiled", {})
    monkeypatch.setattr(_kernels, "_failed", [])
    monkeypatch.setattr(_kernels, "_failed_keys", set())
    x, scale, qmax, g = _case("weight4d", True, torch.float32)
    plain = _run(x, scale, qmax, g, True, "ewgs", 5e-3, False)
    xt, st, qt = (t.clone().requires_grad_() for t in (x, scale, qmax))
    with _kernels.fast_kernels(True, min_numel=0), pytest.warns(UserWarning, match="plain"):
        y = F.fake_quant_uniform(xt, st, qt, True, "ewgs", 5e-3)
    y.backward(g)
    for a, b in zip((y.detach(), xt.grad, st.grad, qt.grad), plain, strict=True):
        assert torch.equal(a, b)
    assert _kernels.fast_kernel_status()["failed"].startswith("RuntimeError")


# ------------------------------------------------------------------------------- batched updates
def _quantizer_zoo():
    torch.manual_seed(0)
    w = QuantizerConfig()
    a = QuantConfig().act
    qs = [UniformQuantizer(w, 8), UniformQuantizer(w, 16), UniformQuantizer(w.replace(bits_max=6), 4),
          UniformQuantizer(a.replace(signed=False)), UniformQuantizer(a.replace(signed=False)),
          UniformQuantizer(a.replace(signed=True)), UniformQuantizer(w.replace(param="u1"), 4),
          UniformQuantizer(w.replace(pow2_scale=False), 8)]
    for q in qs:
        q.calibrated = True
        with torch.no_grad():  # arbitrary values: out of range, swapped, tiny, huge
            for p in q.parameters():
                p.copy_(torch.exp2(torch.empty_like(p).uniform_(-14, 9)))
            q.numel.fill_(9.0)
        for p in q.parameters():
            p.grad = torch.randn_like(p) * 3
    return qs


def _state(qs):
    return [t.clone() for q in qs for p in q.parameters() for t in (p.detach(), p.grad)]


@pytest.fixture
def batched(monkeypatch):
    """Batch the small per-slice ops whatever the thread count (see batched.batch_small_ops)."""
    monkeypatch.setattr(mixq.batched, "batch_small_ops", lambda device, numel: True)


@pytest.mark.parametrize("fast", [False, True])
def test_shared_steps_give_the_same_step(batched, fast):
    """A training step's forward and size penalty inside `shared_steps` (each power-of-two step
    computed once for all quantizers) give the loss bit for bit and every gradient to float32
    rounding (a step's uses now sum their gradients before the chain rule multiplies by
    d step / d scale, not after), and compute the steps once instead of at every use."""
    from mixq.batched import shared_steps

    model, x = _prepared_model()
    qmods = [m for m in model.modules() if isinstance(m, UniformQuantizer)]
    account = SizeAccount(model)

    def step(shared: bool):
        model.zero_grad(set_to_none=True)
        penalty = BudgetPenalty(Budgets(weight_bytes=100.0, act_sum_bytes=100.0))  # fresh state
        log = _OpLog()  # (dynamo compiles nothing under a dispatch mode: not with the kernels)
        with _kernels.fast_kernels(fast, min_numel=0):
            with contextlib.nullcontext() if fast else log:
                with shared_steps(qmods) if shared else contextlib.nullcontext():
                    loss = model(x * 3).square().mean() + penalty(account(), 1.0)
            loss.backward()
        assert all(q.shared_step is None for q in qmods)  # nothing outlives the context
        return loss.detach(), [p.grad.clone() for p in model.parameters()], log.names.count("exp2")

    want, got = step(False), step(True)
    assert torch.equal(_bits(got[0]), _bits(want[0]))
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-9)
    # 2^round(log2 scale) of 3 weight and 3 activation quantizers, used in forward, the saved
    # codes, the bias grid and the size account: once in all (one device, one dtype) when shared
    if not fast:
        assert got[2] == 1 and want[2] > 6, (got[2], want[2])


def test_batched_project_and_clip_equal_per_quantizer(batched):
    a, b = _quantizer_zoo(), _quantizer_zoo()
    for q in a:
        q.clip_grads_()
    clip_grads_all_(b)
    for x, y in zip(_state(a), _state(b), strict=True):
        assert torch.equal(_bits(x), _bits(y))
    for q in a:
        q.project_()
    project_all_(b)
    for x, y in zip(_state(a), _state(b), strict=True):
        assert torch.equal(_bits(x), _bits(y))


def _prepared_model(act_modifier: str = "atanh", device: str = "cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10)).to(device)
    x = torch.randn(8, 3, 12, 12, device=device)
    config = QuantConfig()
    config = QuantConfig(act=config.act.replace(modifier=act_modifier))
    mixq.prepare_(model, config, example_input=x)
    mixq.calibrate_(model, [x])
    return model, x


def test_batched_size_account_equals_per_quantizer_sums(batched):
    model, _ = _prepared_model()
    account = SizeAccount(model)
    got = account()
    weight = torch.stack([q.size_bits() for q in account.weights]).sum() + account.bias_bits
    acts = torch.stack([q.size_bits() for q in account.acts])
    assert torch.equal(got["weight_bits"], weight)
    assert torch.equal(got["act_sum_bits"], acts.sum())
    assert torch.equal(got["act_max_bits"], acts.amax())
    # the gradients through the straight-through bit widths are the same as well
    params = [p for q in account.weights + account.acts for p in q.parameters()]
    total = got["weight_bits"] * 1e-3 + got["act_sum_bits"] * 1e-2 + got["act_max_bits"]
    g_batched = torch.autograd.grad(total, params)
    total_ref = weight * 1e-3 + acts.sum() * 1e-2 + acts.amax()
    g_ref = torch.autograd.grad(total_ref, params)
    for a, b in zip(g_batched, g_ref, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- one graph, no sync
@pytest.mark.compile
def test_qconv2d_forward_backward_compiles_fullgraph():
    """A QConv2d with input and weight quantizers and a quantized bias: forward + backward in one
    graph (fullgraph=True fails on a graph break, a .item() or a Python bool of a tensor)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    cfg = QuantConfig()
    w_q = UniformQuantizer(cfg.weight, 6)
    w_q.calibrate_(w_q.slice_rows(conv.weight.detach()))
    in_q = UniformQuantizer(cfg.act.replace(signed=False))
    x = torch.relu(torch.randn(2, 4, 8, 8))
    in_q.calibrate_(in_q.slice_rows(x))
    layer = QConv2d.from_float(conv, w_q, in_q)
    g = torch.randn(2, 6, 8, 8)

    def fwd_bwd(module):
        xi = x.clone().requires_grad_()
        module(xi).backward(g)
        grads = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return grads

    want = fwd_bwd(layer)
    try:
        got = fwd_bwd(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.compile
def test_size_penalty_and_updates_compile_fullgraph(batched):
    """SizeAccount + BudgetPenalty (with the PI controller's buffer updates) and their backward,
    and the batched clipping and projection: each one graph."""
    model, _ = _prepared_model()
    account = SizeAccount(model)
    with torch.no_grad():
        wbytes = float(account()["weight_bits"]) / 8
    penalty = BudgetPenalty(Budgets(weight_bytes=0.5 * wbytes, act_sum_bytes=1.0))
    qmods = account.weights + account.acts

    def penalize():
        return penalty(account(), 0.5)

    eager_state = [b.clone() for b in penalty.buffers()]
    want = penalize()
    want.backward()
    want_grads = [p.grad.clone() for q in qmods for p in q.parameters()]
    for q in qmods:
        q.zero_grad(set_to_none=True)
    for b, s in zip(penalty.buffers(), eager_state, strict=True):
        b.copy_(s)
    try:
        got = torch.compile(penalize, fullgraph=True, backend="aot_eager")()
        got.backward()
        got_grads = [p.grad.clone() for q in qmods for p in q.parameters()]
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(lambda: clip_grads_all_(qmods), fullgraph=True, backend="aot_eager")()
            torch.compile(lambda: project_all_(qmods), fullgraph=True, backend="aot_eager")()
    finally:
        torch._dynamo.reset()


@pytest.mark.compile
@pytest.mark.parametrize("dtype,act_modifier", [(torch.float32, "atanh"), (torch.bfloat16, "atanh"),
                                                (torch.float32, "tanh")])
def test_saved_codes_give_the_same_gradients(monkeypatch, dtype, act_modifier):
    """A QConv2d / QLinear saves its quantized input as 8-bit codes (written by the fused forward,
    or, after a plain-path quantizer (tanh), by a small kernel of their own): the backward rebuilds
    x_hat bit for bit, so every gradient equals the one with x_hat saved as it is."""
    model, x = _prepared_model(act_modifier)
    packed = []
    original = _kernels.saved_code_hooks

    def counting(*args):
        hooks = original(*args)
        if hooks is None:
            return None
        pack, unpack = hooks

        def pack_and_count(t):
            out = pack(t)
            packed.append(isinstance(out, _kernels._Codes))
            return out
        return pack_and_count, unpack

    monkeypatch.setattr(_kernels, "saved_code_hooks", counting)

    def grads(pack: bool):
        model.zero_grad(set_to_none=True)
        with _kernels.fast_kernels(True, min_numel=0, pack_saved=pack):
            with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(x * 3)
            out.float().square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    with_codes = grads(True)
    assert any(packed)
    plain = grads(False)
    for a, b in zip(with_codes, plain, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ no host round trip in a step
HOST_OPS = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "is_nonzero", "item"}


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _training_runner(model, x, cuda_graphs: bool = False):
    """(step(xb, yb) -> (loss, correct), runner): steps of mixq.train's PhaseRunner (forward, loss +
    size penalty, backward, clipping, SGD, projection) on `model`, sized for batches like `x`."""
    from mixq.recipe import PhaseConfig
    from mixq.train import PhaseRunner, make_optimizer

    account = SizeAccount(model)
    with torch.no_grad():
        wbytes = float(account()["weight_bits"]) / 8
    penalty = BudgetPenalty(Budgets(weight_bytes=0.5 * wbytes, act_sum_bytes=1.0)).to(x.device)
    phase = PhaseConfig(name="qat", penalty=True, quantizers="learned")
    opt = make_optimizer(model, phase)
    qmods = account.weights + account.acts

    class Hooks:
        @staticmethod
        def ramp(progress):
            return 0.5 + progress

    runner = PhaseRunner(model, phase, 0, None, Hooks(), None, penalty=penalty, account=account,
                         cuda_graphs=cuda_graphs)
    return (lambda xb, yb, progress=0.5: runner._step(xb, yb, opt, qmods, True, progress)), runner


def _training_step(model, x):
    """One PhaseRunner step (see `_training_runner`) on the batch `x`, as a function of no arguments."""
    y = torch.randint(0, 10, (x.shape[0],), device=x.device)
    step, _ = _training_runner(model, x)
    return lambda: step(x, y)


def test_training_step_reads_nothing_back_to_the_host():
    """One real training step of mixq.train (forward, loss + size penalty, backward, clipping, SGD,
    projection) calls no op that moves a value between host and device: no .item() / float() /
    bool() of a tensor (aten._local_scalar_dense: a CUDA sync) and no tensor built from Python
    numbers (aten.lift_fresh: a host-to-device copy, which also waits for the stream). Checked on
    the CPU through the dispatcher, so it holds for the CUDA step too (and on CUDA itself in
    test_cuda_kernels.py, with torch.cuda's sync debug mode). The plain ops: the fused kernels are
    fullgraph-compiled functions, in which such an op cannot occur (and dynamo does not run under a
    dispatch mode)."""
    model, x = _prepared_model()
    step = _training_step(model, x)
    with _kernels.fast_kernels(False):
        step()  # first step: builds the caches
        log = _OpLog()
        with log:
            step()
    assert len(log.names) > 50  # the mode saw the step
    assert not HOST_OPS & set(log.names), sorted(HOST_OPS & set(log.names))
