"""The predicted risk of an affine replacement at a conv site (several positions per sample).

When everything after the site is linear, the logit-MSE risk is exactly quadratic in the perturbation
delta(x, pos), so the second-order prediction must equal the measured risk (THEORY §2). It does for a
constant replacement (delta is the same at every position, and the curvature is summed over positions)
and for an affine one with a single position. With several positions an affine replacement's residual
differs from position to position, and the prediction pairs the per-position residual covariance with
the per-position curvature E[sum_pos U(pos)^T U(pos)] (risk.affine_curvature): exact to second order when
the residuals at different positions are uncorrelated, as here, where every pixel is drawn independently
(up to the sampling noise of the cross-position terms: ~1% at 8192 samples). The position-summed
curvature, which this replaced, overestimates it up to as many times as there are positions (behind a global
average pool: 16x here) and misweighed blocks of different resolution against each other
(benchmarks/results/mobilenet_v2.md). Residuals correlated across positions make the per-position
prediction an underestimate; that case is left to the measured risk curves (passes/measure.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.passes import risk


def _risks(positions: int, replacement: str, n: int = 256, pooled: bool = False) -> tuple[float, float, fxa.Analysis]:
    torch.manual_seed(0)
    side = int(positions**0.5)
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)] if pooled else \
        [nn.Flatten(), nn.Linear(4 * positions, 3)]
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1), *head).eval()
    x = torch.randn(n, 3, side, side)
    analysis = fxa.analyse(model, x.split(256), curvature="exact")
    result = analysis.compile({"0": 4}, replacement, "diagonal", round_to=1)
    with torch.no_grad():
        measured = 0.5 * (model(x).double() - result.module(x).double()).pow(2).sum(-1).mean()
    return result.report["predicted_risk"], float(measured), analysis


@pytest.mark.parametrize("replacement,positions", [("constant", 1), ("constant", 16), ("affine", 1)])
def test_predicted_risk_is_exact_behind_a_linear_map(replacement, positions):
    predicted, measured, _ = _risks(positions, replacement)
    assert predicted == pytest.approx(measured, rel=1e-3), \
        f"{replacement}, {positions} positions: predicted {predicted:.4g} != measured {measured:.4g}"


@pytest.mark.parametrize("pooled", [False, True])
def test_affine_predicted_risk_at_a_conv_site_with_independent_positions(pooled):
    predicted, measured, analysis = _risks(16, "affine", n=8192, pooled=pooled)
    assert predicted == pytest.approx(measured, rel=1e-2), \
        f"affine, 16 positions: predicted {predicted:.4g} != measured {measured:.4g}"
    k = analysis.stats.curvature["0"]
    assert torch.allclose(risk.affine_curvature(analysis.stats, "0"), k.Hp / k.n)
    if pooled:  # J is the same at every position: the summed curvature is 16x the per-position one
        ratio = float(k.H0.trace() / k.Hp.trace())
        assert ratio == pytest.approx(16, rel=1e-6), f"summed / per-position curvature {ratio:.4g}, expected 16"


def test_per_position_curvature_equals_summed_curvature_at_one_position():
    _, _, analysis = _risks(1, "affine")
    k = analysis.stats.curvature["0"]
    assert torch.allclose(k.Hp, k.H0, rtol=1e-10, atol=1e-12)
