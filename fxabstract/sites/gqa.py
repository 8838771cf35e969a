"""Grouped-query attention: h query heads read h_kv key/value heads, kv head j serving the G = h / h_kv
adjacent query heads j G .. j G + G - 1. A head site's units are removed one query head at a time
(group = dh); a kv head's rows of k and v are deleted once all G of its query heads are (SharedPiece).
The repeat of k and v to h heads cannot stay uniform then, so fold rewrites it (docs/math.md §1: exact):

    repeat_kv: x[:, :, None].expand(B, h_kv, G, T, dh).reshape(B, h, T, dh)  ->  x.index_select(1, idx)
    x.repeat_interleave(G, dim=1)                                           ->  x.index_select(1, idx)
    x.expand(B, h, T, dh)   (multi-query attention, h_kv = 1)                ->  x.index_select(1, idx)
    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)                ->  k, v index_select'ed, no GQA

idx [kept query heads]: the new position of each kept query head's kv head among the kept kv heads.

    >>> plan = kv_plan(chains, k_and_v, env, layout, h, dh, G, kernel, sdpa_gqa)   # analysis
    >>> select_kv_heads(gm, site, kept_units)                                      # fold, in place
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .layers import narrow, op_name
from .site import Refusal

REPEAT_OPS = {"unsqueeze", "getitem", "expand", "clone", "contiguous", "reshape", "view", "_unsafe_view",
              "repeat_interleave"}


def _rows(t, heads: int, dh: int):
    """[heads, dh] rows of a [B, heads, T, dh] value whose heads read the same rows at every b and t, or None."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.shape[1], t.shape[3]) != (heads, dh):
        return None
    n = narrow(t)                                                 # (broadcast axes narrowed: cheap to compare)
    return t[0, :, 0, :] if torch.equal(n, n[:1, :, :1].expand_as(n)) else None


def _repeat(chain: list[fx.Node], env: dict, expected: torch.Tensor, G: int):
    """(x, y): the kv value [B, h_kv, T, dh] and the repeated value [B, h, T, dh] on a k or v chain
    (the nodes after x up to y are the repeat); Refusal if there is none; expected: [h, dh] rows."""
    (h, dh), kv = expected.shape, expected[::G]
    y = next((i for i, n in enumerate(chain) if (r := _rows(env[n], h, dh)) is not None
              and torch.equal(r, expected)), None)
    x = next((j for j in range(y - 1, -1, -1) if (r := _rows(env[chain[j]], h // G, dh)) is not None
              and torch.equal(r, kv)), None) if y else None
    if x is None:
        raise Refusal("no repeat of the key/value heads over axis 1 found")
    if any(op_name(n) not in REPEAT_OPS or len(n.users) != 1 for n in chain[x + 1:y + 1]):
        bad = next(n for n in chain[x + 1:y + 1] if op_name(n) not in REPEAT_OPS or len(n.users) != 1)
        raise Refusal(f"`{bad.name}` repeats the key/value heads in a form fxabstract does not rewrite")
    return chain[x], chain[y]


def kv_plan(chains: dict, kv_starts: list, env: dict, rows: dict, h: int, dh: int, G: int, kernel: fx.Node,
            sdpa_gqa: bool):
    """(repeats, kv-side chain nodes, repeat nodes) for the k and v chains, or why not: repeats are
    ("repeat", x, y) or ("sdpa", kernel, "") entries for fold; kv-side nodes carry h_kv heads."""
    repeats, kv_side, inside = [], set(), set()
    if sdpa_gqa:
        for s in kv_starts:
            kv_side |= set(chains[s][1])
        return [("sdpa", kernel.name, "")], kv_side, inside
    for s in kv_starts:
        chain = chains[s][1]
        x, y = _repeat(chain, env, rows[s], G)                                # rows[s]: [h, dh]
        a, b = chain.index(x), chain.index(y)
        kv_side |= set(chain[:a + 1])
        inside |= set(chain[a + 1:b + 1])
        repeats.append(("repeat", x.name, y.name))
    return repeats, kv_side, inside


def select_kv_heads(gm: fx.GraphModule, site, kept_units: list[int]) -> int:
    """Rewrite each repeat of the site's k and v into an index_select of the kept query heads' kv
    heads, in place; the number of kv heads kept."""
    dh, G = site.group, site.pieces[-1].share
    heads = sorted({u // dh for u in kept_units})
    kv = sorted({g // G for g in heads})
    name = "fxa_kv_index_" + site.name.replace(".", "_")
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    gm.register_buffer(name, torch.tensor([kv.index(g // G) for g in heads], device=device))   # [kept heads]
    nodes = {n.name: n for n in gm.graph.nodes}
    for kind, a, b in site.repeats:
        if kind == "sdpa":
            kernel = nodes[a]
            args = list(kernel.args)
            with gm.graph.inserting_before(kernel):
                index = gm.graph.get_attr(name)
                for pos, key in ((1, "key"), (2, "value")):
                    value = args[pos] if len(args) > pos else kernel.kwargs[key]
                    new = gm.graph.call_function(torch.index_select, (value, 1, index))
                    if len(args) > pos:
                        args[pos] = new
                    else:
                        kernel.update_kwarg(key, new)
            kernel.args = tuple(args[:7] + [False] if len(args) > 7 else args)
            if "enable_gqa" in kernel.kwargs:
                kernel.update_kwarg("enable_gqa", False)
            continue
        x, y = nodes[a], nodes[b]
        with gm.graph.inserting_before(y):
            index = gm.graph.get_attr(name)
            new = gm.graph.call_function(torch.index_select, (x, 1, index))
        y.replace_all_uses_with(new)
        node = y
        while node is not x and not node.users:
            up = node.args[0]
            gm.graph.erase_node(node)
            node = up
    return len(kv)
