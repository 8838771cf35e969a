"""Per-sample curvature of the Interventional Risk at each site, with torch.func (docs/math.md §2).

For D = logit-MSE or KL the risk is flat at the clean activations (g = 0) and its Hessian w.r.t. the
site's values a is, per sample, H(x) = J^T M J with J = dz/da and M = I (logit-MSE) or the softmax
Fisher diag(p) - p p^T (KL, and the curvature of CE). We write M = L L^T and compute, per sample, a
factor U(x) = L^T J: [r, d] with H(x) = U^T U, from vector-Jacobian products vmapped over r vectors:

- exact: r = o, one VJP per output (rows of L^T);
- hutchinson: r probes, U = v^T L^T J / sqrt(r) with Rademacher v, so E_v[U^T U] = H (unbiased).

Where a site has several positions per sample (conv pixels, tokens), a replaced unit is held at one
constant over all of them, so what matters is the sum over positions: per sample the factors
Us = sum_pos U(pos) and Ua = sum_pos U(pos) a(pos) (calibrate.py gets both from one backward). The
constant-replacement risk 1/2 E||c Us - Ua||^2 is then exact to second order, cross-position terms
included. From them we accumulate, as float64 sums over samples (mergeable like `Moments`):
  sum h = sum Us^2, sum h a = sum Us Ua, sum h a^2 = sum Ua^2       (docs/math.md §3: c*, s_j)
  Us^T Us, Us^T Ua, Ua^T Ua        -> d x d sums for joint selection  (docs/math.md §3, "Additivity fails")
    (float32 products of centred chunks of rows for a float32 model: `Curvature.flush`, docs/math.md §7)
  w = tr H(x) as a sample weight   -> sum w, sum w a, sum w a a^T over positions (affine fit)
  sum over positions of U(pos)^T U(pos) -> Hp, the curvature of a per-position perturbation, and the
    per-sample means over positions abar -> sum abar, sum abar abar^T (affine risk: an affine
    replacement's residual differs from position to position; risk.py splits it into the per-sample
    mean, weighted by the summed curvature, and the deviations from it, weighted by Hp)
and, for CE with labels, the gradient g = J^T (p - y) likewise summed: sum g, sum g a.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

PENDING_ROWS = 2048   # factor rows buffered before one Gram product of the joint sums (see `Curvature.flush`)


PACKED_PROBES = 2 ** 24   # probe values per batch past which they are drawn as packed bits, one probe at a time


def output_vectors(z: torch.Tensor, divergence: str, method: str, probes: int,
                   generator: torch.Generator | None, draw: int | None = None) -> torch.Tensor:
    """The vectors v whose VJPs v^T J give the factor U = L^T J: [r, B, o].

    draw: for Hutchinson, how many of the `probes` probes to draw now (None: all), scaled as one of
    `probes`; `calibrate` draws one at a time where the whole [r, B, o] block would be large (a language
    model's logits: 8 sequences x 128 tokens x 50,257 values a probe)."""
    B, o = z.shape
    if method == "exact":
        v = torch.eye(o, dtype=z.dtype, device=z.device)[:, None, :].expand(o, B, o)
    else:  # Hutchinson: Rademacher probes in output space, scaled so that E[U^T U] = H
        shape = (probes if draw is None else draw, B, o)
        if probes * B * o > PACKED_PROBES:
            v = rademacher(shape, generator).to(z).div_(probes**0.5)
        else:
            v = (torch.randint(0, 2, shape, generator=generator, device="cpu").to(z) * 2 - 1) / probes**0.5
    if divergence == "logit-mse":
        return v  # M = I
    p = torch.softmax(z.detach(), dim=-1)
    sp = p.sqrt()
    # L = diag(sqrt p) - p sqrt(p)^T satisfies L L^T = diag(p) - p p^T; L v = sqrt(p) v - p (sqrt(p).v)
    return sp * v - p * (sp * v).sum(-1, keepdim=True)


_BITS = torch.arange(8, dtype=torch.uint8)


def rademacher(shape: tuple, generator: torch.Generator | None) -> torch.Tensor:
    """Independent +-1 values (float32) from packed random bits, eight per random byte: the same
    distribution as `randint(0, 2) * 2 - 1`, about ten times faster on the CPU for large blocks."""
    n = int(np.prod(shape))
    words = torch.randint(-2**63, 2**63 - 1, (-(-n // 64),), generator=generator, dtype=torch.int64)
    bits = (words.view(torch.uint8)[:, None] >> _BITS) & 1
    return bits.reshape(-1)[:n].reshape(shape).float().mul_(2).sub_(1)


def gram(X: torch.Tensor) -> torch.Tensor:
    """X^T X in X's precision, as float64. On the CPU through numpy, whose `X.T @ X` is one symmetric
    rank-k update (BLAS syrk: half the multiply-adds of torch's general product), on as many threads as
    torch uses."""
    if X.device.type != "cpu":
        return (X.T @ X).double()
    global _BLAS
    _BLAS = _BLAS or ThreadpoolController()
    Xn = X.contiguous().numpy()
    with _BLAS.limit(limits=torch.get_num_threads(), user_api="blas"), np.errstate(all="ignore"):
        return torch.from_numpy(Xn.T @ Xn).double()


_BLAS: ThreadpoolController | None = None     # numpy's BLAS, found once


def _centred_grams(Us: torch.Tensor, Ua: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Us^T Us, Us^T Uc, Uc^T Uc) as float64, Uc = Ua - Us mu."""
    Uc = Ua - Us * mu
    return gram(Us), (Us.T @ Uc).double(), gram(Uc)


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
    Hp: torch.Tensor | None = None   # [d, d] sum over samples and positions of U(pos)^T U(pos)  (affine)
    sab: torch.Tensor | None = None  # [d]    sum abar, abar = a averaged over a sample's positions (affine)
    Sbb: torch.Tensor | None = None  # [d, d] sum abar abar^T                                   (affine)
    rows: int = 0                    # sum over samples of their positions
    pending: list = field(default_factory=list, repr=False, compare=False)   # rows not yet in H0..H2
    centre: torch.Tensor | None = field(default=None, repr=False, compare=False)     # [d] mu of `flush`
    centred: list | None = field(default=None, repr=False, compare=False)    # their centred sums, not yet in H

    @classmethod
    def empty(cls, d: int, gradient: bool, matrices: bool | str, device=None) -> "Curvature":
        """matrices: False (O(d) sums only), "joint" (also H0, H1, H2: joint selection with constant
        replacement) or True (every d x d sum: affine replacement too)."""
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        c = cls(0, z(d), z(d), z(d))
        if gradient:
            c.sg, c.sga = z(d), z(d)
        if matrices:
            c.H0, c.H1, c.H2 = z(d, d), z(d, d), z(d, d)
        if matrices is True:
            c.sw, c.swa, c.swaa = z(()), z(d), z(d, d)
            c.Hp, c.sab, c.Sbb = z(d, d), z(d), z(d, d)
        return c

    @property
    def matrices(self) -> bool | str:
        """Which d x d sums this holds: False, "joint" or True (see `empty`)."""
        return False if self.H0 is None else "joint" if self.swaa is None else True

    def update(self, a: torch.Tensor, Us: torch.Tensor, Ua: torch.Tensor, gs: torch.Tensor | None = None,
               ga: torch.Tensor | None = None, Up: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> None:
        """Add a batch of n samples. a: [n, positions, d] activations; Us, Ua: [r, n, d] the factors
        summed over positions, Us = sum_pos U(pos), Ua = sum_pos U(pos) a(pos) (so H(x) = Us^T Us is the
        curvature of holding a unit constant over every position); gs, ga: [n, d] likewise for g (ce);
        Up: [r, n, positions, d] the factors per position (needed with the d x d sums); valid: [n, positions]
        bool, the real (not padded) positions: the others enter no sum."""
        Us_in, Ua_in = Us.detach(), Ua.detach()
        a, Us, Ua = (t.detach().to(torch.float64) for t in (a, Us, Ua))
        n, positions, d = a.shape
        padded = valid is not None
        valid = torch.ones(n, positions, dtype=torch.bool, device=a.device) if valid is None else valid
        self.n += n
        self.rows += int(valid.sum())
        self.sh += (Us * Us).sum((0, 1))
        self.sha += (Us * Ua).sum((0, 1))
        self.sha2 += (Ua * Ua).sum((0, 1))
        if self.sg is not None:
            self.sg += gs.detach().to(torch.float64).sum(0)
            self.sga += ga.detach().to(torch.float64).sum(0)
        if self.H0 is not None:
            one = self.swaa is not None and positions == 1 and not padded   # Hp's sum is H0's (one position)
            self.pending.append((Us_in.reshape(-1, d), Ua_in.reshape(-1, d), one))
            if sum(len(u) for u, _, _ in self.pending) >= PENDING_ROWS:
                self._product()
        if self.swaa is not None:
            w = (Us * Us).sum((0, 2))                        # [n] tr H(x)
            af = a[valid]                                    # [real positions, d]
            wf = w[:, None].expand(n, positions)[valid]      # each position weighted by its sample's w
            self.sw += wf.sum()
            self.swa += wf @ af
            self.swaa += (af * wf[:, None]).T @ af
            if not (positions == 1 and not padded):          # one position: added with H0 (`flush`)
                Upf = Up.detach().to(torch.float64)[:, valid].reshape(-1, d)  # [r * real positions, d]
                self.Hp += Upf.T @ Upf
            abar = ((a * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)) if padded \
                else a.mean(1)                               # [n, d]: the mean over a sample's real positions
            self.sab += abar.sum(0)
            self.Sbb += abar.T @ abar

    def flush(self) -> None:
        """Add the buffered factor rows to H0, H1 and H2 (docs/math.md §7).

        One product of the rows' Gram per `PENDING_ROWS` rows (`_product`), in the factors' own precision
        (float32 for a float32 model: about twice as fast as float64; the symmetric two through `gram`),
        added to float64 sums. The rows are centred first, Uc = Ua - Us mu with mu the first chunk's
        curvature-weighted mean (c*), so the products hold only the part of H1 and H2 that does not cancel
        in the risk c^T H0 c - 2 c^T H1 + H2: the rounding error is relative to a unit's spread around mu,
        not to its mean. Here the mu-terms are added back, in float64, once for all chunks.
        `calibrate` flushes at the end of its pass; so does `+`."""
        self._product()
        if self.centred is None:
            return
        mu, (S0, S01, S11) = self.centre, self.centred
        self.H0 += S0
        self.H1 += S01 + S0 * mu
        self.H2 += S11 + S01 * mu[:, None] + S01.T * mu + S0 * (mu[:, None] * mu)
        self.centre = self.centred = None

    def _product(self) -> None:
        """The buffered rows' centred Grams, added to `centred` (float64 [Us^T Us, Us^T Uc, Uc^T Uc])."""
        if not self.pending:
            return
        Us = torch.cat([u for u, _, _ in self.pending])
        Ua = torch.cat([v for _, v, _ in self.pending])
        one = torch.cat([torch.full((len(u),), f, dtype=torch.bool, device=u.device) for u, _, f in self.pending])
        self.pending.clear()
        if Us.dtype not in (torch.float32, torch.float64):
            Us, Ua = Us.float(), Ua.float()
        if self.centre is None:
            Ud = Us.double()
            h, ha = (Ud * Ud).sum(0), (Ud * Ua.double()).sum(0)
            self.centre = torch.where(h > 0, ha / torch.where(h > 0, h, torch.ones_like(h)), torch.zeros_like(h))
        G = _centred_grams(Us, Ua, self.centre.to(Us.dtype))
        if not all(torch.isfinite(g.diagonal()).all() for g in G[::2]):   # an overflow shows on the diagonal
            G = _centred_grams(Us.double(), Ua.double(), self.centre)
        self.centred = list(G) if self.centred is None else [s + g for s, g in zip(self.centred, G)]
        if one.all():
            self.Hp += G[0]
        elif one.any():
            self.Hp += (Us[one].T @ Us[one]).double()

    def __add__(self, other: "Curvature") -> "Curvature":
        self.flush()
        other.flush()
        add = lambda x, y: None if x is None else x + y  # noqa: E731
        return Curvature(self.n + other.n, *(add(getattr(self, k), getattr(other, k))
                                             for k in ("sh", "sha", "sha2", "sg", "sga", "H0", "H1", "H2",
                                                       "sw", "swa", "swaa", "Hp", "sab", "Sbb", "rows")))
