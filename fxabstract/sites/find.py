"""Find sites: graph values whose units can be replaced and folded away (docs/math.md §1).

A site is the output of one or more *producers* (layers whose output features or channels are the
units: Linear, Conv1d/2d), followed by a chain of per-unit ops, read only by affine *consumers*.

- Per-unit ops act on each unit separately: activations, dropout, arithmetic with constants,
  pooling, and per-channel layers whose channel j is deleted with the unit (BatchNorm, depthwise
  convolutions, per-channel PReLU). A `cat` along the unit axis joins several producers' units
  into one site (SqueezeNet's fire modules, DenseNet-style blocks): each unit belongs to exactly
  one producer, at an offset. A product `a * b` of two producers' paths is one site of gated units
  (SwiGLU's `up(x) * silu(gate(x))`): unit j is row j of both.
- A value split along the unit axis (split, chunk, tensor_split, constant slices; splits.py) is
  followed piece by piece: each piece is a site of its own, whose units are the producer rows it
  carries; GLU (`F.glu`, or `a, g = h.chunk(2); a * act(g)`) gives one site whose unit j is the
  pair of rows {j, d/2 + j}. Producers linked through splits are eligible together or not at all.
- Squeeze-and-excitation: `x * gate` with the gate [B, d, 1, 1] broadcast over x's positions is a
  product too (unit j: row j of x's producer and of the gate's, fc2), and x may then have one more
  reader, the squeeze (global pool or spatial mean, per-unit ops, read by affine fc1). The squeeze is a
  *branch* of the site (`Site.branches`, itself a producer-less Site): its units are the site's, and
  removing unit j also folds the branch's own replacement into fc1 and deletes fc1's column j. A gate
  Linear's [B, d] output viewed back to [B, d, 1, 1] is followed; a constant d in the view is rewritten.
- Consumers read the units affinely: a Linear on the last axis ("features"), a Conv with groups=1
  on the channel axis ("channels"), or a Linear after a flatten of a channel-axis site
  ("flattened": unit j is a block of features). Removing unit j deletes producer row j, every
  per-channel op's channel j and every consumer's column (block) j.

    >>> gm = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> annotate_shapes(gm, [torch.randn(2, 4)])
    >>> sites, ineligible = find_sites(gm)
    >>> sites[0].name, sites[0].node, sites[0].consumers, sites[0].n_units
    ('0', '_1', ['2'], 8)

Layer support is a table (`PRODUCERS`, `CONSUMERS`, `CHANNEL_OPS` in ops.py), Torch-Pruning style: a
new layer type is one entry there plus one in `passes/fold.py`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .layers import (CHANNEL_OPS, CONVS, ELEMENTWISE_FUNCTIONS, PRODUCERS, consumer_reads, excitation,
                     feeds_gate, gate_of, groups_of, is_cat, is_elementwise, is_per_unit, is_product, is_unsqueeze,
                     module_of, readers_of, shape_of, stateless, width_of, writer_of, zero_padded)
from .patterns import CLAIM, GRAPH, SITE, VALUE, stage
from .site import Context, Piece, Refusal, Site


# --------------------------------------------------------------------------- shapes

class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["fxa_shape"] = tuple(out.shape)
            n.meta["fxa_dtype"] = out.dtype
        return out


@torch.no_grad()
def annotate_shapes(gm: fx.GraphModule, inputs: list) -> None:
    """Run one batch through the graph and record every tensor value's shape in node.meta."""
    _ShapeRecorder(gm).run(*inputs)


# --------------------------------------------------------------------------- the finder

@dataclass
class _Path:
    """Graph nodes from a source (a producer's output, or a piece of a split value) to where following
    stops, and the source's units: layer rows, per-channel layers and split pieces, in source units."""

    nodes: list[fx.Node]
    axis: int
    pieces: list[Piece]
    channel_ops: list[Piece] = field(default_factory=list)
    splits: list[Piece] = field(default_factory=list)
    before: list[fx.Node] = field(default_factory=list)    # nodes between the producers and the source
    piece: str | None = None                                # the split piece this path starts at


def _follow(gm: fx.GraphModule, calls: Counter, start: fx.Node, axis: int) -> list[fx.Node]:
    """start, then each node that is the one reader of the last and keeps its units: per-unit, cat, product."""
    path = [start]
    while True:
        readers = readers_of(path[-1])
        if len(readers) > 1 and (region := _elementwise_join(gm, path[-1])):
            path += region                  # a per-unit function written out (GPT-2's gelu): one op
            continue
        if len(readers) == 2 and (excite := excitation(path[-1])) is not None:
            path.append(excite)             # an SE block: x * gate(squeeze(x)); the squeeze is a branch
            continue
        if len(readers) != 1:
            return path
        (user,) = readers
        if not ((is_per_unit(gm, user, path[-1], axis, shape_of(path[-1])[axis])
                 and (user.op != "call_module" or calls[user.target] == 1 or stateless(gm, user)))
                or is_cat(user, axis) or is_product(user) or gate_of(user) is not None
                or (axis == 1 and is_unsqueeze(user, path[-1]) and feeds_gate(user))):
            return path
        path.append(user)


def _elementwise_join(gm: fx.GraphModule, start: fx.Node, limit: int = 32) -> list[fx.Node] | None:
    """The nodes, in graph order, of a per-unit function of `start` written out as elementwise ops of
    several readers that meet again in one node (`0.5 * x * (1 + tanh(c * (x + a * x**3)))`), or None:
    every op reads only `start`, the region's values and scalars, at start's shape."""
    region, shape = [start], shape_of(start)
    node = start.next
    while len(region) <= limit and node.op != "output":
        inputs = node.all_input_nodes
        if any(a in region for a in inputs):
            elementwise = (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS) or (
                node.op == "call_module" and is_elementwise(gm, node, inputs[0]))
            if not elementwise or node.kwargs or shape_of(node) != shape or any(a not in region for a in inputs):
                return None
            region.append(node)
            if all(set(readers_of(n)) <= set(region) for n in region[:-1]):
                return region[1:]       # every value but the last is read inside the region only
        node = node.next
    return None


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], dict[str, str]]:
    """Every eligible site in graph order, and the reason each other producer is not one.

    Paths are followed from every producer; paths that meet (cat, product) end at one site; a value
    split along the unit axis starts one path per piece (splits.py). Producers connected this way
    form a region, which is eligible whole or not at all: a split's rows are deleted consistently.
    Needs `annotate_shapes` to have run (shapes decide the unit axis, flatten blocks and bias maps)."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    tied = tied_modules(gm)
    ctx = Context(gm, calls, tied)
    claimed_sites, claimed, ineligible = _claim(ctx)
    stream_sites, refused = [], {}
    for pattern in stage(GRAPH):                                           # residual streams
        found, reasons = pattern.find(ctx, lambda node, axis: _follow(gm, calls, node, axis),
                                      {q.module for s in claimed_sites for q in s.pieces})   # o_proj can write
        stream_sites += found
        refused.update(reasons)
    _stream_parts(gm, stream_sites)
    claimed |= {q.module for s in stream_sites for q in s.pieces}          # a stream's writers
    ineligible.update({m: reason for m, reason in refused.items() if m not in claimed})
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pending: dict[fx.Node, list[_Path]] = {}          # path end -> the paths that end there
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if mod is None or type(mod) not in PRODUCERS or node.target in claimed or node.target in ineligible:
            continue
        name = node.target
        d = width_of(PRODUCERS, mod)
        if d is None:                               # a depthwise conv: a per-channel op on a producer's path
            continue
        if calls[name] > 1:
            ineligible[name] = f"module is called {calls[name]} times (shared weights cannot be sliced for one call)"
            continue
        if name in tied:
            ineligible[name] = f"it shares a weight with `{tied[name]}` (tied weights cannot be sliced for one layer)"
            continue
        shape = shape_of(node)
        if shape is None:
            ineligible[name] = "its output shape is unknown (the layer did not run on the calibration batch)"
            continue
        axis = 1 if isinstance(mod, CONVS) else len(shape) - 1
        path = _Path(_follow(gm, calls, node, axis), axis, [Piece(name, 0, d)])
        pending.setdefault(path.nodes[-1], []).append(path)
    region: dict[str, str] = {}                       # union-find over producers

    def root(m: str) -> str:
        while region.setdefault(m, m) != m:
            m = region[m]
        return m
    built, failures = [], []
    while pending:
        end = min(pending, key=order.get)             # every path into `end` starts before it: all are here
        group = pending.pop(end)
        producers = sorted({q.module for p in group for q in p.pieces}, key=str)
        for m in producers[1:]:
            region[root(m)] = root(producers[0])
        try:                                          # one candidate: the value `end` and the paths into it
            merged = _merge(gm, order, group)
            outputs = _split(ctx, end, group[0].axis)
            if outputs:
                for path in _pieces(gm, calls, end, outputs, merged, group[0].axis):
                    pending.setdefault(path.nodes[-1], []).append(path)
            else:
                built.append(_build_site(ctx, end, merged, group[0].axis))
        except Refusal as refusal:
            piece = next((p.piece for p in group if p.piece), None)
            reason = refusal.reason
            failures.append((producers[0], reason if piece is None else f"its split piece `{piece}`: {reason}"))
    failed: dict[str, str] = {}
    for m, reason in failures:                        # the first failure in graph order names the region
        failed.setdefault(root(m), reason)
    for m in list(region):
        if root(m) in failed:
            ineligible[m] = failed[root(m)]
    sites = claimed_sites + stream_sites + [s for s in built if root(s.producer) not in failed]
    _name_pieces(sites)
    for s in sites:
        for k, b in enumerate(s.branches):
            b.name = f"{s.name}.branch{k}"
    position = {n.name: i for n, i in order.items()}
    sites.sort(key=lambda s: position[s.node])
    return sites, ineligible


def _claim(ctx: Context) -> tuple[list[Site], set[str], dict[str, str]]:
    """The sites that CLAIM patterns find whole (attention heads), before any path is followed; the
    module paths they claim (producers and consumers); and, for candidates refused, the reason per
    module named. A candidate that touches a tied or already claimed module is left to the paths."""
    sites, claimed, reasons = [], set(), {}
    for node in ctx.gm.graph.nodes:
        for pattern in stage(CLAIM):
            try:
                site = pattern.find(ctx, node)
            except Refusal as refusal:
                reasons.update({m: refusal.reason for m in refusal.modules if m not in claimed})
                continue
            if site is None:
                continue
            modules = {p.module for p in site.pieces} | set(site.consumers)
            if modules & (set(ctx.tied) | claimed):
                continue
            sites.append(site)
            claimed |= modules
    return sites, claimed, {m: r for m, r in reasons.items() if m not in claimed}


def _split(ctx: Context, end: fx.Node, axis: int):
    """The pieces [(output node, lo, hi)] the first VALUE pattern splits `end` into, or None."""
    for pattern in stage(VALUE):
        outputs = pattern.find(ctx, end, axis)
        if outputs is not None:
            return outputs
    return None


def _merge(gm: fx.GraphModule, order: dict, group: list[_Path]):
    """The units of every path of the group numbered in their common end value: (pieces, channel
    ops, split pieces, chain nodes); Refusal if they do not tile it."""
    end, axis = group[0].nodes[-1], group[0].axis
    if len({p.axis % len(shape_of(end)) for p in group}) > 1:
        raise Refusal(f"its units meet units on another axis at `{end.name}` (a Linear's features and a Conv's channels)")
    on_path = {n for p in group for n in p.nodes}
    offset: dict[fx.Node, int] = {end: 0}             # node -> the end's unit of its unit 0
    for path in group:
        off = 0
        for node, prev in zip(path.nodes[:0:-1], path.nodes[-2::-1]):
            if is_cat(node, axis):
                tensors = list(node.args[0])
                for t in tensors:
                    if t not in on_path:
                        raise Refusal(f"it is concatenated (`{node.name}`) with `{getattr(t, 'name', t)}`, "
                                "which is not the output of an eligible producer")
                off += sum(shape_of(t)[axis] for t in tensors[:tensors.index(prev)])
            elif is_product(node) or gate_of(node) is not None:
                other = next(a for a in node.all_input_nodes if a is not prev)
                if other not in on_path:
                    raise Refusal(f"it is gated (`{node.name}`) by `{other.name}`, which is not reached from a producer "
                            "(an SE gate must be a Linear or Conv's output through per-unit ops that nothing else reads)"
                            if gate_of(node) is not None else
                            f"it is multiplied (`{node.name}`) by `{other.name}`, which is not the output of an "
                            "eligible producer (gated units need both factors from producers)")
            offset[prev] = off
    pieces = [q.shifted(offset[p.nodes[0]]) for p in group for q in p.pieces]
    splits = [q.shifted(offset[p.nodes[0]]) for p in group for q in p.splits]
    nodes = sorted({n for p in group for n in p.nodes[1:]}, key=order.get)
    channel_ops = [q.shifted(offset[p.nodes[0]]) for p in group for q in p.channel_ops] + [
        Piece(n.target, offset[n], offset[n] + shape_of(n)[axis]) for n in nodes
        if n.op == "call_module" and width_of(CHANNEL_OPS, gm.get_submodule(n.target)) is not None]
    d = shape_of(end)[axis]
    covered = Counter(u for q in pieces for u in range(q.lo, q.hi))
    rows = Counter((q.module, r) for q in pieces for r in range(q.start, q.start + q.hi - q.lo))
    if set(covered) != set(range(d)) or max(rows.values()) > 1:
        raise Refusal("its producers' channels do not tile the site exactly once (a value concatenated twice?)")
    chain = sorted({n for p in group for n in p.before} | set(nodes) | {p.nodes[0] for p in group if p.piece},
                   key=order.get)
    return pieces, channel_ops, splits, chain


def _pieces(gm: fx.GraphModule, calls: Counter, end: fx.Node, outputs: list, merged, axis: int) -> list[_Path]:
    """One path per piece of the split value `end`: its units are an interval (two, for a GLU) of end's."""
    pieces, channel_ops, splits, chain = merged
    spans: dict[fx.Node, list[tuple[int, int]]] = {}
    for out, lo, hi in outputs:
        spans.setdefault(out, []).append((lo, hi))
    paths = []
    for out, cuts in spans.items():
        def cut(qs):
            return [r for q in qs for lo, hi in cuts if (r := q.restrict(lo, hi)) is not None]
        split = [out.args[0]] if out.args[0] is not end else []          # getitem: the split node before it
        own = [Piece(out.name, 0, cuts[0][1] - cuts[0][0])] if len(cuts) == 1 else []   # a GLU needs no rewrite
        paths.append(_Path(_follow(gm, calls, out, axis), axis, cut(pieces), cut(channel_ops), cut(splits) + own,
                           chain + split, out.name))
    return paths


def _name_pieces(sites: list[Site]) -> None:
    """Sites that share a first producer (the pieces of a split) are named `<producer>.piece<k>`, in
    the order of that producer's rows."""
    shared = Counter(s.name for s in sites)
    for name in [n for n, c in shared.items() if c > 1]:
        mine = sorted((s for s in sites if s.name == name), key=lambda s: s.pieces[0].start)
        for k, s in enumerate(mine):
            s.name = f"{name}.piece{k}"


def _build_site(ctx: Context, end: fx.Node, merged, axis: int) -> Site:
    """The Site of the value `end` whose units `merged` describes, with every SITE pattern's part
    (an SE squeeze's branches); Refusal if its readers or a pattern's part cannot be folded."""
    gm = ctx.gm
    pieces, channel_ops, splits, chain = merged
    shape = shape_of(end)
    d = shape[axis]
    reads = consumer_reads(gm, end, ctx.calls, d, axis, ctx.tied)
    first = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    pieces = sorted(pieces, key=lambda q: (q.lo, first[q.module], q.start))
    channel_ops = sorted(channel_ops, key=lambda q: (first[q.module], q.lo))
    site = Site(pieces[0].module, end.name, [n.name for n in chain], list(reads), d,
                axis=1 if axis == 1 else -1, shape=tuple(shape[1:]), pieces=pieces, channel_ops=channel_ops,
                reads=reads, bias_maps=[c for c in reads if zero_padded(gm.get_submodule(c))], splits=splits)
    site.parts, site.fit_parts = _parts(gm, site)
    for pattern in stage(SITE):
        site = pattern.find(ctx, site)
    return site


def _stream_parts(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Each stream point's parts (`_parts`); a stream's points take the largest, so they lose alike."""
    for s in sites:
        s.parts, s.fit_parts = _parts(gm, s, writers_alone=True)
    for s in sites:
        s.parts = math.lcm(*(t.parts for t in sites if t.tie == s.tie))


def _parts(gm: fx.GraphModule, site: Site, writers_alone: bool = False) -> tuple[int, int]:
    """(parts, fit_parts) of a site next to grouped convolutions. A grouped producer or consumer with g
    groups stays grouped only if every group loses as many channels: the units form `parts` equal blocks
    (the least common multiple of every such g), each losing the same number. A grouped consumer's
    group reads only its own channels, so a replaced unit's affine map may read only kept units of its
    block (`fit_parts`: the consumers' g's alone). Refusal where a grouped producer shares the site."""
    producer = math.lcm(*(groups_of(writer_of(gm, q.module)) for q in site.pieces))
    if producer > 1 and not writers_alone and (len(site.pieces) > 1 or site.pieces[0].total != site.n_units):
        raise Refusal(f"grouped convolution `{site.pieces[0].module}` (groups={producer}) shares the site with other "
                      "producers or split pieces: its channels could not go the same number from every group")
    fit = math.lcm(*(groups_of(gm.get_submodule(c)) for c in site.consumers))
    return math.lcm(producer, fit), fit


def tied_modules(gm: fx.GraphModule) -> dict[str, str]:
    """{module path: another module path} for modules that share a parameter object (tied weights)."""
    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    for path, module in gm.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            first = owners.setdefault(id(p), path)
            if first != path:
                tied.setdefault(path, first)
                tied.setdefault(first, path)
    return tied


