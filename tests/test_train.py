"""The main job on real data (the 1,000-image Fashion-MNIST fixture): every stage runs, budgets are
met, an interrupted run resumes to exactly the same result, and failures say what to do."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from conftest import TINY_RECIPE

from mixq import _kernels, host_memory
from mixq.pipeline import CheckpointError, train_run
from mixq.recipe import load_recipe
from mixq.train import Interrupted, NonFiniteLoss, lr_factor

pytestmark = pytest.mark.e2e


def run(folder, data, **kw):
    return train_run(kw.pop("recipe", None) or load_recipe(TINY_RECIPE, kw.pop("overrides", [])), folder,
                     data_root=data, progress=False, device="cpu", **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fmnist_dir):
    folder = tmp_path_factory.mktemp("runs") / "reference"
    return folder, run(folder, fmnist_dir)


def test_main_job_runs_every_stage_and_meets_the_budget(reference_run):
    folder, summary = reference_run
    for name in ("recipe.json", "env.json", "log.jsonl", "summary.json", "summary.md", "bits.png",
                 "training.png", "ckpt/final.pt", "ckpt/float.pt"):
        assert (folder / name).exists(), name
    assert summary["budgets_met"] == {"weight": True} and summary["all_budgets_met"]
    # 2.5 bits per weight element, biases included (at 32 bits): the budget is that exact number
    weights = sum(row["weight_elements"] for row in summary["layers"])
    biases = sum(row["bias_bytes"] for row in summary["layers"]) / 4
    assert summary["budgets"]["weight_bytes"] == pytest.approx(2.5 * (weights + biases) / 8)
    assert summary["weight_bytes"] <= summary["budgets"]["weight_bytes"]
    # the rule keeps the first layer at 8 bits, activations are fixed at 4 (8 for the image)
    first = summary["layers"][0]
    assert first["weight_bits_min"] == first["weight_bits_max"] == 8 and first["act_bits_mean"] == 8
    assert all(row["act_bits_mean"] == 4 for row in summary["layers"][1:])
    # the model learned something even from 900 images and a few steps per stage
    assert summary["float_acc"] > 0.5 and summary["quant_acc"] > 0.35
    env = json.loads((folder / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env
    # a CPU run keeps freed memory for reuse where the C library is glibc (mixq.host_memory)
    assert env["keep_freed_host_memory"] == (host_memory._glibc() is not None)
    kernels = {k: v for k, v in _kernels.fast_kernel_status().items() if k != "variants"}
    assert env["fast_kernels"] == json.loads(json.dumps(kernels))  # the settings the run used
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log if "stage" in r} == {0, 1, 2, 3}
    assert any(r.get("eval") and r["stage"] == 2 and "sizes" in r for r in log)


def test_interrupted_run_resumes_to_the_same_result(reference_run, tmp_path, fmnist_dir):
    _, expected = reference_run
    folder = tmp_path / "interrupted"

    def interrupt(stage, step):
        if (stage, step) == (2, 3):  # the middle of the mixed phase, between two evaluations
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted):
        run(folder, fmnist_dir, on_step=interrupt)
    last = torch.load(folder / "ckpt" / "last.pt", weights_only=False)
    assert (last["stage"], last["progress"]["step"]) == (2, 3)
    resumed = train_run(None, folder, data_root=fmnist_dir, resume=True, progress=False, device="cpu")
    for key in ("float_acc", "quant_acc", "weight_bytes", "act_sum_bytes", "budgets_met"):
        assert resumed[key] == expected[key], key
    bits = [(r["fqn"], r["weight_bits_min"], r["weight_bits_mean"], r["weight_bits_max"])
            for r in resumed["layers"]]
    assert bits == [(r["fqn"], r["weight_bits_min"], r["weight_bits_mean"], r["weight_bits_max"])
                    for r in expected["layers"]]
    # the log continues where it stopped: no step of stage 2 appears twice
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"], bool(r.get("eval"))) for r in log if r.get("stage") == 2]
    assert len(steps) == len(set(steps))


def test_a_run_folder_is_not_overwritten(reference_run, fmnist_dir):
    folder, _ = reference_run
    with pytest.raises(FileExistsError, match="--resume"):
        run(folder, fmnist_dir)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, fmnist_dir):
    folder = tmp_path / "diverged"
    with pytest.raises(NonFiniteLoss, match="Lower the learning rate") as err:
        run(folder, fmnist_dir, overrides=["pretrain.lr=1e30", "pretrain.epochs=2"])
    assert "last.pt" in str(err.value)
    assert not (folder / "ckpt" / "float.pt").exists()


def test_damaged_and_mismatched_checkpoints_give_clear_errors(reference_run, tmp_path, fmnist_dir):
    folder, _ = reference_run
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "ckpt").mkdir()
    for name in ("recipe.json", "env.json", "log.jsonl"):
        (damaged / name).write_bytes((folder / name).read_bytes())
    (damaged / "ckpt" / "last.pt").write_bytes((folder / "ckpt" / "final.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="damaged"):
        train_run(None, damaged, data_root=fmnist_dir, resume=True, progress=False, device="cpu")
    from mixq.models import create_model
    from mixq.pipeline import load_model_state

    state = torch.load(folder / "ckpt" / "final.pt", weights_only=False)["model"]
    with pytest.raises(CheckpointError, match="does not match this recipe's model"):
        load_model_state(create_model("resnet20"), state, folder / "ckpt" / "final.pt")


def test_infeasible_budget_is_refused_with_the_minimum(tmp_path, fmnist_dir):
    with pytest.raises(ValueError, match="below the smallest weight size") as err:
        run(tmp_path / "tiny", fmnist_dir, overrides=['budget.weight="1 kB"'])
    assert "raise the budget" in str(err.value)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_lr_schedules_start_low_or_flat_and_end_low(schedule):
    factors = [lr_factor(schedule, p / 100, 0.25) for p in range(101)]
    assert all(0 <= f <= 1.0 + 1e-9 for f in factors)
    if schedule == "constant":
        assert set(factors) == {1.0}
    else:
        assert factors[-1] <= 0.01 + 1e-9 and max(factors) == pytest.approx(1.0, abs=0.01)
    if schedule == "onecycle":
        assert factors[0] < 0.01 and math.isclose(factors[25], 1.0, abs_tol=0.01)


def test_quantizer_momentum_is_its_own_setting():
    """quant_momentum = 0: a quantizer step is lr x its clipped gradient, with no memory of earlier
    steps (what stops a budget-driven descent the step the penalty lets go); weights keep theirs."""
    from torch import nn

    from mixq.config import QuantConfig
    from mixq.convert import prepare_
    from mixq.recipe import PhaseConfig
    from mixq.train import make_optimizer, quantizer_params

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    prepare_(model, QuantConfig(), example_input=torch.randn(2, 1, 8, 8))
    qids = {id(p) for p in quantizer_params(model)}
    for quant_momentum, expected in ((0.0, 0.0), (None, 0.9)):
        opt = make_optimizer(model, PhaseConfig(momentum=0.9, quant_momentum=quant_momentum))
        for g in opt.param_groups:
            is_quant = all(id(p) in qids for p in g["params"])
            assert g["momentum"] == (expected if is_quant else 0.9)
    q = next(p for p in quantizer_params(model))
    opt = make_optimizer(model, PhaseConfig(lr=0.0, quant_lr=0.5, quant_momentum=0.0))
    for _ in range(2):  # the same gradient twice: two equal steps (momentum would make the second larger)
        before = q.detach().clone()
        opt.zero_grad()
        q.grad = torch.ones_like(q)
        opt.step()
        torch.testing.assert_close(before - q.detach(), torch.full_like(q, 0.5))
    with pytest.raises(ValueError, match="quant_momentum"):
        PhaseConfig(quant_momentum=-0.1)


def test_greedy_start_enters_the_phase_inside_the_budget(tmp_path, fmnist_dir):
    folder = tmp_path / "greedy"
    summary = run(folder, fmnist_dir, overrides=["phases.1.greedy_start=true", "phases.1.epochs=0.5"])
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    first_mixed = next(i for i, r in enumerate(log) if r.get("stage") == 2)
    events = [(i, r) for i, r in enumerate(log) if r.get("event") == "enforce_budgets"]
    assert events and events[0][0] < first_mixed and "starts inside" in events[0][1]["why"]
    i, start = events[0]
    assert start["lowered"] and start["sizes"]["weight_bytes"] <= summary["budgets"]["weight_bytes"]
    before = [r for r in log[:i] if r.get("stage") == 1 and "sizes" in r][-1]  # homogeneous 4 bits
    assert before["sizes"]["weight_bytes"] > summary["budgets"]["weight_bytes"]
    assert summary["all_budgets_met"]
