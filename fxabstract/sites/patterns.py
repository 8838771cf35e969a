"""The pattern table: every site kind beyond a plain producer -> per-unit ops -> consumers path.

Each pattern module offers the same two functions:

- `find(ctx, candidate, ...)`: what the pattern adds at that candidate, None where it does not
  apply, or `Refusal(reason)` where it applies but cannot be folded. What a candidate is depends on
  the pattern's stage:
  - CLAIM: a graph node; returns a whole Site the pattern claims before any path is followed
    (attention heads: the output projection's input);
  - VALUE: a path's end value and its units' axis; returns the pieces [(output node, lo, hi)] the
    value is split into, each followed as a site of its own (split, chunk, slices, GLU);
  - SITE: a Site the finder built; returns it with the pattern's part added (the squeezes of a
    squeeze-and-excitation block);
  - GRAPH: the whole graph, after the claims: `find(ctx, follow, claimed)` returns (sites, {module:
    reason}) for structures spanning many producers (residual streams), with `follow(node, axis)` the
    finder's path of per-unit ops.
- `rewrite(gm, folded)`: after the fold has folded every replacement and deleted nothing yet, rewrite
  the graph in place for the kept units; `folded` lists (site, kept unit indices) for every site that
  lost units. The fold runs every pattern's rewrite, in table order, and names none.

The finder (`find.py`) asks the patterns of a stage in table order and catches a Refusal once per
candidate; `docs/architecture.md` lists the steps to add a site kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import excitation, heads, splits, streams

CLAIM, VALUE, SITE, GRAPH = "claim", "value", "site", "graph"


@dataclass(frozen=True)
class Pattern:
    name: str
    stage: str              # CLAIM | VALUE | SITE | GRAPH: where the finder asks it
    find: Callable          # (ctx, candidate, ...) -> contribution | None; raises Refusal
    rewrite: Callable       # (gm, [(site, kept)]) -> None, in place


PATTERNS = (
    Pattern("attention heads", CLAIM, heads.find, heads.rewrite),      # with rotary, q/k norm, GQA
    Pattern("splits", VALUE, splits.find, splits.rewrite),             # split, chunk, slices, GLU
    Pattern("squeeze-excitation", SITE, excitation.find, excitation.rewrite),
    Pattern("residual streams", GRAPH, streams.find, streams.rewrite),  # tied channels of a chain of adds
)


def stage(name: str) -> tuple[Pattern, ...]:
    """The patterns the finder asks at stage `name`, in table order."""
    return tuple(p for p in PATTERNS if p.stage == name)
