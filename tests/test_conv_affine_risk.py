"""The predicted risk of an affine replacement at a conv site (several positions per sample).

When everything after the site is linear, the logit-MSE risk is exactly quadratic in the perturbation
delta(x, pos), so the second-order prediction must equal the measured risk (docs/math.md §2). It does for a
constant replacement (delta is the same at every position, and the curvature is summed over positions)
and for an affine one with a single position. With several positions an affine replacement's residual
differs from position to position. The prediction (risk.position_affine_risk) splits the residual into its
per-sample mean, weighted by the position-summed curvature, and the deviations from it, weighted by the
per-position curvature: exact to second order both when every pixel is drawn independently and when a
sample holds one value at every pixel (up to the sampling noise of the cross-position terms: ~1% at 8192
samples). Either curvature alone is off by up to as many times as there are positions in one of the two
cases (behind a global average pool: 16x), and the position-summed one misweighed blocks of different
resolution against each other (benchmarks/results/mobilenet_v2.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.passes import risk


def _risks(positions: int, replacement: str, n: int = 256, pooled: bool = False,
           mixed: bool = False) -> tuple[float, float, fxa.Analysis]:
    torch.manual_seed(0)
    side = int(positions**0.5)
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)] if pooled else \
        [nn.Flatten(), nn.Linear(4 * positions, 3)]
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1), *head).eval()
    x = torch.randn(n, 3, side, side)
    if mixed:   # half the samples hold one value at every pixel: their residuals are equal across positions
        x[: n // 2] = x[: n // 2, :, :1, :1].expand(-1, -1, side, side)
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
    assert risk.positions(analysis.stats, "0") == 16
    if pooled:  # J is the same at every position: the summed curvature is 16x the per-position one
        ratio = float(k.H0.trace() / k.Hp.trace())
        # H0 is a float32 product over chunks of ~2,000 rows (Curvature.flush), Hp a float64 one
        assert ratio == pytest.approx(16, rel=1e-4), f"summed / per-position curvature {ratio:.4g}, expected 16"


@pytest.mark.parametrize("pooled", [False, True])
def test_affine_predicted_risk_when_residuals_are_equal_across_positions(pooled):
    """Samples constant over their pixels have one residual at every position: the per-position curvature
    alone would undercount their risk (up to 16x behind the pool); the split into the per-sample mean and
    the deviations from it counts both kinds of sample."""
    predicted, measured, analysis = _risks(16, "affine", n=8192, pooled=pooled, mixed=True)
    assert predicted == pytest.approx(measured, rel=2e-2), \
        f"affine, 16 positions, mixed: predicted {predicted:.4g} != measured {measured:.4g}"


def test_per_position_curvature_equals_summed_curvature_at_one_position():
    _, _, analysis = _risks(1, "affine")
    k = analysis.stats.curvature["0"]
    assert torch.allclose(k.Hp, k.H0, rtol=1e-10, atol=1e-12)
