"""Compute cost: multiply-accumulates (MACs) per sample, counted from one forward pass.

What is counted: every call of an nn.Linear, nn.Conv1d or nn.Conv2d (grouped and depthwise convs
included, and the convolution inside a bias-map fold), one MAC per weight use:
Linear = output elements x in_features; Conv = output elements x (in_channels / groups) x kernel
size. Not counted: matmuls between activations (attention scores), normalisation, pooling,
activations, elementwise arithmetic and bias additions (all small next to the layers above in CNNs).

    >>> macs = module_macs(model, x)             # {module path: MACs per sample}
    >>> sum(macs.values())
    >>> unit_macs(site, macs)                     # [d]: MACs per sample saved by removing each unit
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .sites import Site

COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    per_sample = out.numel() // max(out.shape[0], 1) if out.dim() > 1 else out.numel()
    if isinstance(m, nn.Linear):
        return per_sample * m.in_features
    return per_sample * (m.in_channels // m.groups) * math.prod(m.kernel_size)


@torch.no_grad()
def module_macs(model: nn.Module, *inputs, **kwinputs) -> dict[str, int]:
    """MACs per sample of every Linear/Conv call in one forward pass of `inputs` (a batch)."""
    counts: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, COUNTED):
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
            cost[piece.lo:piece.hi] += macs[piece.module] / (piece.hi - piece.lo)
    for name in site.consumers:  # each unit is an equal share of the consumer's input (a block if flattened)
        cost += macs.get(name, 0) / site.n_units
    return cost


def allocate_macs(sites: list[Site], curves: dict, macs: dict[str, int], target: float,
                  round_to: int = 1) -> dict[str, int]:
    """A `keep` dict {site: units kept} that saves at least `target` MACs per sample: the removal with
    the least risk per MAC saved goes first, across all sites (risks in output units add, THEORY §3).

    curves: `Analysis.risk_curves(...)`; each site's measured curve is used where set, else the
    predicted one. A channel of an early high-resolution block saves far more MACs than one of a
    late block, so a budget in MACs differs from a budget in units."""
    from .passes.select import allowed_removals
    steps, saved, risk, pos = {}, {}, {}, {}
    for s in sites:
        cv = curves[s.name]
        steps[s.name] = allowed_removals(s.n_units, round_to)
        per_unit = unit_macs(s, macs)[torch.tensor(cv.order, dtype=torch.long)]
        saved[s.name] = torch.cat([per_unit.new_zeros(1), per_unit.cumsum(0)])   # MACs saved by the first k
        risk[s.name] = cv.curve if cv.measured is None else cv.measured
        pos[s.name] = 0
    total = 0.0
    while total < target:
        best = None
        for s in sites:
            st, i = steps[s.name], pos[s.name]
            if i + 1 >= len(st):
                continue
            gain = float(saved[s.name][st[i + 1]] - saved[s.name][st[i]])
            cost = float(risk[s.name][st[i + 1]] - risk[s.name][st[i]]) / max(gain, 1e-12)
            if best is None or cost < best[0]:
                best = (cost, s.name, gain)
        if best is None:
            break
        pos[best[1]] += 1
        total += best[2]
    return {s.name: s.n_units - steps[s.name][pos[s.name]] for s in sites}
