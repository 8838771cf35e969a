"""Residual streams: channels tied through a chain of `add`s, as sites (docs/math.md §6).

A stream h_0 = w_0(x), h_t = h_(t-1) + w_t(...) (per-unit ops such as a ReLU may follow each add) ties
channel c across every *writer* w_t (a producer whose path ends in an add: the stem, each block's last
conv or linear, shortcut projections) and every *reader* of every value of the chain (each block's
first layer, shortcut projections, the head). Each value with readers besides the chain's adds is a
*point*. Removing channel c removes row c of every writer and the replacement folds into every point's
readers: do(h_t[c] := beta_t + theta_t h_t[K]) at every point t at once, each point with its own
statistics. Every point is a Site of its own (its writers, the ones whose add makes it, are its
pieces), and all points of a stream carry the stream's name in `Site.tie`: selection and the budget
treat them as one unit set, so every point keeps the same channels.

A point may be read by a LayerNorm or RMSNorm over its channels whose readers are Linears (a pre-norm
transformer): `Site.norms` lists them and passes/norms.py compiles them exactly; their readers may
read some positions only (a ViT's head, `norm(x)[:, 0]`). Embeddings are writers too (a table's columns
are its units), and so are Parameters whose last axis is the channels (a ViT's position embedding, its
class token through `expand(B, -1, -1)`: the Parameter's slice along that axis). A conv writer
followed by `flatten(2).transpose(1, 2)` (a patch embedding) has its channels on the last axis, and a
`cat` along another axis than the units' joins writers into one value (class token and patches). Reading a size of a point or of its normaliser's output
reads no value: other axes' sizes do not change, and a read of the units axis' size (GPT-2's
`B, T, C = x.shape`, C sizing the qkv split and the heads' views) becomes the original width d, a
constant, in the compiled graph (`Site.unit_sizes`, `rewrite`). A stream whose values are read by
anything else but affine layers and its own adds (the model output, a concat, a normaliser read by a
non-Linear, a shape used whole with the units axis inside) is refused with the reason, and its writers
with it.

    >>> [s.name for s in sites if s.tie]     # ['stem.stream.0', 'stem.stream.1', ...]
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from torch import nn

from .layers import (CAT_FUNCTIONS, CHANNEL_OPS, CONVS, FLATTEN_FUNCTIONS, WRITERS, consumer_reads, is_cat,
                     is_metadata, module_of, parameter_of, readers_of, shape_of, size_reads, stream_norm, whole_shape,
                     width_of, zero_padded)
from .site import Context, Piece, Refusal, Site

aten = torch.ops.aten
ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}


def is_residual_add(node: fx.Node) -> bool:
    """a + b of two graph values of the add's own shape (no alpha, no broadcasting)."""
    if not ((node.op == "call_function" and node.target in ADDS)
            or (node.op == "call_method" and node.target == "add")):
        return False
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    a, b = node.args
    sa, sb, sn = shape_of(a), shape_of(b), shape_of(node)
    if a is b or sa is None or sb is None or sn is None:
        return False
    return sa == sb == sn or (sa == sn and _suffix(sb, sn)) or (sb == sn and _suffix(sa, sn))


def _suffix(s: tuple, full: tuple) -> bool:
    """`s` broadcasts along the leading axes of `full` alone (a position embedding [T, d] or [1, T, d]
    added to [B, T, d])."""
    lead = 0
    while lead < len(s) - 2 and s[lead] == 1:
        lead += 1
    s = tuple(s[lead:])
    return 2 <= len(s) < len(full) and tuple(full[-len(s):]) == s


def rewrite(gm: fx.GraphModule, folded) -> None:
    """The adds of a stream add the writers' kept rows, which are the same channels: nothing to rewrite
    there. Each read of the units axis' size at a point or its normaliser's output (`Site.unit_sizes`)
    becomes the original width, a constant: what it sizes (GPT-2's `B, T, C = x.shape` sizing the qkv
    split, the heads' views, `C // heads`) still has every channel."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for site, _ in folded:
        for name in site.unit_sizes:
            if name in nodes:
                _to_constant(gm, nodes.pop(name), site.n_units)


def _to_constant(gm: fx.GraphModule, node: fx.Node, value: int) -> None:
    """Every use of `node` reads the int `value` instead; node goes, and the shape read it indexed
    (`x.shape`, `x.size()`) too once nothing else reads it."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
    shape = node.args[0] if whole_shape(node.args[0]) else None
    gm.graph.erase_node(node)
    if shape is not None and not shape.users:
        gm.graph.erase_node(shape)


def find(ctx: Context, follow: Callable, claimed: set[str]) -> tuple[list[Site], dict[str, str]]:
    """Every residual stream's point sites, and {writer: reason} for the streams refused.

    follow(node, axis) -> the path of single-reader per-unit ops from node (find.py's `_follow`)."""
    gm = ctx.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    writers: dict[fx.Node, list[tuple[str, list[fx.Node]]]] = {}      # path end -> (producer, path)
    for node in gm.graph.nodes:
        path = _layer_path(ctx, node, follow, claimed) or _parameter_path(ctx, node, follow)
        if path is not None:
            writers.setdefault(path[-1], []).append((node.target, path))
    joined = _join(gm, writers, follow)
    adds = [n for n in gm.graph.nodes if is_residual_add(n)]
    value = {}                                   # add -> the value after it and its per-unit ops
    for a in adds:
        axis = _axis(gm, a, writers)
        value[a] = (follow(a, axis), axis)
    ends = {path[-1]: a for a, (path, _) in value.items()}
    parent = {a: a for a in adds}

    def root(a):
        while parent[a] is not a:
            a = parent[a]
        return a
    for a in adds:                               # adds joined through their operands form one stream
        for x in a.args:
            if x in ends:
                parent[root(ends[x])] = root(a)
    streams: dict[fx.Node, list[fx.Node]] = {}
    for a in adds:
        streams.setdefault(root(a), []).append(a)
    sites, refused = [], {}
    for members in streams.values():
        members.sort(key=order.get)
        mine = {x for a in members for x in a.args if x in writers}
        names = [w for x in sorted(mine, key=order.get) for w, _ in writers[x]]
        try:
            sites += _stream_sites(ctx, members, value, ends, writers, joined, order)
        except Refusal as refusal:
            refused.update({w: f"residual stream: {refusal.reason}" for w in names})
    return sites, refused


def _layer_path(ctx: Context, node: fx.Node, follow: Callable, claimed: set[str]) -> list[fx.Node] | None:
    """A layer writer's path: its output and the per-unit ops after it. A conv's goes on through
    `flatten(2).transpose(1, 2)` (a ViT's patch embedding: the channels move to the last axis)."""
    gm, mod = ctx.gm, module_of(ctx.gm, node)
    if (mod is None or type(mod) not in WRITERS or width_of(WRITERS, mod) is None or node.target in claimed
            or ctx.calls[node.target] > 1 or node.target in ctx.tied or shape_of(node) is None):
        return None
    if not isinstance(mod, CONVS):
        return follow(node, len(shape_of(node)) - 1)
    path = follow(node, 1)
    moved = _channels_last(path[-1])
    return path if moved is None else path + [moved[0]] + follow(moved[1], 2)


def _channels_last(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(flatten, transpose) if `node` [B, C, H, W] is read only by `flatten(2)`, read only by
    `transpose(1, 2)`: [B, H W, C], the channels on the last axis."""
    users = readers_of(node)
    if len(users) != 1 or len(shape_of(node) or ()) != 4:
        return None
    flat = users[0]
    start = flat.args[1] if len(flat.args) > 1 else flat.kwargs.get("start_dim")
    if not (((flat.op == "call_method" and flat.target == "flatten") or (
            flat.op == "call_function" and flat.target in FLATTEN_FUNCTIONS)) and start == 2
            and flat.args[2:] in ((), (-1,), (3,)) and len(readers_of(flat)) == 1):
        return None
    t = readers_of(flat)[0]
    swaps = t.op == "call_method" and t.target == "transpose" or (
        t.op == "call_function" and t.target in (torch.transpose, aten.transpose.int))
    return (flat, t) if swaps and sorted(a % 3 for a in t.args[1:]) == [1, 2] and not t.kwargs else None


def _parameter_path(ctx: Context, node: fx.Node, follow: Callable) -> list[fx.Node] | None:
    """A Parameter writer's path (a ViT's position embedding, its class token), its units on its last
    axis: the get_attr, an `expand` that keeps that axis (`cls.expand(B, -1, -1)`), then per-unit ops.
    A Parameter read twice or shared with another module is none."""
    gm, p = ctx.gm, parameter_of(ctx.gm, node)
    shape = shape_of(node)
    if p is None or shape is None or len(shape) < 2 or _shared(gm, node):
        return None
    path = [node]
    if len(readers_of(node)) == 1 and _expands(readers_of(node)[0], node):
        path.append(readers_of(node)[0])
    return path + follow(path[-1], len(shape_of(path[-1])) - 1)[1:]


def _shared(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the Parameter `node` reads is read elsewhere in the graph or is another module's too."""
    p = gm.get_parameter(node.target)
    names = [n for n, q in gm.named_parameters(remove_duplicate=False) if q is p]
    return len(names) > 1 or sum(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes) > 1


def _expands(node: fx.Node, source: fx.Node) -> bool:
    """`source.expand(..., -1)` (aten.expand): broadcast along other axes, the last one kept as it is."""
    if node.args[:1] != (source,) or node.kwargs:
        return False
    if node.op == "call_method" and node.target == "expand":
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    elif node.op == "call_function" and node.target == aten.expand.default:
        sizes = list(node.args[1])
    else:
        return False
    return len(sizes) == len(shape_of(source)) and sizes[-1] == -1 and all(isinstance(v, (int, fx.Node)) for v in sizes)


def _join(gm: fx.GraphModule, writers: dict, follow: Callable) -> set[fx.Node]:
    """Writers concatenated along an axis other than the units' (a ViT's class token and patch
    embedding, `cat([cls.expand(B, -1, -1), patches], 1)`) write one value: their entries move to the
    end of the cat's path. Returns those ends. Each input must be a writer's path end that only the
    cat reads (size reads of other axes aside)."""
    joined, order = set(), {n: i for i, n in enumerate(gm.graph.nodes)}
    for cat in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CAT_FUNCTIONS]:
        parts = list(cat.args[0]) if cat.args and isinstance(cat.args[0], (list, tuple)) else []
        if not parts or len(set(parts)) < len(parts) or not all(p in writers for p in parts):
            continue
        axes = {_units_axis(gm, path) for p in parts for _, path in writers[p]}
        axis = next(iter(axes))
        if len(axes) > 1 or is_cat(cat, axis) or not all(_only_read_by(p, cat, axis) for p in parts):
            continue
        path = follow(cat, axis)
        entries = [(w, own + path) for p in parts for w, own in writers.pop(p)]
        writers[path[-1]] = sorted(entries, key=lambda e: order[e[1][0]])      # in graph order: the leader first
        joined.add(path[-1])
    return joined


def _only_read_by(node: fx.Node, reader: fx.Node, axis: int) -> bool:
    """Whether `reader` is node's one reader besides reads of other axes' sizes."""
    try:
        sizes, units = _sizes(node, axis)
    except Refusal:
        return False
    return not units and [r for r in readers_of(node) if r not in sizes] == [reader]


def _units_axis(gm: fx.GraphModule, path: list[fx.Node]) -> int:
    """The units' axis at the end of a writer's path: a conv's channels (1) unless moved to the last axis."""
    moved = any(_channels_last(n) is not None for n in path)
    return 1 if isinstance(module_of(gm, path[0]), CONVS) and not moved else len(shape_of(path[-1])) - 1


def _axis(gm: fx.GraphModule, a: fx.Node, writers: dict) -> int:
    """The units' axis at add `a`: channels (1) when a convolution writes into it, else the last."""
    rank = len(shape_of(a))
    for x in a.args:
        for _, path in writers.get(x, []):
            return _units_axis(gm, path)
    return 1 if rank == 4 else rank - 1


def _stream_sites(ctx: Context, members: list[fx.Node], value: dict, ends: dict, writers: dict, joined: set,
                  order: dict) -> list[Site]:
    """The point sites of one stream (adds `members`, in graph order); Refusal if it cannot be folded."""
    gm = ctx.gm
    inside = set(members)
    axis = value[members[0]][1]
    d = shape_of(members[0])[axis]
    owned: dict[fx.Node, list[tuple[str, list[fx.Node]]]] = {}      # point -> the writers whose add makes it
    points: list[fx.Node] = []
    for a in members:
        path, _ = value[a]
        if any(n.op == "call_module" and width_of(CHANNEL_OPS, gm.get_submodule(n.target)) is not None
               for n in path[1:]):
            raise Refusal(f"a per-channel layer follows the residual add `{a.name}` (it would be sliced for "
                          "every writer)")
        for x in a.args:
            if x in ends:
                continue
            if x not in writers:
                raise Refusal(_not_written(x, a, writers))
            if len(writers[x]) > 1 and x not in joined:
                raise Refusal(f"`{x.name}` joins several layers before the residual add `{a.name}`")
            if [r for r in readers_of(x) if r not in inside]:   # a writer's value read by more than the add
                points.append(x)                                   # (the stem's): a point itself
                owned.setdefault(x, []).extend(writers[x])
            else:
                owned.setdefault(path[-1], []).extend(writers[x])
        end = path[-1]
        if [r for r in readers_of(end) if r not in inside]:
            points.append(end)
        elif end not in {x for m in members for x in m.args}:
            raise Refusal(f"the stream's last value `{end.name}` is never read")
    points = sorted(set(points), key=order.get)
    nxt = {x: m for m in members for x in m.args}
    for v in [v for v in list(owned) if v not in points]:      # a value only the next add reads: its writers
        w = v                                                    # belong to the next point downstream
        while w not in points:
            if w not in nxt:
                raise Refusal(f"the stream's value `{w.name}` is never read")
            w = value[nxt[w]][0][-1]
        owned.setdefault(w, []).extend(owned.pop(v))
    for p in points:
        if p.op == "output" or any(r.op == "output" for r in readers_of(p)):
            raise Refusal("it is read by the model output (no consumer to fold into)")
    leader = next(w for p in points for w, _ in owned.get(p, []))
    tie = f"{leader}.stream"
    sites = []
    for k, p in enumerate(points):
        owned.setdefault(p, [])
        norms = _norms(ctx, p, d, axis, inside)
        sizes, unit_sizes = _sizes(p, axis)
        skip = inside | set(norms) | sizes
        others = [r for r in readers_of(p) if r not in skip]
        reads = consumer_reads(gm, p, ctx.calls, d, axis, ctx.tied, ignore=skip) if others else {}
        reads.update({n.target: "features" for n in norms})
        pieces, channel_ops, chain = [], [], []
        for w, path in owned[p]:
            pieces.append(Piece(w, 0, d))
            channel_ops += [Piece(n.target, 0, d) for n in path[1:] if n.op == "call_module"
                            and width_of(CHANNEL_OPS, gm.get_submodule(n.target)) is not None]
            chain += [n.name for n in path[1:]]
        if not pieces:
            raise Refusal(f"its value `{p.name}` is the sum of two streams (no layer writes it alone)")
        sites.append(Site(f"{tie}.{k}", p.name, chain, list(reads), d, axis=1 if axis == 1 else -1,
                          shape=tuple(shape_of(p)[1:]), pieces=pieces, channel_ops=channel_ops, reads=reads,
                          bias_maps=[c for c in reads if c not in {n.target for n in norms}
                                     and zero_padded(gm.get_submodule(c))],
                          tie=tie, norms={n.target: rs for n, rs in norms.items()},
                          unit_sizes=unit_sizes + [u for n in norms for u in _sizes(n, axis)[1]]))
    return sites


def _not_written(x: fx.Node, a: fx.Node, writers: dict) -> str:
    """Why `x`, an input of the residual add `a`, has no writer; for a cat, the first input that is none."""
    parts = list(x.args[0]) if x.op == "call_function" and x.target in CAT_FUNCTIONS else []
    bad = next((p for p in parts if p not in writers), None)
    if bad is not None:
        return (f"`{x.name}`, an input of the residual add `{a.name}`, concatenates `{bad.name}`, which is not a "
                "writer (a layer's output, or a Parameter's with `expand(..., -1)`, through per-unit ops)")
    if parts:
        return (f"`{x.name}`, an input of the residual add `{a.name}`, concatenates writers along their units' "
                "axis, or one of them is read by something else too")
    return (f"`{x.name}`, an input of the residual add `{a.name}`, is neither a layer's output through per-unit "
            "ops nor another add of the stream")


def _norms(ctx: Context, p: fx.Node, d: int, axis: int, inside: set) -> dict[fx.Node, list[str]]:
    """{normaliser node: its Linear readers} for the LayerNorms and RMSNorms over the d channels that read
    point `p` (passes/norms.py compiles them for the kept channels); Refusal if one cannot be."""
    gm, out = ctx.gm, {}
    for r in readers_of(p):
        if r in inside or r.op != "call_module" or not stream_norm(gm.get_submodule(r.target), d):
            continue
        if axis != len(shape_of(p)) - 1:
            raise Refusal(f"normaliser `{r.target}` reads the stream over an axis that is not its channels'")
        if ctx.calls[r.target] > 1:
            raise Refusal(f"normaliser `{r.target}` is called {ctx.calls[r.target]} times (shared weights)")
        if r.target in ctx.tied:
            raise Refusal(f"normaliser `{r.target}` shares a weight with `{ctx.tied[r.target]}` (tied weights)")
        try:
            reads = consumer_reads(gm, r, ctx.calls, d, axis, ctx.tied, ignore=_sizes(r, axis)[0], positions=True)
        except Refusal as refusal:
            raise Refusal(f"normaliser `{r.target}`: {refusal.reason}") from None
        for c, how in reads.items():
            if how != "features" or not isinstance(gm.get_submodule(c), nn.Linear):
                raise Refusal(f"normaliser `{r.target}` is read by `{c}`, not a Linear over its features")
        out[r] = list(reads)
    return out


def _sizes(node: fx.Node, axis: int) -> tuple[set[fx.Node], list[str]]:
    """(the readers of `node` that read only its sizes, dtype or device; the nodes among them whose value
    is the units axis' size). Removing units changes no other axis' size (an attention block's
    `x.size(1)`), and `rewrite` makes the units axis' size the original width."""
    rank = len(shape_of(node))
    readers, units = set(), []
    for r in node.users:
        if whole_shape(r):
            readers.add(r)
            units += _shape_reads(r, node, rank, axis)
            continue
        reads = size_reads(r)
        if is_metadata(r) or reads is not None:
            readers.add(r)
            units += [n.name for dim, n in reads or () if dim % rank == axis % rank]
    return readers, units


def _shape_reads(shape: fx.Node, node: fx.Node, rank: int, axis: int) -> list[str]:
    """The indexings of `shape` (node's `x.shape` or `x.size()`) that give the units axis' size; Refusal
    where the units axis' size stays in a tuple (`x.shape[1:]`, `x.view(x.shape)`): no int to rewrite."""
    units = []
    for u in shape.users:
        index = u.args[1] if u.op == "call_function" and u.target is operator.getitem else None
        if isinstance(index, int):
            units += [u.name] if index % rank == axis % rank else []
        elif not (isinstance(index, slice) and axis % rank not in range(rank)[index]):
            raise Refusal(f"`{shape.name}` reads the shape of `{node.name}` and `{u.name}` uses it with the units "
                          "axis' size inside (not one axis' size alone): it could not be rewritten to the original "
                          "width")
    return units
