"""Squeeze-and-excitation: the second reading of a site's units (THEORY §1, applied to an SE block).

An SE block reads its expansion x twice: the excitation y = x * gate(fc2(act(fc1(pool(x))))) feeds
the site's consumer (the projection), and the squeeze pool(x) feeds fc1. `sites._follow` follows x
into the product (ops.excitation); this module describes the squeeze as a *branch* of the site: a
Site without producers, whose value (what fc1 reads) has the site's units. The branch gets its own
replacement (passes/select.py `fit_branch`), folded into fc1 like any site's, and removing unit j
deletes fc1's input column j. Pooling is linear per channel, so do(s_P := beta + theta s_K) on the
pooled value s is do(x_P := beta + theta x_K) on the SE path alone.

    >>> site.branches[0].node, site.branches[0].reads      # ('adaptive_avg_pool2d', {'se.fc1': 'channels'})
"""
from __future__ import annotations

from collections import Counter

import torch.fx as fx

from .ops import _readers, _shape, excitation, is_cat, is_per_unit, is_spatial_mean
from .sites import Site, _consumer_problem, _stateless, _zero_padded


def squeeze_branches(gm: fx.GraphModule, calls: Counter, tied: dict, chain: list[fx.Node], producers: set[str], d: int):
    """The site's squeezes (branch Sites), or why one cannot be folded. A squeeze starts at a node x of
    the site's chain (or a producer's output) that `ops.excitation` matched: stateless per-unit ops
    (global average pool, spatial mean, activations) from x to affine consumers. x must carry the
    site's units one to one (no cat or split between x and the site)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    heads = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in producers]
    branches = []
    for x in sorted(set(chain) | set(heads), key=order.get):
        excite = excitation(x) if x.op != "output" else None
        if excite is None or excite not in chain:
            continue
        squeeze = next(r for r in _readers(x) if r is not excite)
        later = [n for n in chain if order[n] > order[x]]
        if any(is_cat(n, 1) or (_shape(n) or (0, 0))[1] != d for n in later):
            return (f"its SE input `{x.name}` does not carry the site's units one to one "
                    "(a cat or split between it and the site)")
        nodes = [x]
        while len(_readers(nodes[-1])) == (2 if nodes[-1] is x else 1):
            nxt = squeeze if nodes[-1] is x else _readers(nodes[-1])[0]
            stateless = nxt.op != "call_module" or _stateless(gm, nxt)
            if not ((stateless and is_per_unit(gm, nxt, nodes[-1], 1, d)) or is_spatial_mean(nxt, nodes[-1])):
                break
            nodes.append(nxt)
        if len(nodes) == 1:
            return (f"its SE input `{x.name}` is read by `{squeeze.name}`, which is neither a pooling nor a "
                    "per-unit op on the way to an affine layer")
        value = nodes[-1]
        shape = _shape(value)
        axis = 1 if len(shape) > 2 else len(shape) - 1
        reads = _consumer_problem(gm, value, calls, d, axis, tied)
        if isinstance(reads, str):
            return f"its SE branch `{squeeze.name}`: {reads}"
        branches.append(Site(x.name, value.name, [n.name for n in nodes[1:]], list(reads), d, axis=1,
                             shape=tuple(shape[1:]), reads=reads,
                             bias_maps=[c for c in reads if _zero_padded(gm.get_submodule(c))]))
    return branches
