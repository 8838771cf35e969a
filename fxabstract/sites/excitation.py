"""Squeeze-and-excitation: the second reading of a site's units (docs/math.md §1, applied to an SE block).

An SE block reads its expansion x twice: the excitation y = x * gate(fc2(act(fc1(pool(x))))) feeds
the site's consumer (the projection), and the squeeze pool(x) feeds fc1. The finder follows x
into the product (`layers.excitation`); this module describes the squeeze as a *branch* of the site: a
Site without producers, whose value (what fc1 reads) has the site's units. The branch gets its own
replacement (`passes.select.fit_branch`), folded into fc1 like any site's, and removing unit j
deletes fc1's input column j. Pooling is linear per channel, so do(s_P := beta + theta s_K) on the
pooled value s is do(x_P := beta + theta x_K) on the SE path alone.

    >>> site.branches[0].node, site.branches[0].reads      # ('adaptive_avg_pool2d', {'se.fc1': 'channels'})
"""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from .layers import (consumer_reads, excitation, groups_of, is_cat, is_per_unit, is_spatial_mean, is_unsqueeze,
                     readers_of, resize_unsqueeze, shape_of, stateless, zero_padded)
from .site import Context, Refusal, Site


def find(ctx: Context, site: Site) -> Site:
    """The site with its SE parts: its squeezes (`branches`) and the gate views [B, d] -> [B, d, 1, 1]
    that spell d as a constant (`unit_views`); Refusal if a squeeze cannot be folded."""
    nodes = {n.name: n for n in ctx.gm.graph.nodes}
    chain = [nodes[name] for name in site.chain]
    branches = _squeeze_branches(ctx, chain, {q.module for q in site.pieces}, site.n_units)
    views = [n.name for n in chain if n.all_input_nodes and is_unsqueeze(n, n.args[0])]
    return replace(site, branches=branches, unit_views=views)


def rewrite(gm: fx.GraphModule, folded: list[tuple[Site, list[int]]]) -> None:
    """Each gate view of a folded site takes the kept width d', in place (the squeezes' replacements
    fold into fc1 like any site's; their rows go with the main site)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for site, kept in folded:
        for view in site.unit_views:
            resize_unsqueeze(nodes[view], len(kept))


def _squeeze_branches(ctx: Context, chain: list[fx.Node], producers: set[str], d: int) -> list[Site]:
    """The site's squeezes (branch Sites); Refusal if one cannot be folded. A squeeze starts at a node x of
    the site's chain (or a producer's output) that `layers.excitation` matched: stateless per-unit ops
    (global average pool, spatial mean, activations) from x to affine consumers. x must carry the
    site's units one to one (no cat or split between x and the site)."""
    gm = ctx.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    heads = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in producers]
    branches = []
    for x in sorted(set(chain) | set(heads), key=order.get):
        excite = excitation(x) if x.op != "output" else None
        if excite is None or excite not in chain:
            continue
        squeeze = next(r for r in readers_of(x) if r is not excite)
        later = [n for n in chain if order[n] > order[x]]
        if any(is_cat(n, 1) or (shape_of(n) or (0, 0))[1] != d for n in later):
            raise Refusal(f"its SE input `{x.name}` does not carry the site's units one to one "
                    "(a cat or split between it and the site)")
        nodes = [x]
        while len(readers_of(nodes[-1])) == (2 if nodes[-1] is x else 1):
            nxt = squeeze if nodes[-1] is x else readers_of(nodes[-1])[0]
            free = nxt.op != "call_module" or stateless(gm, nxt)
            if not ((free and is_per_unit(gm, nxt, nodes[-1], 1, d)) or is_spatial_mean(nxt, nodes[-1])):
                break
            nodes.append(nxt)
        if len(nodes) == 1:
            raise Refusal(f"its SE input `{x.name}` is read by `{squeeze.name}`, which is neither a pooling nor a "
                    "per-unit op on the way to an affine layer")
        value = nodes[-1]
        shape = shape_of(value)
        axis = 1 if len(shape) > 2 else len(shape) - 1
        try:
            reads = consumer_reads(gm, value, ctx.calls, d, axis, ctx.tied)
        except Refusal as refusal:
            raise Refusal(f"its SE branch `{squeeze.name}`: {refusal.reason}") from None
        grouped = [c for c in reads if groups_of(gm.get_submodule(c)) > 1]
        if grouped:
            raise Refusal(f"its SE branch `{squeeze.name}` is read by grouped convolution `{grouped[0]}` (the "
                          "squeeze's replacement is not restricted to groups)")
        branches.append(Site(x.name, value.name, [n.name for n in nodes[1:]], list(reads), d, axis=1,
                             shape=tuple(shape[1:]), reads=reads,
                             bias_maps=[c for c in reads if zero_padded(gm.get_submodule(c))]))
    return branches
