"""Saving and loading an abstraction without pickled code: module.pt2 (torch.export), report.json and
its coefficients in tensors.safetensors; for every capture path (torch.fx, torch.export, nn.Sequential)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.verify import relative_error
from fxabstract.zoo import LeNet

ALL_FILES = ["module.pt", "module.pt2", "report.json", "tensors.safetensors"]


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

    assert loaded.report["files"] == ALL_FILES, "the saved report names the files beside it"
    assert {k: v for k, v in loaded.report.items() if k != "files"} == json.loads(json.dumps(result.report)), \
        "the report must travel with the module"
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ALL_FILES
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "module.pt", weights_only=False)(x), result.module(x))


def test_load_of_a_folder_without_a_saved_abstraction_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"module.pt2 or report.json.*Abstraction.save"):
        fxa.load(str(tmp_path))


# ----------------------------------------------------------------------------- every capture path

class ShapeBranch(nn.Module):
    """A Python branch on the input's shape: torch.fx cannot trace it, so capture goes through
    torch.export, whose GraphModule holds local functions and does not pickle."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 48), nn.Linear(48, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        if x.shape[-1] == 16:
            return self.fc3(h)
        return -self.fc3(h)


class Traceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 5)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def sequential():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 5))


@pytest.mark.parametrize("make, pickles", [(Traceable, True), (ShapeBranch, False), (sequential, True)],
                         ids=["fx", "torch.export", "sequential"])
def test_save_load_intervene_reproduces_the_compiled_module(make, pickles, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    if make is ShapeBranch:
        with pytest.raises(Exception):
            torch.fx.symbolic_trace(model)       # the test must exercise the torch.export front end
    result = fxa.abstract(model, list(torch.randn(256, 16).split(64)), keep=0.5, replacement="affine", round_to=1)
    written = result.save(str(tmp_path))
    expected = ALL_FILES if pickles else [f for f in ALL_FILES if f != "module.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected == written, \
        f"module.pt is written exactly when the module pickles: {sorted(os.listdir(tmp_path))}"
    loaded = fxa.load(str(tmp_path))
    assert loaded.report["files"] == expected, "the saved report must say which files exist"
    x = torch.randn(40, 16)
    with torch.no_grad():
        dense = model(x)
        with fxa.intervene(model, loaded.report):
            hooked = model(x)
        compiled, reloaded = result.module(x), loaded.module(x)
    assert relative_error(dense, compiled) > 1e-3, "the compile must change the outputs (the check is not vacuous)"
    assert relative_error(hooked, compiled) < 1e-5, "the loaded report's interventions must reproduce the compiled module"
    assert torch.allclose(reloaded, compiled, rtol=0, atol=1e-6), "the loaded module must compute the same"


def test_a_forced_save_of_an_unpicklable_module_removes_the_old_pickled_file(tmp_path):
    torch.manual_seed(0)
    fxa.abstract(Traceable().eval(), [torch.randn(64, 16)], keep=0.5).save(str(tmp_path))
    assert (tmp_path / "module.pt").exists()
    fxa.abstract(ShapeBranch().eval(), [torch.randn(64, 16)], keep=0.5).save(str(tmp_path), force=True)
    assert sorted(os.listdir(tmp_path)) == ["module.pt2", "report.json", "tensors.safetensors"], \
        "a module.pt of an earlier save must not pass for this module"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_get_the_permissions_of_the_umask(tmp_path, mask, mode):
    torch.manual_seed(0)
    result = fxa.abstract(mlp(), [torch.randn(64, 16)], keep=0.5, replacement="affine")
    old = os.umask(mask)
    try:
        result.save(str(tmp_path / "out"))
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert modes == {name: oct(mode) for name in ALL_FILES}, f"umask {oct(mask)} gives {oct(mode)}: {modes}"


def test_save_and_load_print_nothing(tmp_path, capfd):
    import warnings

    torch.manual_seed(0)
    result = fxa.abstract(ShapeBranch().eval(), [torch.randn(64, 16)], keep=0.5)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result.save(str(tmp_path))
        fxa.load(str(tmp_path))
    out, err = capfd.readouterr()
    assert not caught and not out and not err, \
        f"other libraries' chatter must stay inside save/load: {[str(w.message) for w in caught]} {out} {err}"
