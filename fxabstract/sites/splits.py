"""Values split along the unit axis: which output of a split carries which units, and how fold
rewrites the split when units are deleted (docs/math.md §1: a removed unit's producer rows are deleted, so
every split of the producer's output must take the new widths).

Three forms are followed, in fx (symbolic_trace) or aten (torch.export) spelling:

    a, b = h.split([24, 40], dim=1)       torch.split / chunk / tensor_split, and getitem on the result
    a, b = h[:, :24], h[:, 24:]           constant slices on the unit axis (step 1, disjoint)
    s = F.glu(h, dim=1)                   GLU: unit j of s is the pair of units {j, d/2 + j} of h

Each output (a getitem, a slice, the glu) becomes the source of its own path in `sites.find_sites`;
its units are the interval [lo, hi) of h's units. After removals, a split takes the sizes of its
pieces that are left (a chunk becomes a split with those sizes, since pieces need not shrink
equally), and a slice's bounds move down by the units removed before them. GLU needs no rewrite: its
two halves lose the same units.

    >>> outputs = split_outputs(gm, h_node, axis=1)   # [(output node, lo, hi)] or None; Refusal
    >>> rewrite_splits(gm, {"getitem": 3})             # 3 units removed from piece `getitem`
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .layers import readers_of, shape_of
from .site import Context, Refusal, Site

aten = torch.ops.aten

# split-like call -> the torch function that splits the same way (dim as the third argument)
SPLIT_FUNCTIONS = {
    torch.split: torch.split, torch.chunk: torch.chunk, torch.tensor_split: torch.tensor_split,
    aten.split.Tensor: torch.split, aten.split_with_sizes.default: torch.split, aten.chunk.default: torch.chunk,
    aten.tensor_split.indices: torch.tensor_split, aten.tensor_split.sections: torch.tensor_split,
}
SPLIT_METHODS = {"split": torch.split, "chunk": torch.chunk, "tensor_split": torch.tensor_split,
                 "split_with_sizes": torch.split}
PARAMETERS = ("split_size_or_sections", "split_size", "split_sizes", "chunks", "sections", "indices",
              "indices_or_sections", "tensor_indices_or_sections")
GLU = {torch.nn.functional.glu, aten.glu.default}


def split_call(node: fx.Node):
    """(splitting function, parameter, dim) if node splits its first argument, else None."""
    if node.op == "call_function" and node.target in SPLIT_FUNCTIONS:
        fn = SPLIT_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in SPLIT_METHODS:
        fn = SPLIT_METHODS[node.target]
    else:
        return None
    param = node.args[1] if len(node.args) > 1 else next((node.kwargs[k] for k in PARAMETERS if k in node.kwargs), None)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return fn, param, dim


def split_intervals(node: fx.Node, d: int) -> list[tuple[int, int]]:
    """The unit interval [lo, hi) of each output of a split of d units (the split run on arange(d);
    sizes computed in the graph, `x.split(C)` with C from x.shape, are read off the traced pieces)."""
    fn, param, _ = split_call(node)
    sizes = [len(t) for t in fn(torch.arange(d), param, 0)] if constant_sizes(node) else traced_sizes(node)
    ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
    return [(e - s, e) for s, e in zip(sizes, ends)]


def constant_sizes(node: fx.Node) -> bool:
    """Whether a split's sizes (or chunk count) are constants in the graph."""
    param = split_call(node)[1]
    return all(isinstance(v, int) for v in (param if isinstance(param, (list, tuple)) else [param]))


def traced_sizes(node: fx.Node) -> list[int] | None:
    """The sizes of a split's pieces as traced, when every piece is indexed (else None)."""
    dim = split_call(node)[2]
    traced = {_getitem_index(u, node): shape_of(u)[dim] for u in node.users if shape_of(u) is not None}
    return [traced[k] for k in range(len(traced))] if set(traced) == set(range(len(traced))) and traced else None


def _slice(node: fx.Node, rank: int):
    """(dim, start, stop, step) of a one-axis constant slice `x[..., a:b]` / aten.slice, else None."""
    if node.op == "call_function" and node.target == aten.slice.Tensor and not node.kwargs:
        given = list(node.args[1:])
        dim, start, stop, step = given + [0, None, None, 1][len(given):]
        ints = all(isinstance(v, (int, type(None))) for v in (start, stop, step))
        return (dim % rank, start, stop, step) if ints else None
    if node.op != "call_function" or node.target != operator.getitem or not isinstance(node.args[1], tuple):
        return None
    index = node.args[1]
    if index[:1] == (Ellipsis,):
        index, first = index[1:], rank - len(index) + 1
    else:
        first = 0
    if Ellipsis in index or not all(isinstance(i, slice) for i in index):
        return None
    cuts = [(first + k, i) for k, i in enumerate(index) if i != slice(None)]
    if len(cuts) != 1 or not all(isinstance(v, (int, type(None))) for v in (cuts[0][1].start, cuts[0][1].stop,
                                                                              cuts[0][1].step)):
        return None
    dim, s = cuts[0]
    return dim, s.start, s.stop, 1 if s.step is None else s.step


def _bound(v, default: int, d: int) -> int:
    v = default if v is None else v
    return min(max(v + d if v < 0 else v, 0), d)


def _getitem_index(node: fx.Node, parent: fx.Node):
    if node.op == "call_function" and node.target == operator.getitem and node.args[0] is parent \
            and isinstance(node.args[1], int):
        return node.args[1]
    return None


def split_outputs(readers: list[fx.Node], value: fx.Node, axis: int):
    """How `value` (units on `axis`) is split by its readers: [(output node, lo, hi)] (a glu is one
    output listed for both halves), or None when
    `value` is not split (its readers are then checked as consumers); Refusal when a split there cannot
    be followed."""
    shape = shape_of(value) or ()
    rank = len(shape)
    if not readers or not rank:
        return None
    d = shape[axis]
    if len(readers) == 1 and (call := split_call(readers[0])) is not None:
        split = readers[0]
        if call[2] % rank != axis % rank:
            return None
        sizes = call[1] if isinstance(call[1], (list, tuple)) else [call[1]]
        if not all(isinstance(v, int) for v in sizes):
            raise Refusal(f"the split `{split.name}` has sizes that are not constants")
        intervals = split_intervals(split, d)
        outputs = []
        for user in split.users:
            k = _getitem_index(user, split)
            if k is None:
                raise Refusal(f"the split `{split.name}` is read by `{user.name}`, which is not an indexing of one piece")
            if user.users:                          # a piece nothing reads is left as it is
                outputs.append((user, *intervals[k]))
        return sorted(outputs, key=lambda o: o[1])
    if len(readers) == 1 and readers[0].op == "call_function" and readers[0].target in GLU:
        glu = readers[0]
        dim = glu.args[1] if len(glu.args) > 1 else glu.kwargs.get("dim", -1)
        if dim % rank != axis % rank:
            return None
        return [(glu, 0, d // 2), (glu, d // 2, d)]
    slices = [(r, _slice(r, rank)) for r in readers]
    if not all(s is not None and s[0] == axis % rank for _, s in slices):
        return None
    for r, (_, _, _, step) in slices:
        if step != 1:
            raise Refusal(f"the slice `{r.name}` has a step ({step}); only contiguous slices of the units are followed")
    outputs = sorted(((r, _bound(s[1], 0, d), _bound(s[2], d, d)) for r, s in slices), key=lambda o: o[1:])
    for (a, _, hi), (b, lo, _) in zip(outputs, outputs[1:]):
        if lo < hi:
            raise Refusal(f"the slices `{a.name}` and `{b.name}` overlap (a unit read by two pieces is not followed)")
    return outputs


def find(ctx: Context, value: fx.Node, axis: int):
    """The pieces [(output node, lo, hi)] `value` is split into along the units' `axis`, or None when it is
    not split; Refusal when a split there cannot be followed (`split_outputs`)."""
    return split_outputs(readers_of(value), value, axis)


def rewrite(gm: fx.GraphModule, folded: list[tuple[Site, list[int]]]) -> None:
    """Every split whose pieces lost units takes its new sizes or bounds, in place. The pieces of one
    split are several sites: their losses are summed per piece first."""
    lost: dict[str, int] = {}                 # split piece node -> units it no longer carries
    for site, kept in folded:
        removed = sorted(set(range(site.n_units)) - set(kept))
        for piece in site.splits:
            lost[piece.module] = lost.get(piece.module, 0) + len(piece.rows_of(removed))
    rewrite_splits(gm, {piece: n for piece, n in lost.items() if n})


def rewrite_splits(gm: fx.GraphModule, removed: dict[str, int]) -> None:
    """Give every split whose pieces lost units (removed: piece node -> units it no longer carries)
    its new sizes or bounds, in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    done = set()
    for name in removed:
        piece = nodes[name]
        parent = piece.args[0]
        if parent in done:
            continue
        done.add(parent)
        if split_call(parent) is not None:
            _resize_split(parent, removed)
        else:
            _move_slices(parent, removed)


def _resize_split(split: fx.Node, removed: dict[str, int]) -> None:
    """split / chunk / tensor_split -> a split with the sizes left (torch.split, Tensor.split or
    aten.split_with_sizes: the same spelling family as before)."""
    x = split.args[0]
    _, _, dim = split_call(split)
    lost = {_getitem_index(u, split): removed.get(u.name, 0) for u in split.users}
    sizes = [hi - lo - lost.get(k, 0) for k, (lo, hi) in enumerate(split_intervals(split, shape_of(x)[dim]))]
    if split.op == "call_method":
        split.target, split.args, split.kwargs = "split", (x, sizes), {"dim": dim}
    elif isinstance(split.target, torch._ops.OpOverload):
        split.target, split.args, split.kwargs = aten.split_with_sizes.default, (x, sizes, dim), {}
    else:
        split.target, split.args, split.kwargs = torch.split, (x, sizes), {"dim": dim}


def _move_slices(x: fx.Node, removed: dict[str, int]) -> None:
    """Every slice of x moves down by the units removed before it and shrinks by its own."""
    rank = len(shape_of(x) or ())
    slices = [(s, _slice(s, rank)) for s in x.users if _slice(s, rank) is not None]
    d = shape_of(x)[slices[0][1][0]]
    spans = [(s, _bound(a, 0, d), _bound(b, d, d)) for s, (_, a, b, _) in slices]
    for s, lo, hi in spans:
        before = sum(removed.get(t.name, 0) for t, _, t_hi in spans if t_hi <= lo)
        start, stop = lo - before, hi - before - removed.get(s.name, 0)
        dim = slices[0][1][0]
        if s.target == aten.slice.Tensor:
            s.args = (x, dim, start, stop)
        else:
            index = list(s.args[1])
            k = next(i for i, v in enumerate(index) if isinstance(v, slice) and v != slice(None))
            index[k] = slice(start, stop)
            s.args = (x, tuple(index))
