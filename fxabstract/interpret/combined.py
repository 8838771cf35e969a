"""Combined abstractions (docs/math.md §5, Pîslar et al.): several candidate abstractions each explain a
subset of the inputs; inputs no candidate explains fall back to the dense model.

    >>> candidates = [analysis.compile(k) for k in (0.5, 0.25, 0.125)]
    >>> combo = fxa.combine(model, candidates, x_eval, lambdas=(0.9, 0.8, 0.7))
    >>> combo.curve                  # [{"lambda", "strength", "coverage", "faithfulness", ...}]
    >>> combo.assignments[0.8]       # [n] candidate index per input, -1 = the dense model

Per candidate c, a graph over the n evaluation inputs: the weight w_c[b, s] of the ordered pair
(base b, source s) is the interchange agreement of docs/math.md §4 (mask over the kept units with
probability swap_p, averaged over c's sites). A candidate's *strength* is the fraction of the
model's parameters it removes. The IIA of a set S of base inputs under c is the mean of w_c over
S x (all inputs): a combined model must accept a swap from any source, so splitting inputs between
copies of one candidate gains nothing (restricting sources to the set would reward splitting: small
sets agree with themselves). For each lambda, each input goes to the strongest candidate whose IIA on
its set stays >= lambda, or else to the dense model (strength 0, IIA 1): the strongest candidate takes
the inputs it explains best while its set's IIA stays >= lambda, then the next strongest takes from
the rest. Faithfulness is measured on a second graph drawn with fresh masks over the same pairs, so the
assignment is not scored on the coin flips that chose it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..verify import gather, swap_run


def interchange_graph(original: nn.Module, candidate, x: torch.Tensor, swap_p: float, gen: torch.Generator,
                      batch_size: int = 4096) -> torch.Tensor:
    """w [n, n]: agreement of the top-1 of original and candidate under the interchange (base b, source s),
    averaged over the candidate's sites (docs/math.md §4)."""
    n = len(x)
    base, src = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    base, src = base.reshape(-1), src.reshape(-1)
    w = torch.zeros(n * n, dtype=torch.float64)
    sites = candidate.report["sites"]
    for site in sites:
        K = torch.tensor(site["kept"], dtype=torch.long, device=x.device)
        for i in range(0, n * n, batch_size):
            b, s = base[i:i + batch_size], src[i:i + batch_size]
            mask = (torch.rand(len(b), len(K), generator=gen) < swap_p).to(x.device)
            z = swap_run(original, site, K, x[b], x[s], mask)
            zc = swap_run(candidate.module, site, None, x[b], x[s], mask)
            w[i:i + batch_size] += (z.argmax(-1) == zc.argmax(-1)).double().cpu() / len(sites)
    return w.reshape(n, n)


def assign(graphs: list[torch.Tensor], strengths: list[float], lam: float) -> torch.Tensor:
    """Greedy assignment [n] (candidate index or -1 = dense) keeping each candidate's set IIA >= lam."""
    n = graphs[0].shape[0]
    out = torch.full((n,), -1, dtype=torch.long)
    for c in sorted(range(len(graphs)), key=lambda c: -strengths[c]):          # strongest first
        free = (out == -1).nonzero().squeeze(1)
        rows = graphs[c][free].mean(1)                                          # IIA of each free base input
        rows, idx = rows.sort(descending=True)
        mean = rows.cumsum(0) / torch.arange(1, len(rows) + 1)                  # set IIA of each prefix
        take = int((mean >= lam).long().cumprod(0).sum())                       # longest prefix >= lambda
        out[free[idx[:take]]] = c
    return out


def score(assignment: torch.Tensor, graphs: list[torch.Tensor], strengths: list[float]) -> dict:
    """Strength, coverage and faithfulness of an assignment, per input (dense: strength 0, IIA 1)."""
    n = len(assignment)
    strength, faithful, sizes = 0.0, 0.0, {}
    for c, g in enumerate(graphs):
        S = assignment == c
        m = int(S.sum())
        sizes[c] = m
        if m:
            faithful += m * float(g[S].mean())                                   # IIA of the set (§5)
            strength += m * strengths[c]
    dense = int((assignment == -1).sum())
    return {"strength": strength / n, "coverage": 1 - dense / n, "faithfulness": (faithful + dense) / n,
            "sizes": sizes, "dense": dense}


@dataclass
class Combination:
    """The result of `combine`: per lambda, the assignment of every input and its point on the curve."""

    strengths: list[float]                      # per candidate: fraction of parameters removed
    assignments: dict                           # lambda -> [n] candidate index, -1 = dense
    curve: list[dict]                           # the combination, one point per lambda
    single_curves: list[list[dict]] = field(default_factory=list)   # each candidate alone, same lambdas
    graphs: list = field(default_factory=list)  # per candidate: w [n, n] the assignment used
    held_out: list = field(default_factory=list)  # per candidate: w [n, n] with fresh masks, for faithfulness


def combine(model: nn.Module, candidates: list, data, lambdas=(0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0),
            swap_p: float = 0.5, samples: int = 150, seed: int = 0, batch_size: int = 4096) -> Combination:
    """Combine candidate abstractions (fxa.abstract results of `model`) over the first `samples` inputs
    of `data`; returns the assignment and the strength-faithfulness curve per lambda (docs/math.md §5)."""
    if not candidates:
        raise ConfigError("combine needs at least one candidate abstraction; pass a list of fxa.abstract results")
    if any(not 0.0 <= lam <= 1.0 for lam in lambdas) or not lambdas:
        raise ConfigError(f"lambdas {tuple(lambdas)} must be a non-empty list of IIA thresholds in [0, 1]")
    if samples < 2:
        raise ConfigError(f"samples = {samples} must be at least 2: the graph is over pairs of inputs")
    original = copy.deepcopy(model).eval()
    x = gather(data)[:samples].to(next(original.parameters()).device)
    strengths = [1 - c.report["parameters"]["after"] / c.report["parameters"]["before"] for c in candidates]
    gen = torch.Generator().manual_seed(seed)
    graphs: dict = {}                                                           # one pair of graphs per distinct candidate
    for c in candidates:
        if id(c) not in graphs:
            graphs[id(c)] = [interchange_graph(original, c, x, swap_p, gen, batch_size) for _ in range(2)]
    fit, held = [graphs[id(c)][0] for c in candidates], [graphs[id(c)][1] for c in candidates]
    assignments, curve = {}, []
    singles: list[list[dict]] = [[] for _ in candidates]
    for lam in lambdas:
        a = assign(fit, strengths, lam)
        assignments[lam] = a
        curve.append({"lambda": lam, **score(a, held, strengths)})
        for c in range(len(candidates)):
            alone = assign([fit[c]], [strengths[c]], lam)
            singles[c].append({"lambda": lam, **score(alone, [held[c]], [strengths[c]])})
    return Combination(strengths, assignments, curve, singles, fit, held)
