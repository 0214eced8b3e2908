"""Recipes: every shipped recipe validates; unknown keys and bad values fail with a suggestion;
overrides reach nested keys and phases."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixq.recipe import RECIPES_DIR, Recipe, apply_overrides, load_recipe, recipe_from_dict

SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def test_the_issue_recipes_are_shipped():
    for name in ("fmnist_default", "cifar10_resnet20_uhlich", "imagefolder_mobilenetv2_schaefer",
                 "imagefolder_efficientnet_lite0_schaefer"):
        assert name in SHIPPED
    assert any("nuuq" in name for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_and_round_trips(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe_from_dict(recipe.to_dict()) == recipe  # recipe.json rebuilds the same recipe


def test_schaefer_recipes_have_three_phases_and_the_papers_settings():
    r = load_recipe("imagefolder_mobilenetv2_schaefer")
    assert [p.name for p in r.phases] == ["homogeneous", "mixed", "finetune"]
    assert r.phases[0].quantizers == "frozen" and r.phases[2].reload_best
    assert r.phases[1].update_every == 20 and r.phases[1].penalty
    assert r.budget.unit == "kB" and r.budget.lambdas["weight"] == 1e-4
    assert (r.quant.weight.modifier, r.quant.act.modifier) == ("ewgs", "atanh")


def test_uhlich_recipe_budgets():
    r = load_recipe("cifar10_resnet20_uhlich")
    assert (r.budget.weight, r.budget.act_sum, r.budget.unit) == ("70.1 KiB", "92.1 KiB", "KiB")
    assert r.quant.act_site == "relu" and len(r.phases) == 1 and r.phases[0].penalty


@pytest.mark.parametrize(("overrides", "message"), [
    (["pretrain.epoch=3"], "did you mean 'epochs'"),
    (["modle.name=resnet20"], "did you mean 'model'"),
    (["quant.weight.param=u4"], "did you mean 'u3'"),
    (["quant.act.modifier=ewsg"], "did you mean 'ewgs'"),
    (["phases.0.optimizer=adamm"], "did you mean 'adam'"),
    (["budget.weight=70 KB"], "ambiguous"),
    (["budget.greedy_criterion=fischer"], "did you mean 'fisher'"),
    (["budget.fisher_batches=0"], "fisher_batches must be >= 1"),
    (["phases.1.greedy_strat=true"], "did you mean 'greedy_start'"),
    (["pretrain.epochs"], "key=value"),
])
def test_bad_values_fail_with_a_suggestion(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("fmnist_default", overrides)


def test_unknown_recipe_name_suggests_the_closest():
    with pytest.raises(ValueError, match="fmnist_default"):
        load_recipe("fmnist_defualt")


def test_overrides_reach_nested_keys_and_phases(tmp_path: Path):
    r = load_recipe("fmnist_default", ["pretrain.epochs=2", "phases.1.lr=0.5", 'budget.weight="3 bpe"',
                                        "quant.weight.granularity=group", "quant.weight.group_size=8"])
    assert r.pretrain.epochs == 2 and r.phases[1].lr == 0.5 and r.budget.weight == "3 bpe"
    assert r.quant.weight.group_size == 8
    data = apply_overrides({"a": [{"b": 1}]}, ["a.0.b=2", "c.d=word"])
    assert data == {"a": [{"b": 2}], "c": {"d": "word"}}
    path = tmp_path / "mine.toml"
    path.write_text('[model]\nname = "resnet20"\n')
    assert load_recipe(str(path)).model.name == "resnet20"
    path.write_text("[model\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_recipe(str(path))


def test_quant_sections_change_their_own_site_defaults(tmp_path):
    """[quant.act] starts from default_act_config (sign from the data, percentile init), not from
    the weights' defaults: a recipe that only sets the widths must not get signed activations."""
    from mixq.config import default_act_config, default_weight_config

    path = tmp_path / "r.toml"
    path.write_text('[quant.act]\nbits_init = 4\nbits_min = 4\nbits_max = 4\n[quant.weight]\nbits_min = 3\n')
    quant = load_recipe(str(path)).quant
    assert quant.act == default_act_config().replace(bits_init=4, bits_min=4, bits_max=4)
    assert quant.act.signed is None and quant.act.init == "percentile"
    assert quant.weight == default_weight_config().replace(bits_min=3)
    path.write_text("[quant.act]\nbits_maxx = 4\n")
    with pytest.raises(ValueError, match=r"unknown key 'quant\.act\.bits_maxx'.*did you mean 'bits_max'"):
        load_recipe(str(path))
