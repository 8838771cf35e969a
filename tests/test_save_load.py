"""Saving and loading an abstraction without pickled code: module.pt2 (torch.export) + report.json."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.zoo import LeNet


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 5)).eval()


@pytest.mark.parametrize("make, shape", [(mlp, (16,)), (lambda: LeNet().eval(), (1, 8, 8))])
def test_load_restores_a_module_that_computes_the_same_and_the_report(make, shape, tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = make()
    result = fxa.abstract(model, list(torch.randn(96, *shape).split(32)), keep=0.5, replacement="affine")
    result.save(str(tmp_path))
    (tmp_path / "module.pt").unlink()                   # the pickled module is not needed to load

    def no_unpickling(*args, **kwargs):
        raise AssertionError("fxa.load must not unpickle code")
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    loaded = fxa.load(str(tmp_path))
    monkeypatch.undo()

    assert loaded.report == json.loads(json.dumps(result.report)), "the report must travel with the module"
    for batch in (1, 7):                                # the batch axis was exported dynamic
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            expected, got = result.module(x), loaded.module(x)
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), f"batch {batch}: the loaded module must compute the same"
    assert sum(p.numel() for p in loaded.module.parameters()) == result.report["parameters"]["after"], \
        "the loaded module must be the small one"


def test_save_keeps_writing_the_pickled_module_for_earlier_callers(tmp_path):
    model = mlp()
    result = fxa.abstract(model, [torch.randn(40, 16)], keep=0.5)
    result.save(str(tmp_path), example_inputs=torch.randn(3, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["module.pt", "module.pt2", "report.json"]
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "module.pt", weights_only=False)(x), result.module(x))


def test_load_of_a_folder_without_a_saved_abstraction_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"module.pt2 or report.json.*Abstraction.save"):
        fxa.load(str(tmp_path))
