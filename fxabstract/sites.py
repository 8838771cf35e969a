"""Find sites: graph values whose units can be replaced and folded away (THEORY §1).

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

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .ops import (CHANNEL_OPS, CONSUMERS, CONVS, ELEMENTWISE_FUNCTIONS, PRODUCERS, _module, _readers, _shape,
                  _width, excitation, feeds_gate, gate_of, is_cat, is_elementwise, is_flatten, is_identity,
                  is_per_unit, is_product, is_unsqueeze)
from .splits import split_outputs


@dataclass
class Piece:
    """A layer's share of a site's units: units [lo, hi) are its output rows (channels) start ..
    start + hi - lo, out of `rows` (0: hi - lo, the whole layer). A split value's pieces take part of
    a layer's rows; a gated unit (GLU) takes one row from each half."""

    module: str
    lo: int
    hi: int
    start: int = 0
    rows: int = 0

    @property
    def total(self) -> int:
        """The layer's rows (channels) in all."""
        return self.rows or self.hi - self.lo

    def rows_of(self, units) -> list[int]:
        """The layer's rows for those of `units` that fall in this piece."""
        return [self.start + u - self.lo for u in units if self.lo <= u < self.hi]

    def restrict(self, lo: int, hi: int) -> Piece | None:
        """This piece's part of units [lo, hi), numbered from lo (the units of a piece of a split)."""
        a, b = max(self.lo, lo), min(self.hi, hi)
        return Piece(self.module, a - lo, b - lo, self.start + a - self.lo, self.total) if a < b else None

    def shifted(self, offset: int) -> Piece:
        return Piece(self.module, self.lo + offset, self.hi + offset, self.start, self.rows)


@dataclass
class SharedPiece(Piece):
    """A k or v layer's share of a grouped-query head site: units [lo, hi) are `share` query heads of
    `block` units each, and unit lo + i + k block reads row start + i for every k; a row is deleted once
    every unit that reads it is removed (the k/v head once all its query heads are)."""

    share: int = 1
    block: int = 1

    def rows_of(self, units) -> list[int]:
        units = set(units)
        return [self.start + i for i in range(self.block)
                if all(u in units for u in range(self.lo + i, self.hi, self.block))]


@dataclass
class Site:
    """One site: the value read by `consumers`, produced by `producers` through `chain`."""

    name: str                 # stable name: the first producer's module path (+ `.piece<k>`: a split's pieces)
    node: str                 # graph node whose value is the site (read by the consumers)
    chain: list[str]          # graph nodes of the per-unit ops between the producers and the site
    consumers: list[str]      # module paths of the affine layers that read the site
    n_units: int
    axis: int = -1            # the units' axis in the site value: -1 (features) or 1 (channels)
    shape: tuple = ()         # the site value's shape without the batch axis (traced input size)
    pieces: list[Piece] = field(default_factory=list)          # producers and their unit ranges
    channel_ops: list[Piece] = field(default_factory=list)     # per-channel layers and their unit ranges
    reads: dict[str, str] = field(default_factory=dict)        # consumer -> features | channels | flattened
    bias_maps: list[str] = field(default_factory=list)         # zero-padded conv consumers: spatial bias maps
    group: int = 1            # units are removed in groups of this many (an attention head's width)
    head_shapes: dict = field(default_factory=dict)            # view node -> (head axis, positions per head)
    splits: list[Piece] = field(default_factory=list)          # split pieces (graph nodes) and the units each carries
    branches: list[Site] = field(default_factory=list)         # second readings of the units (an SE squeeze)
    unit_views: list[str] = field(default_factory=list)        # gate views [B, d] -> [B, d, 1, 1] (fold writes d)
    kv_shapes: dict = field(default_factory=dict)              # GQA: k/v view node -> (kv head axis, 1)
    repeats: list = field(default_factory=list)                # GQA: (kv value, repeated value) node names (gqa.py)

    @property
    def producer(self) -> str:
        return self.pieces[0].module


# --------------------------------------------------------------------------- shapes

class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["fxa_shape"] = tuple(out.shape)
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
        readers = _readers(path[-1])
        if len(readers) > 1 and (region := _elementwise_join(gm, path[-1])):
            path += region                  # a per-unit function written out (GPT-2's gelu): one op
            continue
        if len(readers) == 2 and (excite := excitation(path[-1])) is not None:
            path.append(excite)             # an SE block: x * gate(squeeze(x)); the squeeze is a branch
            continue
        if len(readers) != 1:
            return path
        (user,) = readers
        if not ((is_per_unit(gm, user, path[-1], axis, _shape(path[-1])[axis])
                 and (user.op != "call_module" or calls[user.target] == 1 or _stateless(gm, user)))
                or is_cat(user, axis) or is_product(user) or gate_of(user) is not None
                or (axis == 1 and is_unsqueeze(user, path[-1]) and feeds_gate(user))):
            return path
        path.append(user)


def _elementwise_join(gm: fx.GraphModule, start: fx.Node, limit: int = 32) -> list[fx.Node] | None:
    """The nodes, in graph order, of a per-unit function of `start` written out as elementwise ops of
    several readers that meet again in one node (`0.5 * x * (1 + tanh(c * (x + a * x**3)))`), or None:
    every op reads only `start`, the region's values and scalars, at start's shape."""
    region, shape = [start], _shape(start)
    node = start.next
    while len(region) <= limit and node.op != "output":
        inputs = node.all_input_nodes
        if any(a in region for a in inputs):
            elementwise = (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS) or (
                node.op == "call_module" and is_elementwise(gm, node, inputs[0]))
            if not elementwise or node.kwargs or _shape(node) != shape or any(a not in region for a in inputs):
                return None
            region.append(node)
            if all(set(_readers(n)) <= set(region) for n in region[:-1]):
                return region[1:]       # every value but the last is read inside the region only
        node = node.next
    return None


def _stateless(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A module without parameters or buffers (an activation, a pooling): calling it more than once
    (`self.act(a)`, `self.act(b)`) shares nothing that a fold would slice."""
    mod = gm.get_submodule(node.target)
    return next(mod.parameters(), None) is None and next(mod.buffers(), None) is None


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], dict[str, str]]:
    """Every eligible site in graph order, and the reason each other producer is not one.

    Paths are followed from every producer; paths that meet (cat, product) end at one site; a value
    split along the unit axis starts one path per piece (splits.py). Producers connected this way
    form a region, which is eligible whole or not at all: a split's rows are deleted consistently.
    Needs `annotate_shapes` to have run (shapes decide the unit axis, flatten blocks and bias maps)."""
    from .heads import find_head_sites  # heads.py builds on this module's Site

    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    tied = tied_modules(gm)
    head_sites, claimed, ineligible = find_head_sites(gm, calls, set(tied))   # ineligible: unmatched attention
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pending: dict[fx.Node, list[_Path]] = {}          # path end -> the paths that end there
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if mod is None or type(mod) not in PRODUCERS or node.target in claimed or node.target in ineligible:
            continue
        name = node.target
        d = _width(PRODUCERS, mod)
        if d is None:
            if _width(CHANNEL_OPS, mod) is None:
                ineligible[name] = (f"grouped convolution (groups={mod.groups}): its output channels could go "
                                    "only the same number from every group, which fxabstract does not do yet")
            continue
        if calls[name] > 1:
            ineligible[name] = f"module is called {calls[name]} times (shared weights cannot be sliced for one call)"
            continue
        if name in tied:
            ineligible[name] = f"it shares a weight with `{tied[name]}` (tied weights cannot be sliced for one layer)"
            continue
        shape = _shape(node)
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
        merged = _merge(gm, order, group)
        outputs = None if isinstance(merged, str) else split_outputs(_readers(end), end, group[0].axis)
        reason = merged if isinstance(merged, str) else outputs if isinstance(outputs, str) else None
        if reason is None and outputs:
            for path in _pieces(gm, calls, end, outputs, merged, group[0].axis):
                pending.setdefault(path.nodes[-1], []).append(path)
        elif reason is None:
            site, reason = _build_site(gm, calls, tied, end, merged, group[0].axis)
            built.append(site)
        if reason:
            piece = next((p.piece for p in group if p.piece), None)
            failures.append((producers[0], reason if piece is None else f"its split piece `{piece}`: {reason}"))
    failed: dict[str, str] = {}
    for m, reason in failures:                        # the first failure in graph order names the region
        failed.setdefault(root(m), reason)
    for m in list(region):
        if root(m) in failed:
            ineligible[m] = failed[root(m)]
    sites = head_sites + [s for s in built if s is not None and root(s.producer) not in failed]
    _name_pieces(sites)
    for s in sites:
        for k, b in enumerate(s.branches):
            b.name = f"{s.name}.branch{k}"
    position = {n.name: i for n, i in order.items()}
    sites.sort(key=lambda s: position[s.node])
    return sites, ineligible


def _merge(gm: fx.GraphModule, order: dict, group: list[_Path]):
    """The units of every path of the group numbered in their common end value: (pieces, channel
    ops, split pieces, chain nodes), or why they do not tile it."""
    end, axis = group[0].nodes[-1], group[0].axis
    if len({p.axis % len(_shape(end)) for p in group}) > 1:
        return f"its units meet units on another axis at `{end.name}` (a Linear's features and a Conv's channels)"
    on_path = {n for p in group for n in p.nodes}
    offset: dict[fx.Node, int] = {end: 0}             # node -> the end's unit of its unit 0
    for path in group:
        off = 0
        for node, prev in zip(path.nodes[:0:-1], path.nodes[-2::-1]):
            if is_cat(node, axis):
                tensors = list(node.args[0])
                for t in tensors:
                    if t not in on_path:
                        return (f"it is concatenated (`{node.name}`) with `{getattr(t, 'name', t)}`, "
                                "which is not the output of an eligible producer")
                off += sum(_shape(t)[axis] for t in tensors[:tensors.index(prev)])
            elif is_product(node) or gate_of(node) is not None:
                other = next(a for a in node.all_input_nodes if a is not prev)
                if other not in on_path:
                    return (f"it is gated (`{node.name}`) by `{other.name}`, which is not reached from a producer "
                            "(an SE gate must be a Linear or Conv's output through per-unit ops that nothing else reads)"
                            if gate_of(node) is not None else
                            f"it is multiplied (`{node.name}`) by `{other.name}`, which is not the output of an "
                            "eligible producer (gated units need both factors from producers)")
            offset[prev] = off
    pieces = [q.shifted(offset[p.nodes[0]]) for p in group for q in p.pieces]
    splits = [q.shifted(offset[p.nodes[0]]) for p in group for q in p.splits]
    nodes = sorted({n for p in group for n in p.nodes[1:]}, key=order.get)
    channel_ops = [q.shifted(offset[p.nodes[0]]) for p in group for q in p.channel_ops] + [
        Piece(n.target, offset[n], offset[n] + _shape(n)[axis]) for n in nodes
        if n.op == "call_module" and _width(CHANNEL_OPS, gm.get_submodule(n.target)) is not None]
    d = _shape(end)[axis]
    covered = Counter(u for q in pieces for u in range(q.lo, q.hi))
    rows = Counter((q.module, r) for q in pieces for r in range(q.start, q.start + q.hi - q.lo))
    if set(covered) != set(range(d)) or max(rows.values()) > 1:
        return "its producers' channels do not tile the site exactly once (a value concatenated twice?)"
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


def _build_site(gm: fx.GraphModule, calls: Counter, tied: dict, end: fx.Node, merged, axis: int):
    """(Site, None) for the value `end` whose units `merged` describes, or (None, why not)."""
    pieces, channel_ops, splits, chain = merged
    shape = _shape(end)
    d = shape[axis]
    reads = _consumer_problem(gm, end, calls, d, axis, tied)
    if isinstance(reads, str):
        return None, reads
    from .excitation import squeeze_branches   # excitation.py builds on this module's Site
    branches = squeeze_branches(gm, calls, tied, chain, {q.module for q in pieces}, d)
    if isinstance(branches, str):
        return None, branches
    first = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    pieces = sorted(pieces, key=lambda q: (q.lo, first[q.module], q.start))
    channel_ops = sorted(channel_ops, key=lambda q: (first[q.module], q.lo))
    site = Site(pieces[0].module, end.name, [n.name for n in chain], list(reads), d,
                axis=1 if axis == 1 else -1, shape=tuple(shape[1:]), pieces=pieces, channel_ops=channel_ops,
                reads=reads, bias_maps=[c for c in reads if _zero_padded(gm.get_submodule(c))], splits=splits,
                branches=branches, unit_views=[n.name for n in chain if n.all_input_nodes
                                               and is_unsqueeze(n, n.args[0])])
    return site, None


def _zero_padded(m: nn.Module) -> bool:
    """A conv whose zero padding makes a constant input channel non-constant at the border."""
    return isinstance(m, CONVS) and (m.padding == "same" or (m.padding != "valid" and any(m.padding)))


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


def _consumer_problem(gm: fx.GraphModule, site: fx.Node, calls: Counter, d: int, axis: int, tied: dict):
    """{consumer: how it reads} if `site` is read only by unshared affine consumers, else why not."""
    readers = _readers(site)
    if not readers:
        return "its output is never read"
    rank = len(_shape(site))
    reads = {}
    for user in readers:
        how = "features" if axis == rank - 1 else "channels"
        if user.op != "output" and is_flatten(gm, user) and axis == 1 and rank > 2:
            nxt = _readers(user)
            while len(nxt) == 1 and is_identity(gm, nxt[0]):
                nxt = _readers(nxt[0])
            if len(nxt) != 1:
                return f"it is flattened (`{user.name}`) and then read by {len(nxt)} nodes"
            user, how = nxt[0], "flattened"
        if user.op == "output":
            return "it is read by the model output (no consumer to fold into)"
        layer = _module(gm, user)
        width = None if layer is None else _width(CONSUMERS, layer)
        if width is None and isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1:
            return (f"it is read by grouped convolution `{user.target}` (groups={layer.groups}): its input "
                    "channels could go only the same number from every group, each replaced within its "
                    "group, which fxabstract does not do yet")
        if width is None:
            target = getattr(user.target, "__name__", user.target)
            others = f" (one of its {len(readers)} readers: {', '.join(f'`{r.name}`' for r in readers)}; " \
                     "per-unit ops are followed only when they are a value's one reader)" if len(readers) > 1 else ""
            return (f"it is read by `{user.name}` ({user.op} {target}), which is not an affine layer "
                    f"fxabstract can fold into{others}")
        if len(user.all_input_nodes) != 1:
            return f"consumer `{user.target}` reads it in an unsupported way"
        if calls[user.target] > 1:
            return f"consumer `{user.target}` is called {calls[user.target]} times (shared weights)"
        if user.target in tied:
            return f"consumer `{user.target}` shares a weight with `{tied[user.target]}` (tied weights)"
        if isinstance(layer, nn.Linear) and how == "channels":
            return f"consumer `{user.target}` is a Linear over an axis that is not the units' axis"
        if isinstance(layer, CONVS) and how != "channels":
            return f"consumer `{user.target}` convolves an axis that is not the units' axis"
        if how == "flattened" and width % d:
            return f"consumer `{user.target}` reads {width} features, not a multiple of the {d} units"
        if how != "flattened" and width != d:
            return f"consumer `{user.target}` reads {width} features, not the {d} units produced"
        reads[user.target] = how
    return reads
