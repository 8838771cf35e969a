"""Grouped-query attention: h query heads read h_kv key/value heads, kv head j serving the G = h / h_kv
adjacent query heads j G .. j G + G - 1. A head site's units are removed one query head at a time
(group = dh); a kv head's rows of k and v are deleted once all G of its query heads are (SharedPiece).
The repeat of k and v to h heads cannot stay uniform then, so fold rewrites it (THEORY §1: exact):

    repeat_kv: x[:, :, None].expand(B, h_kv, G, T, dh).reshape(B, h, T, dh)  ->  x.index_select(1, idx)
    x.repeat_interleave(G, dim=1)                                           ->  x.index_select(1, idx)
    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)                ->  k, v index_select'ed, no GQA

idx [kept query heads]: the new position of each kept query head's kv head among the kept kv heads.

    >>> plan = kv_plan(chains, k_and_v, env, layout, h, dh, G, kernel, sdpa_gqa)   # analysis
    >>> select_kv_heads(gm, site, kept_units)                                      # fold, in place
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .ops import _shape, narrow, op_name

REPEAT_OPS = {"unsqueeze", "getitem", "expand", "clone", "contiguous", "reshape", "view", "_unsafe_view",
              "repeat_interleave"}


def _repeat(chain: list[fx.Node], env: dict, h: int, h_kv: int):
    """(x, y): the kv value [B, h_kv, T, dh] and the repeated value [B, h, T, dh] on a k or v chain
    (the nodes after x up to y are the repeat), or why there is none."""
    first = next((i for i, n in enumerate(chain) if isinstance(env[n], torch.Tensor)
                  and narrow(env[n]).numel() > torch.unique(env[n]).numel()), None)
    if first is None:
        return "no repeat of the key/value heads found"
    i = first
    while i < len(chain) and (len(_shape(chain[i]) or ()) != 4 or _shape(chain[i])[1] != h):
        i += 1
    j = first - 1
    while j >= 0 and (len(_shape(chain[j]) or ()) != 4 or _shape(chain[j])[1] != h_kv):
        j -= 1
    if i == len(chain) or j < 0 or any(op_name(n) not in REPEAT_OPS or len(n.users) != 1 for n in chain[j + 1:i + 1]):
        return f"`{chain[first].name}` repeats the key/value heads in a form fxabstract does not rewrite"
    return chain[j], chain[i]


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
        found = _repeat(chain, env, h, h // G)
        if isinstance(found, str):
            return found
        x, y = found
        t = narrow(env[x])
        if t.dim() != 4 or tuple(t.shape[1::2]) != (h // G, dh):
            return f"`{x.name}` does not carry the key/value heads on axis 1 before they are repeated"
        expected = rows[s]                                                      # [h, dh] rows of each query head
        if not torch.equal(narrow(env[y])[0, :, 0, :], expected):
            return f"`{y.name}` does not give query head g the key/value head g // {G}"
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
