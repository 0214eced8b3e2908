"""The training-step benchmark: its bootstrap interval against a float64 numpy reference and its
coverage, and one small end-to-end run of the script (the JSON last line the acceptance check reads)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import bench_train_step  # noqa: E402


def _reference_interval(ratios, level, resamples, seed):
    """The same resamples (the indices from torch's seeded generator), numpy's median and
    quantile in float64."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(ratios), (resamples, len(ratios)), generator=g).numpy()
    medians = np.median(np.asarray(ratios, dtype=np.float64)[picks], axis=1)
    tail = (1.0 - level) / 2
    return tuple(np.quantile(medians, [tail, 1.0 - tail]))


@pytest.mark.parametrize("n", [1, 2, 7, 15])
def test_interval_matches_float64_reference(n):
    rng = np.random.default_rng(n)
    ratios = list(1.2 + 0.1 * rng.standard_normal(n))
    got = _common.rep_ratio_interval(ratios, level=0.9, resamples=500, seed=3)
    want = _reference_interval(ratios, 0.9, 500, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert min(ratios) <= got[0] <= statistics.median(ratios) <= got[1] <= max(ratios)


def test_interval_of_equal_ratios_is_a_point_and_reproducible():
    assert _common.rep_ratio_interval([1.25] * 9) == pytest.approx((1.25, 1.25), abs=1e-15)
    ratios = [1.1, 1.3, 1.2, 1.4, 1.15, 1.22]
    assert _common.rep_ratio_interval(ratios) == _common.rep_ratio_interval(ratios)
    with pytest.raises(ValueError, match="at least one ratio"):
        _common.rep_ratio_interval([])


def test_interval_covers_the_true_median():
    """Ratios drawn from a lognormal with median 1.25 (15 repetitions, like --quick): the 95 %
    interval holds 1.25 in about 95 % of 300 seeded trials (the percentile bootstrap of a median
    runs a little under its level for small n; far under would mean a wrong interval)."""
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(300):
        ratios = list(1.25 * np.exp(0.08 * rng.standard_normal(15)))
        lo, hi = _common.rep_ratio_interval(ratios, resamples=1000, seed=trial)
        hits += lo <= 1.25 <= hi
    assert 0.88 <= hits / 300 <= 0.995


def test_bench_train_step_small_run_prints_the_summary_json(tmp_path, capsys):
    stem = tmp_path / "smoke"
    # --malloc default: the run leaves this pytest process's C allocator as it found it
    rc = bench_train_step.main(["--device", "cpu", "--models", "fmnist_cnn", "--modes", "eager",
                                "--precisions", "fp32", "--reps", "3", "--warmup", "1",
                                "--no-brevitas", "--no-memory", "--malloc", "default",
                                "--out", str(stem), "--json"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    key = "fmnist_cnn_cpu_eager_fp32"
    ratio, (lo, hi) = summary[f"{key}_ratio"], summary[f"{key}_ratio_ci95"]
    assert 0.5 < ratio < 5.0 and lo <= ratio <= hi
    assert {f"{key}_mixq_ste_ratio", f"{key}_torch_lsq_ratio", "elapsed_s", "torch"} <= summary.keys()
    payload = json.loads(stem.with_suffix(".json").read_text())
    variants = {r["variant"]: r for r in payload["rows"]}
    assert {"float", "mixq", "mixq_bn", "mixq_ste", "mixq_ewgs_act", "torch_lsq"} <= variants.keys()
    assert all(len(r["times_s"]) == 3 for r in variants.values())
    assert "BatchNorm kept" in variants["mixq_bn"]["note"]
    assert "95% interval" in stem.with_suffix(".md").read_text()


def test_out_names_the_results_files_and_a_missing_folder_fails_before_the_run(tmp_path, monkeypatch):
    results = _common.RESULTS
    assert _common.results_paths("run9") == (results / "run9.json", results / "run9.md")
    monkeypatch.chdir(results.parent.parent)  # the repository root, where the README's commands run
    assert _common.results_paths("benchmarks/results/run9.json")[0].resolve() == results / "run9.json"
    assert _common.results_paths(str(tmp_path / "a.b"))[1] == tmp_path / "a.b.md"
    with pytest.raises(SystemExit, match="nowhere.*does not exist.*bare name"):
        bench_train_step.main(["--device", "cpu", "--out", str(tmp_path / "nowhere" / "x")])


@pytest.mark.parametrize("kind, has_bn", [("float", True), ("mixq", False), ("mixq_ste", False),
                                          ("mixq_bn", True)])
def test_mixq_variants_train_the_model_as_the_main_job_does(kind, has_bn):
    """mixq's rows time the model as mixq trains it, BatchNorm folded into the convs (the main
    job, the export); mixq_bn keeps BatchNorm, and float always has it."""
    x, y = _common.make_batch("fmnist_cnn", 4, torch.device("cpu"))
    v = _common.make_variant(kind, "fmnist_cnn", x, y, "eager", "fp32")
    bns = [m for m in v.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bool(bns) == has_bn
    before = [p.detach().clone() for p in v.model.parameters()]
    v.step(x, y)  # it trains: every conv weight moves
    assert all(not torch.equal(b, p) for b, p in zip(before, v.model.parameters(), strict=True)
               if p.dim() == 4)
