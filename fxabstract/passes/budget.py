"""The budget: how many units each site gives up (docs/math.md §3), in units or in MACs.

In units: `keep` is a global fraction, a total count or a per-site dict; with scores in output units
the cheapest next removal across all sites goes first (risks add across sites), otherwise every site
keeps the same fraction. In MACs: `macs_removals` keeps a fraction of the sites' MACs
(`cost.site_macs`), the removal with the least risk per MAC saved first; `allocate_macs` does the same
on risk curves of one's own. Kept widths are multiples of `round_to` (or of an attention head's width).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..cost import removal_macs, site_macs, unit_macs
from ..errors import ConfigError
from ..sites import Site
from .plan import Curves, ties
from .scores import OUTPUT_UNITS


def min_kept(d: int, round_to: int) -> int:
    return min(round_to, d)


def granularity(site: Site, round_to: int) -> int:
    """Kept widths are multiples of this: the group (an attention head's width), else round_to; and of
    the site's parts (a grouped convolution keeps as many channels in every group)."""
    return math.lcm(site.group if site.group > 1 else round_to, site.parts)


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
            if v % names[k].parts:
                raise ConfigError(f"keep[{k!r}] = {v} must be a multiple of {names[k].parts}: that site is next to a "
                                  f"grouped convolution whose {names[k].parts} groups keep as many channels each")
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
    """Units removed per site: the cheapest next removal globally (risks are in output units, docs/math.md
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


def mac_savings(sites: list[Site], curves: dict, macs: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per site name: [d + 1] MACs per sample saved by removing the first k units of its elimination order."""
    saved = {}
    for s in sites:
        per_unit = unit_macs(s, macs)[torch.tensor(curves[s.name].order, dtype=torch.long)]
        saved[s.name] = torch.cat([per_unit.new_zeros(1), per_unit.cumsum(0)])
    return saved


def _first(sites: list[Site], curves: dict, counts: dict[str, int]) -> dict[str, list[int]]:
    return {s.name: [int(u) for u in curves[s.name].order[:counts[s.name]]] for s in sites}


def _meet(sites: list[Site], curves: dict, macs: dict[str, int], removals, need: float,
          additive: float) -> dict[str, int]:
    """removals(x) for the least x in [x0, 1] whose removals save at least `need` MACs together
    (`removal_macs`), by bisection; removals(x) saves more as x grows. x0 = need / `additive` (the sum
    of the sites' unit MACs) is the first guess: where no two sites share a layer, it saves `need`."""
    x0 = need / max(additive, 1e-12)
    out = removals(x0)
    tol = 1e-9 * max(need, 1.0)                   # float sums: the additive guess meets `need` up to rounding
    saves = lambda r: removal_macs(sites, _first(sites, curves, r), macs) >= need - tol   # noqa: E731
    if saves(out):
        return out
    lo, hi, best = x0, 1.0, removals(1.0)
    if not saves(best):
        return best                               # every allowed removal: the caller warns
    for _ in range(40):
        mid = (lo + hi) / 2
        r = removals(mid)
        if saves(r):
            hi, best = mid, r
        else:
            lo = mid
    return best


def allocate_macs(sites: list[Site], curves: dict, macs: dict[str, int], target: float,
                  round_to: int = 1) -> dict[str, int]:
    """A `keep` dict {site: units kept} that saves at least `target` MACs per sample: the removal with
    the least risk per MAC saved goes first, across all sites (risks in output units add, docs/math.md §3).

    curves: `Analysis.risk_curves(...)`; each site's measured curve is used where set, else the
    predicted one. A channel of an early high-resolution block saves far more MACs than one of a
    late block, so a budget in MACs differs from a budget in units. `Analysis.compile(keep,
    budget="macs")` does this with keep a fraction of the sites' MACs. The saving counts a layer that
    two sites share once (`removal_macs`)."""
    removed = _global(sites, curves, macs, target, round_to)
    return {s.name: s.n_units - removed[s.name] for s in sites}


def _global(sites: list[Site], curves: dict, macs: dict[str, int], need: float, round_to: int) -> dict[str, int]:
    saved = mac_savings(sites, curves, macs)
    total = sum(float(unit_macs(s, macs).sum()) for s in sites)
    return _meet(sites, curves, macs, lambda x: cheapest_removals(sites, curves, saved, x * total, round_to), need,
                 total)


def macs_removals(sites: list[Site], curves: dict, macs: dict[str, int], keep: float, global_budget: bool,
                  round_to: int = 1) -> dict[str, int]:
    """Units removed per site so that at most a fraction `keep` of the sites' MACs stays (`site_macs`:
    each layer that their units touch, once). global_budget (risks in output units): the cheapest risk
    per MAC saved first across sites; otherwise every site saves the same fraction of its own MACs
    (`unit_macs`), the fewest allowed removals along its order that do, with the least fraction whose
    removals together meet the total (1 - keep where no two sites share a layer; sites that share one
    overlap there, so their own MACs add up to more than the sites' MACs)."""
    need = (1 - keep) * site_macs(sites, macs) * (1 - 1e-9)     # float sums: a target met exactly still counts
    if global_budget:
        return _global(sites, curves, macs, need, round_to)
    saved = mac_savings(sites, curves, macs)
    total = {s.name: float(unit_macs(s, macs).sum()) for s in sites}

    def per_site(x: float) -> dict[str, int]:
        out = {}
        for s in sites:
            steps = allowed_removals(s.n_units, granularity(s, round_to))
            want = min(x, 1.0) * total[s.name]
            out[s.name] = next((k for k in steps if k < len(saved[s.name]) and float(saved[s.name][k]) >= want),
                               steps[-1])
        return out
    return _meet(sites, curves, macs, per_site, need, sum(total.values()))


def tied_proxies(sites: list[Site], cv: dict[str, Curves]) -> tuple[list[Site], dict[str, Curves]]:
    """The sites as the budget sees them: a residual stream's points (`Site.tie`) as one site named after
    the stream, with every writer, per-channel layer and reader of its points (its MACs) and the points'
    risk curves summed (measured ones too, when every point has one); they share one elimination order.
    Other sites are themselves. `expand_ties` gives the points the stream's removal count."""
    groups = ties(sites)
    out_sites, out_cv = [], {}
    for s in sites:
        if not s.tie:
            out_sites.append(s)
            out_cv[s.name] = cv[s.name]
        elif s is groups[s.tie][0]:
            tied = groups[s.tie]
            out_sites.append(replace(s, name=s.tie, pieces=[q for t in tied for q in t.pieces],
                                     channel_ops=[q for t in tied for q in t.channel_ops],
                                     consumers=[c for t in tied for c in t.consumers],
                                     reads={c: r for t in tied for c, r in t.reads.items()}, branches=[],
                                     norms={n: r for t in tied for n, r in t.norms.items()},
                                     parts=max(t.parts for t in tied), tie=""))
            measured = [cv[t.name].measured for t in tied]
            out_cv[s.tie] = Curves(sum(cv[t.name].scores for t in tied), cv[s.name].constants, cv[s.name].order,
                                   sum(cv[t.name].curve for t in tied),
                                   None if any(m is None for m in measured) else sum(measured))
    return out_sites, out_cv


def expand_ties(removed: dict[str, int], sites: list[Site]) -> dict[str, int]:
    """Removal counts per site from those per budget site (`tied_proxies`): a stream's to each point."""
    return {s.name: removed[s.tie] if s.tie else removed[s.name] for s in sites}
