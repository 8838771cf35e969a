"""Selection: which units each site keeps, and the fitted replacement of the others (docs/math.md §3).

Per site, an elimination order and its risk curve R_s[k] (risk after removing k units): the
diagonal ranking (additive scores), greedy joint elimination (cross terms kept), or "local": the
joint elimination at the consumer (its Gram matrix W^T W as the curvature, i.e. layer-local optimal
brain surgeon) with the order's risk measured in output units, so the budget is still global. The budget is
then allocated: globally, cheapest next removal first, when the scores are in output units; the
same fraction per site otherwise. Kept widths are multiples of `round_to` (or the full width).
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
import torch.fx as fx

from ..errors import FxAbstractWarning
from ..sites import Site
from . import risk
from .calibrate import Statistics
from .plan import Curves, SitePlan, ties
from .scores import OUTPUT_UNITS, consumer_gram, unit_scores


def group_order(site: Site, stats: Statistics, scores: torch.Tensor, c: torch.Tensor, replacement: str,
                selection: str, ridge: float) -> tuple[list[int], torch.Tensor]:
    """Elimination order and risk curve over whole groups (attention heads), expanded to units.

    The group risks are docs/math.md §3's with P a union of groups: diagonal sums unit scores; joint
    constant greedily eliminates on G^T M G; joint affine greedily drops the group whose removal
    leaves the least Schur-complement risk (exhaustive per step: there are few heads)."""
    g, d = site.group, site.n_units
    h = d // g
    G = torch.zeros(d, h, dtype=torch.float64)
    G[torch.arange(d), torch.arange(d) // g] = 1                       # unit -> its group
    if selection == "diagonal":
        heads, curve = risk.diagonal_order(G.T @ scores, h - 1)
    elif replacement == "constant":
        M = risk.constant_matrix(stats, site.name, c)
        heads, curve = risk.joint_constant_order(G.T @ M @ G, G.T @ risk.linear_term(stats, site.name, c), h - 1)
    else:
        _, S = risk.weighted_moments(stats, site.name, weighted=True)
        heads, values = [], [0.0]
        for _ in range(h - 1):
            best = None
            for q in set(range(h)) - set(heads):
                P = [u for r in heads + [q] for u in range(r * g, (r + 1) * g)]
                K = sorted(set(range(d)) - set(P))
                _, theta = risk.fit_affine(S.new_zeros(d), S, K, sorted(P), ridge)
                value = risk.position_affine_risk(stats, site.name, S, K, sorted(P), theta)
                if best is None or value < best[0]:
                    best = (value, q)
            heads.append(best[1])
            values.append(best[0])
        curve = torch.tensor(values, dtype=torch.float64)
    order = [u for r in heads for u in range(r * g, (r + 1) * g)]
    unit_curve = torch.tensor(np.interp(np.arange(len(order) + 1), np.arange(len(curve)) * g, curve.numpy()))
    return order, unit_curve


def curves(sites: list[Site], stats: Statistics, gm: fx.GraphModule, score: str, replacement: str,
           selection: str, ridge: float | dict[str, float], seed: int) -> dict[str, Curves]:
    """Scores, constants and full elimination orders for every site (computed once per setting); `ridge`:
    one for every site, or per site name."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in sites:
        r = ridge[s.name] if isinstance(ridge, dict) else ridge
        sc, c = unit_scores(score, s, stats, gm, gen)
        n = s.n_units - 1
        if s.group > 1:
            group_selection = {"local": "joint"}.get(selection, selection) if score in OUTPUT_UNITS else "diagonal"
            order, curve = group_order(s, stats, sc, c, replacement, group_selection, r)
        elif (score == "cwvar" and selection == "joint") or selection == "local":
            G, S = consumer_gram(gm, s), stats.moments[s.name].cov   # layer-local: the consumers' Gram as curvature
            if replacement == "constant":                 # constant = mean: R(P) = 1/2 1_P^T (G * S) 1_P
                order, curve = risk.joint_constant_order(G * S, torch.zeros_like(sc), n)
            else:                                         # OBS: R(K) = 1/2 tr(G_PP Cov(a_P | a_K))
                order, curve = risk.joint_affine_order(G, S, r, n)
            if selection == "local" and score in OUTPUT_UNITS:   # the order's risk in output units, to allocate on
                curve = (_evaluated_curve(s, order, stats, score, r) if replacement == "affine"
                         else _constant_curve(stats, s.name, c, order))
        elif selection == "diagonal":
            order, curve = risk.diagonal_order(sc, n)
        elif replacement == "constant":
            M = risk.constant_matrix(stats, s.name, c)
            order, curve = risk.joint_constant_order(M, risk.linear_term(stats, s.name, c), n)
        else:
            _, S = risk.weighted_moments(stats, s.name, weighted=True)
            order, curve = risk.joint_affine_order(risk.affine_curvature(stats, s.name), S, r, n)
            if risk.positions(stats, s.name) > 1:   # the OBS curve is the per-position risk alone: re-evaluate
                curve = _evaluated_curve(s, order, stats, score, r)
        if s.parts > 1 and not s.tie:       # a grouped conv: every group loses as many units
            order = balanced(order, s.parts, s.n_units)
            curve = _curve_along(s, order, sc, c, stats, score, replacement, selection, r)
        out[s.name] = Curves(sc, c, order, curve)
    for tied in ties(sites).values():
        _tie_curves(tied, out, stats, score, replacement, selection, ridge)
    return out


def _tie_curves(tied: list[Site], out: dict[str, Curves], stats: Statistics, score: str, replacement: str,
                selection: str, ridge) -> None:
    """One elimination order for every point of a stream (they lose the same units), from the points'
    risks summed (risks add across points as across sites, docs/math.md §3): the sum of their scores
    (diagonal), else greedy elimination on the sum of their constant-replacement matrices; each point's
    curve is then its own risk along that order."""
    d = tied[0].n_units
    total = sum(out[s.name].scores for s in tied)
    matrices = stats.curvature[tied[0].name].H0 is not None
    if selection == "diagonal" or score not in OUTPUT_UNITS or not matrices:
        order, _ = risk.diagonal_order(total, d - 1)
    else:
        M = sum(risk.constant_matrix(stats, s.name, out[s.name].constants) for s in tied)
        lin = sum(risk.linear_term(stats, s.name, out[s.name].constants) for s in tied)
        order, _ = risk.joint_constant_order(M, lin, d - 1)
    parts = max(s.parts for s in tied)
    if parts > 1:
        order = balanced(order, parts, d)
    for s in tied:
        r = ridge[s.name] if isinstance(ridge, dict) else ridge
        sc, c = out[s.name].scores, out[s.name].constants
        out[s.name] = Curves(sc, c, list(order), _curve_along(s, order, sc, c, stats, score, replacement, selection, r))


def _curve_along(site: Site, order: list[int], sc: torch.Tensor, c: torch.Tensor, stats: Statistics, score: str,
                 replacement: str, selection: str, ridge: float) -> torch.Tensor:
    """The site's risk curve along an order chosen elsewhere (balanced over groups, or a stream's):
    summed scores (diagonal, or scores not in output units), else the constant or affine risk evaluated."""
    if selection == "diagonal" or score not in OUTPUT_UNITS:
        return torch.cat([sc.new_zeros(1), sc[order].cumsum(0)])
    if replacement == "affine":
        return _evaluated_curve(site, order, stats, score, ridge)
    return _constant_curve(stats, site.name, c, order)


def balanced(order: list[int], parts: int, d: int) -> list[int]:
    """`order` rearranged in rounds: each round removes, from every one of `parts` equal blocks of the d
    units, the block's next unit in `order`. Its first k * parts units take k from each block (what a
    grouped convolution needs), in the order's preference within each block."""
    size, rank = d // parts, {u: i for i, u in enumerate(order)}
    queues = [[u for u in order if u // size == j] for j in range(parts)]
    rounds = min(len(q) for q in queues)
    return [q[r] for r in range(rounds) for q in sorted(queues, key=lambda q: rank[q[r]])]


def _fit_moments(stats: Statistics, name: str, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) the affine maps are fitted on: curvature-weighted for output-unit scores, plain
    for the others and whenever forward-only fit data joined the moments (it has no curvature)."""
    return risk.weighted_moments(stats, name, weighted=score in OUTPUT_UNITS and not stats.fit_samples)


def _constant_curve(stats: Statistics, name: str, c: torch.Tensor, order: list[int]) -> torch.Tensor:
    """R(first k of `order`) for constants c: lin.1_P + 1/2 1_P^T M 1_P (docs/math.md §3), k = 0..len(order)."""
    o = torch.tensor(order, dtype=torch.long)
    M = risk.constant_matrix(stats, name, c)[o][:, o]
    step = risk.linear_term(stats, name, c)[o] + 0.5 * M.diagonal() + torch.tril(M, -1).sum(1)   # R(P + q) - R(P)
    return torch.cat([step.new_zeros(1), step.cumsum(0)])


def _evaluated_curve(site: Site, order: list[int], stats: Statistics, score: str, ridge: float,
                     points: int = 65) -> torch.Tensor:
    """The affine risk curve along `order`: `risk.position_affine_risk` of the fitted maps at `points`
    removal counts, linear in between."""
    grid = sorted({int(round(x)) for x in np.linspace(0, len(order), points)})
    mu, S = _fit_moments(stats, site.name, score)
    values = []
    for k in grid:
        P = sorted(order[:k])
        K = sorted(set(range(site.n_units)) - set(P))
        theta = risk.fit_affine(mu, S, K, P, ridge, site.fit_parts)[1] if P else None
        values.append(risk.position_affine_risk(stats, site.name, S, K, P, theta) if P else 0.0)
    return torch.tensor(np.interp(np.arange(len(order) + 1), grid, values), dtype=torch.float64)


def short_sample_ridge(n: int, d: int, ridge: float) -> float:
    """`ridge`, raised to d / n when n samples are fewer than d units (see `tiny_calibration_ridge`)."""
    return max(ridge, d / max(n, 1)) if n < d else ridge


def tiny_calibration_ridge(samples: dict[str, int], units: dict[str, int], ridge: float) -> dict[str, float]:
    """The ridge to fit each site with: `ridge`, or d / n at a site with fewer samples n than units d.

    With n < d the least-squares fit over the kept units interpolates the calibration set (it can
    drive the predicted risk to zero and extrapolate wildly); a ridge of d / n times each unit's own
    variance shrinks the affine fit towards the constant one. Only the short sites are raised; the
    others keep `ridge`. Warns with FxAbstractWarning."""
    used = {name: short_sample_ridge(samples[name], d, ridge) for name, d in units.items()}
    short = {name: (samples[name], d) for name, d in units.items() if samples[name] < d}
    if short:
        worst = max(short, key=lambda name: short[name][1] / short[name][0])
        others = f" and {len(short) - 1} more site(s)" if len(short) > 1 else ""
        warnings.warn(f"calibration has {short[worst][0]} samples but site {worst!r} has {short[worst][1]} units: "
                      f"selection and the affine fit would overfit; fitting it{others} with a ridge of d / n "
                      f"(there {used[worst]:.3g}), the other sites with {ridge:g} (pass more calibration data "
                      "than units)", FxAbstractWarning, stacklevel=3)
    return used


def fit(site: Site, cv: Curves, n_removed: int, stats: Statistics, score: str, replacement: str,
        selection: str, ridge: float) -> SitePlan:
    """Fit the replacement of the first n_removed units of the site's elimination order."""
    removed = list(cv.order[:n_removed])

    def emptied(piece) -> bool:   # a producer joined by cat keeps at least one unit (not a kv head of GQA)
        mine = [u for u in removed if piece.lo <= u < piece.hi]
        return len(mine) == piece.hi - piece.lo and len(site.pieces) > 1 and site.group == 1 and not site.tie
    if site.parts > 1:            # balanced rounds (grouped convs): give back whole rounds
        while removed and any(emptied(q) for q in site.pieces):
            removed = removed[:len(removed) - site.parts]
    for piece in site.pieces:
        if emptied(piece):
            removed.remove([u for u in removed if piece.lo <= u < piece.hi][-1])
    P = sorted(removed)
    K = sorted(set(range(site.n_units)) - set(P))
    branches = [fit_branch(b, K, P, stats, replacement, ridge) for b in site.branches]
    if replacement == "constant":
        cP = cv.constants[P]
        return SitePlan(site, K, P, "constant", cP, torch.zeros(len(P), len(K), dtype=torch.float64),
                        cv.scores, risk.constant_risk(stats, site.name, P, cP), branches)
    mu, S = _fit_moments(stats, site.name, score)
    beta, theta = risk.fit_affine(mu, S, K, P, ridge, site.fit_parts)
    return SitePlan(site, K, P, "affine", beta, theta, cv.scores,
                    risk.position_affine_risk(stats, site.name, S, K, P, theta), branches)


def refitted_risk(plan: SitePlan, stats: Statistics, score: str) -> SitePlan:
    """`plan` with its predicted risk evaluated for its own beta and theta (after passes/refit.py moved them)."""
    if not plan.removed:
        return plan
    if plan.kind == "constant":
        value = risk.constant_risk(stats, plan.site.name, plan.removed, plan.beta)
    else:
        _, S = _fit_moments(stats, plan.site.name, score)
        value = risk.position_affine_risk(stats, plan.site.name, S, plan.kept, plan.removed, plan.theta)
    return dataclasses.replace(plan, predicted_risk=value)


def fit_branch(branch: Site, K: list[int], P: list[int], stats: Statistics, replacement: str,
               ridge: float) -> SitePlan:
    """The SE squeeze's replacement for the site's removed units P: do(s_P := beta + theta s_K) on the
    value s the SE branch's consumer (fc1) reads, on that path only. s is the pooled x, and pooling is
    linear per channel, so this is do(x_P := beta + theta x_K) for the SE path alone.

    Fitted on the plain moments of s (calibration, plus fit data): constants are the mean, affine maps
    least squares with the site's ridge (raised to d / n when s has fewer samples n than units d). There
    is no curvature at s (the calibration pass differentiates at the site y = x * gate only), so the
    branch adds nothing to the scores, the selection or the predicted and measured risks: a unit is priced
    by its y value alone. Its predicted_risk is 0."""
    m = stats.branch_moments[branch.name]
    if replacement == "constant":
        return SitePlan(branch, K, P, "constant", m.mean[P], torch.zeros(len(P), len(K), dtype=torch.float64),
                        torch.zeros(0, dtype=torch.float64), 0.0)
    beta, theta = risk.fit_affine(m.mean, m.cov, K, P, short_sample_ridge(m.n, branch.n_units, ridge))
    return SitePlan(branch, K, P, "affine", beta, theta, torch.zeros(0, dtype=torch.float64), 0.0)
