"""Budgets: the papers' penalty and ramp against hand-written formulas, the adaptive multiplier,
budget resolution and feasibility, and the greedy enforcement that guarantees the final size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixq
from mixq.budget import (
    BudgetPenalty,
    Budgets,
    check_feasible,
    element_counts,
    enforce_budgets_,
    minimum_sizes_bytes,
    ramp,
    resolve_budgets,
    squared_gradients,
    weight_importance,
)
from mixq.size import SizeAccount


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def prepared(config=None):
    net, x = small_net(), torch.randn(16, 1, 8, 8)
    mixq.prepare_(net, config or mixq.QuantConfig(), example_input=x)
    mixq.calibrate_(net, [x])
    return net, x


def test_ramp_rises_linearly_over_the_first_half_then_stays_at_one():
    assert ramp(0.0) == pytest.approx(0.01)
    assert ramp(0.25) == pytest.approx(0.01 + 0.99 * 0.5)
    assert ramp(0.5) == ramp(0.9) == 1.0
    assert ramp(0.3, start=0.1, fraction=0.0) == 1.0


def test_penalty_matches_the_papers_formula_in_the_chosen_unit():
    budgets = Budgets(weight_bytes=1000.0, act_max_bytes=200.0)
    pen = BudgetPenalty(budgets, {"weight": 0.1, "act_max": 1.0}, unit="kB", controller="none", margin=0.0)
    sizes = {"weight_bits": torch.tensor(8 * 1500.0), "act_sum_bits": torch.tensor(0.0),
             "act_max_bits": torch.tensor(8 * 150.0), "bn16_bits": torch.tensor(0.0)}
    # weight: 0.1 * (1.5 kB - 1.0 kB)^2 = 0.025; act_max is under its budget: 0; ramp 0.5
    assert float(pen(sizes, strength=0.5)) == pytest.approx(0.5 * 0.025)
    pen_margin = BudgetPenalty(budgets, {"weight": 0.1}, unit="kB", controller="none", margin=0.1)
    # the target is lowered by the margin: 0.1 * (1.5 - 0.9)^2
    assert float(pen_margin(sizes)) == pytest.approx(0.1 * 0.6**2)


def test_controller_raises_the_factor_while_over_budget_and_relaxes_under_it():
    pen = BudgetPenalty(Budgets(weight_bytes=1000.0), controller="pi")
    over = {"weight_bits": torch.tensor(8 * 2000.0)}
    under = {"weight_bits": torch.tensor(8 * 500.0)}
    factors = []
    for _ in range(20):
        pen(over)
        factors.append(pen.factors()["weight"])
    assert all(b > a for a, b in zip(factors, factors[1:], strict=False)) and factors[-1] > 2
    for _ in range(200):
        pen(under)
    assert pen.factors()["weight"] == pytest.approx(1.0)  # floored at the papers' lambda
    pen.eval()
    before = pen.factors()
    pen(over)
    assert pen.factors() == before  # no controller step outside training


def test_the_penalty_drives_the_size_under_budget_even_with_adam():
    net, _ = prepared()
    account = SizeAccount(net)
    start = float(account()["weight_bits"].detach()) / 8
    target = 0.7 * start
    pen = BudgetPenalty(Budgets(weight_bytes=target), {"weight": 1e-6}, unit="B", controller="pi")
    qparams = [p for s in mixq.quant_sites(net) for p in s.quant.parameters()]
    opt = torch.optim.Adam(qparams, lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        pen(account()).backward()
        opt.step()
        for s in mixq.quant_sites(net):
            s.quant.project_()
        if float(account()["weight_bits"].detach()) / 8 <= target:
            break
    assert float(account()["weight_bits"].detach()) / 8 <= target


def test_resolve_budgets_reads_units_and_bits_per_element():
    net, _ = prepared()
    counts = element_counts(net)
    # 8*1*9 + 8 + 16*8*9 + 16 + 10*16 + 10 weight elements incl. bias; act sites: 64 + 512 + 16
    assert counts == {"weight": 72 + 8 + 1152 + 16 + 160 + 10, "act_sum": 64 + 512 + 16, "act_max": 512}
    b = resolve_budgets({"weight": "2.5 bpe", "act_sum": "1 KiB", "act_max": "600 B"}, net)
    assert b.weight_bytes == pytest.approx(2.5 * counts["weight"] / 8)
    assert (b.act_sum_bytes, b.act_max_bytes) == (1024.0, 600.0)
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_budgets({"weight": "10 KB"}, net)


def test_feasibility_check_names_the_minimum():
    net, _ = prepared()
    floor = minimum_sizes_bytes(net)
    # every signed weight slice at 2 bits (codes -1, 0, 1), biases at 32 bits
    assert floor["weight_bytes"] == (2 * (72 + 1152 + 160) + 32 * (8 + 16 + 10)) / 8
    check_feasible(net, Budgets(weight_bytes=floor["weight_bytes"]))
    with pytest.raises(ValueError, match=f"{floor['weight_bytes']:.0f} B"):
        check_feasible(net, Budgets(weight_bytes=floor["weight_bytes"] - 1), unit="B")


@pytest.mark.parametrize("key", ["weight", "act_sum", "act_max"])
def test_enforcement_meets_any_feasible_budget(key):
    net, x = prepared()
    account = SizeAccount(net)
    size = float(account()[f"{key}_bits"]) / 8
    floor = minimum_sizes_bytes(net)[f"{key}_bytes"]
    target = floor + 0.4 * (size - floor)
    lowered = enforce_budgets_(net, Budgets(**{f"{key}_bytes": target}), x)
    assert lowered and float(account()[f"{key}_bits"]) / 8 <= target
    for s in mixq.quant_sites(net):
        assert (s.quant.bits_per_slice() >= (2 if s.quant.signed else 1)).all()
    with pytest.raises(ValueError, match="minimum width"):
        enforce_budgets_(net, Budgets(**{f"{key}_bytes": floor - 1}), x)


def test_squared_gradients_match_a_float64_reference():
    net = small_net().double()
    torch.manual_seed(1)
    batches = [(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))) for _ in range(3)]
    params = [net[0].weight, net[6].weight]
    got = squared_gradients(net, batches, 2, params)  # the first two batches only
    want = [torch.zeros_like(p) for p in params]
    for x, y in batches[:2]:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        for w, p in zip(want, params, strict=True):
            w += p.grad ** 2 / 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)
    assert net.training  # the model's mode is restored


def test_importance_steers_the_greedy_lowering_to_the_unimportant_layer():
    """Steps that clip nothing cost nothing whatever the weighting; all others go to the layer whose
    errors are cheap: the first layer, which the plain criterion hardly touches, or the last."""
    from collections import Counter

    def lowered_by_layer(cheap):
        net, x = prepared()
        size = float(SizeAccount(net)()["weight_bits"].detach()) / 8
        importance = None if cheap is None else {
            s.fqn: torch.full_like(s.layer.weight, 1e-6 if s.fqn == cheap else 1e6)
            for s in mixq.quant_sites(net) if s.role == "weight"}
        lowered = enforce_budgets_(net, Budgets(weight_bytes=size - 50), x, importance)
        return Counter(item.split(":")[0] for item in lowered)

    plain = lowered_by_layer(None)
    assert plain.most_common(1)[0][0] == "2" and plain["0"] <= 1
    for cheap in ("0", "6"):
        counts = lowered_by_layer(cheap)
        assert counts[cheap] >= 0.7 * sum(counts.values()), counts


def test_weight_importance_names_every_quantized_weight():
    net, x = prepared()
    imp = weight_importance(net, [(x, torch.zeros(len(x), dtype=torch.long))], 1)
    sites = [s for s in mixq.quant_sites(net) if s.role == "weight"]
    assert list(imp) == [s.fqn for s in sites]
    assert all(imp[s.fqn].shape == s.layer.weight.shape and (imp[s.fqn] >= 0).all() for s in sites)
