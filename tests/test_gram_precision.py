"""The joint d x d sums are float32 products (for a float32 model) added into float64 sums, with each
chunk of rows centred at its curvature-weighted mean first (passes/curvature.py `Curvature.flush`). The
centring is what keeps the risk right where it cancels: a unit with a large mean and a small spread has
c^T H0 c - 2 c^T H1 + H2 tiny against each term, and uncentred float32 products would leave only their
rounding error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa


def _model(dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():                 # every hidden unit is about 50, spread about 0.01
        model[0].weight.mul_(0.02)
        model[0].bias.fill_(50.0)
    return model.eval().to(dtype)


@pytest.mark.parametrize("keep", [4, 8, 12])
def test_float32_joint_sums_give_the_float64_risk_for_units_with_a_large_mean(keep):
    x = torch.randn(4096, 4, generator=torch.Generator().manual_seed(1))
    got = {}
    for dtype in (torch.float32, torch.float64):
        result = fxa.abstract(_model(dtype), list(x.to(dtype).split(512)), keep={"0": keep}, curvature="exact",
                              allocation="predicted")
        got[dtype] = result.report
    r32, r64 = got[torch.float32]["predicted_risk"], got[torch.float64]["predicted_risk"]
    assert r64 > 0
    assert r32 == pytest.approx(r64, rel=1e-3), f"float32 sums: risk {r32:.6g}, float64: {r64:.6g}"
    kept = [[s["kept"] for s in got[t]["sites"]] for t in got]
    assert kept[0] == kept[1], "the same units must be kept"
