"""Rewrite each planned site as its replacement: a `Replacement` node after the site value, which
the consumers now read. The graph stays dense; it is the intervened model f_I of docs/math.md §2.

    >>> gm_I = replace(gm, plans)      # a new GraphModule; `gm` is untouched
"""
from __future__ import annotations

import torch.fx as fx

from ..capture import copy_module
from .plan import Replacement, SitePlan


def replacement_target(site_name: str) -> str:
    return "fxabstract_replace_" + site_name.replace(".", "_")


def replace(gm: fx.GraphModule, plans: list[SitePlan]) -> fx.GraphModule:
    """A copy of gm with every plan's replacement inserted between its site and the consumers."""
    gm = copy_module(gm)
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
