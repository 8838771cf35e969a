"""The JSON report: everything needed to re-apply the same interventions to the original model.

Per site: its name, producer, consumers, unit count, kept units (original numbering), and each
replaced unit with its kind and its constant or affine coefficients over the kept units; the
scores and the predicted risk.
"""
from __future__ import annotations

import json

from ..passes.plan import SitePlan


def _piece(q) -> dict:
    """A layer's share of a site: its units, and which of its rows they are when not all of them
    (a piece of a split value, a GLU half)."""
    entry = {"module": q.module, "units": [q.lo, q.hi]}
    if q.start or q.total != q.hi - q.lo:
        entry["rows"] = [q.start, q.start + getattr(q, "block", q.hi - q.lo)]   # a SharedPiece: one k/v head
    return entry


def _replaced(p: SitePlan) -> list[dict]:
    replaced = []
    for i, unit in enumerate(p.removed):
        if p.kind == "constant":
            replaced.append({"unit": unit, "kind": "constant", "constant": float(p.beta[i])})
        else:
            replaced.append({"unit": unit, "kind": "affine", "beta": float(p.beta[i]),
                             "theta": [float(t) for t in p.theta[i]]})
    return replaced


def site_entry(p: SitePlan, measured_risk: float | None = None) -> dict:
    """A site's entry. A site with SE squeezes adds "branches": per branch the value its consumers
    read (node, chain from the SE input, consumers, reads) and its own "replaced" list over the site's
    kept units (the same unit numbers), which `verify.intervene` applies at those consumers."""
    s = p.site
    entry = {"name": s.name, "producer": s.producer, "node": s.node, "chain": s.chain,
             "consumers": s.consumers, "units": s.n_units, "axis": s.axis, "shape": list(s.shape),
             "reads": s.reads, "producers": [_piece(q) for q in s.pieces],
             "channel_ops": [_piece(q) for q in s.channel_ops],
             "bias_maps": s.bias_maps, "group": s.group, "kept": p.kept, "replaced": _replaced(p),
             "scores": [float(v) for v in p.scores], "predicted_risk": p.predicted_risk,
             "measured_risk": measured_risk}
    if s.tie:                       # a point of a residual stream: every point keeps these units
        entry["stream"] = s.tie
    if s.norms:                     # normalisers reading the point, compiled exactly, and their readers
        entry["norms"] = {n: list(r) for n, r in s.norms.items()}
    if s.parts > 1:                 # next to a grouped conv: every part loses as many units
        entry["parts"], entry["fit_parts"] = s.parts, s.fit_parts
    if p.branches:
        entry["branches"] = [{"name": b.site.name, "node": b.site.node, "chain": b.site.chain,
                              "consumers": b.site.consumers, "units": b.site.n_units, "axis": b.site.axis,
                              "shape": list(b.site.shape), "reads": b.site.reads, "bias_maps": b.site.bias_maps,
                              "replaced": _replaced(b)} for b in p.branches]
    return entry


def summary(report: dict) -> str:
    """A plain-text table of the report: per site and overall."""
    rows = [f"{'site':<24} {'units':>6} {'kept':>6} {'removed':>8} {'predicted risk':>15}"]
    for s in report["sites"]:
        rows.append(f"{s['name']:<24} {s['units']:>6} {len(s['kept']):>6} {len(s['replaced']):>8} "
                    f"{s['predicted_risk']:>15.4g}")
    rows.append(f"{'total':<24} {sum(s['units'] for s in report['sites']):>6} "
                f"{sum(len(s['kept']) for s in report['sites']):>6} "
                f"{sum(len(s['replaced']) for s in report['sites']):>8} {report['predicted_risk']:>15.4g}")
    rows.append(f"parameters {report['parameters']['before']:,} -> {report['parameters']['after']:,}  "
                f"(score {report['score']}, {report['replacement']}, {report['selection']} selection)")
    fit = report.get("fit") or {"method": "local"}
    if fit["method"] == "outputs":
        d = fit["divergence"]["held_back"]
        how = (f"{fit['epochs']} epochs, ridge {fit['ridge']:g}" if fit["ridge"] is not None
               else "no epoch improved on the closed form, which is kept")
        rows.append(f"maps fitted at the outputs: {fit['loss']} on {fit['samples']['held_back']} held-back samples "
                    f"{d['before']:.4g} -> {d['after']:.4g} ({how})")
    elif fit["method"] == "sequential":
        rows.append(f"maps fitted sequentially on the partly replaced network ({fit['samples']} samples)")
    if "macs" in report:
        rows.append(f"MACs per sample {report['macs']['before']:,} -> {report['macs']['after']:,}  "
                    f"(budget in MACs, keep {report['keep']})")
    return "\n".join(rows)


def dumps(report: dict) -> bytes:
    return (json.dumps(report, indent=1) + "\n").encode()
