"""The fused quantizer kernels on CUDA give what the plain ATen ops give.

The hand-written Triton kernels (mixq._triton): x_hat and the 8-bit codes bit for bit, dL/dx to
float32 rounding (the compiler may contract multiply-adds), the per-slice dL/dscale and dL/dqmax to
the rounding of a sum; a whole quantized CNN's loss exactly and its gradients to rounding. Run on a
CUDA device when there is one, and through Triton's interpreter on CPU tensors (a subprocess with
TRITON_INTERPRET=1) where Triton is installed; skipped where it is not (the CPU wheel of PyTorch does
not bring it). On CUDA also: the inductor-compiled kernels (the other CUDA backend; its division is
not correctly rounded, so x_hat is exact only away from rounding ties), and a prepared model's
forward and backward under torch.compile(fullgraph=True) with inductor against eager, the default
backend choice, a whole training step under torch.cuda's sync debug mode, and the trainer's CUDA
graphs against eager training. Seen on an H100 (2026-11-27, torch 2.11, Triton 3.6): the Triton and
inductor kernel tests, the default-backend test, the sync-free step with each backend, the CUDA-graph
test and the device loader's test pass. The fullgraph test failed: every gradient through a
quantizer came out zero under torch.compile (inductor and aot_eager alike). The cause, reproduced
with torch 2.11 on a CPU: dynamo traced the backward of an autograd.Function whose forward returned a
no-op `.to(dtype)` with a zero incoming gradient; fixed (`functional.as_dtype`), not yet rerun on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import mixq
import mixq.functional as F
from mixq import QuantConfig, _kernels, models

sys.path.insert(0, os.path.dirname(__file__))
from test_speed_paths import (  # noqa: E402
    _bits,
    _case,
    _prepared_model,
    _sum_bound,
    _training_runner,
    _training_step,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
F32 = torch.float32
# every layout kind, both signs, each modifier the kernel has
CASES = [("tensor0d", False, "atanh", F32), ("tensor4d", True, "ewgs", F32),
         ("tensor2d", False, "ste", F32), ("weight4d", True, "ewgs", F32), ("weight2d", False, "psgd", F32),
         ("act_channel", True, "atanh", F32), ("act_channel", False, "ewgs", torch.bfloat16)]


def _run(x, scale, qmax, g, signed, modifier, delta, backend, devices):
    xt, st, qt = (t.clone().requires_grad_() for t in (x, scale, qmax))
    with _kernels.fast_kernels(backend is not None, min_numel=0, devices=devices,
                               cuda_backend=backend or "triton"):
        kernel = _kernels.uniform_kernel(xt, st, qt, signed, modifier, delta)
        assert (kernel is not None) == (backend is not None)
        assert (type(kernel).__name__ == "TritonUniformKernel") == (backend == "triton")
        y = F.fake_quant_uniform(xt, st, qt, signed, modifier, delta)
        y.backward(g)
        codes = kernel.forward_codes(xt.detach(), st.detach(), qt.detach())[1] if kernel else None
    return y.detach(), xt.grad, st.grad, qt.grad, codes


def check_all(device: str, devices: tuple[str, ...], backend: str = "triton") -> None:
    for layout, signed, modifier, dtype in CASES:
        x, scale, qmax, g = _case(layout, signed, torch.float32, seed=7)
        x, g = x.to(dtype).to(device), g.to(dtype).to(device)
        scale, qmax = scale.to(device), qmax.to(device)
        delta = 0.3 if modifier == "psgd" else 5e-3 if modifier != "ste" else 0.0
        fast = _run(x, scale, qmax, g, signed, modifier, delta, backend, devices)
        plain = _run(x, scale, qmax, g, signed, modifier, delta, None, devices)
        where = f"{layout} signed={signed} {modifier} {dtype} {backend}"
        assert fast[0].dtype == plain[0].dtype and fast[0].shape == plain[0].shape, where
        if backend == "inductor":  # its division is not correctly rounded on CUDA: ties may flip
            u = x.double() / torch.broadcast_to(scale, x.shape).double()
            near_tie = ((u - torch.floor(u)) - 0.5).abs() < 1e-5
            differs = fast[0] != plain[0]
            assert not (differs & ~near_tie).any(), f"x_hat differs away from a rounding tie: {where}"
            step = torch.broadcast_to(scale, x.shape).to(dtype)
            assert ((fast[0] - plain[0]).abs() <= step).all(), where
            torch.testing.assert_close(fast[1][~near_tie], plain[1][~near_tie], rtol=2e-6, atol=1e-7,
                                       msg=where)
            continue
        if dtype == torch.float32 or device == "cuda":
            assert torch.equal(_bits(fast[0].float()), _bits(plain[0].float())), f"x_hat differs: {where}"
        else:  # Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even)
            ulp = torch.finfo(dtype).eps * plain[0].float().abs()
            assert ((fast[0].float() - plain[0].float()).abs() <= ulp).all(), f"x_hat differs: {where}"
            continue
        step = torch.broadcast_to(scale, x.shape)
        want_codes = torch.round(plain[0].float() / step)
        got_codes = fast[4].reshape(x.shape)  # x is contiguous: its (A, S, B) view keeps the order
        assert torch.equal(got_codes.float(), want_codes), f"codes differ: {where}"
        torch.testing.assert_close(fast[1].float(), plain[1].float(), rtol=2e-6, atol=1e-7, msg=where)
        _, t_s, t_q = F._uniform_grad_terms(x, g, scale, qmax, signed, modifier, delta)
        for got, want, terms in ((fast[2], plain[2], t_s), (fast[3], plain[3], t_q)):
            assert got.shape == want.shape == scale.shape, where
            bound = _sum_bound(terms, scale.shape) + 1e-6 * terms.abs().sum_to_size(scale.shape)
            assert ((got - want).abs() <= bound).all(), f"slice sums differ: {where}"


def check_model_step(device: str, devices: tuple[str, ...]) -> None:
    """A prepared CNN's loss and every gradient, Triton kernels against the plain ops: the kernels
    inside the quantized layers (8-bit codes saved for backward, BatchNorm, residual-free CNN).

    The loss is exact. A gradient may differ by the float32 rounding of dL/dx (the compiler
    contracts multiply-adds) carried back through the layers, and a per-slice dL/dscale sums terms
    of both signs (code - u is a rounding residual): a slice's sum can cancel to far below its terms,
    so its error is bounded against the largest gradient of that tensor, not its own value. cuDNN
    runs deterministic and without TF32, so that the two passes differ by the kernels alone."""
    torch.manual_seed(0)
    model = models.create_model("fmnist_cnn", in_channels=1).to(device)
    x = torch.randn(8, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    mixq.prepare_(model, QuantConfig(), example_input=x[:2])
    mixq.calibrate_(model, [x])
    results = []
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = True, False
    try:
        for backend in ("triton", None):
            model.zero_grad(set_to_none=True)
            with _kernels.fast_kernels(backend is not None, min_numel=0, devices=devices,
                                       cuda_backend=backend or "triton"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = flags
    (loss_t, grads_t), (loss_p, grads_p) = results
    assert torch.equal(loss_t, loss_p)  # the forward is exact
    assert grads_t.keys() == grads_p.keys() and len(grads_t) > 10
    for name, want in grads_p.items():
        torch.testing.assert_close(grads_t[name], want, rtol=1e-4, atol=1e-3 * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")



@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU wheel of PyTorch)")
def test_triton_kernels_match_plain_ops_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all cases agree" in done.stdout


CUDA = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")


@CUDA
def test_triton_kernels_match_plain_ops_cuda():
    check_all("cuda", ("cpu", "cuda"))
    check_model_step("cuda", ("cpu", "cuda"))


@CUDA
def test_inductor_kernels_match_plain_ops_cuda():
    check_all("cuda", ("cpu", "cuda"), backend="inductor")


@CUDA
def test_prepared_model_compiles_fullgraph_cuda():
    """Forward + backward of a prepared CNN in one inductor graph on CUDA (no graph break, no host
    sync), equal to eager up to the compiler's float rounding."""
    torch.manual_seed(0)
    model = models.create_model("fmnist_cnn", in_channels=1).cuda()
    x = torch.randn(16, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    mixq.prepare_(model, QuantConfig(), example_input=x[:2])
    mixq.calibrate_(model, [x])

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(fn(x), y)
        loss.backward()
        grads = [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]
        return loss.detach(), grads

    # TF32 convolutions (cuDNN's default) differ between eager's and inductor's algorithms by ~1e-3,
    # and 8-bit activation codes then round differently downstream: compare in full float32, and
    # the gradients by direction (a few flipped codes move single elements, not the whole vector)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want = grads(model)
        got = grads(torch.compile(model, fullgraph=True))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch._dynamo.reset()
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert len(got[1]) == len(want[1]) > 10
    bad = []  # every disagreeing gradient, reported together (a GPU session is short)
    for (name, a), (_, b) in zip(got[1], want[1], strict=True):
        if not b.any():  # e.g. the qmax gradient of a weight quantizer that clips nothing
            if a.any():
                bad.append(f"{name}: zero in eager, max |g| {float(a.abs().max()):.3g} compiled")
            continue
        cosine = float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                             dim=0))
        if not cosine > 0.99:
            bad.append(f"{name} {tuple(b.shape)}: cosine {cosine:.4f}, |eager| {float(b.norm()):.3g}, "
                       f"|compiled| {float(a.norm()):.3g}")
    assert not bad, "\n".join(bad)


@CUDA
def test_cuda_default_is_the_triton_kernel_at_any_size():
    """The default settings send CUDA tensors of every size to the Triton kernels (an eager CUDA step
    is launch-bound) and float64 to the plain ops; CPU tensors keep the size threshold."""
    for numel in (10, 1 << 20):
        x = torch.randn(numel, device="cuda")
        s, q = torch.full((), 0.1, device="cuda"), torch.full((), 1.0, device="cuda")
        kernel = _kernels.uniform_kernel(x, s, q, True, "atanh", 5e-3)
        assert type(kernel).__name__ == "TritonUniformKernel", (numel, kernel)
    assert _kernels.uniform_kernel(x.double(), s.double(), q.double(), True, "atanh", 5e-3) is None
    assert _kernels.uniform_kernel(torch.randn(10), s.cpu(), q.cpu(), True, "atanh", 5e-3) is None


@CUDA
@pytest.mark.parametrize("backend", [None, "triton", "inductor"])
def test_training_step_never_waits_for_the_gpu(backend):
    """A whole training step on CUDA (forward, loss + size penalty, backward, clipping, SGD,
    projection) with torch.cuda's sync debug mode set to raise: no op in it synchronizes the host
    with the device (no .item(), no tensor from a Python number, no copy to pageable memory), so the
    host can run ahead of the GPU. With the plain ops and with each fused-kernel backend."""
    model, x = _prepared_model(device="cuda")
    step = _training_step(model, x)
    with _kernels.fast_kernels(backend is not None, min_numel=0, devices=("cpu", "cuda"),
                               cuda_backend=backend or "triton"):
        step()  # compiles the kernels and builds the caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@CUDA
def test_cuda_graph_steps_match_eager_steps():
    """Eight PhaseRunner steps with CUDA graphs (three eager warm-up steps on a side stream, one
    capture, replays) leave the model where eight eager steps leave it: the same losses, parameters
    and BatchNorm statistics, with a new batch and a new penalty strength at every step (the
    graph's static inputs are refreshed). A replayed step does not synchronize with the host."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    runs = []
    try:
        for graphs in (False, True):
            model, x = _prepared_model(device="cuda")
            gen = torch.Generator(device="cuda").manual_seed(1)
            batches = [(torch.randn(x.shape, device="cuda", generator=gen),
                        torch.randint(0, 10, (x.shape[0],), device="cuda", generator=gen)) for _ in range(8)]
            step, runner = _training_runner(model, x, cuda_graphs=graphs)
            losses = [step(xb, yb, progress=i / 8)[0] for i, (xb, yb) in enumerate(batches)]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                losses.append(step(*batches[0])[0])  # a replay (graphs) under the sync check
            finally:
                torch.cuda.set_sync_debug_mode("default")
            state = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
            runs.append((torch.stack(losses), state, runner))
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = flags
    graph = runs[1][2]._graph
    assert graph is not None and graph.failed is None, graph and graph.failed
    assert (graph.captures, graph.replays) == (1, 6)
    assert runs[0][2]._graph is None
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-6)
    bad = [k for k in runs[0][1] if not torch.allclose(runs[1][1][k].double(), runs[0][1][k].double(),
                                                       rtol=1e-4, atol=1e-6)]
    assert not bad, [(k, float((runs[1][1][k].double() - runs[0][1][k].double()).abs().max())) for k in bad]


if __name__ == "__main__":  # the interpreter run: CPU tensors through Triton's interpreter
    check_all("cpu", ("cpu", "triton"))
    check_model_step("cpu", ("cpu", "triton"))
    print("all cases agree")
