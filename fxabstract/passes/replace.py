"""Rewrite each planned site as its replacement: a `Replacement` node after the site value, which
the consumers now read. The graph stays dense; it is the intervened model f_I of THEORY §2.

    >>> gm_I = replace(gm, plans)      # a new GraphModule; `gm` is untouched
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from .select import SitePlan


class Replacement(nn.Module):
    """do(a[..., P] := beta + a[..., K] @ theta^T) on the last dimension (THEORY §1)."""

    def __init__(self, kept: list[int], removed: list[int], beta: torch.Tensor, theta: torch.Tensor):
        super().__init__()
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long))
        self.register_buffer("removed", torch.tensor(removed, dtype=torch.long))
        self.register_buffer("beta", beta)        # [|P|]
        self.register_buffer("theta", theta)      # [|P|, |K|]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        values = self.beta + a.index_select(-1, self.kept) @ self.theta.T
        return a.index_copy(-1, self.removed, values)


def replacement_target(site_name: str) -> str:
    return "fxabstract_replace_" + site_name.replace(".", "_")


def replace(gm: fx.GraphModule, plans: list[SitePlan]) -> fx.GraphModule:
    """A copy of gm with every plan's replacement inserted between its site and the consumers."""
    gm = copy.deepcopy(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    dtype = next(gm.parameters()).dtype
    device = next(gm.parameters()).device
    for p in plans:
        if not p.removed:
            continue
        target = replacement_target(p.site.name)
        gm.add_submodule(target, Replacement(p.kept, p.removed, p.beta.to(device, dtype),
                                             p.theta.to(device, dtype)).to(device))
        site = nodes[p.site.node]
        with gm.graph.inserting_after(site):
            r = gm.graph.call_module(target, (site,))
        site.replace_all_uses_with(r, delete_user_cb=lambda user: user is not r)
    gm.graph.lint()
    gm.recompile()
    return gm
