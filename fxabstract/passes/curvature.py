"""Per-sample curvature of the Interventional Risk at each site, with torch.func (THEORY §2).

For D = logit-MSE or KL the risk is flat at the clean activations (g = 0) and its Hessian w.r.t. the
site's values a is, per sample, H(x) = J^T M J with J = dz/da and M = I (logit-MSE) or the softmax
Fisher diag(p) - p p^T (KL, and the curvature of CE). We write M = L L^T and compute, per sample, a
factor U(x) = L^T J: [r, d] with H(x) = U^T U, from vector-Jacobian products vmapped over r vectors:

- exact: r = o, one VJP per output (rows of L^T);
- hutchinson: r probes, U = v^T L^T J / sqrt(r) with Rademacher v, so E_v[U^T U] = H (unbiased).

From U we accumulate, as float64 sums over samples (mergeable like `Moments`):
  h = diag H = sum_r U^2           -> sum h, sum h a, sum h a^2       (THEORY §3: c*, s_j)
  H, H_ij a_j, H_ij a_i a_j       -> d x d sums for joint selection  (THEORY §3, "Additivity fails")
  w = tr H(x) as a sample weight   -> sum w, sum w a, sum w a a^T     (curvature-weighted affine fit)
and, for CE with labels, the gradient g = J^T (p - y): sum g, sum g a.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DIVERGENCES = ("logit-mse", "kl", "ce")


def output_vectors(z: torch.Tensor, divergence: str, method: str, probes: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """The vectors v whose VJPs v^T J give the factor U = L^T J: [r, B, o]."""
    B, o = z.shape
    if method == "exact":
        v = torch.eye(o, dtype=z.dtype, device=z.device)[:, None, :].expand(o, B, o)
    else:  # Hutchinson: Rademacher probes in output space, scaled so that E[U^T U] = H
        v = torch.randint(0, 2, (probes, B, o), generator=generator, device="cpu").to(z) * 2 - 1
        v = v / probes**0.5
    if divergence == "logit-mse":
        return v  # M = I
    p = torch.softmax(z.detach(), dim=-1)
    sp = p.sqrt()
    # L = diag(sqrt p) - p sqrt(p)^T satisfies L L^T = diag(p) - p p^T; L v = sqrt(p) v - p (sqrt(p).v)
    return sp * v - p * (sp * v).sum(-1, keepdim=True)


@dataclass
class Curvature:
    """Float64 sums over samples of curvature-weighted site statistics (see module docstring)."""

    n: int
    sh: torch.Tensor                 # [d]    sum h
    sha: torch.Tensor                # [d]    sum h a
    sha2: torch.Tensor               # [d]    sum h a^2
    sg: torch.Tensor | None = None   # [d]    sum g        (ce)
    sga: torch.Tensor | None = None  # [d]    sum g a      (ce)
    H0: torch.Tensor | None = None   # [d, d] sum H                 (joint)
    H1: torch.Tensor | None = None   # [d, d] sum H_ij a_j          (joint)
    H2: torch.Tensor | None = None   # [d, d] sum H_ij a_i a_j      (joint)
    sw: torch.Tensor | None = None   # []     sum w, w = tr H(x)    (affine)
    swa: torch.Tensor | None = None  # [d]    sum w a               (affine)
    swaa: torch.Tensor | None = None  # [d, d] sum w a a^T          (affine)

    @classmethod
    def empty(cls, d: int, gradient: bool, matrices: bool, device=None) -> "Curvature":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        c = cls(0, z(d), z(d), z(d))
        if gradient:
            c.sg, c.sga = z(d), z(d)
        if matrices:
            c.H0, c.H1, c.H2, c.sw, c.swa, c.swaa = z(d, d), z(d, d), z(d, d), z(()), z(d), z(d, d)
        return c

    def update(self, a: torch.Tensor, U: torch.Tensor, g: torch.Tensor | None = None) -> None:
        """Add a batch: activations a: [n, d], factors U: [r, n, d] (H(x) = U^T U), gradients g: [n, d]."""
        a, U = a.detach().to(torch.float64), U.detach().to(torch.float64)
        h = (U * U).sum(0)                                   # [n, d] diag H per sample
        self.n += a.shape[0]
        self.sh += h.sum(0)
        self.sha += (h * a).sum(0)
        self.sha2 += (h * a * a).sum(0)
        if self.sg is not None:
            g = g.detach().to(torch.float64)
            self.sg += g.sum(0)
            self.sga += (g * a).sum(0)
        if self.H0 is not None:
            Uf = U.reshape(-1, U.shape[-1])                   # [r*n, d]
            Ua = (U * a).reshape(-1, U.shape[-1])             # [r*n, d]  U diag(a)
            self.H0 += Uf.T @ Uf
            self.H1 += Uf.T @ Ua
            self.H2 += Ua.T @ Ua
            w = h.sum(1)                                      # [n] tr H(x)
            self.sw += w.sum()
            self.swa += w @ a
            self.swaa += (a * w[:, None]).T @ a

    def __add__(self, other: "Curvature") -> "Curvature":
        add = lambda x, y: None if x is None else x + y  # noqa: E731
        return Curvature(self.n + other.n, *(add(getattr(self, k), getattr(other, k))
                                             for k in ("sh", "sha", "sha2", "sg", "sga", "H0", "H1", "H2",
                                                       "sw", "swa", "swaa")))
