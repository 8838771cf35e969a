"""Issue 5, numerical robustness and dtypes: dead, constant, collinear and huge units, tiny calibration
sets, float16/bfloat16/float64 models, and models handed over in training mode."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import fxabstract as fxa
import fxabstract.abstraction
from fxabstract.errors import CalibrationError, FxAbstractWarning
from fxabstract.verify import relative_error
from test_exactness import ARCHITECTURES, build, hooked_vs_compiled

# Compiled module vs the hook-intervened original: max |dz| / max(1, max |z|). The fold runs in
# float64 and casts once; the hooks compute in the model's dtype, so the gap is a few roundings.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5,
       torch.float16: 8 * torch.finfo(torch.float16).eps, torch.bfloat16: 8 * torch.finfo(torch.bfloat16).eps}


def mlp(d: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, d), nn.ReLU(), nn.Linear(d, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def holdout_mse(model, module, x) -> float:
    """E 1/2 ||z - z_c||^2 on held-out inputs: the measured Interventional Risk (docs/math.md §2)."""
    with torch.no_grad():
        return float(0.5 * (model(x).double() - module(x).double()).pow(2).sum(-1).mean())


def assert_finite_and_exact(model, result, x, dtype=torch.float32):
    json.dumps(result.report, allow_nan=False)  # raises on NaN/inf anywhere in the report
    bad = [n for n, p in result.module.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"the compiled module must have finite parameters, not in {bad}"
    z_hooks, z_compiled = hooked_vs_compiled(model, result, x)
    err = relative_error(z_hooks.double(), z_compiled.double())
    assert err <= TOL[dtype], f"the compiled module must equal the intervened original: relative error {err:.3g}"


# ----------------------------------------------------------------------------- degenerate units

def dead_half(m):
    m[0].bias[:8] = -1e3                               # ReLU(-1000 + ...) = 0: dead units


def constant_half(m):
    m[0].weight[:8] = 0                                # a_j = ReLU(b_j): constant units


def duplicated_half(m):
    m[0].weight[8:], m[0].bias[8:] = m[0].weight[:8], m[0].bias[:8]   # perfectly collinear pairs


# a constant cannot stand in for a copy of a varying unit: copies are replaced affinely only
@pytest.mark.parametrize("degenerate,replacement", [(dead_half, "constant"), (dead_half, "affine"),
                                                    (constant_half, "constant"), (constant_half, "affine"),
                                                    (duplicated_half, "affine")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_redundant_units_are_removed_at_no_cost(degenerate, replacement):
    """Half of fc1's 16 units carry no information (dead, constant, or copies of the other half):
    keeping the 8 others must leave the function unchanged, with a finite fit and no warning."""
    model = mlp()
    with torch.no_grad():
        degenerate(model)
    calibration, x = [torch.randn(64, 6) for _ in range(2)], torch.randn(200, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxAbstractWarning)
        result = fxa.abstract(model, calibration, keep={"0": 8, "2": 10}, replacement=replacement, round_to=1)
    assert_finite_and_exact(model, result, x)
    scale = holdout_mse(model, lambda v: torch.zeros_like(model(v)), x)
    risk = holdout_mse(model, result.module, x)
    assert risk <= 1e-5 * scale, f"removing {degenerate.__name__} units must cost nothing: risk {risk:.3g}"


@pytest.mark.parametrize("selection", ["joint", "diagonal"])
def test_a_site_whose_units_are_all_dead_gets_a_finite_affine_fit(selection):
    """Every unit of fc1 dead: its covariance is 0, so only the ridge's floor makes the fit solvable,
    and the affine replacement must come out as theta = 0 (the constant), not NaN."""
    model = mlp(d=2)                                   # two units (with 16 LAPACK happened to return 0)
    with torch.no_grad():
        model[0].bias[:] = -1e3
    x = torch.randn(64, 6)
    result = fxa.abstract(model, [x], keep={"0": 1, "2": 10}, replacement="affine", selection=selection,
                          round_to=1, allocation="predicted")
    assert_finite_and_exact(model, result, x)


def test_a_numerically_constant_unit_gets_no_exploding_coefficient():
    """A unit whose spread is at float32 rounding level (variance 0 after the moments' cancellation,
    a covariance of rounding noise left over) must not be a regressor with a weight of 1e7: the
    compiled module's own rounding would then be amplified (seen on a MobileNetV2 with a 1x1 late
    stage on one CPU thread: hooks vs compiled 3.6e-3). Its ridge floor is its rounding level."""
    from fxabstract.passes.risk import fit_affine
    mu = torch.tensor([0.3, 0.3], dtype=torch.float64)
    S = torch.tensor([[0.0, 1e-17], [1e-17, 3e-13]], dtype=torch.float64)     # unit 0: constant to rounding
    _, theta = fit_affine(mu, S, [0], [1], 1e-3)
    assert abs(float(theta)) < 1e-2, f"theta {float(theta):.3g} divides rounding noise by rounding noise"
    scaled = torch.tensor([1000.0, 1.0], dtype=torch.float64)                 # the floor scales with the unit
    _, theta_scaled = fit_affine(mu * scaled, S * torch.outer(scaled, scaled), [0], [1], 1e-3)
    assert torch.allclose(theta_scaled * 1000, theta, rtol=1e-9), "the floor must keep the fit scale invariant"
    S_real = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)     # a real unit: the ridge asked for
    _, theta_real = fit_affine(mu, S_real, [0], [1], 1e-3)
    assert float(theta_real) == pytest.approx(0.5 / (1 + 1e-3 + 1e-12), rel=1e-12)


def test_an_exploding_affine_fit_is_refused_not_folded():
    """Sums that are not a covariance (cancellation in float64 on near-duplicate samples can leave one):
    S_KK tiny against S_PK gives theta ~ 1e6 and fitted values varying 1e6 times more than the unit
    replaced. fit_affine must refuse (CalibrationError naming the fix), not hand the fold a NaN model;
    the same call on a real covariance fits."""
    from fxabstract.passes.risk import fit_affine
    mu = torch.zeros(2, dtype=torch.float64)
    broken = torch.tensor([[1e-6, 1.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(CalibrationError, match="broke down numerically.*ridge="):
        fit_affine(mu, broken, [0], [1], 0.0)
    nonfinite = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64)
    with pytest.raises(CalibrationError, match="broke down numerically"):
        fit_affine(mu, nonfinite, [0], [1], 0.0)
    _, theta = fit_affine(mu, torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64), [0], [1], 0.0)
    assert float(theta) == pytest.approx(0.9, rel=1e-9)


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("scale", ["weights", "inputs"])
def test_huge_activations_give_a_finite_exact_compile(scale, replacement):
    """Activations around 1e5-1e6 (float32): statistics in float64 stay finite and the fold exact."""
    model = mlp()
    calibration, x = [torch.randn(64, 6) for _ in range(2)], torch.randn(100, 6)
    if scale == "weights":
        with torch.no_grad():
            model[0].weight.mul_(1e4)
            model[0].bias.add_(1e5)
    else:
        calibration, x = [c * 1e6 for c in calibration], x * 1e6
    result = fxa.abstract(model, calibration, keep=0.5, replacement=replacement, round_to=1)
    assert_finite_and_exact(model, result, x)


def overflow_site(m):
    m[0].weight.mul_(1e6)                                  # past float16's 65504 at the first site


def overflow_logits(m):
    m[4].weight.fill_(1e38)                                # logits past float32's 3.4e38
    m[4].bias.fill_(3e38)


@pytest.mark.parametrize("dtype, overflow, where", [
    (torch.float16, overflow_site, "computes NaN or inf at site '0'"),
    (torch.float32, overflow_logits, "outputs are NaN or inf"),
], ids=["float16-site", "float32-logits"])
def test_overflow_is_a_calibration_error_not_a_silently_wrong_model(dtype, overflow, where):
    """The statistics would be NaN and the compiled module garbage: compilation stops and says where."""
    model = mlp().to(dtype)
    with torch.no_grad():
        overflow(model)
    with pytest.raises(CalibrationError, match=where):
        fxa.abstract(model, [torch.randn(32, 6, dtype=dtype)], keep=0.5, replacement="affine")


def test_fewer_samples_than_units_warns_and_regularises(monkeypatch):
    """n = 32 samples, d = 64 units: the affine fit warns (FxAbstractWarning), raises the ridge to d/n,
    and generalises better than the unregularised fit (summed over three seeds)."""
    regularised, plain = 0.0, 0.0
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
        calibration, x = [torch.randn(32, 10)], torch.randn(1000, 10)
        with pytest.warns(FxAbstractWarning, match="32 samples"):
            result = fxa.abstract(model, calibration, keep=0.5, replacement="affine", round_to=1)
        assert result.report["ridge"] == 1e-3, "the ridge asked for"
        assert [s["ridge"] for s in result.report["sites"]] == [64 / 32, 64 / 32], "the ridge used, per site"
        regularised += holdout_mse(model, result.module, x)
        with monkeypatch.context() as mp:
            mp.setattr(fxabstract.abstraction, "tiny_calibration_ridge",
                       lambda samples, units, ridge: dict.fromkeys(units, ridge))
            plain += holdout_mse(model, fxa.abstract(model, calibration, keep=0.5, replacement="affine",
                                                     round_to=1).module, x)
    assert regularised < 0.5 * plain, \
        f"the regularised fit must generalise better: held-out risk {regularised:.3g} vs {plain:.3g}"


def test_enough_samples_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxAbstractWarning)
        result = fxa.abstract(mlp(), [torch.randn(64, 6)], keep=0.5, replacement="affine")
    assert result.report["ridge"] == 1e-3 and all(s["ridge"] == 1e-3 for s in result.report["sites"]), \
        "with n >= d the requested ridge is used"


def test_only_the_short_site_gets_the_raised_ridge():
    """n = 32 samples: site `0` (64 units) is short and fits with ridge 64 / 32; site `2` (16 units) is not,
    and its replacements are those of an analysis of site `2` alone (where nothing is short)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    calibration = [torch.randn(32, 10)]
    with pytest.warns(FxAbstractWarning, match="site '0' has 64 units.*the other sites with 0.001"):
        both = fxa.abstract(model, calibration, keep={"0": 32, "2": 8}, replacement="affine", round_to=1)
    assert {s["name"]: s["ridge"] for s in both.report["sites"]} == {"0": 2.0, "2": 1e-3}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxAbstractWarning)
        alone = fxa.abstract(model, calibration, keep={"2": 8}, replacement="affine", round_to=1, sites=["2"])
    (mine,), (theirs,) = [s for s in both.report["sites"] if s["name"] == "2"], alone.report["sites"]
    assert mine["kept"] == theirs["kept"] and mine["replaced"] == theirs["replaced"], \
        "site 2's fit must not take site 0's raised ridge"


# ----------------------------------------------------------------------------- dtypes

class ConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU read by a zero-padded conv (a bias map for constants), then a pooled head."""

    in_shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(6, 5))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("cls", ARCHITECTURES + [ConvNet], ids=lambda c: c.__name__)
def test_every_float_dtype_compiles_exactly_within_its_tolerance(cls, replacement, dtype):
    model, calibration, x = build(cls, dtype)
    result = fxa.abstract(model, calibration, keep=0.5, replacement=replacement, round_to=1)
    assert all(p.dtype == dtype for p in result.module.parameters()), "the compiled module keeps the model's dtype"
    assert_finite_and_exact(model, result, x, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_compile_is_as_faithful_as_float32(dtype):
    """Statistics accumulate in float64, so a half-precision model is compiled about as well as its
    float32 twin: the held-out risk (against each dense model) is within 25% plus rounding noise."""
    model32 = mlp(32)
    calibration, x = [torch.randn(256, 6) for _ in range(2)], torch.randn(500, 6)
    model16 = mlp(32).to(dtype)
    r32 = fxa.abstract(model32, calibration, keep=0.5, replacement="affine", round_to=1)
    r16 = fxa.abstract(model16, [c.to(dtype) for c in calibration], keep=0.5, replacement="affine", round_to=1)
    noise = holdout_mse(model32, lambda v: model16(v.to(dtype)), x)        # rounding of the dense model alone
    risk32, risk16 = holdout_mse(model32, r32.module, x), holdout_mse(model16, r16.module, x.to(dtype))
    assert risk16 <= 1.25 * risk32 + 4 * noise, f"{dtype} compile risk {risk16:.3g} vs float32 {risk32:.3g}"


# ----------------------------------------------------------------------------- training mode

class TrainingNet(nn.Module):
    """BatchNorm on the inputs and Dropout in a site's chain: both behave differently in training."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm1d(6)
        self.fc1, self.drop, self.fc2, self.out = nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 12), nn.Linear(12, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(self.norm(x)))))))


def test_a_model_in_training_mode_is_compiled_as_its_eval_copy():
    """Policy: fxabstract abstracts the deployed function, so it compiles an eval-mode copy; the user's
    model keeps its mode and its BatchNorm running statistics."""
    model = TrainingNet().train()
    running = model.norm.running_mean.clone()
    calibration, x = [torch.randn(32, 6) for _ in range(3)], torch.randn(40, 6)
    result = fxa.abstract(model, calibration, keep=0.5, replacement="affine", round_to=1)
    assert model.training and all(m.training for m in model.modules()), "the user's model stays in training mode"
    assert torch.equal(model.norm.running_mean, running), "calibration must not update the running statistics"
    assert not result.module.training, "the compiled module is in eval mode"
    model.eval()
    assert_finite_and_exact(model, result, x)   # equal to the eval model under the report's interventions
    with torch.no_grad():
        assert torch.equal(result.module(x), result.module(x)), "the compiled module is deterministic (no dropout)"
