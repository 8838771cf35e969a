"""fit="sequential" and fit="outputs" (passes/refit.py): replacement maps fitted beyond their own site.

Every refitted compile must still be the original model under the report's interventions (hooks ==
compiled); the sequential fit must be the least squares it claims on the partly replaced network; the
output fit must lower the output divergence it minimises on the samples it holds back; bad options are
one-line ConfigErrors.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.passes.calibrate import units_last
from fxabstract.passes.refit import _Until, fit_pool
from fxabstract.passes.replace import replace
from fxabstract.verify import intervene, relative_error
from test_exactness import ARCHITECTURES, build
from test_padding import Encoder, _states_equal, padded_batches

FITS = ("sequential", "outputs")
QUICK = {"epochs": 3, "ridges": (1e-3,)}


def trained_mlp(seed: int = 0):
    """A digits MLP 64-96-48-10 trained a little (real data, so the maps have something to get right)."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[:1000]), y[:1000]).backward()
        opt.step()
    return model.eval(), X


def hooked_vs_compiled(model, result, x):
    report = json.loads(json.dumps(result.report))
    with torch.no_grad(), intervene(model, report):
        z_hooks = model(x)
    with torch.no_grad():
        return z_hooks, result.module(x)


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_refitted_compile_equals_original_under_report_interventions(cls, replacement, fit):
    model, calibration, x = build(cls, torch.float32)
    options = QUICK if fit == "outputs" else None
    result = fxa.abstract(model, calibration, keep=0.5, replacement=replacement, round_to=1, fit=fit,
                          fit_options=options)
    assert result.report["fit"]["method"] == fit
    err = relative_error(*hooked_vs_compiled(model, result, x))
    assert err <= 1e-5, f"{cls.__name__} {replacement} fit={fit}: hooks vs compiled {err:.3g}"


def test_output_fit_moves_the_maps_and_lowers_the_held_back_divergence():
    model, X = trained_mlp()
    analysis = fxa.analyse(model, list(X[:512].split(64)), "logit-mse", fit_data=list(X[512:1000].split(64)))
    local = analysis.compile(0.3, "constant", round_to=1)
    fitted = analysis.compile(0.3, "constant", round_to=1, fit="outputs")
    record = fitted.report["fit"]
    assert record["samples"]["fit"] + record["samples"]["held_back"] == 1000, "calibration and fit data are pooled"
    held = record["divergence"]["held_back"]
    assert held["after"] < 0.8 * held["before"], f"the held-back KL must fall: {held}"
    betas = lambda r: torch.tensor([u["constant"] for s in r.report["sites"] for u in s["replaced"]])  # noqa: E731
    assert not torch.allclose(betas(local), betas(fitted)), "the output fit must change the constants"
    assert [s["kept"] for s in local.report["sites"]] == [s["kept"] for s in fitted.report["sites"]], \
        "the fit moves the maps only, never which units are kept"
    with torch.no_grad():                                   # and it carries over to samples never fitted on
        z, z_local, z_fit = model(X[1000:]), local.module(X[1000:]), fitted.module(X[1000:])
    kl = lambda zi: float((z.softmax(-1) * (z.log_softmax(-1) - zi.log_softmax(-1))).sum(-1).mean())  # noqa: E731
    assert kl(z_fit) < kl(z_local), f"unseen digits: KL {kl(z_fit):.3f} (outputs) vs {kl(z_local):.3f} (local)"


def _plan(site, entry):
    from fxabstract.passes.plan import SitePlan
    return SitePlan(site, entry["kept"], [u["unit"] for u in entry["replaced"]], "affine",
                    torch.tensor([u["beta"] for u in entry["replaced"]], dtype=torch.float64),
                    torch.tensor([u["theta"] for u in entry["replaced"]], dtype=torch.float64), torch.zeros(0), 0.0)


def _expected_fit(analysis, site, partly, plan, correct):
    """(beta, theta): ridge least squares of a_P (correct: a_P - C (a~_K - a_K)) on a~_K, a~ from `partly`,
    a from the dense graph, over the fit pool; C from the site's curvature (`_correction`)."""
    from fxabstract.passes.refit import _correction
    K, P = plan.kept, plan.removed
    rows, rows_rep = [], []
    for inputs, _ in fit_pool(analysis.stats):
        rows.append(units_last(_Until(analysis.gm, site.node).value(inputs), site.axis).flatten(0, 1).double())
        rows_rep.append(units_last(_Until(partly, site.node).value(inputs), site.axis).flatten(0, 1).double())
    a, a_rep = torch.cat(rows), torch.cat(rows_rep)
    y = a[:, P] + ((a[:, K] - a_rep[:, K]) @ _correction(analysis.stats, plan).T if correct else 0)
    Z = a_rep[:, K]
    Zc, yc = Z - Z.mean(0), y - y.mean(0)
    S = Zc.T @ Zc / len(Z)
    theta = torch.linalg.solve(S + torch.diag(1e-3 * S.diagonal()), Zc.T @ yc / len(Z)).T   # the default ridge
    return y.mean(0) - theta @ Z.mean(0), theta


def test_sequential_fit_is_least_squares_on_the_partly_replaced_network():
    """Each site's maps are the least squares of its corrected target on the kept units of the network
    whose earlier sites are already replaced (by their refitted maps): recomputed here by hand."""
    model, X = trained_mlp(1)
    analysis = fxa.analyse(model, list(X[:512].split(64)), "logit-mse")
    local = analysis.compile(0.5, "affine", round_to=1)
    for correct in (False, True):
        seq = analysis.compile(0.5, "affine", round_to=1, fit="sequential", fit_options={"correct": correct})
        assert seq.report["fit"]["correct"] is correct
        plans = [_plan(s, e) for s, e in zip(analysis.sites, seq.report["sites"])]
        for k, (site, plan) in enumerate(zip(analysis.sites, plans)):
            partly = replace(analysis.gm, plans[:k])
            beta, theta = _expected_fit(analysis, site, partly, plan, correct)
            assert torch.allclose(plan.theta, theta, rtol=1e-4, atol=1e-6), (k, (plan.theta - theta).abs().max())
            assert torch.allclose(plan.beta, beta, rtol=1e-4, atol=1e-5), (k, (plan.beta - beta).abs().max())
        assert seq.report["sites"][1]["replaced"] != local.report["sites"][1]["replaced"]


def test_output_fit_ignores_padded_positions():
    torch.manual_seed(0)
    model = Encoder().eval()
    options = dict(keep=0.5, replacement="affine", round_to=1, fit="outputs", fit_options=QUICK)
    clean = fxa.abstract(model, padded_batches(), **options)
    junk = fxa.abstract(model, padded_batches(junk=7), **options)
    assert _states_equal(clean, junk), "tokens at padded positions must not change the output fit"
    unmasked = fxa.abstract(model, padded_batches(junk=7), mask=None, **options)
    assert not _states_equal(clean, unmasked), "with mask=None they count (the check can fail)"


def test_refitted_abstraction_saves_loads_and_reapplies(tmp_path):
    model, X = trained_mlp()
    result = fxa.abstract(model, list(X[:256].split(64)), keep=0.5, replacement="affine", round_to=1,
                          fit="outputs", fit_options=QUICK)
    result.save(str(tmp_path / "a"))
    loaded = fxa.load(str(tmp_path / "a"))
    assert loaded.report["fit"]["method"] == "outputs"
    with torch.no_grad(), intervene(model, loaded.report):
        z_hooks = model(X[1000:1100])
    with torch.no_grad():
        assert relative_error(z_hooks, result.module(X[1000:1100])) <= 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(fit="global"), "unknown fit 'global'"),
    (dict(fit_options={"epochs": 2}), "applies to fit='outputs' or 'sequential' only"),
    (dict(fit="sequential", fit_options={"epochs": 2}), "unknown fit_options"),
    (dict(fit="sequential", fit_options={"correct": 1}), "correct=1 must be True or False"),
    (dict(fit="outputs", fit_options={"epoch": 2}), "unknown fit_options"),
    (dict(fit="outputs", fit_options={"loss": "hinge"}), "loss='hinge'"),
    (dict(fit="outputs", fit_options={"lr": -1.0}), "give lr > 0"),
    (dict(fit="outputs", fit_options={"ridges": []}), "non-empty list of ridges"),
    (dict(fit="outputs", fit_options={"epochs": 0}), "epochs=0 must be a positive int"),
])
def test_bad_fit_options_are_config_errors(kwargs, match):
    """Refused before any pass over the data: a generator that fails if iterated proves it."""
    model, X = trained_mlp()

    def never():
        raise AssertionError("the calibration data was read before the options were checked")
        yield

    with pytest.raises(ConfigError, match=match):
        fxa.abstract(model, never(), keep=0.5, round_to=1, **kwargs)
    analysis = fxa.analyse(model, [X[:128]])
    with pytest.raises(ConfigError, match=match):
        analysis.compile(0.5, round_to=1, **kwargs)


def test_output_fit_on_too_few_samples_is_a_config_error():
    model, X = trained_mlp()
    with pytest.raises(ConfigError, match="at least 4 samples"):
        fxa.abstract(model, [X[:3]], keep=0.5, round_to=1, fit="outputs")


def test_output_fit_recomputes_dense_outputs_too_large_to_hold(monkeypatch):
    """Dense outputs beyond the holding limit are recomputed per chunk: the same fit, bit for bit."""
    from fxabstract.passes import refit
    model, X = trained_mlp()
    options = dict(keep=0.5, replacement="affine", round_to=1, fit="outputs", fit_options=QUICK)
    held = fxa.abstract(model, list(X[:256].split(64)), **options)
    original = refit._Targets.__init__

    def tiny(self, gm, chunks, output, limit=2**27):
        original(self, gm, chunks, output, limit=1)
        assert self.held is None
    monkeypatch.setattr(refit._Targets, "__init__", tiny)
    recomputed = fxa.abstract(model, list(X[:256].split(64)), **options)
    assert _states_equal(held, recomputed)


def _ids(n, T=12, vocab=50):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(n))


from fxabstract import zoo  # noqa: E402
from fxabstract.zoo import transformers as zt  # noqa: E402

ZOO = {   # residual streams, grouped convs, SE squeezes, GQA heads with rotary and [B, T, V] logits on token ids
    "cifar_resnet": (lambda: zoo.randomize_batch_norm(zoo.cifar_resnet()), lambda n: torch.randn(n, 3, 16, 16)),
    "resnext": (lambda: zoo.randomize_batch_norm(zoo.ResNeXt()), lambda n: torch.randn(n, 3, 16, 16)),
    "mobilenet_v3_small": (lambda: zoo.randomize_batch_norm(zoo.mobilenet_v3_small()),
                           lambda n: torch.randn(n, 3, 32, 32)),
    "llama": (zt.Llama, _ids),
}


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("name", ZOO)
def test_refitted_zoo_models_equal_the_original_under_report_interventions(name, fit):
    factory, inputs = ZOO[name]
    torch.manual_seed(0)
    model = factory().eval()
    calibration = [inputs(16), inputs(17)]
    result = fxa.abstract(model, calibration, keep=0.5, replacement="affine", round_to=1, fit=fit,
                          fit_options=QUICK if fit == "outputs" else None)
    assert sum(len(s["replaced"]) for s in result.report["sites"]) > 0
    x = inputs(9)
    with torch.no_grad(), intervene(model, json.loads(json.dumps(result.report))):
        z_hooks = model(x)
    with torch.no_grad():
        z = result.module(x)
    err = relative_error(z_hooks, z)
    assert err <= 1e-5, f"{name} fit={fit}: hooks vs compiled {err:.3g}"
