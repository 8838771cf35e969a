"""Measured single-site risk curves: the Interventional Risk R(I) = E[D(f(x), f_I(x))] (THEORY §2)
of replacing the first k units of a site's elimination order, measured by running the intervened
graph on the calibration reservoir, with every other site left clean.

The second-order curves of `risk.py` are exact for a linear head but underestimate large removals
behind a nonlinearity (measured on the digits MLP: fc1 keeping 64 of 256, predicted 65, measured 96),
and the global budget then drifts to the sites whose risk is underestimated. Allocating on measured
curves keeps the additive-across-sites allocation of THEORY §3 while making each term real.
Cost: at most `points` forward passes of the reservoir per site; in between, linear interpolation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..data import logits
from ..sites import Site
from .replace import Replacement


class _Intervened(fx.Interpreter):
    """Runs the graph with `replacement` applied to the value of node `site`."""

    def __init__(self, gm: fx.GraphModule, site: str, replacement: Replacement):
        super().__init__(gm)
        self.site, self.replacement = site, replacement

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        return self.replacement(out) if n.name == self.site else out


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
                   points: int = 32) -> torch.Tensor:
    """Risk after removing k units, k = 0..steps[-1]: measured at <= `points` of `steps`, interpolated.

    fit(k) -> SitePlan for the first k units of the site's order."""
    grid = sorted({steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, min(points, len(steps)))})
    clean = [logits(fx.Interpreter(gm).run(*inputs)) for inputs, _ in reservoir]
    n = sum(len(z) for z in clean)
    like = next(gm.parameters())
    values = []
    for k in grid:
        if k == 0:
            values.append(0.0)
            continue
        p = fit(k)
        rep = Replacement(p.kept, p.removed, p.beta.to(like), p.theta.to(like), site).to(like.device)
        runner = _Intervened(gm, site.node, rep)
        total = sum(float(divergence(name, z, logits(runner.run(*inputs)), y))
                    for z, (inputs, y) in zip(clean, reservoir))
        values.append(total / n)
    return torch.tensor(np.interp(np.arange(steps[-1] + 1), grid, values), dtype=torch.float64)
