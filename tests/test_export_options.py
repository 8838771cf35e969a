"""ONNX export options: dynamic or fixed batch axis, opset choice, external data past a size
threshold, the TorchScript exporter and the fallback between exporters, onnx.checker."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError, ExportError


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 3)).eval()
    return fxa.abstract(model, [torch.randn(100, 12)], keep=0.5).module


def run(path: str, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def batch_dim(path: str):
    dim = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_give_a_checked_model_with_a_dynamic_batch_axis(compiled, exporter, tmp_path):
    path = str(tmp_path / "m.onnx")
    info = fxa.to_onnx(compiled, torch.randn(4, 12), path, exporter=exporter)
    assert info["exporter"] == exporter and info["fallback"] is None, f"the {exporter} exporter must run: {info}"
    assert info["relative_diff"] < 1e-5, f"onnxruntime must match the module: {info}"
    onnx.checker.check_model(path)
    assert isinstance(batch_dim(path), str), "the batch axis must be symbolic"
    x = torch.randn(9, 12)
    with torch.no_grad():
        assert np.allclose(run(path, x), compiled(x).numpy(), atol=1e-5), "batch 9 must run and match"


def test_fixed_batch_axis_when_asked(compiled, tmp_path):
    path = str(tmp_path / "m.onnx")
    info = fxa.to_onnx(compiled, torch.randn(4, 12), path, dynamic_batch=False)
    assert info["dynamic_batch"] is False and batch_dim(path) == 4, "dynamic_batch=False must fix the batch at 4"
    with pytest.raises(Exception):
        run(path, torch.randn(5, 12))


@pytest.mark.parametrize("exporter, opset", [("torchscript", 13), ("torchscript", 17), ("dynamo", 18), ("dynamo", 20)])
def test_the_requested_opset_is_the_model_opset(compiled, exporter, opset, tmp_path):
    path = str(tmp_path / "m.onnx")
    info = fxa.to_onnx(compiled, torch.randn(4, 12), path, opset=opset, exporter=exporter, fallback=False)
    imports = {o.domain: o.version for o in onnx.load(path).opset_import}
    assert imports.get("", imports.get("ai.onnx")) == opset == info["opset"], f"opset {opset} was asked: {imports}"


def test_weights_past_the_threshold_go_to_external_data(compiled, tmp_path):
    path = str(tmp_path / "m.onnx")
    info = fxa.to_onnx(compiled, torch.randn(4, 12), path, external_threshold=10_000)
    weights = sum(t.numel() * t.element_size() for t in compiled.state_dict().values())
    assert weights > 10_000, "the test model must be over the threshold"
    assert info["external_data"] == path + ".data", f"the weights must go to {path}.data: {info}"
    assert (tmp_path / "m.onnx.data").stat().st_size >= weights, "the side file must hold the weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"], "no temporary files left"
    assert info["relative_diff"] < 1e-5, "onnxruntime must load the external data and match"
    inits = onnx.load(path, load_external_data=False).graph.initializer
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in inits), "every weight must be external"
    inline = fxa.to_onnx(compiled, torch.randn(4, 12), str(tmp_path / "s.onnx"))
    assert inline["external_data"] is None, "under the default 2 GB threshold the weights stay inline"
    saved = (tmp_path / "s.onnx").stat().st_size - (tmp_path / "m.onnx").stat().st_size
    assert saved >= 0.9 * weights, f"the model file must not hold the weights ({saved} of {weights} bytes moved)"


class DataDependent(nn.Module):
    """A branch on the data: torch.export refuses it; the TorchScript tracer records the taken branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_a_failing_exporter_falls_back_to_the_other(tmp_path):
    module, x = DataDependent().eval(), torch.rand(3, 5) + 0.1
    info = fxa.to_onnx(module, x, str(tmp_path / "m.onnx"), dynamic_batch=False)
    assert info["exporter"] == "torchscript", f"dynamo must fail on the data-dependent branch: {info}"
    assert info["fallback"].startswith("dynamo:"), f"the result must say why dynamo was not used: {info}"
    assert info["relative_diff"] < 1e-5
    with pytest.raises(ExportError, match="ONNX export failed"):
        fxa.to_onnx(module, x, str(tmp_path / "n.onnx"), fallback=False)


def test_bad_export_options_are_config_errors(compiled, tmp_path):
    with pytest.raises(ConfigError, match="exporter"):
        fxa.to_onnx(compiled, torch.randn(4, 12), str(tmp_path / "m.onnx"), exporter="tflite")
    with pytest.raises(ConfigError, match="opset"):
        fxa.to_onnx(compiled, torch.randn(4, 12), str(tmp_path / "m.onnx"), opset=3)
