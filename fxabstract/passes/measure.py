"""Measured single-site risk curves: the Interventional Risk R(I) = E[D(f(x), f_I(x))] (docs/math.md §2)
of replacing the first k units of a site's elimination order, measured by running the intervened
graph on the calibration reservoir, with every other site left clean.

The second-order curves of `risk.py` are exact for a linear head but underestimate large removals
behind a nonlinearity (measured on the digits MLP: fc1 keeping 64 of 256, predicted 65, measured 96),
and the global budget then drifts to the sites whose risk is underestimated. Allocating on measured
curves keeps the additive-across-sites allocation of docs/math.md §3 while making each term real.
Cost: at most `points` forward passes of the reservoir per site; in between, linear interpolation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..data import logits
from ..sites import Site
from .plan import Replacement


class _Upstream(fx.Interpreter):
    """One clean run that keeps the values the graph after `site` reads from, up to and including the
    site: each measured point then runs only the part after the site (`initial_env`), with the
    replacement applied to the site's kept value."""

    def __init__(self, gm: fx.GraphModule, site: str):
        super().__init__(gm)
        nodes = list(gm.graph.nodes)
        cut = next(i for i, n in enumerate(nodes) if n.name == site)
        self.before = nodes[:cut + 1]
        later = set(nodes[cut + 1:])
        self.frontier = {n for n in self.before if any(u in later for u in n.users)}
        self.kept: dict = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.frontier:
            self.kept[n] = out
        return out

    def initial_env(self) -> dict:
        """initial_env for `_Intervened.run`: the frontier's values; placeholders for the rest before."""
        return {n: self.kept.get(n) for n in self.before}


def divergence(name: str, z: torch.Tensor, zi: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Sum over the batch of D(z, z_I): logit-MSE 1/2||z - z_I||^2, KL(p || p_I), or the CE increase."""
    z, zi = z.double(), zi.double()
    if name == "logit-mse":
        return 0.5 * (z - zi).pow(2).sum()
    if name == "kl":
        return (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - torch.log_softmax(zi, -1))).sum()
    ce = torch.nn.functional.cross_entropy
    return ce(zi, y.reshape(-1), reduction="sum") - ce(z, y.reshape(-1), reduction="sum")


@torch.no_grad()
def measured_curve(gm: fx.GraphModule, site: Site, steps: list[int], fit, reservoir: list, name: str,
                   points: int = 32, output=None) -> torch.Tensor:
    """Risk after removing k units, k = 0..steps[-1]: measured at <= `points` of `steps`, interpolated.

    fit(k) -> SitePlan for the first k units of the site's order; output: which of the model's outputs the
    divergence reads (`data.select_output`)."""
    grid = sorted({steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, min(points, len(steps)))})
    clean, upstream = [], []
    for inputs, _ in reservoir:
        run = _Upstream(gm, site.node)
        clean.append(logits(run.run(*inputs), output))
        upstream.append(run.initial_env())
    n = sum(len(z) for z in clean)
    node = next(v for v in gm.graph.nodes if v.name == site.node)
    like = next(gm.parameters())
    values = []
    for k in grid:
        if k == 0:
            values.append(0.0)
            continue
        p = fit(k)
        rep = Replacement(p.kept, p.removed, p.beta.to(like), p.theta.to(like), site).to(like.device)
        total = 0.0
        for z, (inputs, y), env in zip(clean, reservoir, upstream):
            env = {**env, node: rep(env[node])}
            total += float(divergence(name, z, logits(fx.Interpreter(gm).run(*inputs, initial_env=env), output), y))
        values.append(total / n)
    return torch.tensor(np.interp(np.arange(steps[-1] + 1), grid, values), dtype=torch.float64)
