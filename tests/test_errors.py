"""Errors a user can cause are fxabstract.errors exceptions with one clear line (STYLE.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import CalibrationError, CaptureError, ConfigError, FxAbstractError, NoSiteError


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


CALIBRATION = [torch.randn(16, 6) for _ in range(2)]


def raised(exc_type, fn, *args, **kwargs) -> str:
    """Call fn, require exc_type (an FxAbstractError) with a one-line message, return the message."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, FxAbstractError), f"{exc_type.__name__} must derive from FxAbstractError"
    assert message and "\n" not in message, f"the error message must be one non-empty line: {message!r}"
    return message


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace this line
            h = h * 2
        return self.fc2(h)


def test_untraceable_model_raises_capture_error_naming_the_line():
    message = raised(CaptureError, fxa.abstract, DataDependent(), CALIBRATION)
    lines = open(__file__).read().splitlines()
    lineno = next(i + 1 for i, line in enumerate(lines) if "if h.sum() > 0:" in line and "data-dependent" in line)
    assert f"{__file__}:{lineno}" in message, \
        f"CaptureError must name the file and line that stopped tracing: {message}"
    assert "if h.sum() > 0" in message, f"CaptureError must quote the offending line: {message}"


def test_non_module_raises_capture_error():
    raised(CaptureError, fxa.abstract, lambda x: x, CALIBRATION)


@pytest.mark.parametrize("model", [nn.Linear(6, 3), nn.Sequential(nn.Linear(6, 3), nn.ReLU())],
                         ids=["single-linear", "linear-read-by-output"])
def test_model_without_eligible_site_raises_no_site_error(model):
    raised(NoSiteError, fxa.abstract, model, CALIBRATION)


@pytest.mark.parametrize("calibration", [[], iter([]), (b for b in [])], ids=["list", "iterator", "generator"])
def test_empty_calibration_raises_calibration_error(calibration):
    raised(CalibrationError, fxa.abstract, small_mlp(), calibration)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_calibration_raises_calibration_error(bad):
    x = torch.randn(16, 6)
    x[3, 2] = bad
    raised(CalibrationError, fxa.abstract, small_mlp(), [torch.randn(16, 6), x])


def test_ce_score_without_labels_raises_calibration_error():
    message = raised(CalibrationError, fxa.abstract, small_mlp(), CALIBRATION, score="ce")
    assert "label" in message or "target" in message, f"the message must say that labels are needed: {message}"


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -1, -0.5, 23, 1000, True, "half", None],
                         ids=lambda k: repr(k))
def test_out_of_range_keep_raises_config_error(keep):
    # total units: 12 + 10 = 22 over 2 sites
    raised(ConfigError, fxa.abstract, small_mlp(), CALIBRATION, keep=keep)


@pytest.mark.parametrize("keep", [{"nope": 4}, {"0": 0}, {"0": 13}, {"0": -1}, {"0": 2.5}],
                         ids=["unknown-site", "zero", "too-many", "negative", "float-count"])
def test_bad_per_site_keep_raises_config_error(keep):
    raised(ConfigError, fxa.abstract, small_mlp(), CALIBRATION, keep=keep)


@pytest.mark.parametrize("option", [dict(score="fisher"), dict(replacement="linear"), dict(selection="greedy"),
                                    dict(curvature="approx"), dict(round_to=0), dict(sites=["nope"]),
                                    dict(sites="nothing.*"), dict(sites=[])],
                         ids=lambda o: f"{next(iter(o))}={next(iter(o.values()))}")
def test_unknown_option_raises_config_error(option):
    message = raised(ConfigError, fxa.abstract, small_mlp(), CALIBRATION, **option)
    value = next(iter(option.values()))
    if isinstance(value, str):
        assert value in message, f"the message must name the rejected value {value!r}: {message}"


@pytest.mark.parametrize("calibration,options", [
    ([torch.randn(16, 5)], {}),                                                   # model takes 6 features
    ([(torch.randn(16, 6), torch.full((16,), 7))], {"score": "ce"}),              # 3 classes, label 7
], ids=["wrong-input-width", "ce-label-out-of-range"])
def test_calibration_the_model_cannot_run_raises_calibration_error(calibration, options):
    """A malformed calibration batch is a user mistake: CalibrationError, not a raw torch RuntimeError."""
    raised(CalibrationError, fxa.abstract, small_mlp(), calibration, **options)
