"""The bookkeeping of mixq.graphs.GraphedStep, on the CPU: warm-up, capture, replay with fresh inputs,
capturing again when something the graph baked in changed, and the eager fallback.

A CUDA graph is replaced by a stand-in (`Rerun`) that behaves as a captured graph does towards the
training loop: capturing runs nothing (its effect on the buffers is undone), and a replay writes
the step's loss, accuracy count and gradients into the tensors of the capture. The real capture is
checked on a GPU in tests/test_cuda_kernels.py (test_cuda_graph_steps_match_eager_steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types

import pytest
import torch
from conftest import TINY_RECIPE
from test_speed_paths import _prepared_model, _training_runner

import mixq.train
from mixq.graphs import GraphedStep
from mixq.pipeline import train_run
from mixq.recipe import Recipe, load_recipe


class Rerun:
    """Stand-in for CUDA (see the module doc); a replay on memory other than the capture's (what
    a real graph would read stale) fails the test; `fail` makes every capture raise."""

    def __init__(self, fail: bool = False):
        self.fail, self.params, self.buffers = fail, [], []
        self.captures = self.replays = 0

    @staticmethod
    @contextlib.contextmanager
    def side_stream(device):
        yield

    @staticmethod
    def synchronize(device):
        pass

    def capture(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        saved = [b.clone() for b in self.buffers]
        out = fn()
        for b, value in zip(self.buffers, saved, strict=True):  # a capture runs no kernel
            b.copy_(value)
        params, buffers, grads = self.params, self.buffers, [p.grad for p in self.params]
        baked = [t.data_ptr() for t in params + buffers]  # the memory a real graph would read
        self.captures += 1

        def replay():
            assert [t.data_ptr() for t in params + buffers] == baked, "replayed on stale memory"
            assert all(p.grad is g for p, g in zip(params, grads, strict=True)), "gradients replaced"
            self.replays += 1
            for p in params:
                p.grad = None
            new = fn()
            for o, n in zip(out, new, strict=True):
                o.copy_(n)
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    g.copy_(p.grad)
                p.grad = g

        return types.SimpleNamespace(replay=replay), out


def _use_stand_in(monkeypatch, fake: Rerun) -> Rerun:
    """PhaseRunner builds its GraphedStep with `fake` for CUDA, on the CPU."""
    def build(fn, modules):
        step = GraphedStep(fn, modules, cuda=fake)
        fake.params, fake.buffers = step.params, step.buffers
        return step

    monkeypatch.setattr(mixq.train, "graphs_available", lambda device: True)
    monkeypatch.setattr(mixq.train, "GraphedStep", build)
    return fake


@pytest.fixture
def stand_in(monkeypatch):
    return _use_stand_in(monkeypatch, Rerun())


def _batches(x, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(x.shape, generator=gen), torch.randint(0, 10, (x.shape[0],), generator=gen))
            for _ in range(n)]


def _train(graphs: bool, steps: int = 8, between=None):
    model, x = _prepared_model()
    step, runner = _training_runner(model, x, cuda_graphs=graphs)
    losses = []
    for i, (xb, yb) in enumerate(_batches(x, steps)):
        if between is not None:
            between(i, model, runner)
        losses.append(step(xb, yb, progress=i / steps)[0])
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return torch.stack(losses), state, runner


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert [k for k in a[1] if not torch.equal(a[1][k], b[1][k])] == []


def test_replayed_steps_train_as_eager_steps(stand_in):
    """Three warm-up steps, a capture replayed for its own step, then replays with a new batch and a
    new penalty strength each: the losses, parameters and buffers of eager training, bit for bit."""
    eager, graphed = _train(False), _train(True)
    graph = graphed[2]._graph
    assert (graph.captures, graph.replays, graph.failed) == (1, 5, None)
    assert eager[2]._graph is None
    _assert_same(graphed, eager)


def test_a_graph_is_captured_again_when_what_it_baked_in_changes(stand_in):
    """New parameter storage (a `model.to(...)`, a state_dict assigned), gradients set to None, a
    module switched to eval: each makes the next steps eager and a new capture follow; training
    still matches eager training step for step."""
    def meddle(i, model, runner):
        p = next(model.parameters())
        if i == 5:
            p.data = p.data.clone()  # new memory: the old graph would read the old tensor
        if i == 10:
            for q in model.parameters():
                q.grad = None
        if i == 15:
            model[1].eval()
        if i == 16:
            model[1].train()

    eager = _train(False, steps=22, between=meddle)
    graphed = _train(True, steps=22, between=meddle)
    _assert_same(graphed, eager)
    graph = graphed[2]._graph
    # captured at steps 3, 8, 13 and 19 (each after three eager warm-up steps; the eval flip at
    # step 15 and its undoing at 16 each start a new warm-up)
    assert (graph.captures, graph.failed) == (4, None)


def test_a_failed_capture_warns_once_and_trains_eagerly(monkeypatch):
    _use_stand_in(monkeypatch, Rerun(fail=True))
    with pytest.warns(UserWarning, match="CUDA graph failed.*not permitted") as caught:
        graphed = _train(True)
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    assert graphed[2]._graph.failed.startswith("RuntimeError")
    _assert_same(graphed, _train(False))


@pytest.mark.parametrize("why", ["cpu", "off", "update_every"])
def test_no_graph_where_it_cannot_or_should_not_apply(why, monkeypatch):
    """The CPU has no CUDA graphs; `cuda_graphs=False` keeps steps eager; quantizers that learn
    every second step change their requires_grad flags between steps, which a graph cannot follow."""
    model, x = _prepared_model()
    step, runner = _training_runner(model, x, cuda_graphs=why != "off")
    if why != "cpu":
        monkeypatch.setattr(mixq.train, "graphs_available", lambda device: True)
    if why == "update_every":
        runner.phase = dataclasses.replace(runner.phase, update_every=2)
    assert runner._graphed_step(x, [], True) is None


def test_recipe_cuda_graphs_is_a_bool():
    assert Recipe().cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs must be true or false, got 'yes'"):
        Recipe(cuda_graphs="yes")


@pytest.mark.e2e
def test_the_main_job_with_graphs_gives_the_eager_result(stand_in, tmp_path, fmnist_dir):
    """The whole main job (float, frozen, mixed and fine-tuning phases with evaluations, best-model
    checkpoints and the greedy start between steps) with the trainer's graphs: the same accuracies,
    sizes and bit widths as eager training, and no replay on memory the capture did not see."""
    def run(name, graphs):
        recipe = load_recipe(TINY_RECIPE, [f"cuda_graphs={'true' if graphs else 'false'}"])
        return train_run(recipe, tmp_path / name, data_root=fmnist_dir, progress=False, device="cpu")

    eager, graphed = run("eager", False), run("graphed", True)
    # one capture per phase (float, frozen, mixed, fine-tuning): evaluations, checkpoints and the
    # greedy start change nothing a graph baked in; every later step of a phase is a replay
    assert (stand_in.captures, stand_in.replays >= 40) == (4, True), (stand_in.captures, stand_in.replays)
    for key in ("float_acc", "quant_acc", "weight_bytes", "act_sum_bytes", "budgets_met"):
        assert graphed[key] == eager[key], key
    bits = [[r["weight_bits_mean"] for r in run["layers"]] for run in (graphed, eager)]
    assert bits[0] == bits[1]
