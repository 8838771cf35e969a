"""Issue 5, bad input: every mistake with data, options, reports and output paths is one
`fxabstract.errors` exception with a one-line message naming the problem and the fix. The cases
already in test_errors.py (untraceable model, no site, empty data, NaN, keep ranges, unknown score,
ce without labels) are not repeated here."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import CalibrationError, ConfigError, ExportError, NoSiteError, OutputError
from fxabstract.verify import relative_error
from test_errors import CALIBRATION, raised, small_mlp


class Tied(nn.Module):
    """fc2 reuses fc1's weight Parameter (tied weights); fc3 -> fc4 is an ordinary site."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 3)
        self.fc2.weight = self.fc1.weight
        self.eval()

    def forward(self, x):
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


# ----------------------------------------------------------------------------- calibration data

def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 1] = float("nan")
    return x


@pytest.mark.parametrize("calibration, fragment", [
    ([torch.randn(16, 6), torch.randn(16, 5)], "batch 1"),                               # shape changes
    ([torch.randn(16, 6), torch.randn(16, 6, dtype=torch.float64)], "float64"),         # dtype changes
    ([torch.randn(16, 6, dtype=torch.float64)], "dtype"),                               # wrong dtype
    ([torch.randint(0, 3, (16, 6))], "dtype"),                                          # integer inputs
    ([torch.randn(16, 6), with_nan(torch.randn(16, 6))], "NaN"),                         # NaN in a later batch
    ([{"input": with_nan(torch.randn(16, 6))}], "NaN"),                                  # NaN in a dict batch
    ([(torch.randn(16, 6), torch.full((16,), float("inf")))], "targets"),               # inf targets
    ([torch.randn(0, 6)], "no samples"),                                                # empty batch
    ([torch.tensor(1.0)], "no samples"),                                                # scalar batch
    (torch.randn(16, 6), "not an iterable"),                                            # one Tensor
    (5, "not an iterable"),                                                             # not iterable
    ([torch.randn(16, 6).numpy()], "a batch must be"),                                  # numpy batch
], ids=["shape-changes", "dtype-changes", "float64-inputs", "int-inputs", "nan-later-batch", "nan-dict",
        "inf-targets", "empty-batch", "scalar-batch", "one-tensor", "not-iterable", "numpy"])
def test_malformed_calibration_raises_calibration_error(calibration, fragment):
    message = raised(CalibrationError, fxa.abstract, small_mlp(), calibration)
    assert fragment in message, f"the message must say what is wrong ({fragment!r}): {message}"


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("option", [dict(probes=0, curvature="hutchinson"), dict(seed="a"), dict(seed=1.5),
                                    dict(ridge=-1.0, replacement="affine"), dict(ridge=float("nan")),
                                    dict(sites=3), dict(sites="fc["), dict(sites=[0])],
                         ids=["probes=0", "seed=str", "seed=float", "ridge<0", "ridge=nan", "sites=int",
                              "sites=bad-regex", "sites=[int]"])
def test_malformed_option_raises_config_error(option):
    message = raised(ConfigError, fxa.abstract, small_mlp(), CALIBRATION, **option)
    name = next(iter(option))
    assert name in message, f"the message must name the option {name!r}: {message}"


@pytest.fixture(scope="module")
def compiled():
    model = small_mlp()
    return model, fxa.abstract(model, CALIBRATION, keep=0.5)


@pytest.mark.parametrize("options", [dict(swap_p=1.5), dict(swap_p=-0.1), dict(trials=0), dict(batch_size=0)],
                         ids=lambda o: f"{next(iter(o))}={next(iter(o.values()))}")
def test_iia_options_out_of_range_raise_config_error(compiled, options):
    model, result = compiled
    raised(ConfigError, fxa.iia, model, result, torch.randn(20, 6), **options)


@pytest.mark.parametrize("data, fragment", [
    (torch.randn(20, 5), "cannot run"), (with_nan(torch.randn(20, 6)), "NaN"), (torch.randn(0, 6), "no samples"),
    ([], "empty"),
], ids=["wrong-shape", "nan", "no-rows", "no-batches"])
@pytest.mark.parametrize("check", ["iia", "certificate"])
def test_bad_evaluation_data_raises_calibration_error(compiled, data, fragment, check):
    model, result = compiled
    kwargs = {"trials": 10} if check == "iia" else {}
    message = raised(CalibrationError, getattr(fxa, check), model, result, data, **kwargs)
    assert fragment in message, f"the message must say what is wrong ({fragment!r}): {message}"


@pytest.mark.parametrize("report, model", [
    ({"score": "logit-mse"}, small_mlp), ("report.json", small_mlp),
    (None, lambda: nn.Sequential(nn.Linear(6, 3))),
], ids=["no-sites", "a-path", "another-model"])
def test_intervene_with_a_report_that_does_not_fit_raises_config_error(compiled, report, model):
    report = compiled[1].report if report is None else report
    with pytest.raises(ConfigError, match="report"):
        with fxa.intervene(model(), report):
            pass


def test_intervene_with_an_edited_report_raises_config_error(compiled):
    report = {**compiled[1].report, "sites": [dict(s, kept=s["kept"][1:]) for s in compiled[1].report["sites"]]}
    with pytest.raises(ConfigError, match="kept and replaced"):
        with fxa.intervene(small_mlp(), report):
            pass


# ----------------------------------------------------------------------------- tied weights

def test_tied_weights_are_ineligible_and_the_rest_compiles_exactly():
    model = Tied()
    x = torch.randn(64, 8)
    result = fxa.abstract(model, [x], keep=0.5, round_to=1)
    assert [s["name"] for s in result.report["sites"]] == ["fc3"], "only the untied site may be compiled"
    for name in ("fc1", "fc2"):
        assert "shares a weight" in result.report["ineligible"][name], \
            f"{name} must be listed as ineligible because of the tied weight: {result.report['ineligible']}"
    compiled_fc1, compiled_fc2 = result.module.get_submodule("fc1"), result.module.get_submodule("fc2")
    assert compiled_fc1.weight is compiled_fc2.weight, "the tie must survive compilation (nothing folded twice)"
    with torch.no_grad(), fxa.intervene(model, result.report):
        z_hooks = model(x)
    assert relative_error(z_hooks, result.module(x)) <= 1e-5, "the untied site must stay exact"


def test_model_whose_only_sites_are_tied_raises_no_site_error_naming_the_tie():
    class OnlyTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.fc2.weight = self.fc1.weight

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    message = raised(NoSiteError, fxa.abstract, OnlyTied(), [torch.randn(16, 8)])
    assert "shares a weight" in message, f"the error must say that the weights are tied: {message}"


# ----------------------------------------------------------------------------- output paths

def test_save_refuses_to_overwrite_without_force(compiled, tmp_path):
    result = compiled[1]
    result.save(str(tmp_path))
    before = (tmp_path / "report.json").read_bytes()
    message = raised(OutputError, result.save, str(tmp_path))
    assert "force" in message, f"the message must name the fix (force=True): {message}"
    assert (tmp_path / "report.json").read_bytes() == before, "the existing report must be left alone"
    result.save(str(tmp_path), force=True)


def test_save_into_an_unwritable_path_raises_output_error(compiled, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    raised(OutputError, compiled[1].save, str(tmp_path / "afile" / "out"))
    assert os.listdir(tmp_path) == ["afile"], "nothing may be written after the error"


def test_to_onnx_refuses_to_overwrite_and_unwritable_paths(compiled, tmp_path):
    module, x = compiled[1].module, torch.randn(4, 6)
    (tmp_path / "afile").write_text("a file, not a folder")
    raised(OutputError, fxa.to_onnx, module, x, str(tmp_path / "afile" / "m.onnx"))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    raised(OutputError, fxa.to_onnx, module, x, str(path))
    assert path.read_bytes() == b"precious", "an existing file must not be overwritten without force"
    assert fxa.to_onnx(module, x, str(path), force=True)["max_abs_diff"] < 1e-5
    assert path.read_bytes() != b"precious", "force=True overwrites"


@pytest.mark.parametrize("example", [torch.randn(4, 5), torch.randn(0, 6), "x"], ids=["wrong-shape", "empty", "str"])
def test_to_onnx_with_inputs_the_module_cannot_take_raises_export_error(compiled, tmp_path, example):
    raised(ExportError, fxa.to_onnx, compiled[1].module, example, str(tmp_path / "m.onnx"))
    assert not os.listdir(tmp_path), "no file may be written when export fails"
