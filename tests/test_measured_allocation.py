"""The measured allocation and the cost bounds of the analysis (docs/math.md §7).

- A measured risk (passes/measure.py, the graph after the site run as its own GraphModule) equals the
  risk of the same replacement applied to the user's model with hooks (`fxa.intervene`).
- The corrected curve equals the measurement at every measured removal and scales the prediction by the
  measured ratio in between; the operating points bracket the predicted allocation.
- The measuring work is bounded: a transformer with many sites measures a few sequences.
- Large outputs draw their Hutchinson probes one at a time from packed random bits; the statistics are
  still unbiased (checked against the exact curvature).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.passes import calibrate as calibrate_mod
from fxabstract.passes import curvature as curvature_mod
from fxabstract.passes.measure import (MIN_ROWS, corrected_curve, measure_plan, measured_risks, operating_points)
from fxabstract.passes.select import fit


def _mlp(seed=0, width=24, out=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, out)).eval()


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_a_measured_risk_is_the_hooked_intervention_on_the_original_model(replacement):
    model = _mlp()
    x = torch.randn(96, 6, generator=torch.Generator().manual_seed(1))
    analysis = fxa.analyse(model, x.split(32), curvature="exact")
    site = analysis.sites[1]
    cv = analysis.risk_curves(replacement, "joint")[site.name]
    k = 10
    got = measured_risks(analysis.gm, site, [k], lambda j: fit(site, cv, j, analysis.stats, analysis.score,
                                                                 replacement, "joint", 1e-3),
                         analysis.stats.reservoir, "logit-mse")[0]
    keep = {s.name: s.n_units - (k if s is site else 0) for s in analysis.sites}
    report = analysis.compile(keep, replacement, "joint", round_to=1, ridge=1e-3).report
    with torch.no_grad():
        z = model(x)
        with fxa.intervene(model, report) as hooked:
            zi = hooked(x)
    want = float(0.5 * (z.double() - zi.double()).pow(2).sum(-1).mean())
    assert want > 0, "removing 10 units must change the outputs"
    assert got == pytest.approx(want, rel=1e-5), f"measured {got} != hooked intervention {want}"


def test_the_corrected_curve_is_the_measurement_at_measured_removals_and_scales_between():
    predicted = torch.arange(11, dtype=torch.float64) ** 2          # 0, 1, 4, ..., 100
    out = corrected_curve(predicted, {2: 8.0, 4: 48.0})             # ratios 2 and 3
    assert out[2] == 8.0 and out[4] == 48.0
    assert out[3] == pytest.approx(9 * 2.5), "the ratio is linear in k between measured removals"
    assert out[1] == pytest.approx(2.0) and out[10] == pytest.approx(300.0), "constant ratio beyond them"
    assert out[0] == 0.0
    flat = corrected_curve(torch.zeros(5, dtype=torch.float64), {2: 1.0})
    assert flat.tolist() == pytest.approx([0, 0.5, 1.0, 1.0, 1.0]), "a zero prediction: the excess is interpolated"
    assert torch.equal(corrected_curve(predicted, {}), predicted)


def test_operating_points_bracket_the_predicted_removal():
    steps = list(range(0, 65, 8))                                    # removals allowed in multiples of 8
    assert operating_points(24, steps) == [8, 24, 48]                # nearest to 12 (a tie: the smaller), 24, 48
    assert operating_points(0, steps) == [8, 16], "nothing removed: are the first steps cheaper than predicted?"
    assert operating_points(64, steps) == [32, 64]                   # twice is beyond the last step
    assert operating_points(0, [0]) == []


def test_the_measuring_work_is_bounded_by_the_calibration_pass():
    # a GPT-2-small-sized model: 24 sites, 256 sequences of 128 tokens, a reservoir of 256 sequences
    samples = measure_plan(24, 256, 256, 128)
    assert 24 * 3 * samples <= 2 * 256, "about one forward pass of the calibration set"
    assert samples * 128 >= MIN_ROWS
    assert measure_plan(2, 10_064, 512, 1) == 512, "a small model measures its whole reservoir"
    assert measure_plan(35, 1536, 512, 1) == MIN_ROWS, "at least MIN_ROWS output rows"


def test_the_report_says_where_the_allocation_was_measured():
    model = _mlp()
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(2))
    result = fxa.abstract(model, x.split(32), keep=0.5, round_to=1)
    measured = result.report["measured"]
    assert measured["samples"] == measure_plan(2, 128, 128, 1) == 42, "2 sites x 3 points x 42 ~ 2 x 128"
    assert set(measured["points"]) == {s["name"] for s in result.report["sites"]}
    assert all(1 <= len(p) <= 4 for p in measured["points"].values()), "3 around the first allocation, the last"
    for site in result.report["sites"]:
        assert site["units"] - len(site["kept"]) in measured["points"][site["name"]], "measured_risk is a measurement"
        assert site["measured_risk"] >= 0
    assert "measured" not in fxa.abstract(model, x.split(32), keep=0.5, allocation="predicted").report


def test_probes_drawn_one_at_a_time_from_packed_bits_are_unbiased(monkeypatch):
    v = curvature_mod.rademacher((64, 1000), torch.Generator().manual_seed(0))
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    gram = v.T @ v / 64
    assert abs(float(gram.diagonal().mean()) - 1) < 1e-6 and float(gram.fill_diagonal_(0).abs().mean()) < 0.15
    model = _mlp(width=16, out=8)
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(3))
    exact = fxa.analyse(model, x.split(128), curvature="exact", matrices="joint").stats.curvature
    monkeypatch.setattr(calibrate_mod, "PACKED_PROBES", 0)            # every output counts as large
    monkeypatch.setattr(curvature_mod, "PACKED_PROBES", 0)
    probed = fxa.analyse(model, x.split(128), curvature="hutchinson", probes=32, matrices="joint").stats.curvature
    for name in exact:
        e, p = exact[name], probed[name]
        assert float((p.sh - e.sh).abs().sum() / e.sh.sum()) < 0.1, name
        assert float((p.H0 - e.H0).norm() / e.H0.norm()) < 0.1, name
