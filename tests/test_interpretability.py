"""The interpretability suite (docs/math.md §5): certify, combine, explain."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.interpret.groups import (GroupMLP, brute_force_accuracy, cyclic_table, domain, symmetric_table,
                               train_group_model)

# ------------------------------------------------------------------------------------------- certify

GROUPS = {"Z_31": lambda: cyclic_table(31), "S_4": lambda: symmetric_table(4)}


@pytest.fixture(scope="module", params=[(g, s) for g in GROUPS for s in (0, 1)], ids=lambda p: f"{p[0]}-seed{p[1]}")
def group_model(request):
    name, seed = request.param
    table = GROUPS[name]()
    model = train_group_model(table, seed=seed, embed=16, width=48, steps=1200, train_fraction=0.7)
    return table, model


def _calibration(table):
    xy, _ = domain(table)
    return [xy[i:i + 512] for i in range(0, len(xy), 512)]


@pytest.mark.parametrize("keep,replacement", [(8, "constant"), (24, "constant"), (24, "affine"),
                                              (40, "affine"), (48, "constant")])
def test_certified_inputs_are_classified_correctly_by_the_dense_model(group_model, keep, replacement):
    table, model = group_model
    result = fxa.abstract(model, _calibration(table), keep=keep, replacement=replacement, sites=["hidden"])
    cert = fxa.certify(model, result, table)
    xy, labels = domain(table)
    with torch.no_grad():
        right32 = (model(xy).argmax(-1) == labels).reshape(table.shape)
        right64 = (model.double()(xy).argmax(-1) == labels).reshape(table.shape)
    model.float()
    wrong = cert["mask"] & ~(right32 & right64)
    assert not wrong.any(), f"certified inputs {wrong.nonzero()[:5].tolist()} are misclassified by the dense model"
    assert cert["bound"] <= brute_force_accuracy(model, table), "the certified bound exceeds brute-force accuracy"
    assert cert["certified"] == int(cert["mask"].sum()) and cert["inputs"] == table.numel()


@pytest.mark.parametrize("seed", range(8))
def test_certify_is_sound_on_untrained_networks_with_near_ties(seed):
    """Random weights give tiny margins and ties everywhere: the rounding allowances must hold."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 14, (1,), generator=gen))
    table = cyclic_table(n) if seed % 2 else symmetric_table(3 + (seed % 4 == 0))
    n = table.shape[0]
    torch.manual_seed(seed)
    model = GroupMLP(n, embed=4, width=16).eval()
    keep = int(torch.randint(1, 17, (1,), generator=gen))
    result = fxa.abstract(model, _calibration(table), keep=keep, round_to=1, sites=["hidden"],
                          replacement="affine" if seed % 3 else "constant")
    cert = fxa.certify(model, result, table)
    xy, labels = domain(table)
    with torch.no_grad():
        right = (model(xy).argmax(-1) == labels).reshape(table.shape)
    assert not (cert["mask"] & ~right).any(), "a certified input is misclassified"


def test_certify_is_tight_when_nothing_is_removed(group_model):
    """keep = every unit: the deviation is fold rounding only, so every input with a visible margin is proven."""
    table, model = group_model
    result = fxa.abstract(model, _calibration(table), keep=48, sites=["hidden"])
    cert = fxa.certify(model, result, table)
    acc = brute_force_accuracy(model, table)
    assert cert["gap_max"] <= cert["rounding"] * (1 + 1e-6) < 0.01, f"gap {cert['gap_max']} should be rounding only"
    assert cert["bound"] >= acc - 0.01, f"bound {cert['bound']} should match accuracy {acc} at keep = all"


def test_certify_rejects_a_model_that_is_not_a_group_network():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    result = fxa.abstract(mlp, [torch.randn(32, 4)], keep=4, round_to=1)
    with pytest.raises(ConfigError, match="GroupMLP"):
        fxa.certify(mlp, result, cyclic_table(3))


def test_certify_rejects_a_domain_of_the_wrong_shape():
    table = cyclic_table(7)
    model = GroupMLP(7, embed=4, width=8)
    result = fxa.abstract(model, _calibration(table), keep=4, round_to=1, sites=["hidden"])
    with pytest.raises(ConfigError, match="multiplication table"):
        fxa.certify(model, result, cyclic_table(5))


def test_symmetric_table_is_a_group():
    table = symmetric_table(4)
    e = 0
    assert (table[e] == torch.arange(24)).all() and (table[:, e] == torch.arange(24)).all(), "index 0 is the identity"
    assoc = table[table, :]                                    # (x*y)*z as [x, y, z]
    assert (assoc == table[:, table]).all(), "composition is associative"
    assert all(sorted(row.tolist()) == list(range(24)) for row in table), "each row is a permutation (Latin square)"
    assert not (table == table.T).all(), "S_4 is not abelian"


# ------------------------------------------------------------------------------------------- combine

@pytest.fixture(scope="module")
def digits():
    """A small trained digits MLP (width 64) and its data: a couple of seconds."""
    from fxabstract.demo import DigitsMLP, digits_data, train
    x_train, y_train, x_test, y_test = digits_data()
    torch.manual_seed(0)
    model = train(DigitsMLP(width=64), x_train, y_train, epochs=20)
    return model, x_train, x_test


@pytest.fixture(scope="module")
def combination(digits):
    model, x_train, x_test = digits
    analysis = fxa.analyse(model, list(x_train.split(256)))
    candidates = [analysis.compile(k, replacement="affine") for k in (0.5, 0.25, 0.125)]
    return candidates, fxa.combine(model, candidates, x_test, lambdas=(1.0, 0.9, 0.7, 0.0), samples=40)


def test_combine_keeps_every_candidate_set_above_lambda(combination):
    _, combo = combination
    for lam, a in combo.assignments.items():
        assert a.shape == (40,) and int(a.min()) >= -1 and int(a.max()) < 3, "one candidate index (or -1) per input"
        for c, g in enumerate(combo.graphs):
            S = a == c
            if S.any():
                assert float(g[S].mean()) >= lam - 1e-12, f"candidate {c}'s set IIA fell below lambda {lam}"


def test_combine_at_lambda_zero_gives_everything_to_the_strongest(combination):
    candidates, combo = combination
    strongest = max(range(3), key=lambda c: combo.strengths[c])
    assert (combo.assignments[0.0] == strongest).all(), "lambda = 0 accepts any set: the strongest takes all"
    point = combo.curve[-1]
    assert point["coverage"] == 1.0 and abs(point["strength"] - combo.strengths[strongest]) < 1e-12
    fewer = [1 - c.report["parameters"]["after"] / c.report["parameters"]["before"] for c in candidates]
    assert combo.strengths == fewer and fewer[0] < fewer[1] < fewer[2], "strength = fraction of parameters removed"


def test_combine_curve_points_are_consistent(combination):
    _, combo = combination
    for point, a in zip(combo.curve, combo.assignments.values()):
        assert 0.0 <= point["strength"] <= max(combo.strengths) and 0.0 <= point["faithfulness"] <= 1.0
        assert point["dense"] == int((a == -1).sum()), "dense counts the inputs left to the dense model"
        assert abs(point["coverage"] - (1 - point["dense"] / 40)) < 1e-12
    assert combo.curve[0]["faithfulness"] >= combo.curve[-1]["faithfulness"], "lambda 1 is at least as faithful as 0"


def test_combine_of_one_candidate_is_its_single_curve(digits, combination):
    model, _, x_test = digits
    candidates, _ = combination
    alone = fxa.combine(model, candidates[1:2], x_test, lambdas=(0.9, 0.5), samples=30, seed=3)
    assert alone.curve == alone.single_curves[0], "combining one candidate is that candidate alone"


def test_copies_of_one_candidate_gain_nothing_over_it(digits, combination):
    """Splitting inputs between copies of one abstraction must not look like a better combination."""
    model, _, x_test = digits
    candidates, _ = combination
    copies = fxa.combine(model, [candidates[2]] * 3, x_test, lambdas=(0.95, 0.8, 0.6), samples=30, seed=1)
    for point, single in zip(copies.curve, copies.single_curves[0]):
        assert point["sizes"][1] == point["sizes"][2] == 0, "the second and third copies receive no input"
        assert abs(point["faithfulness"] - single["faithfulness"]) < 1e-12 and point["strength"] == single["strength"]


def test_combine_rejects_bad_arguments(digits):
    model, _, x_test = digits
    with pytest.raises(ConfigError, match="at least one candidate"):
        fxa.combine(model, [], x_test)
    with pytest.raises(ConfigError, match="lambdas"):
        fxa.combine(model, [object()], x_test, lambdas=(1.5,))


# ------------------------------------------------------------------------------------------- explain

def test_node_effects_at_the_last_site_are_exact_for_a_linear_readout(digits):
    """At the penultimate site z_t = W_t a + b, so the effect of unit j is W_tj E[a_j - c*_j]."""
    model, x_train, _ = digits
    g = fxa.explain(model, x_train, target=4, top=4)
    with torch.no_grad():
        xt = x_train[model(x_train).argmax(1) == 4]
        a = torch.relu(model.fc2(torch.relu(model.fc1(xt))))
        grad = model.fc3.weight[4].expand(len(x_train), -1)
        from fxabstract.interpret.explanations import optimal_constants
        a_all = torch.relu(model.fc2(torch.relu(model.fc1(x_train))))
        c = optimal_constants(a_all, grad)
    expected = model.fc3.weight[4].detach() * (a - c).mean(0)
    assert torch.allclose(g.effects("relu_1").float(), expected, atol=1e-4), "node effects = W_tj E[a_j - c*_j]"


def test_deleting_the_top_units_hurts_the_class_more_than_the_bottom_units(digits):
    model, x_train, x_test = digits
    from fxabstract.interpret.explanations import UnitProbe
    probe = UnitProbe(model)
    for target in (0, 7):
        g = fxa.explain(model, x_train, target=target)
        xt = x_test[model(x_test).argmax(1) == target]
        base = probe.run(xt)[:, target].mean()
        probe.run(x_train, record=True)
        mean = probe.seen("relu_1").mean(0)                              # mean ablation: neutral between methods
        order = g.effects("relu_1").argsort(descending=True)

        def drop(units):
            return float(base - probe.run(xt, {"relu_1": (units, mean[units][None])})[:, target].mean())
        assert drop(order[:8]) > drop(order[-8:]) + 1.0, f"class {target}: top-8 deletion must hurt more than bottom-8"


def test_explanation_exports_json_and_dot(digits, tmp_path):
    model, x_train, _ = digits
    g = fxa.explain(model, x_train, target=2, top=3)
    g.save_json(str(tmp_path / "g.json"))
    g.save_dot(str(tmp_path / "g.dot"))
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["target"] == 2 and [s["name"] for s in data["sites"]] == ["relu", "relu_1"]
    assert all(len(s["effects"]) == s["units"] == 64 and len(s["top"]) == 3 for s in data["sites"])
    assert len(data["edges"]) == 9 and {tuple(e["source"][:1]) for e in data["edges"]} == {("relu",)}
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and dot.count("->") == 9 + 3, "9 path edges and 3 edges into the class node"


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(nn.functional.avg_pool2d(x, 2).flatten(1))


def test_explain_on_a_cnn_matches_a_forward_hook_intervention():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(64, 1, 8, 8)
    target = int(model(x).argmax(1).mode().values)
    g = fxa.explain(model, x, target=target, top=2)
    assert [s["units"] for s in g.graph["sites"]] == [4, 6], "units are the conv channels"
    from fxabstract.interpret.explanations import UnitProbe, optimal_constants
    a, grad = UnitProbe(model).gradients(x, target)
    c = optimal_constants(a["act1"], grad["act1"])                     # [4, 8, 8] constant maps
    xt = x[model(x).argmax(1) == target]

    def set_channel(module, inputs, out):
        out = out.clone()
        out[:, 1] = c[1]
        return out
    with torch.no_grad():
        handle = model.act1.register_forward_hook(set_channel)
        z_hook = model(xt)[:, target]
        handle.remove()
        expected = float((model(xt)[:, target] - z_hook).mean())
    assert abs(g.graph["sites"][0]["effects"][1] - expected) < 1e-5, "the node effect is a channel intervention"
    assert len(g.graph["edges"]) == 4


def test_explain_rejects_a_class_the_model_never_predicts(digits):
    model, x_train, _ = digits
    with pytest.raises(ConfigError, match="not a class"):
        fxa.explain(model, x_train, target=10)
    with pytest.raises(ConfigError, match="not nodes"):
        fxa.explain(model, x_train, target=1, sites=["nope"])
