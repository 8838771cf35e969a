"""The interpretability suite (THEORY §5): certify, combine, explain."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.groups import (GroupMLP, brute_force_accuracy, cyclic_table, domain, symmetric_table,
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


def test_certify_is_tight_when_nothing_is_removed(group_model):
    """keep = every unit: the deviation is fold rounding only, so every input with a visible margin is proven."""
    table, model = group_model
    result = fxa.abstract(model, _calibration(table), keep=48, sites=["hidden"])
    cert = fxa.certify(model, result, table)
    acc = brute_force_accuracy(model, table)
    assert cert["deviation_max"] < 1e-3, f"deviation bound {cert['deviation_max']} should be rounding-sized"
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
