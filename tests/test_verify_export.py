"""Verification (docs/math.md §4: interchange interventions, margin certificate) and the back ends
(ONNX export with onnxruntime parity, save/load), on the digits MLP trained once per module."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxabstract as fxa
from fxabstract.demo import DigitsMLP, digits_data, train
from fxabstract.verify import relative_error


@pytest.fixture(scope="module")
def digits():
    """(trained DigitsMLP, x_train, y_train, x_test, y_test): seconds of training, once per module."""
    x_train, y_train, x_test, y_test = digits_data()
    torch.manual_seed(0)
    model = train(DigitsMLP(), x_train, y_train, epochs=30)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
    assert accuracy > 0.9, f"the digits MLP must train (test accuracy {accuracy:.3f})"
    return model, x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def half(digits):
    model, x_train, *_ = digits
    return fxa.abstract(model, list(x_train.split(256)), keep=0.5)


def top1_agreement(model, module, x) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == module(x).argmax(-1)).double().mean())


# ----------------------------------------------------------------------------- interchange interventions

def test_iia_is_a_probability_with_a_confidence_interval_around_it(digits, half):
    model, *_, x_test, _ = digits
    out = fxa.iia(model, half, x_test, swap_p=0.5, trials=2000)
    assert set(out) == {s["name"] for s in half.report["sites"]}, "iia must report every site of the abstraction"
    for name, site in out.items():
        lo, hi = site["ci95"]
        assert 0.0 <= site["iia"] <= 1.0, f"IIA of {name} must be a probability: {site['iia']}"
        assert 0.0 <= lo <= site["iia"] <= hi <= 1.0, f"the 95% interval of {name} must contain its IIA: {site}"
        assert hi - lo < 0.1, f"2000 trials must give an interval narrower than 0.1: {site['ci95']}"
        assert site["trials"] == 2000 and site["swap_p"] == 0.5, "iia must record its trials and swap probability"
        assert site["logit_mse"] >= 0, "the logit-MSE under intervention must be non-negative"


def test_iia_is_one_at_keep_one(digits):
    model, x_train, _, x_test, _ = digits
    identity = fxa.abstract(model, [x_train], keep=1.0)
    for name, site in fxa.iia(model, identity, x_test, swap_p=0.5, trials=1000).items():
        assert site["iia"] == 1.0, f"an abstraction that removes nothing must have IIA 1 at {name}: {site['iia']}"
        assert site["logit_mse"] < 1e-9, f"and logit-MSE ~0 at {name}: {site['logit_mse']}"


def test_iia_without_swaps_is_the_top1_agreement(digits):
    model, x_train, _, x_test, _ = digits
    result = fxa.abstract(model, [x_train], keep=0.2, sites=["fc2"])
    agreement = top1_agreement(model, result.module, x_test)
    assert agreement < 0.999, "the abstraction must disagree sometimes, else the test is vacuous"
    trials = 20_000
    (site,) = fxa.iia(model, result, x_test, swap_p=0.0, trials=trials).values()
    sigma = math.sqrt(agreement * (1 - agreement) / trials)
    assert abs(site["iia"] - agreement) <= 4 * sigma + 1 / trials, (
        f"with swap_p=0 IIA estimates the top-1 agreement on the data ({agreement:.4f}), got {site['iia']:.4f}")


def test_iia_trials_are_reproducible_and_seeded(digits, half):
    model, *_, x_test, _ = digits
    a = fxa.iia(model, half, x_test, swap_p=0.5, trials=500, seed=3)
    b = fxa.iia(model, half, x_test, swap_p=0.5, trials=500, seed=3)
    c = fxa.iia(model, half, x_test, swap_p=0.5, trials=500, seed=4)
    assert a == b, "the same seed must draw the same trials and give identical results"
    assert all(a[k]["logit_mse"] != c[k]["logit_mse"] for k in a), "a different seed must draw different trials"


# ----------------------------------------------------------------------------- margin certificate

@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75, 0.9])
def test_margin_certificate_is_sound(digits, keep):
    model, x_train, _, x_test, _ = digits
    result = fxa.abstract(model, list(x_train.split(256)), keep=keep)
    cert = fxa.certificate(model, result, x_test)
    with torch.no_grad():
        z, zc = model(x_test).double(), result.module(x_test).double()
    disagreement = float((z.argmax(-1) != zc.argmax(-1)).double().mean())
    D2 = float((zc - z).pow(2).sum(-1).mean())
    assert math.isclose(cert["D2"], D2, rel_tol=1e-9, abs_tol=1e-12), "the certificate's D2 must be E||z_c - z||^2"
    assert math.isclose(cert["disagreement"], disagreement, abs_tol=1e-12), \
        "the certificate must report the measured top-1 disagreement"
    assert disagreement <= cert["bound"] <= 1.0, \
        f"keep={keep}: the certified bound {cert['bound']} must be >= the measured disagreement {disagreement}"
    top2 = z.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    eps = cert["eps"]
    assert cert["bound"] <= float((margin <= 2 * eps).double().mean()) + D2 / eps**2 + 1e-12, \
        "the bound must be P(m <= 2 eps) + D2 / eps^2 at its eps (or tighter)"


def test_margin_certificate_is_informative_at_a_mild_keep(digits):
    model, x_train, _, x_test, _ = digits
    result = fxa.abstract(model, list(x_train.split(256)), keep=0.75)
    cert = fxa.certificate(model, result, x_test)
    assert cert["bound"] < 1.0, f"at keep=0.75 the certificate must be non-vacuous: {cert}"


# ----------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def exported(half, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "digits.onnx")
    x = torch.rand(4, 64)
    info = fxa.to_onnx(half.module, x, path)
    return path, info


def test_onnx_output_matches_the_module_at_several_batch_sizes(half, exported):
    path, info = exported
    assert info["path"] == path and info["relative_diff"] <= 1e-5, f"to_onnx must report parity: {info}"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (4, 1, 37):                               # the example's size and others: dynamic batch axis
        x = torch.rand(batch, 64, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = half.module(x)
        assert got.shape == tuple(expected.shape), f"onnxruntime must accept batch {batch} (dynamic axis)"
        err = relative_error(expected, torch.from_numpy(np.asarray(got)))
        assert err <= 1e-5, f"onnxruntime must match the compiled module at batch {batch}: relative error {err:.3g}"


def test_onnx_weights_have_the_reduced_shapes(half, exported):
    path, _ = exported
    proto = onnx.load(path)
    shapes = sorted(tuple(init.dims) for init in proto.graph.initializer if len(init.dims) == 2)
    k1, k2 = (len(s["kept"]) for s in half.report["sites"])
    assert k1 < 256 and k2 < 256, "keep=0.5 must shrink both sites"
    assert shapes == sorted([(k1, 64), (k2, k1), (10, k2)]), \
        f"the ONNX weights must have the compiled, reduced shapes, got {shapes}"


# ----------------------------------------------------------------------------- save

def check_save(result, x, folder):
    names = result.save(str(folder))
    assert names == ["module.pt", "module.pt2", "report.json", "tensors.safetensors"], names
    loaded = fxa.load(str(folder))
    assert loaded.report == json.loads(json.dumps({**result.report, "files": names})), \
        "report.json with tensors.safetensors must hold the report, plus the files written"
    module = torch.load(folder / "module.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(module(x), result.module(x)), "module.pt must load and compute the same output"
        assert torch.equal(loaded.module(x), result.module(x)), "module.pt2 must load and compute the same output"
    leftovers = sorted(p.name for p in folder.iterdir())
    assert leftovers == names, f"save must leave no temporary files behind: {leftovers}"


def test_save_writes_a_loadable_report_and_module(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    x = torch.rand(50, 64)
    check_save(fxa.abstract(model, [x], keep=0.5), x, tmp_path / "out")


def test_save_works_for_the_demo_model(half, tmp_path, digits):
    """DigitsMLP's module uses `from __future__ import annotations`, so fx records its forward's
    annotations as strings; the compiled module must still pickle (save() writes module.pt where the module pickles)."""
    *_, x_test, _ = digits
    check_save(half, x_test, tmp_path / "out")


# ----------------------------------------------------------------------------- real data smoke test

def test_joint_logit_mse_beats_variance_on_digits(digits):
    """docs/math.md §4: at the penultimate site, keeping 25%, a sound implementation beats VBP."""
    model, x_train, _, x_test, _ = digits
    calibration = list(x_train.split(256))
    metrics = {}
    for score in ("logit-mse", "variance"):
        result = fxa.abstract(model, calibration, keep=0.25, score=score, replacement="constant",
                              selection="joint", sites=["fc2"])
        assert len(result.report["sites"][0]["kept"]) == 64, "25% of fc2's 256 units must be kept"
        with torch.no_grad():
            mse = float((0.5 * (model(x_test) - result.module(x_test)).pow(2).sum(-1)).mean())
        metrics[score] = (top1_agreement(model, result.module, x_test), mse)
    (agree_c, mse_c), (agree_v, mse_v) = metrics["logit-mse"], metrics["variance"]
    assert agree_c >= agree_v, f"joint logit-mse must agree with the model at least as often as variance: {metrics}"
    assert mse_c <= mse_v, f"joint logit-mse must have a logit-MSE no larger than variance's: {metrics}"
