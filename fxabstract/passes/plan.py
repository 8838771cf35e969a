"""The plan: the intervention as data, between selection and the rewrite passes.

`Curves` (per site: scores, constants, elimination order, risk curve) is what the analysis hands to
selection; a `SitePlan` is one site's do(a_P := beta + theta a_K); a `Replacement` is that plan as a
graph module, inserted by `replace` and folded away by `fold`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..sites import Site


@dataclass
class SitePlan:
    """The replacement of one site: do(a_P := beta + theta a_K); theta = 0 for constants."""

    site: Site
    kept: list[int]              # K, sorted, original numbering
    removed: list[int]           # P, sorted
    kind: str                    # "constant" | "affine"
    beta: torch.Tensor           # [|P|] float64
    theta: torch.Tensor          # [|P|, |K|] float64
    scores: torch.Tensor         # [d] the unit scores of the chosen criterion
    predicted_risk: float
    branches: list["SitePlan"] = field(default_factory=list)   # the SE squeezes' replacements (`fit_branch`)


@dataclass
class Curves:
    """Per site: scores [d], constants c* [d], elimination order, predicted risk curve R[0..len(order)],
    and optionally the measured risk curve (passes/measure.py), which allocation then uses."""

    scores: torch.Tensor
    constants: torch.Tensor
    order: list[int]
    curve: torch.Tensor
    measured: torch.Tensor | None = None


class Replacement(nn.Module):
    """do(a_P := beta + theta a_K) on the units' axis (-1 features, 1 channels), at every position
    (docs/math.md §1). `site` (sites.Site) tells the fold pass where the units come from and go."""

    def __init__(self, kept: list[int], removed: list[int], beta: torch.Tensor, theta: torch.Tensor,
                 site=None):
        super().__init__()
        self.site = site
        self.axis = -1 if site is None else site.axis
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long))
        self.register_buffer("removed", torch.tensor(removed, dtype=torch.long))
        self.register_buffer("beta", beta)        # [|P|]
        self.register_buffer("theta", theta)      # [|P|, |K|]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.axis == 1:
            a = a.movedim(1, -1)
        values = self.beta + a.index_select(-1, self.kept) @ self.theta.T
        a = a.index_copy(-1, self.removed, values)
        return a.movedim(-1, 1).contiguous() if self.axis == 1 else a


def ties(sites: list[Site]) -> dict[str, list[Site]]:
    """{stream name: its point sites} for the residual streams among `sites` (`Site.tie`), in order."""
    groups: dict[str, list[Site]] = {}
    for s in sites:
        if s.tie:
            groups.setdefault(s.tie, []).append(s)
    return groups
