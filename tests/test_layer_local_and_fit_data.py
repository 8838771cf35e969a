"""cwvar's joint selection (layer-local optimal brain surgeon: the consumers' Gram matrix as curvature,
docs/math.md §3 linear-head case) and affine replacements fitted on extra forward-only data (`fit_data`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract import zoo
from fxabstract.errors import CalibrationError
from fxabstract.passes import risk
from fxabstract.passes.scores import consumer_gram
from fxabstract.passes.select import fit
from fxabstract.verify import intervene, relative_error


def _convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 10, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 4))
    zoo.randomize_batch_norm(model)
    return model.eval(), torch.randn(96, 3, 8, 8)


def _hook_error(model, result, x) -> float:
    with torch.no_grad(), intervene(model, result.report):
        z_hooks = model(x)
    with torch.no_grad():
        return relative_error(z_hooks, result.module(x))


def test_consumer_gram_is_w_transpose_w_over_outputs_and_taps():
    model, x = _convnet()
    analysis = fxa.analyse(model, x.split(32), score="cwvar")
    site = analysis.sites[0]
    W = model[3].weight.detach().double()                                 # [10, 12, 3, 3]
    G = torch.einsum("oikl,ojkl->ij", W, W)
    assert torch.allclose(consumer_gram(analysis.gm, site), G)


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_cwvar_joint_selection_is_exact_and_beats_diagonal_on_its_own_risk(replacement):
    model, x = _convnet()
    analysis = fxa.analyse(model, x.split(32), score="cwvar")
    site = analysis.sites[0].name
    joint = analysis.compile({site: 4}, replacement, "joint", round_to=1)
    diagonal = analysis.compile({site: 4}, replacement, "diagonal", round_to=1)
    assert joint.report["selection"] == "joint"
    assert _hook_error(model, joint, x) < 1e-5
    # the layer-local risk 1/2 E[delta^T G delta] at the consumer, measured on the calibration data
    gm, s = analysis.gm, analysis.sites[0]
    G, S, mu = consumer_gram(gm, s), analysis.stats.moments[site].cov, analysis.stats.moments[site].mean

    def local_risk(report):
        entry = report["sites"][0]
        K = entry["kept"]
        P = sorted(set(range(s.n_units)) - set(K))
        if replacement == "constant":
            return 0.5 * float((G[P][:, P] * S[P][:, P]).sum())
        _, theta = risk.fit_affine(mu, S, K, P, 1e-3)
        return risk.affine_risk(G, S, K, P, theta)

    assert local_risk(joint.report) <= local_risk(diagonal.report) * (1 + 1e-9)


def test_fit_data_fits_affine_maps_on_more_samples_and_stays_exact():
    model, x = _convnet()
    extra = torch.randn(512, 3, 8, 8)
    base = fxa.abstract(model, x.split(32), keep=0.5, score="cwvar", replacement="affine", round_to=1)
    more = fxa.abstract(model, x.split(32), keep=0.5, score="cwvar", replacement="affine", round_to=1,
                        fit_data=extra.split(128))
    assert more.report["fit_samples"] == 512 and base.report["fit_samples"] == 0
    assert _hook_error(model, more, x) < 1e-5
    # the fit on calibration + fit data equals least squares on the union's moments
    analysis = fxa.analyse(model, [torch.cat([x, extra])], score="cwvar")
    union = analysis.compile(0.5, "affine", "joint", round_to=1)
    a = more.report["sites"][0]["replaced"]
    b = union.report["sites"][0]["replaced"]
    assert [r["unit"] for r in a] == [r["unit"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["beta"] == pytest.approx(rb["beta"], rel=1e-6, abs=1e-9)


def test_fit_data_of_another_shape_is_refused():
    model, x = _convnet()
    with pytest.raises(CalibrationError, match="fit_data batches hold inputs of shape"):
        fxa.abstract(model, x.split(32), score="cwvar", replacement="affine", fit_data=[torch.randn(8, 3, 9, 9)])
    with pytest.raises(CalibrationError, match="fit_data batch 0"):
        fxa.abstract(model, x.split(32), score="cwvar", replacement="affine",
                     fit_data=[torch.full((8, 3, 8, 8), float("nan"))])


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_local_selection_orders_like_cwvar_and_prices_the_order_in_output_units(replacement):
    model, x = _convnet()
    analysis = fxa.analyse(model, x.split(32), curvature="exact")
    local = analysis.risk_curves(replacement, "local")
    cw = fxa.Analysis(analysis.gm, analysis.sites, analysis.ineligible, analysis.stats, "cwvar", 0)
    layer = cw.risk_curves(replacement, "joint")
    for s in analysis.sites:
        cv = local[s.name]
        assert cv.order == layer[s.name].order, "local selection is the consumer-Gram elimination order"
        for k in (1, 3, s.n_units // 2):
            plan = fit(s, cv, k, analysis.stats, "logit-mse", replacement, "local", 1e-3)
            assert float(cv.curve[k]) == pytest.approx(plan.predicted_risk, rel=1e-6, abs=1e-12), \
                f"{s.name}: the curve must be the output-unit risk of the fitted replacement of the first {k} units"
    result = analysis.compile(0.5, replacement, "local", round_to=1, allocation="predicted")
    assert result.report["selection"] == "local"
    assert _hook_error(model, result, x) < 1e-5


def test_local_selection_on_a_vit_removes_whole_heads_and_stays_exact():
    from fxabstract.zoo import transformers as zt
    torch.manual_seed(0)
    model, x = zt.ViT().eval(), torch.randn(48, 3, 32, 32)
    result = fxa.abstract(model, x.split(16), keep=0.5, selection="local", replacement="affine", round_to=1,
                          allocation="predicted")
    heads = [s for s in result.report["sites"] if s["group"] > 1]
    assert heads and all(len(s["kept"]) % s["group"] == 0 for s in heads), "head sites keep whole heads"
    assert _hook_error(model, result, x) < 1e-5
