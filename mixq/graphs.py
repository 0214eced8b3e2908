"""A training step's forward and backward captured once as a CUDA graph and replayed.

An eager QAT step on a GPU is bound by the host: every quantizer call is Python, autograd and a
few kernel launches, and a ResNet-20 step has about 40 of them (on an H100 the mixq step's kernels
took 23 ms and its host 54 ms, `benchmarks/results/profile_step_cuda_h100.md`). A CUDA graph
records the step's kernels once and replays them with one launch, so the step costs what its
kernels cost. This is PyTorch's whole-network capture (torch.cuda.graph), with what a training
loop needs around it:

- The batch, the labels and the penalty strength are copied into static tensors before each
  replay; the loss and the count of correct predictions come back as fresh tensors (no host sync).
- Only forward, loss, budget penalty and backward are captured. Gradient clipping, the optimizer
  step (its learning rate changes every step) and the projection of the quantizer parameters run
  eagerly after the replay: a few dozen batched launches.
- Warm-up: the first `WARMUP_STEPS` steps of a capture run eagerly on a side stream (cuDNN's
  algorithm search, lazy initialization and the compiled kernels' first calls happen there), then
  the graph is captured and replayed for that step. Every step is a real training step.
- What the graph bakes in is checked before each replay: the addresses, requires_grad flags and
  gradients of every parameter and buffer, the training flag, the batch's shape and dtype and the
  autocast state. Anything that changed (a state_dict loaded with new tensors, `model.to(...)`,
  gradients set to None, a batch of another shape) makes the step run eagerly and the graph be
  captured again after a new warm-up, so a replay never reads stale memory.
- A capture that fails (an op that synchronizes with the host, an unsupported library) warns once
  and leaves that runner eager.

The numbers: a replayed step runs the very kernels of the eager step, in the same order, so its
results agree with eager training to the last bits that cuDNN's algorithm choice allows
(tests/test_cuda_kernels.py compares them on a GPU).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

WARMUP_STEPS = 3


def graphs_available(device: torch.device) -> bool:
    """CUDA graphs need a CUDA device (ROCm's HIP graphs are taken the same way by PyTorch)."""
    return device.type == "cuda" and torch.cuda.is_available()


class CudaGraphs:
    """What `GraphedStep` asks of CUDA: a side stream for warm-up, a capture, a synchronization.
    (Tests give `GraphedStep` a stand-in that re-runs the captured function, to check the
    bookkeeping on a machine without a GPU.)"""

    @staticmethod
    @contextlib.contextmanager
    def side_stream(device: torch.device):
        side, main = torch.cuda.Stream(device=device), torch.cuda.current_stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)

    @staticmethod
    def capture(fn: Callable, device: torch.device):
        """(graph, fn's outputs): fn's kernels recorded as one graph (`replay()` runs them)."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out

    @staticmethod
    def pool_bytes(graph) -> int:
        """Bytes reserved by the graph's private memory pool."""
        pool = tuple(graph.pool())
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    @staticmethod
    def synchronize(device: torch.device) -> None:
        torch.cuda.synchronize(device)


class GraphedStep:
    """Runs `forward_backward(x, y, strength) -> (loss, correct)` (which calls backward itself) as a
    replayed CUDA graph; see the module doc. `modules` are everything whose parameters and buffers
    the step reads or writes (the model, the penalty, a teacher)."""

    def __init__(self, forward_backward: Callable, modules: list[nn.Module],
                 warmup_steps: int = WARMUP_STEPS, cuda=CudaGraphs):
        self.forward_backward = forward_backward
        self.params = [p for m in modules for p in m.parameters()]
        self.buffers = [b for m in modules for b in m.buffers()]
        self.modules = [sub for m in modules for sub in m.modules()]
        self.warmup_steps, self.cuda = warmup_steps, cuda
        self.graph = None  # what `cuda.capture` returned
        self.signature: tuple | None = None
        self.warm = 0  # eager steps taken towards the next capture
        self.captures = 0  # graphs captured so far (tests, logs)
        self.replays = 0
        self.failed: str | None = None
        self._static: dict[str, Tensor] = {}
        self._grads: list = []

    def _signature(self, x: Tensor, y: Tensor) -> tuple:
        autocast = torch.is_autocast_enabled(x.device.type)
        return ((tuple(x.shape), x.dtype, x.device, tuple(y.shape), y.dtype),
                tuple(m.training for m in self.modules),
                (autocast, torch.get_autocast_dtype(x.device.type) if autocast else None),
                tuple((p.data_ptr(), p.dtype, p.requires_grad) for p in self.params),
                tuple(b.data_ptr() for b in self.buffers))

    def _grads_intact(self) -> bool:
        return all(p.grad is g for p, g in zip(self.params, self._grads, strict=True))

    def _forget(self) -> None:
        self.graph, self._static, self._grads = None, {}, []

    def __call__(self, x: Tensor, y: Tensor, strength: float) -> tuple[Tensor, Tensor]:
        if self.failed is not None:
            return self._eager(x, y, strength)
        signature = self._signature(x, y)
        if self.graph is not None and signature == self.signature and self._grads_intact():
            s = self._static
            s["x"].copy_(x)
            s["y"].copy_(y)
            s["strength"].fill_(strength)
            self.graph.replay()
            self.replays += 1
            return s["loss"].clone(), s["correct"].clone()
        if signature != self.signature or self.graph is not None:  # what the graph baked in changed
            self._forget()
            self.signature, self.warm = signature, 0
        if self.warm < self.warmup_steps:
            self.warm += 1
            with self.cuda.side_stream(x.device):
                return self._eager(x, y, strength)
        try:
            return self._capture_and_replay(x, y, strength)
        except Exception as err:  # noqa: BLE001 - whatever failed, the runner goes on eagerly
            self.failed = f"{type(err).__name__}: {err}"
            self._forget()
            warnings.warn("mixq: capturing the training step as a CUDA graph failed; training goes on "
                          f"eagerly (slower on the host). The error was: {self.failed[:500]}", stacklevel=2)
            self.cuda.synchronize(x.device)
            return self._eager(x, y, strength)

    def pool_bytes(self) -> int:
        """Device memory the captured graph keeps for itself (activations, saved tensors, gradients:
        its private pool, reserved for as long as the graph lives); 0 before a capture."""
        return self.cuda.pool_bytes(self.graph) if self.graph is not None else 0

    def _eager(self, x: Tensor, y: Tensor, strength: float):
        for p in self.params:
            p.grad = None
        return self.forward_backward(x, y, strength)

    def _capture_and_replay(self, x: Tensor, y: Tensor, strength: float):
        s = {"x": x.clone(), "y": y.clone(), "strength": torch.full((), float(strength), device=x.device)}
        for p in self.params:  # backward then writes fresh gradients into the graph's memory
            p.grad = None
        self.graph, (s["loss"], s["correct"]) = self.cuda.capture(
            lambda: self.forward_backward(s["x"], s["y"], s["strength"]), x.device)
        self._static, self._grads = s, [p.grad for p in self.params]
        self.captures += 1
        self.graph.replay()  # capturing recorded the kernels; this runs them, for this step
        self.replays += 1
        return s["loss"].clone(), s["correct"].clone()
