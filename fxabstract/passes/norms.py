"""Normalisers over a replaced residual stream, compiled exactly (docs/math.md §6).

A LayerNorm (or RMSNorm) that reads a stream point sees every channel of the stream. With the
channels P replaced by `h_P = beta + theta h_K` (theta = 0 for constants) it computes its statistics
over the kept channels and the replacement values, so the compiled normaliser, `StreamNorm`, reads
the |K| kept channels, rebuilds h_P for the statistics alone and returns the features

    LayerNorm:  [ (h_K - mu) / sigma,  1 / sigma,  mu / sigma ]
    RMSNorm:    [  h_K / rms,          1 / rms ]

without its elementwise affine. Every removed channel's normalised value is linear in those features:
(h_P - mu) / sigma = theta n_K + beta (1 / sigma) + (theta 1 - 1) (mu / sigma) with n_K the kept
channels' normalised values, and h_P / rms = theta n_K + beta (1 / rms). So each reader W (a Linear
over the normaliser's output) becomes W diag(gamma) M, with M the [d, |K| + 2] (or + 1) map of the
features to all d normalised channels, and its bias b + W b_norm: one or two extra input columns per
reader, exact for constant and affine replacements alike.

    >>> StreamNorm.of(nn.LayerNorm(64), replacement)(h_K).shape    # [..., |K| + 2]
"""
from __future__ import annotations

import torch
from torch import nn


class StreamNorm(nn.Module):
    """A LayerNorm or RMSNorm over d channels of which only `kept` are passed in; the others are
    `beta + theta x` (float buffers). Returns the normalised kept channels and the per-position
    scalars 1/sigma (and mu/sigma for a LayerNorm), without the normaliser's elementwise affine."""

    def __init__(self, d: int, eps: float, centred: bool, beta: torch.Tensor, theta: torch.Tensor | None):
        super().__init__()
        self.d, self.eps, self.centred = d, float(eps), centred
        self.register_buffer("beta", beta.clone())
        self.register_buffer("theta", None if theta is None else theta.clone())

    @classmethod
    def of(cls, norm: nn.Module, r) -> StreamNorm:
        """The compiled form of `norm` reading a point whose removed units `r` (a Replacement) replaces."""
        like = norm.weight if getattr(norm, "weight", None) is not None else r.beta
        theta = r.theta.to(like.dtype) if r.theta.numel() and r.theta.abs().max() > 0 else None
        eps = norm.eps if norm.eps is not None else torch.finfo(like.dtype).eps   # nn.RMSNorm's eps=None
        return cls(r.site.n_units, eps, isinstance(norm, nn.LayerNorm), r.beta.to(like.dtype), theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        replaced = self.beta.expand(*x.shape[:-1], -1) if self.theta is None else self.beta + x @ self.theta.T
        full = torch.cat([x, replaced], -1)               # the statistics over all d channels
        if self.centred:
            mu = full.mean(-1, keepdim=True)
            inv = torch.rsqrt((full - mu).pow(2).mean(-1, keepdim=True) + self.eps)
            return torch.cat([(x - mu) * inv, inv, mu * inv], -1)
        inv = torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.cat([x * inv, inv], -1)

    def macs_per_position(self) -> int:
        """The multiply-adds of rebuilding the replaced channels (0 for constants)."""
        return 0 if self.theta is None else self.theta.numel()


def feature_map(norm: nn.Module, r) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, c) in float64 with norm(h) = A features + c for the features StreamNorm returns: A is
    diag(gamma) M ([d, |K| + 2] or [d, |K| + 1]) and c the normaliser's bias (zeros without one)."""
    d, K, P = r.site.n_units, r.kept, r.removed
    k = len(K)
    centred = isinstance(norm, nn.LayerNorm)
    M = torch.zeros(d, k + (2 if centred else 1), dtype=torch.float64, device=r.beta.device)
    M[K, torch.arange(k)] = 1.0
    theta = r.theta.double()
    M[P, :k] = theta
    M[P, k] = r.beta.double()
    if centred:
        M[P, k + 1] = theta.sum(1) - 1.0
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    gamma = torch.ones(d, dtype=torch.float64, device=M.device) if weight is None else weight.detach().double()
    c = torch.zeros(d, dtype=torch.float64, device=M.device) if bias is None else bias.detach().double()
    return gamma[:, None] * M, c


def fold_reader(m: nn.Linear, norm: nn.Module, r) -> nn.Linear:
    """A Linear reading `norm`'s output, rewritten to read StreamNorm's features: W A, b + W c."""
    A, c = feature_map(norm, r)
    W = m.weight.detach().double()
    new = nn.Linear(A.shape[1], m.out_features, bias=True, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(W @ A)
        new.bias.copy_((0 if m.bias is None else m.bias.detach().double()) + W @ c)
    return new
