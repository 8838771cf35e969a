"""Selection: which units each site keeps, and the fitted replacement of the others (THEORY §3).

Per site, an elimination order and its risk curve R_s[k] (risk after removing k units): the
diagonal ranking (additive scores), greedy joint elimination (cross terms kept), or "local": the
joint elimination at the consumer (its Gram matrix W^T W as the curvature, i.e. layer-local optimal
brain surgeon) with the order's risk measured in output units, so the budget is still global. The budget is
then allocated: globally, cheapest next removal first, when the scores are in output units; the
same fraction per site otherwise. Kept widths are multiples of `round_to` (or the full width).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from ..checks import short_sample_ridge
from ..errors import ConfigError
from ..sites import Site
from . import risk
from .calibrate import Statistics
from .scores import OUTPUT_UNITS, consumer_gram, unit_scores


@dataclass
class SitePlan:
    """The replacement of one site: do(a_P := beta + theta a_K); theta = 0 for constants."""

    site: Site
    kept: list[int]              # K, sorted, original numbering
    removed: list[int]           # P, sorted
    kind: str                    # "constant" | "affine"
    beta: torch.Tensor           # [|P|] float64
    theta: torch.Tensor          # [|P|, |K|] float64
    scores: torch.Tensor         # [d] the unit scores of the chosen criterion
    predicted_risk: float
    branches: list["SitePlan"] = field(default_factory=list)   # the SE squeezes' replacements (`fit_branch`)


@dataclass
class Curves:
    """Per site: scores [d], constants c* [d], elimination order, predicted risk curve R[0..len(order)],
    and optionally the measured risk curve (passes/measure.py), which allocation then uses."""

    scores: torch.Tensor
    constants: torch.Tensor
    order: list[int]
    curve: torch.Tensor
    measured: torch.Tensor | None = None


def min_kept(d: int, round_to: int) -> int:
    return min(round_to, d)


def granularity(site: Site, round_to: int) -> int:
    """Kept widths are multiples of this: the group (an attention head's width), else round_to."""
    return site.group if site.group > 1 else round_to


def group_order(site: Site, stats: Statistics, scores: torch.Tensor, c: torch.Tensor, replacement: str,
                selection: str, ridge: float) -> tuple[list[int], torch.Tensor]:
    """Elimination order and risk curve over whole groups (attention heads), expanded to units.

    The group risks are THEORY §3's with P a union of groups: diagonal sums unit scores; joint
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
        out[s.name] = Curves(sc, c, order, curve)
    return out


def _fit_moments(stats: Statistics, name: str, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) the affine maps are fitted on: curvature-weighted for output-unit scores, plain
    for the others and whenever forward-only fit data joined the moments (it has no curvature)."""
    return risk.weighted_moments(stats, name, weighted=score in OUTPUT_UNITS and not stats.fit_samples)


def _constant_curve(stats: Statistics, name: str, c: torch.Tensor, order: list[int]) -> torch.Tensor:
    """R(first k of `order`) for constants c: lin.1_P + 1/2 1_P^T M 1_P (THEORY §3), k = 0..len(order)."""
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
        values.append(risk.position_affine_risk(stats, site.name, S, K, P, risk.fit_affine(mu, S, K, P, ridge)[1])
                      if P else 0.0)
    return torch.tensor(np.interp(np.arange(len(order) + 1), grid, values), dtype=torch.float64)


def allowed_removals(d: int, round_to: int) -> list[int]:
    """Removal counts that leave a multiple of round_to kept (or everything), increasing."""
    kept = [d] + [k for k in range((d - 1) // round_to * round_to, 0, -round_to) if k >= min_kept(d, round_to)]
    return [d - k for k in kept]


def allocate(sites: list[Site], cv: dict[str, Curves], keep, score: str, round_to: int) -> dict[str, int]:
    """Units removed per site for `keep` (fraction, total count or per-site dict)."""
    total = sum(s.n_units for s in sites)
    if isinstance(keep, dict):
        names = {s.name: s for s in sites}
        unknown = sorted(set(keep) - set(names))
        if unknown:
            raise ConfigError(f"keep names unknown sites {unknown}; sites are {sorted(names)}")
        for k, v in keep.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= names[k].n_units:
                raise ConfigError(f"keep[{k!r}] = {v!r} must be an int in 1..{names[k].n_units} (units kept at that site)")
            if v % names[k].group:
                raise ConfigError(f"keep[{k!r}] = {v} must be a multiple of {names[k].group}: that site's units are "
                                  "attention heads, removed whole")
        return {s.name: s.n_units - keep.get(s.name, s.n_units) for s in sites}
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ConfigError(f"keep must be a fraction, an int or a dict of per-site counts, got {type(keep).__name__}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ConfigError(f"keep = {keep} is out of range; give a fraction in (0, 1] of the units to keep")
        target_kept = round(keep * total)
    else:
        if not len(sites) <= keep <= total:
            raise ConfigError(f"keep = {keep} units is out of range; give between {len(sites)} (one per site) and {total}")
        target_kept = keep
    if score not in OUTPUT_UNITS:  # not comparable across sites: the same fraction per site
        frac = target_kept / total
        step = {s.name: granularity(s, round_to) for s in sites}
        return {s.name: s.n_units - max(min_kept(s.n_units, step[s.name]),
                                        min(s.n_units, round(frac * s.n_units / step[s.name]) * step[s.name]))
                for s in sites}
    target = total - target_kept
    units = {s.name: torch.arange(s.n_units + 1, dtype=torch.float64) for s in sites}
    return cheapest_removals(sites, cv, units, target, round_to, overshoot=False)


def cheapest_removals(sites: list[Site], cv: dict[str, Curves], gains: dict[str, torch.Tensor], target: float,
                      round_to: int, overshoot: bool = True) -> dict[str, int]:
    """Units removed per site: the cheapest next removal globally (risks are in output units, THEORY
    §3) until `target` is gained. Each step moves one site to its next allowed count (`granularity`),
    the one with the least risk per unit of gain; gains[site][k] is the gain of removing its first k
    units (units, MACs). overshoot=False skips a step that would pass the target by more than half."""
    allowed = {s.name: allowed_removals(s.n_units, granularity(s, round_to)) for s in sites}
    pos = {s.name: 0 for s in sites}
    gained = 0.0
    while gained < target:
        best = None
        for s in sites:
            steps, i = allowed[s.name], pos[s.name]
            if i + 1 >= len(steps):
                continue
            gain = float(gains[s.name][steps[i + 1]] - gains[s.name][steps[i]])
            if not overshoot and gained + gain > target + gain // 2:
                continue
            curve = cv[s.name].curve if cv[s.name].measured is None else cv[s.name].measured
            cost = float(curve[steps[i + 1]] - curve[steps[i]]) / max(gain, 1e-12)
            if best is None or cost < best[0]:
                best = (cost, s.name, gain)
        if best is None:
            break
        pos[best[1]] += 1
        gained += best[2]
    return {s.name: allowed[s.name][pos[s.name]] for s in sites}


def fit(site: Site, cv: Curves, n_removed: int, stats: Statistics, score: str, replacement: str,
        selection: str, ridge: float) -> SitePlan:
    """Fit the replacement of the first n_removed units of the site's elimination order."""
    removed = list(cv.order[:n_removed])
    for piece in site.pieces:  # a producer joined by cat keeps at least one unit (not a kv head of GQA)
        mine = [u for u in removed if piece.lo <= u < piece.hi]
        if len(mine) == piece.hi - piece.lo and len(site.pieces) > 1 and site.group == 1:
            removed.remove(mine[-1])
    P = sorted(removed)
    K = sorted(set(range(site.n_units)) - set(P))
    branches = [fit_branch(b, K, P, stats, replacement, ridge) for b in site.branches]
    if replacement == "constant":
        cP = cv.constants[P]
        return SitePlan(site, K, P, "constant", cP, torch.zeros(len(P), len(K), dtype=torch.float64),
                        cv.scores, risk.constant_risk(stats, site.name, P, cP), branches)
    mu, S = _fit_moments(stats, site.name, score)
    beta, theta = risk.fit_affine(mu, S, K, P, ridge)
    return SitePlan(site, K, P, "affine", beta, theta, cv.scores,
                    risk.position_affine_risk(stats, site.name, S, K, P, theta), branches)


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
