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
    >>> removal_macs(sites, {name: units}, macs)  # saved by removing units of several sites together
    >>> site_macs(sites, macs)                    # the sites' MACs: each layer their units touch, once
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .sites import SharedPiece, Site

COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _counted() -> tuple[type, ...]:
    """COUNTED, and transformers' Conv1D when transformers is loaded (a model using it loaded it)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return COUNTED + ((conv1d,) if isinstance(conv1d, type) else ())


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    per_sample = out.numel() // max(out.shape[0], 1) if out.dim() > 1 else out.numel()
    if hasattr(m, "macs_per_position"):             # passes/norms.StreamNorm: rebuilding replaced channels
        return per_sample // out.shape[-1] * m.macs_per_position()
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
        if isinstance(m, counted) or hasattr(m, "macs_per_position"):   # a compiled stream normaliser
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
    every per-channel conv (depthwise), and its column in every consumer. Exact for one site alone
    (a key/value row shared by G query heads: 1/G to each); for units of several sites removed
    together, `removal_macs`."""
    cost = torch.zeros(site.n_units, dtype=torch.float64)
    for piece in site.pieces + site.channel_ops:
        if piece.module in macs:
            cost[piece.lo:piece.hi] += macs[piece.module] / piece.total / getattr(piece, "share", 1)
    for name in site.readers():      # SE squeezes' consumers and a stream normaliser's readers too
        cost += macs.get(name, 0) / site.n_units   # each unit: an equal share of the input (a block if flattened)
    return cost


def removal_macs(sites: list[Site], removed: dict[str, list[int]], macs: dict[str, int]) -> float:
    """MACs per sample saved by removing units `removed[site name]` (indices) of every site together.
    A layer loses a fraction rho of its rows (producer side; a key/value row once every query head
    reading it is removed) and kappa of its input (consumer side), so it keeps (1 - rho)(1 - kappa) of
    its MACs: where one site's consumer is the next site's producer (an MLP's middle layer), the saving
    is less than the sum of the units' `unit_macs`."""
    rows: dict[str, float] = {}
    cols: dict[str, float] = {}
    for s in sites:
        units = sorted(int(u) for u in removed.get(s.name, ()))
        for piece in s.pieces + s.channel_ops:
            if piece.module in macs:
                n = len(piece.rows_of(units)) if isinstance(piece, SharedPiece) else \
                    sum(piece.lo <= u < piece.hi for u in units)
                rows[piece.module] = rows.get(piece.module, 0.0) + n / piece.total
        for name in s.readers():
            if name in macs:
                cols[name] = cols.get(name, 0.0) + len(units) / s.n_units
    saved = 0.0
    for name in rows.keys() | cols.keys():
        rho, kappa = min(rows.get(name, 0.0), 1.0), min(cols.get(name, 0.0), 1.0)
        saved += macs[name] * (1 - (1 - rho) * (1 - kappa))
    return saved


def site_macs(sites: list[Site], macs: dict[str, int]) -> float:
    """The sites' MACs per sample: what removing every unit of every site would save, each layer once."""
    return removal_macs(sites, {s.name: range(s.n_units) for s in sites}, macs)
