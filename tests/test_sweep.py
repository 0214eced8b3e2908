"""`mixq sweep` on the 1,000-image Fashion-MNIST fixture: one float model for every point, one row
per point with the stored and equivalent bits, the table and plot written, a finished point reused."""

from __future__ import annotations

import json

import pytest

from mixq.sweep import parse_grid, run_sweep, sweep_table

pytestmark = pytest.mark.e2e

RECIPE = """
seed = 0
method = "flexible"
[data]
batch_size = 100
eval_batch_size = 250
val_size = 100
[pretrain]
epochs = 1
lr = 0.1
[quant.act]
granularity = "tensor"
[flexible]
k = 4
grid_bits = 4
granularity = "tensor"
finetune_epochs = 0.1
report_mse = false
[[phases]]
name = "qat"
epochs = 0.1
lr = 0.005
quant_lr = 0.001
schedule = "constant"
"""


def test_parse_grid_and_its_errors():
    assert parse_grid(["flexible.k=3, 4", "flexible.grid_bits=8"]) == [
        ("flexible.k", ["3", "4"]), ("flexible.grid_bits", ["8"])]
    with pytest.raises(ValueError, match="must look like key=v1,v2"):
        parse_grid(["flexible.k"])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["flexible.k=3", "flexible.k=4"])


def test_sweep_reuses_one_float_model_and_reports_every_point(tmp_path, fmnist_dir):
    recipe = tmp_path / "nuuq.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "sweep"
    kw = {"data_root": fmnist_dir, "device": "cpu", "progress": False}
    rows = run_sweep(str(recipe), parse_grid(["flexible.k=3,4"]), out, **kw)
    assert [r["point"] for r in rows] == ["k3", "k4"] and [r["k"] for r in rows] == [3, 4]
    assert len(list(out.glob("float-*"))) == 1  # trained once, used by both points
    assert rows[0]["float_checkpoint"] == rows[1]["float_checkpoint"]
    assert rows[0]["float_acc"] == rows[1]["float_acc"]
    assert rows[0]["equivalent_bits"] == pytest.approx(1.585, abs=1e-3)
    assert rows[0]["stored_bits"] == pytest.approx(1.6)  # 5 ternary codes per byte
    assert rows[1]["equivalent_bits"] == rows[1]["stored_bits"] == 2
    assert all(r["acc_qat"] == r["quant_acc"] and r["acc_ft"] is not None for r in rows)
    assert json.loads((out / "sweep.json").read_text()) == rows
    table = (out / "sweep.md").read_text()
    assert "QAT %" in table and table.count("\n| k") == 2 and (out / "sweep.png").stat().st_size > 0
    stamp = (out / "k3" / "summary.json").stat().st_mtime_ns
    again = run_sweep(str(recipe), parse_grid(["flexible.k=3"]), out, **kw)  # finished: reused
    assert again == rows[:1] and (out / "k3" / "summary.json").stat().st_mtime_ns == stamp


def test_sweep_refuses_a_recipe_of_another_method(tmp_path):
    recipe = tmp_path / "learned.toml"
    recipe.write_text('method = "learned"\n')
    with pytest.raises(ValueError, match="method = 'flexible'"):
        run_sweep(str(recipe), parse_grid(["seed=1"]), tmp_path / "out")


def test_sweep_table_final_column_prefers_qat():
    row = {"point": "k4", "seed": 0, "k": 4, "grid_bits": 8, "level_init": "dp", "equivalent_bits": 2.0,
           "stored_bits": 2.0, "stored_bits_ceil": 2.0, "stored_bits_base_k": 2.0, "float_acc": 0.9,
           "acc_no_ft": 0.5, "acc_ft": 0.85, "acc_qat": 0.88, "weight_bytes": 2048}
    assert "| 85.00 | 88.00 | -2.00 | 2.0 |" in sweep_table([row])
    assert "| 85.00 | - | -5.00 |" in sweep_table([{**row, "acc_qat": None}])
