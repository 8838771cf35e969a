"""fxa.explain(method="paths"): Ahmad et al.'s top-down path interventions, checked against edits of a
copy of the model's weights made by hand, and the path-specific input maps against scipy."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.interpret import explanations
from fxabstract.zoo import LeNet5


@pytest.fixture(scope="module")
def lenet():
    """LeNet-5 on digits upsampled to 32x32, a few epochs (about 3 s): (model, x_train, y_train, x_test)."""
    from fxabstract.demo import digits_data, train
    x_train, y_train, x_test, _ = digits_data()

    def up(x):
        return F.interpolate(x.reshape(-1, 1, 8, 8), size=32, mode="bilinear", align_corners=False)
    torch.manual_seed(0)
    model = train(LeNet5(), up(x_train), y_train, epochs=4)
    return model, up(x_train), y_train, up(x_test)


def _class_inputs(model, x, y, target, n=100):
    with torch.no_grad():
        keep = (model(x).argmax(1) == target) & (y == target)
    return x[keep][:n]


def test_top_layer_effects_equal_zeroing_the_weights_by_hand(lenet):
    model, x, y, _ = lenet
    before = copy.deepcopy(model.state_dict())
    g = fxa.explain(model, x, target=3, method="paths", labels=y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model is not modified"
    top = g.graph["sites"][-1]
    assert top["name"] == "fc2" and top["layer"] == "fc3" and top["effect_set"] == [3] and top["units"] == 84
    xt = _class_inputs(model, x, y, 3)
    assert g.graph["samples"] == len(xt) > 50, "the first 100 (or all) labelled, correctly classified inputs"
    with torch.no_grad():
        observed = model(xt)[:, 3]
        for i in (0, 17, 83):
            edited = copy.deepcopy(model)
            edited.fc3.weight[3, i] = 0.0
            expected = float(observed.mean() - edited(xt)[:, 3].mean())
            assert abs(top["effects"][i] - expected) < 1e-5, f"unit {i}: W[3, {i}] := 0 by hand"


def test_causes_pass_the_one_sided_z_test_and_recurse_down(lenet):
    model, x, y, _ = lenet
    g = fxa.explain(model, x, target=5, method="paths", labels=y)
    xt = _class_inputs(model, x, y, 5)
    with torch.no_grad():
        observed = model(xt)[:, 5]
    sites = {s["name"]: s for s in g.graph["sites"]}
    assert list(sites) == ["conv1", "conv2", "fc1", "fc2"]
    fc1 = sites["fc1"]                                    # units of fc1 into the effect set = fc2's causes
    assert fc1["effect_set"] == sites["fc2"]["causes"] and fc1["layer"] == "fc2"
    n = len(xt)
    with torch.no_grad():
        passed = []
        for i in range(fc1["units"]):
            edited = copy.deepcopy(model)
            edited.fc2.weight[fc1["effect_set"], i] = 0.0
            z = edited(xt)[:, 5]
            margin = 1.65 * torch.sqrt(z.var() / n + observed.var() / n)
            if z.mean() < observed.mean() - margin:
                passed.append(i)
    assert passed, "some fc1 units pass the test on a trained LeNet"
    assert fc1["causes"] == passed, "causes are exactly the units that pass the z-test"
    conv2 = sites["conv2"]                                # a flatten: a conv channel is a block of 25 features
    assert conv2["layer"] == "fc1" and conv2["units"] == 16 and conv2["effect_set"] == fc1["causes"]
    with torch.no_grad():
        edited = copy.deepcopy(model)
        c = conv2["causes"][0] if conv2["causes"] else 0
        edited.fc1.weight[conv2["effect_set"], c * 25:(c + 1) * 25] = 0.0
        expected = float(observed.mean() - edited(xt)[:, 5].mean())
    assert abs(conv2["effects"][c] - expected) < 1e-5
    edges = g.graph["edges"]
    assert {tuple(e["source"]) for e in edges if e["target"][0] == "fc2"} == {("fc1", i) for i in fc1["causes"]}


def test_soft_interventions_draw_u_in_the_band_and_are_seeded(lenet):
    model, x, y, _ = lenet
    g = fxa.explain(model, x, target=1, method="paths", labels=y, soft=True, beta=0.05, seed=3)
    us = [s["u"] for s in g.graph["sites"]]
    assert all(0.05 <= u <= 0.06 for u in us) and len(set(us)) == len(us)
    again = fxa.explain(model, x, target=1, method="paths", labels=y, soft=True, beta=0.05, seed=3)
    assert again.graph == g.graph, "the same seed gives the same graph"
    hard = fxa.explain(model, x, target=1, method="paths", labels=y)
    assert all(s["u"] == 0.0 for s in hard.graph["sites"])


def test_paths_on_a_sequential_mlp_and_one_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x = torch.randn(200, 5)
    target = int(model(x).argmax(1).mode().values)
    g = fxa.explain(model, x, target=target, method="paths", samples=1)
    assert g.graph["samples"] == 1 and [s["name"] for s in g.graph["sites"]] == ["0", "2"]
    top = g.graph["sites"][-1]
    x1 = x[model(x).argmax(1) == target][:1]
    with torch.no_grad():
        z = model(x1)[0, target]
        relative = []
        for i in range(6):
            edited = copy.deepcopy(model)
            edited[4].weight[target, i] = 0.0
            relative.append(float(edited(x1)[0, target] / z - 1))
    assert top["causes"] == [i for i, r in enumerate(relative) if r < 0.05], "N = 1: relative effect below 0.05"


def test_paths_refuses_what_it_cannot_walk(lenet):
    model, x, y, _ = lenet

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(h + torch.relu(self.b(h)))
    with pytest.raises(ConfigError, match="chain"):
        fxa.explain(Skip(), torch.randn(20, 4), target=0, method="paths")
    with pytest.raises(ConfigError, match="method"):
        fxa.explain(model, x, target=0, method="gradients")
    with pytest.raises(ConfigError, match="sites=None"):
        fxa.explain(model, x, target=0, method="paths", sites=["relu"])
    with pytest.raises(ConfigError, match="one label per input"):
        fxa.explain(model, x, target=0, method="paths", labels=y[:5])
    with pytest.raises(ConfigError, match="effect"):
        fxa.explain(model, x, target=0, effect="median")


def _paper_map(model, x1, parents, children):
    """The paper's construction for conv2, written with scipy: conv1's output per parent channel,
    convolve2d (full) with W2[c, p], softmax over positions, mean over parents, bilinear resize, sum."""
    from scipy import signal, special
    with torch.no_grad():
        feats = model.conv1(x1)[0].numpy()
    w = model.conv2.weight.detach().numpy()
    total = 0
    for c in children:
        v = np.stack([signal.convolve2d(feats[p], w[c, p]) for p in parents])
        m = special.softmax(v, axis=(1, 2)).mean(0)
        total = total + F.interpolate(torch.tensor(m)[None, None], size=32, mode="bilinear",
                                      align_corners=False)[0, 0].numpy()
    return total


def test_input_maps_follow_the_paper_construction(lenet):
    model, x, y, x_test = lenet
    g = fxa.explain(model, x, target=3, method="paths", labels=y)
    sites = {s["name"]: s for s in g.graph["sites"]}
    maps = g.input_maps(x_test[:3])
    assert maps.shape == (3, 32, 32) and bool((maps >= 0).all())
    parents, children = sites["conv1"]["top"], sites["conv2"]["top"]
    assert parents and children
    for b in range(3):
        expected = _paper_map(model, x_test[b:b + 1], parents, children)
        assert np.allclose(maps[b].numpy(), expected, atol=1e-6), "the same map as the paper's scipy construction"
    ours = fxa.explain(model, x, target=3, top=2)              # the same construction over the project's units
    assert ours.input_maps(x_test[:2]).shape == (2, 32, 32)
    with pytest.raises(ConfigError, match="Conv2d"):
        g.input_maps(x_test[:2], layer="fc1")


def test_paths_exports_json_and_dot(lenet, tmp_path):
    model, x, y, _ = lenet
    g = fxa.explain(model, x, target=2, method="paths", labels=y)
    g.save_json(str(tmp_path / "p.json"))
    g.save_dot(str(tmp_path / "p.dot"))
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["method"] == "paths" and [s["name"] for s in data["sites"]] == ["conv1", "conv2", "fc1", "fc2"]
    dot = (tmp_path / "p.dot").read_text()
    assert dot.startswith("digraph") and dot.count("->") == len(data["edges"]) + len(data["sites"][-1]["causes"])
    assert g.top_units("fc2", 1)[0] in data["sites"][-1]["causes"] or not data["sites"][-1]["causes"]


def test_replayed_interventions_equal_whole_forward_passes(lenet, monkeypatch):
    """explain re-runs only what is downstream of the edited site (Replay); the effects must not change."""
    model, x, _, _ = lenet
    fast = fxa.explain(model, x[:300], target=4, top=3)
    monkeypatch.setattr(explanations.UnitProbe, "prepare", lambda self, x: None)
    slow = fxa.explain(model, x[:300], target=4, top=3)
    assert fast.graph == slow.graph


@pytest.mark.parametrize("effect", ["mean", "zero"])
def test_node_effects_with_a_mean_or_zero_constant_match_a_hook(lenet, effect):
    model, x, _, _ = lenet
    g = fxa.explain(model, x, target=7, top=0, effect=effect)
    assert g.graph["effect"] == effect
    with torch.no_grad():
        xt = x[model(x).argmax(1) == 7]
        h = torch.relu(model.fc2(torch.relu(model.fc1(torch.flatten(
            F.max_pool2d(torch.relu(model.conv2(F.max_pool2d(torch.relu(model.conv1(x)), 2))), 2), 1)))))
        c = h.mean(0) if effect == "mean" else torch.zeros(84)
        expected = model.fc3.weight[7] * (h[model(x).argmax(1) == 7] - c).mean(0)
    assert torch.allclose(g.effects("relu_3").float(), expected, atol=1e-4)
