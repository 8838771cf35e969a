"""Progress bars per pass and per batch; the summary PNG (fidelity against keep, budget per site),
skipped with a note when matplotlib is missing."""
from __future__ import annotations

import sys

import torch
from torch import nn

import fxabstract as fxa
from fxabstract.output.plots import summary_png

PNG = b"\x89PNG\r\n\x1a\n"


def small_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return fxa.abstract(model, list(torch.randn(96, 8).split(32)), keep=0.5, progress=True)


def test_progress_shows_the_calibration_batches_and_the_measured_sites(capfd):
    small_result()
    err = capfd.readouterr().err
    assert "calibrate" in err and "batch" in err, f"a bar over the calibration batches: {err!r}"
    assert "measure risk" in err and "/2 " in err, f"a bar over the 2 sites whose risk is measured: {err!r}"


def test_no_progress_by_default(capfd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    fxa.abstract(model, [torch.randn(40, 8)], keep=0.5)
    assert capfd.readouterr().err == "", "the API is silent unless progress=True"


def sweep_of(result):
    units = sum(s["units"] for s in result.report["sites"])
    return [{"keep": k, "kept": round(k * units), "units": units, "agreement": 1 - (1 - k) / 4,
             "logit_mse": (1 - k) ** 2} for k in (1.0, 0.5, 0.25)]


def test_summary_png_is_written_atomically(tmp_path):
    result = small_result()
    assert summary_png(result.report, sweep_of(result), str(tmp_path / "summary.png")) is True
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG, "a PNG file"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.png"], "no temporary file is left"


def test_summary_png_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    result = small_result()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib -> ImportError
    assert summary_png(result.report, sweep_of(result), str(tmp_path / "summary.png")) is False
    assert not list(tmp_path.iterdir()), "nothing is written without matplotlib"
