"""Unit scores and their optimal constants, one interface for every criterion (docs/math.md §3).

    >>> s, c = unit_scores("logit-mse", site, stats, gm)    # s: [d] risk of replacing unit j by c[j]

`OUTPUT_UNITS` scores are expected risks in the model's output units: they add across sites, so one
global ranking allocates the budget. The others (variance, cwvar, magnitude, random) are not, and
selection falls back to the same fraction of units per site for them. `JOINT_SCORES` have cross terms
between units and so support joint selection: the output-unit scores, and cwvar, whose curvature is the
consumers' Gram matrix W^T W (`consumer_gram`: docs/math.md §3's linear-head case applied at the consumer).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..sites import Site, dense_weight
from ..sites.layers import writer_of
from .calibrate import Statistics

SCORES = ("logit-mse", "kl", "ce", "variance", "cwvar", "magnitude", "random")
OUTPUT_UNITS = ("logit-mse", "kl", "ce")
JOINT_SCORES = OUTPUT_UNITS + ("cwvar",)


def unit_rows(layer) -> torch.Tensor:
    """A producer's weights per output unit, [units, ...] (float64): a layer's rows, an embedding table's
    columns, a Parameter's slices along its last axis (a stream's class token or position embedding)."""
    if isinstance(layer, nn.Parameter):
        return layer.detach().double().reshape(-1, layer.shape[-1]).T
    W = layer.weight.detach().double()
    return W.T if isinstance(layer, nn.Embedding) else W.flatten(1)


def optimal_constants(score: str, stats: Statistics, name: str) -> torch.Tensor:
    """c*: [d]. Curvature-weighted mean E[h a]/E[h] (docs/math.md §3), with the CE gradient term
    (E[h a] - E[g])/E[h] (docs/math.md §2); the plain mean for scores without curvature or units with h = 0."""
    m, k = stats.moments[name], stats.curvature[name]
    if score not in OUTPUT_UNITS:
        return m.mean
    num = k.sha - k.sg if score == "ce" else k.sha
    return torch.where(k.sh > 0, num / k.sh.clamp_min(1e-300), m.mean)


def consumer_weights(gm: fx.GraphModule, site: Site, consumer: str) -> list[torch.Tensor]:
    """The dense weights (`dense_weight`) through which `consumer` reads the site: its own, or for a
    stream's normaliser its Linear readers' W diag(gamma) (the normaliser's statistics held fixed)."""
    if consumer not in site.norms:
        return [dense_weight(gm.get_submodule(consumer))]
    weight = getattr(gm.get_submodule(consumer), "weight", None)
    gamma = 1.0 if weight is None else weight.detach().double()
    return [dense_weight(gm.get_submodule(r)) * gamma for r in site.norms[consumer]]


def consumer_column_norms2(gm: fx.GraphModule, site: Site, consumer: str) -> torch.Tensor:
    """||W[:, j]||^2 per unit j of the consumer's weight: over its outputs, and over the kernel taps
    (Conv) or the block of features a flattened unit feeds (Linear after a flatten): [d]."""
    return sum(W.reshape(W.shape[0], site.n_units, -1).pow(2).sum((0, 2)) for W in consumer_weights(gm, site, consumer))


def consumer_gram(gm: fx.GraphModule, site: Site) -> torch.Tensor:
    """G = sum over the consumers of W^T W over the units (outputs and kernel taps / flattened blocks
    summed): [d, d], whose diagonal is `consumer_column_norms2`; the risk of a perturbation delta of the
    site, measured at the consumers' outputs, is 1/2 delta^T G delta (docs/math.md §3, linear head)."""
    G = torch.zeros(site.n_units, site.n_units, dtype=torch.float64)
    for consumer in site.consumers:
        for W in consumer_weights(gm, site, consumer):
            Wu = W.reshape(W.shape[0], site.n_units, -1).transpose(0, 1).reshape(site.n_units, -1)   # [d, out * taps]
            G += Wu @ Wu.T
    return G


def unit_scores(score: str, site: Site, stats: Statistics, gm: fx.GraphModule,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [d], constants [d]) for one site; lower score = cheaper to replace."""
    m, k = stats.moments[site.name], stats.curvature[site.name]
    c = optimal_constants(score, stats, site.name)
    if score == "variance":                                     # VBP: s_j = Var(a_j)
        s = m.var
    elif score == "cwvar":                                      # s_j = 1/2 ||W[:, j]||^2 Var(a_j)
        s = 0.5 * sum(consumer_column_norms2(gm, site, c) for c in site.consumers) * m.var
    elif score == "magnitude":                                  # L2 norm of the producer's row j
        s = torch.zeros(site.n_units, dtype=torch.float64)
        for q in reversed(site.pieces):                         # where pieces share units, the first one's
            if getattr(q, "share", 1) > 1:                      # a k/v head of GQA: the query heads' rows count
                continue
            W = unit_rows(writer_of(gm, q.module))
            s[q.lo:q.hi] = W[q.start:q.start + q.hi - q.lo].norm(dim=1)
    elif score == "random":
        s = torch.rand(site.n_units, generator=generator, dtype=torch.float64)
    else:  # s_j = E[g (c - a)] + 1/2 E[h (c - a)^2]: the constant score of docs/math.md §3 (g = 0 unless ce)
        quad = 0.5 * (c * c * k.sh - 2 * c * k.sha + k.sha2)
        lin = c * k.sg - k.sga if score == "ce" else 0.0
        s = (lin + quad) / k.n
    return s.to(torch.float64), c.to(torch.float64)
