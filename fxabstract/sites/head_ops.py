"""Per-head ops between the q/k projections and the attention: rotary position embeddings and q/k
normalisation over head_dim. They mix values only along the last axis, within one head, with
tensors (cos, sin, a norm weight [dh]) that are the same for every head; so a head's rows stay that
head's, and deleting whole heads leaves every kept head's values unchanged (docs/math.md §1: the fold is
exact).

    q * cos + rotate_half(q) * sin            rotate_half(x) = cat((-x[..., d/2:], x[..., :d/2]), -1)
    x * rsqrt(mean(x^2, -1, keepdim) + eps) * w     (RMSNorm, written out), nn.RMSNorm, nn.LayerNorm,
    aten.rms_norm / aten.layer_norm / aten.native_layer_norm over [dh], F.rms_norm / F.layer_norm

A *region* is such an op's nodes, walked back from its output over last-axis ops to its one
*source* (the value it normalises or rotates: the leaf of the full shape); its other leaves are
*broadcast operands* (cos, sin, weights), checked to be size 1 on the head axis when row indices are
known (`broadcast_ok`).

    >>> region(gm, add_1)          # Region(source=transpose, nodes={add_1, mul_2, cat, ...}, operands=[narrow, ...])
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .layers import shape_of, narrow, op_name, size_dims

ELEMENTWISE = {"add", "sub", "mul", "div", "truediv", "neg", "rsqrt", "sqrt", "pow", "to", "type", "float",
               "_to_copy", "reciprocal", "type_as"}
LAST_AXIS = {"mean", "cat", "slice", "getitem", "rms_norm", "layer_norm", "native_layer_norm"}
NORM_MODULES = (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)
MAX_NODES = 64


@dataclass
class Region:
    source: fx.Node
    nodes: set = field(default_factory=set)       # the op's nodes, its output included
    operands: list = field(default_factory=list)  # broadcast tensors: cos, sin, weights
    mixes: bool = False                           # reads along the last axis (not only elementwise)


def _last(dim, rank: int) -> bool:
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] % rank == rank - 1


def _within_last_axis(gm: fx.GraphModule, node: fx.Node) -> bool:
    """node is elementwise, or reduces, slices, concatenates or normalises along the last axis only."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, NORM_MODULES) and len(tuple(m.normalized_shape)) == 1
    name = op_name(node)
    if name in ELEMENTWISE:
        return True
    if name not in LAST_AXIS or not node.args:
        return False
    x, rank = node.args[0], len(shape_of(node.args[0] if name != "cat" else node.args[0][0]) or ())
    if name == "cat":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return rank > 0 and _last(dim, rank)
    if name == "mean":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return rank > 0 and dim is not None and keep and _last(dim, rank)
    if name == "slice":
        return rank > 0 and _last(node.args[1] if len(node.args) > 1 else 0, rank)
    if name == "getitem":
        if isinstance(x, fx.Node) and op_name(x) == "native_layer_norm":
            return node.args[1] == 0
        index = node.args[1]
        if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
            return False
        full = slice(None, None, None)
        return (index[0] is Ellipsis and len(index) == 2) or (
            len(index) == rank and all(i == full for i in index[:-1]))
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")   # the norms
    return isinstance(shape, (list, tuple)) and len(shape) == 1


def region(gm: fx.GraphModule, out: fx.Node) -> Region | None:
    """The per-head op ending at `out` (rotary, q/k norm), or None when out is not one."""
    if out.op not in ("call_function", "call_method", "call_module") or not _within_last_axis(gm, out):
        return None
    shape = shape_of(out)
    nodes, leaves, stack = set(), [], [out]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        if node is not out and (not _within_last_axis(gm, node) or len(nodes) >= MAX_NODES):
            leaves.append(node)
            continue
        nodes.add(node)
        inputs = node.args[:1] if op_name(node) == "type_as" else node.all_input_nodes   # (its dtype source: no input)
        stack += [a for a in inputs if shape_of(a) is not None or op_name(a) == "native_layer_norm"]
    sources = {n for n in leaves if shape_of(n) == shape}
    if len(sources) != 1 or len(nodes) >= MAX_NODES:
        return None
    source = sources.pop()
    for node in nodes - {out}:                     # the op's inner values feed only the op (shape reads aside)
        if any(u not in nodes and not _reads_size(u) for u in node.users):
            return None
    operands = list(dict.fromkeys(n for n in leaves if n is not source))
    if any(source in _ancestors(o) for o in operands):
        return None
    mixes = any(n.op == "call_module" or op_name(n) not in ELEMENTWISE for n in nodes)
    return Region(source, nodes, operands, mixes)


def _ancestors(node: fx.Node, limit: int = 256) -> set:
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += n.all_input_nodes
    return seen


def _reads_size(node: fx.Node) -> bool:
    """x.shape[-1] (fx): a read of the last axis' size (rotate_half's `x.shape[-1] // 2`)."""
    rank = len(shape_of(node.args[0]) or ()) if node.args else 0
    dims = size_dims(node) if node.target is getattr else None
    return rank > 0 and dims is not None and all(d % rank == rank - 1 for d in dims)


def broadcast_ok(source_rows: torch.Tensor, operand: fx.Node) -> bool:
    """The operand (cos, sin, a weight) is the same for every head: size 1 (or absent) on each axis
    other than the last along which the source's row indices vary (the head axis)."""
    t = narrow(source_rows)
    shape = list(shape_of(operand) or ())
    shape = [1] * (t.dim() - len(shape)) + shape
    return len(shape) == t.dim() and all(shape[a] == 1 for a in range(t.dim() - 1) if t.shape[a] > 1)


def within_heads(source_rows: torch.Tensor, heads: list[torch.Tensor]) -> bool:
    """Every fiber along the last axis of the source holds rows of one head only."""
    t = narrow(source_rows)
    for rows in heads:
        mine = torch.isin(t, rows)
        if not torch.equal(mine, mine[..., :1].expand_as(mine)):
            return False
    return True

