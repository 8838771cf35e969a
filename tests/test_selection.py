"""Selection and budgets (docs/math.md §3): joint vs diagonal selection, the greedy elimination curves,
the semantics of `keep`, `round_to` and `sites`, reproducibility, and scaling invariance."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxabstract as fxa
from fxabstract.passes import risk


class MLP(nn.Module):
    """ReLU MLP with hidden widths not multiples of 8: sites fc1, fc2, fc3; out is the output layer."""

    def __init__(self, widths=(10, 30, 20, 12, 5)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in zip(widths, widths[1:4]))
        self.out = nn.Linear(widths[3], widths[4])

    def forward(self, x):
        return self.out(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def make(seed=0, widths=(10, 30, 20, 12, 5), n=300):
    torch.manual_seed(seed)
    model = MLP(widths).double().eval()
    x = torch.randn(n, widths[0], dtype=torch.float64)
    return model, list(x.split(100)), x


def kept(result) -> dict[str, list[int]]:
    return {s["name"]: s["kept"] for s in result.report["sites"]}


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


# ----------------------------------------------------------------------------- joint vs diagonal

def test_joint_selection_risk_is_at_most_diagonal_risk_at_the_same_count():
    model, calibration, x = make(seed=1, widths=(10, 24, 16, 32, 5))
    # fc3 is the penultimate site (linear head): the second-order risk is the true risk there
    analysis = fxa.analyse(model, calibration, sites=["fc3"], matrices=True)   # full second-order risk for both
    joint = analysis.compile(keep=0.25, selection="joint", round_to=1)
    diagonal = analysis.compile(keep=0.25, selection="diagonal", round_to=1)
    (sj,), (sd,) = joint.report["sites"], diagonal.report["sites"]
    assert len(sj["kept"]) == len(sd["kept"]) == 8, "both selections must keep 25% of the 32 units"
    assert joint.report["predicted_risk"] <= diagonal.report["predicted_risk"] * (1 + 1e-9), (
        f"joint selection must not predict a higher risk than the diagonal ranking at the same count: "
        f"{joint.report['predicted_risk']} > {diagonal.report['predicted_risk']}")
    with torch.no_grad():
        measured = {k: float((0.5 * (model(x) - r.module(x)).pow(2).sum(-1)).mean())
                    for k, r in (("joint", joint), ("diagonal", diagonal))}
    assert measured["joint"] <= measured["diagonal"] * (1 + 1e-9), \
        f"joint selection must not have a higher measured risk than the diagonal one: {measured}"


def random_psd(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d + 2, generator=g, dtype=torch.float64)
    return A @ A.T, torch.randn(d, generator=g, dtype=torch.float64) * 0.1


@pytest.mark.parametrize("with_linear_term", [False, True])
def test_joint_constant_greedy_curve_equals_brute_force_risk(with_linear_term):
    d = 9
    for seed in range(5):
        M, lin = random_psd(d, seed)
        lin = lin if with_linear_term else torch.zeros(d, dtype=torch.float64)
        order, curve = risk.joint_constant_order(M, lin, d - 1)

        def R(P):  # R(P) = lin.1_P + 1/2 1_P^T M 1_P, by brute force
            P = list(P)
            return float(lin[P].sum() + 0.5 * M[P][:, P].sum())

        assert sorted(order) == sorted(set(order)) and len(order) == d - 1, "the order must remove distinct units"
        for k in range(d):
            assert math.isclose(float(curve[k]), R(order[:k]), rel_tol=1e-10, abs_tol=1e-12), \
                f"greedy curve at step {k} must equal 1/2 1_P^T M 1_P (+ lin.1_P) of its removed set"
            if k:
                best = min(R(order[:k - 1] + [q]) for q in range(d) if q not in order[:k - 1])
                assert math.isclose(R(order[:k]), best, rel_tol=1e-10, abs_tol=1e-12), \
                    f"step {k} must remove the unit that increases the risk least"


def affine_site(seed, d=6):
    """A site's moments (mu, S) from correlated data and a linear head's curvature Hbar = W^T W."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(500, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    W = torch.randn(4, d, generator=g, dtype=torch.float64)
    return X.mean(0), torch.cov(X.T, correction=0), W.T @ W


def fitted_affine_risk(mu, S, Hbar, P, ridge):
    P = sorted(P)
    K = [j for j in range(S.shape[0]) if j not in P]
    _, theta = risk.fit_affine(mu, S, K, P, ridge)
    return risk.affine_risk(Hbar, S, K, P, theta)


def test_affine_greedy_curve_equals_risk_of_fitted_replacement():
    d, ridge = 6, 1e-12
    for seed in range(20):
        mu, S, Hbar = affine_site(seed, d)
        order, curve = risk.joint_affine_order(Hbar, S, ridge, d - 1)
        total = 0.5 * float((Hbar * S).sum())                      # risk of removing everything (scale)
        for k in range(1, d):
            r = fitted_affine_risk(mu, S, Hbar, order[:k], ridge)
            assert abs(float(curve[k]) - r) <= 1e-6 * total, (
                f"seed {seed}: the greedy affine curve at step {k} ({float(curve[k])}) must equal the risk of "
                f"the fitted affine replacement of its removed set ({r})")
            best = min(fitted_affine_risk(mu, S, Hbar, order[:k - 1] + [q], ridge)
                       for q in range(d) if q not in order[:k - 1])
            assert r <= best + 1e-9 * total, f"seed {seed}: step {k} must add the unit whose removal costs least"


def test_affine_greedy_is_no_worse_than_diagonal_choice():
    """Greedy is optimal for one removal and, over many sites, better than the diagonal ranking at
    every size; it is a heuristic, so single (site, size) pairs may lose (6 of 150 here, e.g. seed 19
    at 3 removals by a factor 2.5), and "never worse at every size" is not a property to demand."""
    d, ridge, seeds = 6, 1e-12, 30
    wins, pairs = 0, 0
    mean_g, mean_d = torch.zeros(d), torch.zeros(d)
    for seed in range(seeds):
        mu, S, Hbar = affine_site(seed, d)
        order, _ = risk.joint_affine_order(Hbar, S, ridge, d - 1)
        diag, _ = risk.diagonal_order(0.5 * Hbar.diagonal() * S.diagonal(), d - 1)   # pipeline's diagonal ranking
        total = 0.5 * float((Hbar * S).sum())
        for k in range(1, d):
            rg, rd = fitted_affine_risk(mu, S, Hbar, order[:k], ridge), fitted_affine_risk(mu, S, Hbar, diag[:k], ridge)
            if k == 1:
                assert rg <= rd + 1e-9 * total, f"seed {seed}: greedy's first removal must be the cheapest unit"
            wins += rg <= rd + 1e-9 * total
            pairs += 1
            mean_g[k] += rg / total / seeds
            mean_d[k] += rd / total / seeds
    assert wins >= 0.95 * pairs, \
        f"greedy must beat or tie the diagonal choice in >= 95% of (site, size) pairs: {wins}/{pairs}"
    assert bool((mean_g <= mean_d + 1e-12).all()), \
        f"on average greedy must be no worse than the diagonal choice at every size: {mean_g} vs {mean_d}"


# ----------------------------------------------------------------------------- keep semantics

@pytest.fixture(scope="module")
def analysis():
    model, calibration, _ = make(seed=2)
    return fxa.analyse(model, calibration, matrices=True)


def test_float_keep_is_a_global_fraction(analysis):
    total = sum(s.n_units for s in analysis.sites)
    for keep in (0.2, 0.5, 0.9):
        result = analysis.compile(keep=keep, round_to=1)
        n = sum(len(k) for k in kept(result).values())
        assert n == round(keep * total), f"keep={keep} must keep round({keep} * {total}) units in total, kept {n}"


def test_int_keep_is_a_total_count(analysis):
    for keep in (3, 25, 61):
        result = analysis.compile(keep=keep, round_to=1)
        n = sum(len(k) for k in kept(result).values())
        assert n == keep, f"keep={keep} (int) must keep exactly {keep} units in total, kept {n}"


def test_dict_keep_sets_exact_per_site_counts(analysis):
    result = analysis.compile(keep={"fc1": 5, "fc3": 7})
    sites = {s["name"]: s for s in result.report["sites"]}
    assert len(sites["fc1"]["kept"]) == 5 and len(sites["fc3"]["kept"]) == 7, \
        "a per-site dict must be honoured exactly (even with round_to=8)"
    assert sites["fc2"]["kept"] == list(range(20)) and not sites["fc2"]["replaced"], \
        "a site missing from the dict must be left untouched"
    assert result.module.fc2.out_features == 20, "an untouched site's producer must keep its width"


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_round_to_8_gives_multiples_of_8_or_full_width(analysis, keep):
    result = analysis.compile(keep=keep, round_to=8)
    for s in result.report["sites"]:
        k = len(s["kept"])
        assert k % 8 == 0 or k == s["units"], \
            f"round_to=8: kept width {k} of {s['name']} must be a multiple of 8 or the full {s['units']}"
    assert any(len(s["kept"]) < s["units"] for s in result.report["sites"]), f"keep={keep} must compress some site"


def test_round_to_1_gives_exact_counts(analysis):
    result = analysis.compile(keep=0.4, round_to=1)
    assert sum(len(k) for k in kept(result).values()) == round(0.4 * 62), "round_to=1 must hit the count exactly"
    assert any(len(k) % 8 for k in kept(result).values()), "round_to=1 must allow widths that are not multiples of 8"


@pytest.mark.parametrize("score", ["variance", "cwvar", "magnitude", "random"])
def test_heuristic_scores_keep_the_same_fraction_at_every_site(score):
    model, calibration, _ = make(seed=2)
    result = fxa.abstract(model, calibration, keep=0.5, score=score, round_to=1)
    for s in result.report["sites"]:
        assert len(s["kept"]) == round(0.5 * s["units"]), \
            f"{score} is not in output units: every site must keep the same fraction (site {s['name']})"


class Branches(nn.Module):
    """Two parallel sites of equal width; the second branch's head is 20x weaker, so its units matter less."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 24), nn.Linear(10, 24)
        self.head1, self.head2 = nn.Linear(24, 5), nn.Linear(24, 5)
        with torch.no_grad():
            self.head2.weight.mul_(0.05)

    def forward(self, x):
        return self.head1(F.relu(self.fc1(x))) + self.head2(F.relu(self.fc2(x)))


@pytest.mark.parametrize("score", ["logit-mse", "variance"])
def test_output_unit_scores_allocate_the_budget_globally(score):
    torch.manual_seed(0)
    model = Branches().double().eval()
    calibration = [torch.randn(100, 10, dtype=torch.float64) for _ in range(2)]
    result = fxa.abstract(model, calibration, keep=0.5, score=score, round_to=1)
    k = {s["name"]: len(s["kept"]) for s in result.report["sites"]}
    assert sum(k.values()) == 24, f"the budget must be met in total: {k}"
    if score == "variance":
        assert k == {"fc1": 12, "fc2": 12}, f"variance is not in output units: each site keeps half, got {k}"
    else:
        assert k["fc2"] < k["fc1"], \
            f"logit-mse allocates globally: the branch whose units matter 20x less must keep fewer units, got {k}"


def test_sites_argument_restricts_compression(analysis):
    model, calibration, _ = make(seed=2)
    only = fxa.abstract(model, calibration, keep=0.5, sites=["fc2"], round_to=1)
    assert [s["name"] for s in only.report["sites"]] == ["fc2"], "sites=[name] must analyse only that site"
    assert only.module.fc1.out_features == 30 and only.module.fc3.out_features == 12, \
        "sites outside the list must keep their width"
    assert only.module.fc2.out_features == 10, "keep=0.5 over the one listed site must keep half of it"
    regex = fxa.abstract(model, calibration, keep=0.5, sites="fc[13]", round_to=1)
    assert [s["name"] for s in regex.report["sites"]] == ["fc1", "fc3"], "a regex must select the sites it matches"
    assert regex.module.fc2.out_features == 20, "a site the regex does not match must keep its width"


# ----------------------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("options", [dict(score="random"), dict(curvature="hutchinson", probes=8)],
                         ids=["random-score", "hutchinson"])
def test_same_seed_gives_identical_report(options):
    model, calibration, _ = make(seed=4)
    a = fxa.abstract(model, calibration, keep=0.5, seed=7, **options)
    b = fxa.abstract(model, calibration, keep=0.5, seed=7, **options)
    assert json.dumps(a.report) == json.dumps(b.report), f"the same seed must reproduce the report exactly ({options})"
    c = fxa.abstract(model, calibration, keep=0.5, seed=8, **options)
    assert json.dumps(a.report) != json.dumps(c.report), \
        f"a different seed must change the randomised result ({options})"


# ----------------------------------------------------------------------------- scaling invariance

def rescaled(model, seed):
    """Scale producer row j by s_j and consumer column j by 1/s_j at every hidden site, s log-uniform [0.1, 10]."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for producer, consumer in ((model.fc1, model.fc2), (model.fc2, model.fc3), (model.fc3, model.out)):
            s = torch.exp(torch.empty(producer.out_features, dtype=torch.float64).uniform_(
                math.log(0.1), math.log(10), generator=g))
            producer.weight.mul_(s[:, None])
            producer.bias.mul_(s)
            consumer.weight.div_(s[None, :])
    return model


def test_rescaling_a_relu_network_preserves_its_function():
    model, _, x = make(seed=5)
    for seed in range(3):
        with torch.no_grad():
            err = fxa.verify.relative_error(model(x), rescaled(model, seed)(x))
        assert err <= 1e-12, f"positive per-unit rescaling of a ReLU MLP must preserve the function: {err}"


@pytest.mark.parametrize("score,selection", [("logit-mse", "joint"), ("logit-mse", "diagonal"), ("kl", "joint")])
def test_output_unit_scores_are_invariant_to_unit_rescaling(score, selection):
    model, calibration, _ = make(seed=5)
    base = kept(fxa.abstract(model, calibration, keep=0.5, score=score, selection=selection, round_to=1))
    for seed in range(5):
        other = kept(fxa.abstract(rescaled(model, seed), calibration, keep=0.5, score=score, selection=selection,
                                  round_to=1))
        for name in base:
            assert jaccard(base[name], other[name]) == 1.0, (
                f"{score}/{selection} kept sets must not change under per-unit rescaling "
                f"(seed {seed}, site {name}): {base[name]} vs {other[name]}")


def test_cwvar_is_invariant_at_the_penultimate_site():
    model, calibration, _ = make(seed=5)
    base = kept(fxa.abstract(model, calibration, keep=0.5, score="cwvar", sites=["fc3"], round_to=1))
    for seed in range(3):
        other = kept(fxa.abstract(rescaled(model, seed), calibration, keep=0.5, score="cwvar", sites=["fc3"],
                                  round_to=1))
        assert other == base, "cwvar must be invariant where the consumer is the output layer"


def test_variance_rankings_change_under_unit_rescaling():
    model, calibration, _ = make(seed=5)
    base = kept(fxa.abstract(model, calibration, keep=0.5, score="variance", round_to=1))
    changed = [seed for seed in range(4) if base != kept(
        fxa.abstract(rescaled(model, seed), calibration, keep=0.5, score="variance", round_to=1))]
    assert changed, "variance-based kept sets are not rescaling-invariant: some seed must change them"


def test_affine_joint_selection_is_invariant_to_unit_rescaling():
    """docs/math.md §3: logit-mse selections do not change under per-unit rescaling. At the penultimate site
    (linear head, so the sample weights w(x) are constant) the affine joint greedy must be invariant too:
    the unregularised OBS risk 1/2 tr(Hbar_PP Cov(a_P | a_K)) is. A ridge of lambda * I with one scalar
    lambda (risk.ridge_of: ridge * mean diag S) is not, since it penalises rescaled units differently;
    a per-unit ridge (lambda * diag S) would be. With ridge=1e-9 the kept sets agree."""
    model, calibration, _ = make(seed=0)
    base = kept(fxa.abstract(model, calibration, keep=0.5, replacement="affine", selection="joint",
                             sites=["fc3"], round_to=1))
    for seed in range(3):
        other = kept(fxa.abstract(rescaled(model, seed), calibration, keep=0.5, replacement="affine",
                                  selection="joint", sites=["fc3"], round_to=1))
        assert jaccard(base["fc3"], other["fc3"]) == 1.0, (
            f"affine joint selection with logit-mse must not change under per-unit rescaling (seed {seed}): "
            f"{base['fc3']} vs {other['fc3']}")
