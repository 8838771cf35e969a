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
    """do(a_P := beta + theta a_K) on the units' axis (-1 features, 1 channels), at every position
    (THEORY §1). `site` (sites.Site) tells the fold pass where the units come from and go."""

    def __init__(self, kept: list[int], removed: list[int], beta: torch.Tensor, theta: torch.Tensor,
                 site=None):
        super().__init__()
        self.site = site
        self.axis = -1 if site is None else site.axis
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long))
        self.register_buffer("removed", torch.tensor(removed, dtype=torch.long))
        self.register_buffer("beta", beta)        # [|P|]
        self.register_buffer("theta", theta)      # [|P|, |K|]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.axis == 1:
            a = a.movedim(1, -1)
        values = self.beta + a.index_select(-1, self.kept) @ self.theta.T
        a = a.index_copy(-1, self.removed, values)
        return a.movedim(-1, 1).contiguous() if self.axis == 1 else a


def replacement_target(site_name: str) -> str:
    return "fxabstract_replace_" + site_name.replace(".", "_")


def replace(gm: fx.GraphModule, plans: list[SitePlan]) -> fx.GraphModule:
    """A copy of gm with every plan's replacement inserted between its site and the consumers."""
    gm = copy.deepcopy(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    dtype = next(gm.parameters()).dtype
    device = next(gm.parameters()).device
    for p in [q for plan in plans for q in (plan, *plan.branches)]:   # an SE squeeze is replaced too
        if not p.removed:
            continue
        target = replacement_target(p.site.name)
        gm.add_submodule(target, Replacement(p.kept, p.removed, p.beta.to(device, dtype),
                                             p.theta.to(device, dtype), p.site).to(device))
        site = nodes[p.site.node]
        with gm.graph.inserting_after(site):
            r = gm.graph.call_module(target, (site,))
        site.replace_all_uses_with(r, delete_user_cb=lambda user: user is not r)
    gm.graph.lint()
    gm.recompile()
    return gm
