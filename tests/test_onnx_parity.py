"""fxa.to_onnx never writes a wrong file: a parity failure (beyond `tolerance`) or a NaN output is an
ExportError and nothing is written. It takes an Abstraction, inputs as a Tensor, a tuple or a dict,
and any output structure, and names the ONNX inputs and outputs after the model's own."""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError, ExportError


class Heads(nn.Module):
    """Keyword inputs and a dict output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, features, scale):
        z = self.fc(features) * scale
        return {"logits": z, "probs": z.softmax(-1)}


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, pixels):
        z = self.fc(pixels)
        return z, z.relu()


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x) * float("nan")


def graph_names(path):
    graph = onnx.load(path).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def perturb(monkeypatch, how):
    """onnxruntime's outputs changed by `how` (a simulated exporter or runtime bug)."""
    real = onnxruntime.InferenceSession

    class Session(real):
        def run(self, *args, **kwargs):
            return [how(np.asarray(o)) for o in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_parity_failure_names_the_difference_and_writes_nothing(tmp_path, monkeypatch, exporter):
    torch.manual_seed(0)
    perturb(monkeypatch, lambda o: o + 0.01)
    with pytest.raises(ExportError, match=r"differs from torch at output 'output' by 0\.01.*tolerance 0\.0001"):
        fxa.to_onnx(nn.Linear(6, 4), torch.randn(4, 6), str(tmp_path / "m.onnx"), exporter=exporter)
    assert os.listdir(tmp_path) == [], "a model that does not match torch must not be written"
    info = fxa.to_onnx(nn.Linear(6, 4), torch.randn(4, 6), str(tmp_path / "m.onnx"), exporter=exporter,
                       tolerance=0.05)
    assert 0.009 < info["max_abs_diff"] < 0.011 and info["tolerance"] == 0.05, "the tolerance is the caller's"


def test_nan_outputs_are_an_export_error_and_nothing_is_written(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="NaN or inf"):
        fxa.to_onnx(Broken(), torch.randn(4, 6), str(tmp_path / "m.onnx"))
    perturb(monkeypatch, lambda o: np.full_like(o, np.nan))
    with pytest.raises(ExportError, match="onnxruntime computes NaN or inf"):
        fxa.to_onnx(nn.Linear(6, 4), torch.randn(4, 6), str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("as_dict", [True, False], ids=["keyword", "positional"])
def test_dict_outputs_and_keyword_inputs_are_named_after_the_model(tmp_path, exporter, as_dict):
    torch.manual_seed(0)
    x, scale = torch.randn(4, 6), torch.rand(4, 1) + 0.5
    inputs = {"scale": scale, "features": x} if as_dict else (x, scale)
    path = str(tmp_path / "m.onnx")
    model = Heads().eval()
    info = fxa.to_onnx(model, inputs, path, exporter=exporter, fallback=False)
    assert graph_names(path) == (["features", "scale"], ["logits", "probs"]), graph_names(path)
    assert set(info["outputs"]) == {"logits", "probs"} and info["relative_diff"] < 1e-5
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x9, s9 = torch.randn(9, 6), torch.rand(9, 1)
    logits, probs = session.run(["logits", "probs"], {"features": x9.numpy(), "scale": s9.numpy()})
    with torch.no_grad():
        expected = model(x9, s9)
    assert np.allclose(logits, expected["logits"].numpy(), atol=1e-5), "batch 9 runs: the axis is dynamic"
    assert np.allclose(probs, expected["probs"].numpy(), atol=1e-5), "each name holds its own output"


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_tuple_outputs_are_output_0_output_1_and_inputs_follow_the_signature(tmp_path, exporter):
    torch.manual_seed(0)
    model = Pair().eval()
    path = str(tmp_path / "m.onnx")
    info = fxa.to_onnx(model, torch.randn(4, 6), path, exporter=exporter, fallback=False)
    assert graph_names(path) == (["pixels"], ["output_0", "output_1"]), graph_names(path)
    assert set(info["outputs"]) == {"output_0", "output_1"}, "every output tensor is compared"
    assert info["inputs"] == ["pixels"]


def test_every_output_is_compared(tmp_path, monkeypatch):
    """Only the second output is wrong: the check must still see it."""
    perturb(monkeypatch, lambda o: o + 0.5 if (o >= 0).all() else o)          # the relu output only
    torch.manual_seed(0)
    with pytest.raises(ExportError, match="output 'output_1'"):
        fxa.to_onnx(Pair(), torch.randn(4, 6) - 5, str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


def test_an_abstraction_is_exported_through_its_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    result = fxa.abstract(model, [torch.randn(64, 6)], keep=0.5)
    path = str(tmp_path / "m.onnx")
    info = fxa.to_onnx(result, torch.randn(4, 6), path)
    assert info["weights"] == fxa.to_onnx(result.module, torch.randn(4, 6), str(tmp_path / "n.onnx"))["weights"]
    assert graph_names(path) == (["input"], ["output"]), "an nn.Sequential's forward takes `input`"
    assert [16, 6] in info["weights"].values() or [6, 16] in info["weights"].values(), \
        f"the compiled (smaller) module is exported: {info['weights']}"


def test_a_valid_export_prints_nothing_and_warns_nothing(tmp_path, capfd):
    torch.manual_seed(0)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exporter in ("dynamo", "torchscript"):
            fxa.to_onnx(Pair(), torch.randn(4, 6), str(tmp_path / f"{exporter}.onnx"), exporter=exporter)
    out, err = capfd.readouterr()
    assert not caught, [str(w.message)[:200] for w in caught]
    assert not out and not err, f"other libraries' chatter must stay inside to_onnx: {out[-500:]} {err[-500:]}"


def test_bad_tolerance_and_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="tolerance"):
        fxa.to_onnx(nn.Linear(6, 4), torch.randn(4, 6), str(tmp_path / "m.onnx"), tolerance=-1)
    with pytest.raises(ExportError, match="do not fit"):
        fxa.to_onnx(nn.Linear(6, 4), {"nope": torch.randn(4, 6)}, str(tmp_path / "m.onnx"))
    with pytest.raises(ExportError, match="batch axis"):
        fxa.to_onnx(nn.Linear(6, 4), torch.randn(6), str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []
