"""Attention heads as unit groups: a head's output slice, read by the output projection, is a site
whose units are removed a whole head at a time (THEORY §1: a site is a value read only by affine
consumers; the output projection is one).

The pattern, in fx (symbolic_trace) or aten (torch.export) spelling:

    q, k, v = Linear(x) -> view [B, T, h, dh] -> transpose          (one per projection)
    P = softmax(q @ k^T * scale (+ mask))                           per head: [B, h, T, T]
    y = (P @ v) -> transpose -> reshape [B, T, h * dh] -> proj        y is the site, proj the consumer

Replacing the units of head g by constants or affine maps of the kept heads' units is folded into
proj; head g's rows of q, k and v are deleted, and the head count in the split views and the merge
reshape (a literal h, or -1) is rewritten. Each head's attention depends on its own q, k, v only, so
the fold is exact.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .sites import Piece, Site, _shape

aten = torch.ops.aten
MATMULS = {operator.matmul, torch.matmul, aten.matmul.default, "matmul"}
SHAPE_OPS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone"}
PER_HEAD_OPS = {"softmax", "_softmax", "dropout", "mul", "div", "truediv", "add", "sub", "masked_fill",
                "masked_fill_", "where", "to", "type", "float", "contiguous", "clone"}


def _op(node: fx.Node) -> str:
    """A node's operation as a bare name: 'view', 'softmax', 'matmul', ..."""
    t = node.target
    if node.op == "call_method":
        return t
    if node.op != "call_function":
        return ""
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[1]
    return "matmul" if t in MATMULS else getattr(t, "__name__", str(t))


def _shape_args(node: fx.Node) -> list:
    """The target shape of a view/reshape node, as a list (varargs or one list argument)."""
    rest = list(node.args[1:])
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def _back_to_linear(gm: fx.GraphModule, node: fx.Node, calls) -> tuple[fx.Node | None, list[fx.Node]]:
    """Follow single-user shape ops back to a once-called Linear: (linear node, shape-op nodes)."""
    ops = []
    while node.op != "call_module" and _op(node) in SHAPE_OPS and len(node.users) == 1:
        ops.append(node)
        node = node.args[0]
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear) \
            and calls[node.target] == 1 and len(node.users) == 1:
        return node, ops
    return None, ops


def _split_views(ops: list[fx.Node], h: int) -> list[fx.Node] | None:
    """The one view [B, T, C] -> [B, T, h, dh] among ops, if its head count is a literal h or -1."""
    views = [n for n in ops if _op(n) in ("view", "reshape", "_unsafe_view")]
    if len(views) != 1 or len(_shape(views[0]) or ()) != 4:
        return None
    shape = _shape_args(views[0])
    return views if len(shape) == 4 and shape[2] in (h, -1) else None


def find_head_sites(gm: fx.GraphModule, calls, taken: set[str]) -> tuple[list[Site], set[str]]:
    """Head sites, one per attention block found; and the module paths they claim (q, k, v, proj)."""
    sites, claimed = [], set()
    for proj in gm.graph.nodes:
        if proj.op != "call_module" or not isinstance(gm.get_submodule(proj.target), nn.Linear):
            continue
        site = _match(gm, proj, calls)
        if site is None:
            continue
        paths = {p.module for p in site.pieces} | {proj.target}
        if paths & (taken | claimed):
            continue
        sites.append(site)
        claimed |= paths
    return sites, claimed


def _match(gm: fx.GraphModule, proj: fx.Node, calls) -> Site | None:
    y = proj.args[0]
    if calls[proj.target] != 1 or len(y.users) != 1 or len(_shape(y) or ()) != 3:
        return None
    node, merge_ops = y, []
    while _op(node) in SHAPE_OPS and len(node.users) == 1:           # back from y to P @ v
        merge_ops.append(node)
        node = node.args[0]
    if _op(node) != "matmul" or len(_shape(node) or ()) != 4 or len(node.users) != 1:
        return None
    B, h, T, dh = _shape(node)
    C = _shape(y)[2]
    probs, v_out = node.args[:2]
    v, v_ops = _back_to_linear(gm, v_out, calls)
    score = probs
    for _ in range(12):                                               # back from P to q @ k^T
        if _op(score) == "matmul" or len(score.users) != 1 or _op(score) not in PER_HEAD_OPS:
            break
        for other in score.all_input_nodes[1:]:
            s = _shape(other) or ()
            if len(s) >= 3 and s[-3] != 1:
                return None                                           # a per-head bias: not handled
        score = score.args[0]
    if _op(score) != "matmul" or (_shape(score) or ())[:2] != (B, h):
        return None
    q, q_ops = _back_to_linear(gm, score.args[0], calls)
    k, k_ops = _back_to_linear(gm, score.args[1], calls)
    if None in (q, k, v) or C != h * dh or len({q.target, k.target, v.target, proj.target}) != 4:
        return None
    if any(gm.get_submodule(n.target).out_features != C for n in (q, k, v)):
        return None
    splits = [_split_views(ops, h) for ops in (q_ops, k_ops, v_ops)]
    merges = [n for n in merge_ops if _op(n) in ("view", "reshape", "_unsafe_view")]
    if None in splits or len(merges) != 1 or _shape_args(merges[0])[-1:] not in ([C], [-1]):
        return None
    prefix = _common_prefix([q.target, k.target, v.target, proj.target])
    name = (prefix + "." if prefix else "") + "heads"
    return Site(name, y.name, [n.name for n in merge_ops], [proj.target], C, axis=-1, shape=tuple(_shape(y)[1:]),
                pieces=[Piece(m.target, 0, C) for m in (v, q, k)], reads={proj.target: "features"},
                group=dh, head_shapes=[s[0].name for s in splits] + [merges[0].name])


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def set_head_count(gm: fx.GraphModule, site: Site, heads: int) -> None:
    """Rewrite the literal head counts of a head site's split views and merge reshape, in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    h, dh = site.n_units // site.group, site.group
    for name in site.head_shapes:
        node = nodes[name]
        shape = _shape_args(node)
        if len(shape) == 4 and shape[2] == h:
            shape[2] = heads
        elif shape and shape[-1] == h * dh:
            shape[-1] = heads * dh
        else:
            continue                                                  # -1: inferred
        as_list = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        node.args = (node.args[0], shape) if as_list else (node.args[0], *shape)
