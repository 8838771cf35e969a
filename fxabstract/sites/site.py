"""The records of structure discovery: a site, its units' layers, and why a candidate is refused.

A `Site` is a graph value whose units can be replaced and folded away: produced by `pieces`
(layers whose output rows are the units), passed through per-unit ops (`chain`, `channel_ops`) and
read only by affine `consumers`. A `Refusal` carries the one-line reason a candidate is not a site;
the finder catches it once per candidate and reports it in the `ineligible` table.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class Context:
    """What every pattern's `find` reads besides the graph node in question: the graph, how often each
    module is called (a module called twice shares its weights between calls: no site), and the modules
    that share a parameter with another (tied weights)."""

    gm: fx.GraphModule
    calls: Counter
    tied: dict[str, str]


class Refusal(Exception):
    """A candidate is not a site: `reason` says why, in words for the ineligible table; `modules` are
    the layers it names (empty: the candidate's own producer)."""

    def __init__(self, reason: str, modules=()):
        super().__init__(reason)
        self.reason = reason
        self.modules = tuple(modules)


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
    parts: int = 1            # units [j d/parts, (j+1) d/parts) form part j; every part loses as many (grouped convs)
    fit_parts: int = 1        # an affine replacement reads kept units of its own part only (a grouped consumer)
    tie: str = ""             # a residual stream's name: its points (sites) keep the same units (streams.py)
    norms: dict = field(default_factory=dict)                  # a stream point's normaliser consumers -> their readers
    head_shapes: dict = field(default_factory=dict)            # view node -> (head axis, positions per head)
    splits: list[Piece] = field(default_factory=list)          # split pieces (graph nodes) and the units each carries
    branches: list[Site] = field(default_factory=list)         # second readings of the units (an SE squeeze)
    unit_views: list[str] = field(default_factory=list)        # gate views [B, d] -> [B, d, 1, 1] (fold writes d)
    unit_sizes: list[str] = field(default_factory=list)        # a stream's reads of its units axis' size (fold
                                                               # writes the original d: streams.rewrite)
    kv_shapes: dict = field(default_factory=dict)              # GQA: k/v view node -> (kv head axis, 1)
    repeats: list = field(default_factory=list)                # GQA: (kv value, repeated value) node names (gqa.py)

    @property
    def producer(self) -> str:
        return self.pieces[0].module

    def readers(self) -> list[str]:
        """Every layer whose input columns the site's units are: its consumers, an SE squeeze's, and the
        readers of a normaliser it feeds (a stream point's LayerNorm is folded into those)."""
        return ([c for c in self.consumers if c not in self.norms] + [c for b in self.branches for c in b.consumers]
                + [r for rs in self.norms.values() for r in rs])
