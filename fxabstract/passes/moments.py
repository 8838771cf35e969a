"""Streaming first and second moments of each site's units, in float64, as mergeable sums.

    >>> m = Moments.empty(3, full=True)
    >>> m.update(torch.randn(100, 3)); m.update(torch.randn(50, 3))
    >>> m.n, m.mean.shape, m.cov.shape
    (150, torch.Size([3]), torch.Size([3, 3]))

Sums and counts, not running means, so statistics from several workers add up: `a + b`.
`full=False` keeps O(d) state (sums of squares); `full=True` keeps the d x d sum of outer products
that the affine replacement needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    n: int
    s1: torch.Tensor            # [d]    sum of a
    s2: torch.Tensor            # [d] sum of a^2, or [d, d] sum of a a^T when full

    @classmethod
    def empty(cls, d: int, full: bool, device=None) -> "Moments":
        shape = (d, d) if full else (d,)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(d), z(*shape))

    @property
    def full(self) -> bool:
        return self.s2.dim() == 2

    def update(self, a: torch.Tensor) -> None:
        """Add a batch of activations a: [n, d]."""
        a = a.detach().to(torch.float64)
        self.n += a.shape[0]
        self.s1 += a.sum(0)
        self.s2 += a.T @ a if self.full else (a * a).sum(0)

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    @property
    def var(self) -> torch.Tensor:
        """Population variance per unit: [d]."""
        sq = self.s2.diagonal() if self.full else self.s2
        return (sq / self.n - self.mean**2).clamp_min(0)

    @property
    def cov(self) -> torch.Tensor:
        """Population covariance [d, d] (needs full=True)."""
        assert self.full, "covariance needs Moments(full=True)"
        mu = self.mean
        return self.s2 / self.n - torch.outer(mu, mu)

