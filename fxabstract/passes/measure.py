"""Measured single-site risks: the Interventional Risk R(I) = E[D(f(x), f_I(x))] (docs/math.md §2) of
replacing the first k units of a site's elimination order, measured by running the intervened graph on
the calibration reservoir, with every other site left clean.

The second-order curves of `risk.py` are exact for a linear head but underestimate large removals
behind a nonlinearity (measured on the digits MLP: fc1 keeping 64 of 256, predicted 65, measured 96),
and the global budget then drifts to the sites whose risk is underestimated. The "measured" allocation
keeps the additive-across-sites allocation of docs/math.md §3 while making each term real where the
budget lands: allocate on the predicted curves, measure each site at its operating point (half, once and
twice the removal the predicted allocation gave it), scale the predicted curve by the measured/predicted
ratio (interpolated between those points, constant beyond them: `corrected_curve`), allocate again.
`measure_plan` bounds the work to about one forward pass of the calibration set.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..data import logits
from ..sites import Site
from .plan import Replacement


MEASURE_FORWARDS = 1.0   # the measured risks together cost about this many forward passes of the calibration set
POINTS = 3               # measured points per site: its operating point, half and twice it
MIN_ROWS = 32            # output rows (a sample's outputs at one position) measured per point at least


def measure_plan(sites: int, calibration: int, reservoir: int, rows: int, points: int = POINTS) -> int:
    """Samples to measure each of `sites` x `points` risks on: together about MEASURE_FORWARDS forward
    passes of the `calibration` samples (a site's point runs the graph after the site, counted as half the
    model), at most the `reservoir` samples kept and at least MIN_ROWS output rows (`rows`: output rows per
    sample, the positions of a [B, T, V] output, else 1). A small model with few sites measures its whole
    reservoir; a transformer with 24 sites over 256 sequences, 7 sequences."""
    work = 2 * MEASURE_FORWARDS * calibration              # tail runs of one sample, summed over sites and points
    floor = min(reservoir, max(1, -(-MIN_ROWS // max(rows, 1))))
    return int(min(reservoir, max(floor, work // max(sites * points, 1))))


def operating_points(k: int, steps: list[int]) -> list[int]:
    """The allowed removals (`steps`, increasing, steps[0] = 0) nearest to k / 2, k and 2 k; for k = 0
    the two smallest removals (is the first step cheaper than predicted?)."""
    if len(steps) < 2:
        return []
    targets = [k / 2, k, 2 * k] if k > 0 else [steps[1], steps[min(2, len(steps) - 1)]]
    near = {min(steps[1:], key=lambda s: (abs(s - t), s)) for t in targets}
    return sorted(near)


def corrected_curve(predicted: torch.Tensor, measured: dict[int, float]) -> torch.Tensor:
    """The predicted curve R[0..n] scaled by measured / predicted, interpolated linearly in k between
    the measured removals and constant beyond them; equal to the measurement at each measured k. Where
    the prediction is zero at every measured k, the measured excess is interpolated instead (from 0 at
    k = 0)."""
    p = predicted.detach().double().numpy()
    ks = sorted(k for k in measured if 0 < k < len(p))
    if not ks:
        return predicted.clone()
    top = max(float(np.abs(p).max()), 1e-300)
    ok = [k for k in ks if p[k] > 1e-9 * top]
    grid = np.arange(len(p))
    if ok:
        out = p * np.interp(grid, ok, [measured[k] / p[k] for k in ok])
    else:
        out = p + np.interp(grid, [0] + ks, [0.0] + [measured[k] - p[k] for k in ks])
    for k in ks:
        out[k] = measured[k]
    return torch.tensor(out, dtype=torch.float64)


def _tail(gm: fx.GraphModule, site: str) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The graph after `site` as a GraphModule of its own, whose inputs are the values it reads from
    the part up to and including the site (the frontier, in graph order): compiled Python, no
    per-node interpretation, for the many runs of a measured curve."""
    nodes = list(gm.graph.nodes)
    cut = next(i for i, n in enumerate(nodes) if n.name == site)
    later = nodes[cut + 1:]
    frontier = [n for n in nodes[:cut + 1] if any(u in set(later) for u in n.users)]
    graph, env = fx.Graph(), {}
    for n in frontier:
        env[n] = graph.placeholder(n.name)
    for n in later:
        env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(gm, graph), frontier


class _Upstream(fx.Interpreter):
    """One clean run that keeps the frontier's values (`_tail`): each measured point then runs only the
    tail, with the replacement applied to the site's kept value."""

    def __init__(self, gm: fx.GraphModule, frontier: list[fx.Node]):
        super().__init__(gm)
        self.frontier = set(frontier)
        self.kept: dict = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.frontier:
            self.kept[n] = out
        return out


def first_samples(reservoir: list, samples: int) -> list:
    """The first `samples` samples of the reservoir's batches (tensors of the batch's size are cut)."""
    out, left = [], samples
    for inputs, y in reservoir:
        if left <= 0:
            break
        B = next((len(v) for v in inputs if isinstance(v, torch.Tensor) and v.dim()), 0)
        take = min(B, left)
        cut = lambda v: v[:take] if isinstance(v, torch.Tensor) and v.dim() and len(v) == B else v  # noqa: E731
        out.append(([cut(v) for v in inputs], None if y is None else cut(y)))
        left -= take
    return out


def divergence(name: str, z: torch.Tensor, zi: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Sum over the batch of D(z, z_I): logit-MSE 1/2||z - z_I||^2, KL(p || p_I), or the CE increase."""
    if name == "logit-mse":   # the float32 difference of two close values is exact: no float64 copy of the logits
        return 0.5 * (z - zi).double().pow(2).sum()
    z, zi = z.double(), zi.double()
    if name == "kl":
        return (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - torch.log_softmax(zi, -1))).sum()
    ce = torch.nn.functional.cross_entropy
    return ce(zi, y.reshape(-1), reduction="sum") - ce(z, y.reshape(-1), reduction="sum")


@torch.no_grad()
def measured_risks(gm: fx.GraphModule, site: Site, ks: list[int], fit, reservoir: list, name: str, output=None,
                   samples: int | None = None) -> list[float]:
    """The measured risk of removing the first k units of the site's order, for each k of `ks`.

    fit(k) -> SitePlan for the first k units of the site's order; output: which of the model's outputs the
    divergence reads (`data.select_output`); samples: measure on the reservoir's first this many (None:
    all of it)."""
    if samples is not None:
        reservoir = first_samples(reservoir, samples)
    tail, frontier = _tail(gm, site.node)
    node = next(v for v in gm.graph.nodes if v.name == site.node)
    at = frontier.index(node)
    clean, upstream = [], []
    for inputs, _ in reservoir:
        run = _Upstream(gm, frontier)
        clean.append(logits(run.run(*inputs), output))
        upstream.append([run.kept[n] for n in frontier])
    n = sum(len(z) for z in clean)
    like = next(gm.parameters())
    values = []
    for k in ks:
        if k == 0:
            values.append(0.0)
            continue
        p = fit(k)
        rep = Replacement(p.kept, p.removed, p.beta.to(like), p.theta.to(like), site).to(like.device)
        total = 0.0
        for z, (inputs, y), env in zip(clean, reservoir, upstream):
            env = [*env[:at], rep(env[at]), *env[at + 1:]]
            total += float(divergence(name, z, logits(tail(*env), output), y))
        values.append(total / n)
    return values


def measured_curve(gm: fx.GraphModule, site: Site, steps: list[int], fit, reservoir: list, name: str,
                   points: int = 32, output=None, samples: int | None = None) -> torch.Tensor:
    """Risk after removing k units, k = 0..steps[-1]: measured at <= `points` of `steps` (`measured_risks`),
    linear in between."""
    grid = sorted({steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, min(points, len(steps)))})
    values = measured_risks(gm, site, grid, fit, reservoir, name, output, samples)
    return torch.tensor(np.interp(np.arange(steps[-1] + 1), grid, values), dtype=torch.float64)
