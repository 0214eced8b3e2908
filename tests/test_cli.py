"""The command line: report answers "how big is this network at B bits?" for every registry model,
--help works for every subcommand, and user errors are one line with a suggestion, exit status 2."""

from __future__ import annotations

import json

import pytest

from mixq.cli import main
from mixq.models import MODELS

INPUT = {"fmnist_cnn": "1,28,28", "fmnist_vgg": "1,28,28", "resnet20": "3,32,32", "resnet18": "3,32,32",
         "mobilenetv2": "3,32,32", "efficientnet_lite0": "3,32,32"}


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_report_resnet20_at_4_bits_matches_hand_counts(capsys):
    argv = ["report", "--model", "resnet20", "--input-size", "3,32,32", "--bits", "4", "--json"]
    r = run_json(capsys, argv)
    # weights: stem 3*16*9 = 432; stage 1: 6 * 16*16*9 = 13,824; stage 2: 16*32*9 + 5 * 32*32*9 =
    # 50,688; stage 3: 32*64*9 + 5 * 64*64*9 = 202,752; fc 64*10 = 640 -> 268,336 at 4 bits, plus the
    # fc bias (10 at 32 bits): 134,168 + 40 bytes. The convs have no bias (BatchNorm is not folded).
    assert r["weight_bytes"] == 134_168 + 40
    # conv/linear inputs per sample: 3*32*32 + 6*16*32*32 + 16*32*32 + 5*32*16*16 + 32*16*16
    # + 5*64*8*8 + 64 = 187,456 elements at 4 bits; the largest is 16*32*32 = 16,384 elements
    assert r["act_sum_bytes"] == 187_456 / 2 and r["act_max_bytes"] == 16_384 / 2
    # BatchNorm channels: 16 + 6*16 + 6*32 + 6*64 = 688, scale and bias at 16 bits each
    assert r["bn16_bytes"] == 688 * 4
    assert len(r["layers"]) == 20 and r["layers"][0]["weight_bits_mean"] == 4


def test_report_relu_placement_counts_uhlichs_sites(capsys):
    r = run_json(capsys, ["report", "--model", "resnet20", "--input-size", "3,32,32", "--bits", "2,4",
                          "--act-site", "relu", "--json"])
    # 19 ReLUs: 7 at 16x32x32, 6 at 32x16x16, 6 at 64x8x8 = 188,416 elements at 4 bits
    assert r["act_sum_bytes"] == 188_416 / 2 and r["act_max_bytes"] == 16_384 / 2
    assert r["weight_bytes"] == 268_336 * 2 / 8 + 40


@pytest.mark.parametrize("name", sorted(MODELS))
def test_report_works_for_every_registry_model(capsys, name):
    r = run_json(capsys, ["report", "--model", name, "--input-size", INPUT[name], "--bits", "8", "--json"])
    for key in ("weight_bytes", "act_sum_bytes", "act_max_bytes", "bn16_bytes", "layers"):
        assert key in r
    assert r["weight_bytes"] > 0 and r["act_max_bytes"] <= r["act_sum_bytes"]


def test_report_table_names_its_unit(capsys):
    assert main(["report", "--model", "fmnist_cnn", "--input-size", "1,28,28", "--unit", "kB"]) == 0
    assert " kB" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "eval", "export", "report"])
def test_help_works_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as err:
        main([command, "--help"])
    assert err.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "--model", "resnet2", "--input-size", "3,32,32"], "did you mean 'resnet20'"),
    (["report", "--model", "resnet20", "--input-size", "3,32"], "--input-size"),
    (["report", "--model", "resnet20"], "--input-size"),
    (["train", "--recipe", "fmnist_default", "--set", "pretrain.epoch=3"], "did you mean 'epochs'"),
    (["train", "--recipe", "fmnist_defualt"], "did you mean 'fmnist_default'"),
    (["eval", "no/such/run"], "not a mixq run folder"),
    (["export", "no/such/run"], "not a mixq run folder"),
])
def test_user_errors_are_one_line_with_exit_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXQ_DATA", str(tmp_path))
    code = main(["train", "--quick", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install dataset-fashion-mnist" in err and "MIXQ_DATA" in err
