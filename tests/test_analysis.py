"""The analysis passes: moments, curvature (docs/math.md §2), calibration inputs, unit scores and the
predicted risk (docs/math.md §3), each checked against an independent computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jacrev, jvp, vmap
from torch.utils.data import DataLoader, TensorDataset

import fxabstract as fxa
from fxabstract.passes.moments import Moments
from fxabstract.passes.scores import unit_scores


def close(a, b, rtol, atol=0.0) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          rtol=rtol, atol=atol)


class TanhMLP(nn.Module):
    """6 -> 10 -> 8 -> 4 with tanh: sites fc1 (behind a nonlinear head) and fc2 (linear head)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 10), nn.Linear(10, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    # independent views of the same computation, for the checks
    def site_fc1(self, x):
        return torch.tanh(self.fc1(x))

    def head_fc1(self, a):            # z as a function of the fc1 site value
        return self.fc3(torch.tanh(self.fc2(a)))

    def site_fc2(self, x):
        return torch.tanh(self.fc2(self.site_fc1(x)))

    def head_fc2(self, a):
        return self.fc3(a)


class ReluMLP(nn.Module):
    """8 -> 16 -> 12 -> 5 ReLU MLP; fc2 is the penultimate site, its consumer fc3 the output layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def site_fc2(self, x):
        return F.relu(self.fc2(F.relu(self.fc1(x))))


@pytest.fixture
def tanh_mlp():
    torch.manual_seed(0)
    model = TanhMLP().double().eval()
    x = torch.randn(48, 6, dtype=torch.float64)
    return model, x


def jacobians(model, site: str, x):
    """Per-sample J = dz/da at the site: [n, o, d], by torch.func.jacrev (independent of fxabstract)."""
    a = getattr(model, f"site_{site}")(x)
    return vmap(jacrev(getattr(model, f"head_{site}")))(a), a


# ----------------------------------------------------------------------------- moments

def test_streamed_moments_equal_torch_mean_and_covariance():
    torch.manual_seed(0)
    batches = [torch.randn(n, 5, dtype=torch.float64) * 3 + 1 for n in (7, 30, 1, 12)]
    data = torch.cat(batches)
    full, diag = Moments.empty(5, full=True), Moments.empty(5, full=False)
    for b in batches:
        full.update(b)
        diag.update(b)
    assert full.n == diag.n == len(data), "Moments must count every sample"
    assert close(full.mean, data.mean(0), 1e-10), "streamed mean must equal torch's mean of all data"
    assert close(full.cov, torch.cov(data.T, correction=0), 1e-10, 1e-12), \
        "streamed covariance must equal torch's population covariance of all data"
    assert close(diag.var, data.var(0, unbiased=False), 1e-10), "O(d) variance must equal torch's variance"
    assert close(full.var, diag.var, 1e-10), "full and diagonal Moments must agree on the variance"


def test_moments_are_mergeable():
    torch.manual_seed(1)
    data = torch.randn(101, 4, dtype=torch.float64)
    one, left, right = (Moments.empty(4, full=True) for _ in range(3))
    one.update(data)
    left.update(data[:40])
    right.update(data[40:])
    merged = left + right
    assert merged.n == one.n, "merged count must be the sum of the halves'"
    assert close(merged.mean, one.mean, 1e-12) and close(merged.cov, one.cov, 1e-10, 1e-13), \
        "merging two halves with + must equal one pass over all the data"


# ----------------------------------------------------------------------------- curvature

@pytest.mark.parametrize("site", ["fc1", "fc2"])
def test_exact_logit_mse_curvature_is_sum_of_diag_JtJ(tanh_mlp, site):
    model, x = tanh_mlp
    stats = fxa.analyse(model, x.split(20), score="logit-mse", curvature="exact").stats
    J, _ = jacobians(model, site, x)                                     # [n, o, d]
    H = torch.einsum("noi,noj->ij", J, J)                                # sum_x J^T J
    k = stats.curvature[site]
    assert stats.method == "exact", "curvature='exact' must be honoured"
    assert close(k.sh, H.diagonal(), 1e-10, 1e-12), "sum h must be sum over samples of diag(J^T J) (logit-mse)"
    assert close(k.H0, H, 1e-10, 1e-12), "H0 must be sum over samples of J^T J (logit-mse)"


@pytest.mark.parametrize("site", ["fc1", "fc2"])
def test_exact_kl_curvature_is_sum_of_diag_Jt_fisher_J(tanh_mlp, site):
    model, x = tanh_mlp
    stats = fxa.analyse(model, x.split(20), score="kl", curvature="exact").stats
    J, _ = jacobians(model, site, x)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)                                   # [n, o]
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]         # diag p - p p^T
    H = torch.einsum("noi,nop,npj->ij", J, fisher, J)
    k = stats.curvature[site]
    assert close(k.sh, H.diagonal(), 1e-9, 1e-13), "sum h must be sum of diag(J^T (diag p - p p^T) J) (kl)"
    assert close(k.H0, H, 1e-9, 1e-13), "H0 must be sum of J^T (diag p - p p^T) J (kl)"


@pytest.mark.parametrize("divergence", ["logit-mse", "kl"])
def test_curvature_is_the_hessian_of_the_risk_at_zero(tanh_mlp, divergence):
    model, x = tanh_mlp
    x1 = x[:1]
    stats = fxa.analyse(model, [x1], score=divergence, curvature="exact").stats
    a = model.site_fc1(x1)[0].detach()
    z0 = model.head_fc1(a).detach()

    def risk(delta):  # R(delta) = D(z(a), z(a + delta)) for one sample
        z = model.head_fc1(a + delta)
        if divergence == "logit-mse":
            return 0.5 * (z - z0).pow(2).sum()
        return (torch.softmax(z0, -1) * (torch.log_softmax(z0, -1) - torch.log_softmax(z, -1))).sum()

    k = stats.curvature["fc1"]
    zero = torch.zeros_like(a)
    for i in (0, 3, 7, 9):
        e = torch.zeros_like(a)
        e[i] = 1.0
        _, He = jvp(grad(risk), (zero,), (e,))                           # forward-over-reverse HVP
        assert close(k.H0[:, i], He, 1e-8, 1e-12), \
            f"curvature column {i} must equal the Hessian of the {divergence} risk at delta = 0"
        assert close(k.sh[i], He[i], 1e-8, 1e-12), f"diag curvature {i} must equal the Hessian's diagonal"


def test_hutchinson_curvature_is_close_to_exact(tanh_mlp):
    model, x = tanh_mlp
    exact = fxa.analyse(model, x.split(24), curvature="exact").stats
    hutch = fxa.analyse(model, x.split(24), curvature="hutchinson", probes=2000, seed=0).stats
    assert hutch.method == "hutchinson" and hutch.probes == 2000, "the Hutchinson setting must be recorded"
    for site in ("fc1", "fc2"):
        rel = ((hutch.curvature[site].sh - exact.curvature[site].sh).abs() / exact.curvature[site].sh).max()
        assert rel < 0.05, f"Hutchinson diag curvature (2000 probes) must be within 5% of exact at {site}: {rel:.3f}"


def test_hutchinson_curvature_is_unbiased_over_seeds(tanh_mlp):
    model, x = tanh_mlp
    exact = fxa.analyse(model, [x], curvature="exact").stats.curvature["fc1"].sh
    runs = [fxa.analyse(model, [x], curvature="hutchinson", probes=8, seed=s).stats.curvature["fc1"].sh
            for s in range(12)]
    mean = torch.stack(runs).mean(0)
    assert ((mean - exact).abs() / exact).max() < 0.1, \
        "the mean of Hutchinson estimates over seeds must approach the exact curvature (unbiased)"


def test_ce_gradient_term_is_sum_of_Jt_softmax_minus_onehot(tanh_mlp):
    model, x = tanh_mlp
    y = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(0))
    stats = fxa.analyse(model, [(x[:30], y[:30]), (x[30:], y[30:])], score="ce", curvature="exact").stats
    for site in ("fc1", "fc2"):
        J, a = jacobians(model, site, x)
        with torch.no_grad():
            r = torch.softmax(model(x), -1) - F.one_hot(y, 4).double()   # p - onehot(y): [n, o]
        g = torch.einsum("no,noi->ni", r, J)                              # J^T (p - y) per sample
        k = stats.curvature[site]
        assert close(k.sg, g.sum(0), 1e-10, 1e-12), f"sum g must be sum of J^T (p - onehot(y)) at {site}"
        assert close(k.sga, (g * a.detach()).sum(0), 1e-10, 1e-12), f"sum g a must match at {site}"


# ----------------------------------------------------------------------------- calibration inputs

def stats_equal(s1, s2, rtol=1e-10):
    for name in s1.moments:
        m1, m2, k1, k2 = s1.moments[name], s2.moments[name], s1.curvature[name], s2.curvature[name]
        if m1.n != m2.n or not (close(m1.s1, m2.s1, rtol, 1e-12) and close(m1.s2, m2.s2, rtol, 1e-12)):
            return False
        for field in ("sh", "sha", "sha2", "H0", "H1", "H2"):
            if not close(getattr(k1, field), getattr(k2, field), rtol, 1e-12):
                return False
    return True


class KeywordMLP(TanhMLP):
    """The same network, taking its input as a keyword argument."""

    def forward(self, pixels):
        return super().forward(pixels)


def test_calibration_accepts_lists_generators_dataloaders_and_dicts(tanh_mlp):
    model, x = tanh_mlp
    y = torch.randint(0, 4, (len(x),))
    reference = fxa.analyse(model, list(x.split(16))).stats
    generator = fxa.analyse(model, (b for b in x.split(16))).stats
    loader = fxa.analyse(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)).stats
    kw_model = KeywordMLP().double().eval()
    kw_model.load_state_dict(model.state_dict())
    dicts = fxa.analyse(kw_model, [{"pixels": b} for b in x.split(16)]).stats
    assert reference.moments["fc1"].n == len(x), "a list of tensors must be consumed whole"
    assert stats_equal(reference, generator), "a generator (iterable once) must give the list's statistics"
    assert stats_equal(reference, loader), "a DataLoader of (x, y) pairs must give the list's statistics"
    assert stats_equal(reference, dicts), "dict batches for a keyword-argument forward must give the same statistics"


def test_calibration_statistics_do_not_depend_on_batching(tanh_mlp):
    model, x = tanh_mlp
    one = fxa.analyse(model, [x]).stats
    small = fxa.analyse(model, list(x.split(5))).stats
    uneven = fxa.analyse(model, [x[:1], x[1:30], x[30:]]).stats
    assert stats_equal(one, small), "the same data batched by 5 must give the same statistics as one batch"
    assert stats_equal(one, uneven), "uneven batches must give the same statistics as one batch"


# ----------------------------------------------------------------------------- scores

@pytest.fixture
def relu_mlp():
    torch.manual_seed(3)
    model = ReluMLP().double().eval()
    x = torch.randn(200, 8, dtype=torch.float64)
    return model, x


def test_logit_mse_at_penultimate_site_is_cwvar_with_mean_constant(relu_mlp):
    model, x = relu_mlp
    analysis = fxa.analyse(model, x.split(64), score="logit-mse")
    (site,) = [s for s in analysis.sites if s.name == "fc2"]
    scores, constants = unit_scores("logit-mse", site, analysis.stats, analysis.gm)
    a = model.site_fc2(x).detach()
    W = model.fc3.weight.detach()
    expected = 0.5 * W.pow(2).sum(0) * a.var(0, unbiased=False)         # 1/2 ||W[:, j]||^2 Var(a_j)
    assert close(constants, a.mean(0), 1e-8, 1e-12), "with a linear head the optimal constant must be the mean"
    assert close(scores, expected, 1e-8, 1e-12), "with a linear head the logit-mse score must be 1/2||W_j||^2 Var(a_j)"
    cw = fxa.analyse(model, x.split(64), score="cwvar")
    cw_scores, _ = unit_scores("cwvar", [s for s in cw.sites if s.name == "fc2"][0], cw.stats, cw.gm)
    assert close(cw_scores, scores, 1e-8, 1e-12), "at the penultimate site logit-mse must equal cwvar"


def test_variance_score_is_the_unit_variance(relu_mlp):
    model, x = relu_mlp
    result = fxa.abstract(model, x.split(64), keep=0.5, score="variance", round_to=1)
    (site,) = [s for s in result.report["sites"] if s["name"] == "fc2"]
    a = model.site_fc2(x).detach()
    assert close(site["scores"], a.var(0, unbiased=False), 1e-10, 1e-12), \
        "the variance score must be the population variance of each unit"


# ----------------------------------------------------------------------------- predicted risk

@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_predicted_risk_is_exact_at_the_penultimate_site(relu_mlp, replacement):
    model, x = relu_mlp
    result = fxa.abstract(model, x.split(64), keep=0.25, replacement=replacement, round_to=1, sites=["fc2"])
    assert len(result.report["sites"]) == 1 and result.report["sites"][0]["replaced"], "fc2 must be compressed"
    with torch.no_grad():
        measured = float((0.5 * (model(x) - result.module(x)).pow(2).sum(-1)).mean())
    predicted = result.report["predicted_risk"]
    assert measured > 0, "removing 75% of a site must change the outputs"
    assert abs(predicted - measured) <= 1e-6 * measured, (
        f"with a linear head the second-order risk is exact: predicted {predicted} must equal the measured "
        f"mean 1/2||z - z_c||^2 = {measured} on the calibration data ({replacement})")
