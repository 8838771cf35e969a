"""Compute cost: multiply-accumulates (MACs) per sample, counted from one forward pass.

What is counted: every call of an nn.Linear, nn.Conv1d or nn.Conv2d (grouped and depthwise convs
included, and the convolution inside a bias-map fold) or of Hugging Face's Conv1D (GPT-2's Linear with
its weight stored [in, out]), one MAC per weight use:
Linear = output elements x in_features; Conv = output elements x (in_channels / groups) x kernel
size. Not counted: matmuls between activations (attention scores), normalisation, pooling,
activations, elementwise arithmetic and bias additions (all small next to the layers above in CNNs).

    >>> macs = module_macs(model, x)             # {module path: MACs per sample}
    >>> sum(macs.values())
    >>> unit_macs(site, macs)                     # [d]: MACs per sample saved by removing each unit
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .passes.select import allowed_removals, cheapest_removals, granularity
from .sites import Site

COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _counted() -> tuple[type, ...]:
    """COUNTED, and transformers' Conv1D when transformers is loaded (a model using it loaded it)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return COUNTED + ((conv1d,) if isinstance(conv1d, type) else ())


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    per_sample = out.numel() // max(out.shape[0], 1) if out.dim() > 1 else out.numel()
    if isinstance(m, nn.Linear):
        return per_sample * m.in_features
    if not isinstance(m, COUNTED):                  # Conv1D: weight [in, out]
        return per_sample * m.weight.shape[0]
    return per_sample * (m.in_channels // m.groups) * math.prod(m.kernel_size)


@torch.no_grad()
def module_macs(model: nn.Module, *inputs, **kwinputs) -> dict[str, int]:
    """MACs per sample of every Linear/Conv call in one forward pass of `inputs` (a batch)."""
    counts: dict[str, int] = {}
    handles = []
    counted = _counted()
    for name, m in model.named_modules():
        if isinstance(m, counted):
            def hook(mod, args, out, name=name):
                counts[name] = counts.get(name, 0) + _macs(mod, out)
            handles.append(m.register_forward_hook(hook))
    try:
        model(*inputs, **kwinputs)
    finally:
        for h in handles:
            h.remove()
    return counts


def unit_macs(site: Site, macs: dict[str, int]) -> torch.Tensor:
    """[d] MACs per sample that removing each unit of `site` saves: its producer row, its channel in
    every per-channel conv (depthwise), and its column in every consumer."""
    cost = torch.zeros(site.n_units, dtype=torch.float64)
    for piece in site.pieces + site.channel_ops:
        if piece.module in macs:
            cost[piece.lo:piece.hi] += macs[piece.module] / piece.total / getattr(piece, "share", 1)
    for name in site.consumers + [c for b in site.branches for c in b.consumers]:  # SE squeezes' consumers too
        cost += macs.get(name, 0) / site.n_units   # each unit: an equal share of the input (a block if flattened)
    return cost


def mac_savings(sites: list[Site], curves: dict, macs: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per site name: [d + 1] MACs per sample saved by removing the first k units of its elimination order."""
    saved = {}
    for s in sites:
        per_unit = unit_macs(s, macs)[torch.tensor(curves[s.name].order, dtype=torch.long)]
        saved[s.name] = torch.cat([per_unit.new_zeros(1), per_unit.cumsum(0)])
    return saved


def allocate_macs(sites: list[Site], curves: dict, macs: dict[str, int], target: float,
                  round_to: int = 1) -> dict[str, int]:
    """A `keep` dict {site: units kept} that saves at least `target` MACs per sample: the removal with
    the least risk per MAC saved goes first, across all sites (risks in output units add, THEORY §3).

    curves: `Analysis.risk_curves(...)`; each site's measured curve is used where set, else the
    predicted one. A channel of an early high-resolution block saves far more MACs than one of a
    late block, so a budget in MACs differs from a budget in units. `Analysis.compile(keep,
    budget="macs")` does this with keep a fraction of the sites' MACs."""
    removed = cheapest_removals(sites, curves, mac_savings(sites, curves, macs), target, round_to)
    return {s.name: s.n_units - removed[s.name] for s in sites}


def macs_removals(sites: list[Site], curves: dict, macs: dict[str, int], keep: float, global_budget: bool,
                  round_to: int = 1) -> dict[str, int]:
    """Units removed per site so that at most a fraction `keep` of the sites' MACs stays (the MACs
    their units cost: `unit_macs`). global_budget (risks in output units): the cheapest risk per MAC
    saved first across sites; otherwise every site saves at least (1 - keep) of its own MACs, the
    fewest allowed removals along its order that do."""
    saved = mac_savings(sites, curves, macs)
    total = {s.name: float(unit_macs(s, macs).sum()) for s in sites}   # the order leaves a site's last unit out
    slack = 1 - 1e-9                                # float sums: a target met exactly still counts
    if global_budget:
        return cheapest_removals(sites, curves, saved, (1 - keep) * sum(total.values()) * slack, round_to)
    out = {}
    for s in sites:
        steps = allowed_removals(s.n_units, granularity(s, round_to))
        need = (1 - keep) * total[s.name] * slack
        out[s.name] = next((k for k in steps if k < len(saved[s.name]) and float(saved[s.name][k]) >= need),
                           steps[-1])
    return out
