"""Second-order risk of replacing a set of units, greedy elimination orders, and the fitted
replacements (docs/math.md §3). All matrices here are float64 expectations for one site, d units.

Constant replacement, removed set P, constants c:
    R(P) = sum_P lin_j + 1/2 1_P^T M 1_P,   M = E[(c - a)(c - a)^T * H],  lin = E[g (c - a)]
Affine replacement, kept set K (OBS restricted to whole units, with H(x) ~ w(x) Hbar):
    R(K) = 1/2 tr(Hbar_PP Cov(a_P | a_K)),  computed as 1/2 tr(Hbar S) - 1/2 tr(B A), A = S_KK^-1,
    B = (S Hbar S)_KK; removing q from K raises it by 1/2 (A B A)_qq / A_qq (rank-one update of A).
    At a site with several positions per sample (conv pixels, tokens) an affine map's residual r(pos)
    differs from position to position. Split it into the sample's mean rbar and the deviations from it:
    sum_pos U(pos) r(pos) = Us rbar + sum_pos (U(pos) - Ubar) (r(pos) - rbar), so (`position_affine_risk`)
        R ~ 1/2 tr(H0_PP Cov(rbar)) + 1/2 N/(N-1) tr(Hw_PP E[within-sample covariance of r]),
    with H0 = E[Us^T Us] the summed curvature, Hw = E[sum_pos U(pos)^T U(pos)] - H0 / N and N positions:
    exact to second order when the residual is the same at every position and when the positions are
    independent (N/(N-1) unbiases the within-sample covariance), and in between otherwise. The greedy
    order uses the OBS recursion with the per-position curvature E[sum_pos U^T U]; the curve along it is
    then evaluated with this risk.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CalibrationError
from .calibrate import Statistics


def constant_matrix(stats: Statistics, name: str, c: torch.Tensor) -> torch.Tensor:
    """M = E[H_ij (c_i - a_i)(c_j - a_j)]: [d, d] (docs/math.md §3, joint selection, constant)."""
    k = stats.curvature[name]
    M = torch.outer(c, c) * k.H0 - c[:, None] * k.H1 - c[None, :] * k.H1.T + k.H2
    return (M + M.T) / (2 * k.n)


def linear_term(stats: Statistics, name: str, c: torch.Tensor) -> torch.Tensor:
    """E[g_j (c_j - a_j)]: [d] (zero unless the divergence is ce)."""
    k = stats.curvature[name]
    return (c * k.sg - k.sga) / k.n if k.sg is not None else torch.zeros_like(c)


def weighted_moments(stats: Statistics, name: str, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], covariance [d, d]) of a, weighted per sample by w(x) = tr H(x) when `weighted`."""
    k, m = stats.curvature[name], stats.moments[name]
    if weighted and k.sw is not None and k.sw > 0:
        mu = k.swa / k.sw
        return mu, k.swaa / k.sw - torch.outer(mu, mu)
    return m.mean, m.cov


def affine_curvature(stats: Statistics, name: str) -> torch.Tensor:
    """Hbar [d, d] for the OBS order of affine removals: the per-position curvature summed over
    positions, per sample (the summed curvature where the per-position sums were not kept)."""
    k = stats.curvature[name]
    return (k.Hp if k.Hp is not None else k.H0) / k.n


def positions(stats: Statistics, name: str) -> float:
    """N, the positions per sample of the site (1 for a vector per sample)."""
    k = stats.curvature[name]
    return k.rows / k.n if k.n else 1.0


def position_affine_risk(stats: Statistics, name: str, S: torch.Tensor, K: list[int], P: list[int],
                         theta: torch.Tensor) -> float:
    """The second-order risk of do(a_P := beta + theta a_K). One position: 1/2 tr(Hbar_PP E[r r^T]) on S, the
    covariance the map was fitted on; several: the residual split into its per-sample mean and the
    deviations from it (module docstring), on the plain moments of the site."""
    k = stats.curvature[name]
    N = positions(stats, name)
    if k.Sbb is None or N <= 1:
        return affine_risk(k.H0 / k.n, S, K, P, theta)
    mb = k.sab / k.n
    Sb = k.Sbb / k.n - torch.outer(mb, mb)                     # Cov(abar)
    Sw = (stats.moments[name].cov - Sb) * (N / (N - 1))        # within-sample covariance, unbiased
    Hw = (k.Hp - k.H0 / N) / k.n                               # E[sum_pos (U - Ubar)^T (U - Ubar)]
    return affine_risk(k.H0 / k.n, Sb, K, P, theta) + affine_risk(Hw, Sw, K, P, theta)


ROUNDING = 10 * torch.finfo(torch.float32).eps   # spread below this fraction of a unit's size: rounding noise


def ridge_of(S: torch.Tensor, ridge: float, mu: torch.Tensor | None = None) -> torch.Tensor:
    """Per-unit ridge [d, d]: `ridge` times each unit's own variance, so rescaling a unit (docs/math.md §3,
    scaling invariance) rescales its ridge with it; a tiny floor keeps dead units invertible (at least
    1e-100 when every unit of the site is constant: the inverse of a subnormal overflows). With the
    means `mu`, a unit whose spread is at float32 rounding level (std below ROUNDING times its root mean
    square: a numerically constant unit) gets a ridge of that level instead, so a fit never divides rounding
    noise by rounding noise (coefficients of 1e8 that the compiled module's own rounding then amplifies);
    it is still scale invariant."""
    diag = S.diagonal()
    lam = ridge * diag + float((1e-12 * diag.mean()).clamp_min(1e-100))
    if mu is not None:
        noise = ROUNDING ** 2 * (diag + mu * mu)                                   # [d] rounding level of each unit
        lam = torch.where(diag < noise, noise, lam)
    return torch.diag(lam)


def diagonal_order(scores: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Remove in increasing score; the additive risk curve R[k] = sum of the k smallest scores."""
    order = torch.argsort(scores, stable=True)[:n]
    return order.tolist(), torch.cat([scores.new_zeros(1), scores[order].cumsum(0)])


def joint_constant_order(M: torch.Tensor, lin: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy elimination on R(P) = lin.1_P + 1/2 1_P^T M 1_P; O(d) per step, O(n d) in all (in numpy:
    a step is three vector operations on contiguous rows of M^T)."""
    Mn = np.ascontiguousarray(M.detach().cpu().numpy().T)     # row q: column q of M
    base = (lin + 0.5 * M.diagonal()).cpu().numpy().copy()    # R(P + q) - R(P) = base_q + (M 1_P)_q
    m = np.zeros_like(base)                                    # M 1_P
    curve, order = [0.0], []
    for _ in range(n):
        cost = base + m
        q = int(np.argmin(cost))
        order.append(q)
        curve.append(curve[-1] + float(cost[q]))
        base[q] = np.inf                                       # removed: never chosen again
        m += Mn[q]                                             # (M 1_P) += M[:, q]
    return order, torch.tensor(curve, dtype=torch.float64)


def joint_affine_order(Hbar: torch.Tensor, S: torch.Tensor, ridge: float, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy elimination for affine replacement, OBS-style with rank-one downdates; O(d^2) per step."""
    d = S.shape[0]
    A = torch.linalg.inv(S + ridge_of(S, ridge))                                  # S_KK^-1, removed rows zeroed
    T = A @ (S @ Hbar @ S) @ A                                                  # A B A
    removed = torch.zeros(d, dtype=torch.bool)
    curve, order = [0.0], []
    for _ in range(n):
        diag_A = A.diagonal().clone()
        cost = 0.5 * T.diagonal() / diag_A.clamp_min(1e-300)
        cost[removed] = float("inf")
        q = int(torch.argmin(cost))
        order.append(q)
        curve.append(curve[-1] + float(cost[q]))
        removed[q] = True
        a, t, alpha, tqq = A[:, q].clone(), T[:, q].clone(), float(A[q, q]), float(T[q, q])
        A -= torch.outer(a, a) / alpha
        T += -(torch.outer(t, a) + torch.outer(a, t)) / alpha + (tqq / alpha**2) * torch.outer(a, a)
    return order, torch.tensor(curve, dtype=torch.float64)


def fit_affine(mu: torch.Tensor, S: torch.Tensor, K: list[int], P: list[int], ridge: float, parts: int = 1):
    """Least squares a_P ~ beta + theta a_K with ridge: theta = S_PK (S_KK + Lambda)^-1 (docs/math.md §3).

    parts > 1: the units form that many equal blocks and a replaced unit reads kept units of its own
    block only (a grouped convolution reads its group's channels alone): one fit per block, theta zero
    across blocks.

    A fit is never folded when it broke down numerically: its coefficients are not finite, or the fitted
    values vary more than the units they replace (theta S_KK theta^T <= S_PP holds for every ridge >= 0
    in exact arithmetic, so a fitted variance above 4 S_PP + rounding is an exploding solve): that is a
    CalibrationError naming the fix."""
    if parts > 1:
        size = S.shape[0] // parts
        beta, theta = mu.new_zeros(len(P)), mu.new_zeros(len(P), len(K))
        for j in range(parts):
            Pj = [i for i, u in enumerate(P) if u // size == j]
            Kj = [i for i, u in enumerate(K) if u // size == j]
            if Pj:
                b, t = fit_affine(mu, S, [K[i] for i in Kj], [P[i] for i in Pj], ridge)
                beta[Pj] = b
                theta[torch.tensor(Pj)[:, None], torch.tensor(Kj, dtype=torch.long)[None, :]] = t
        return beta, theta
    SKK = S[K][:, K]
    theta = torch.linalg.solve(SKK + ridge_of(S, ridge, mu)[K][:, K], S[K][:, P]).T   # [P, K]
    beta = mu[P] - theta @ mu[K]
    if P and K:
        fitted = ((theta @ SKK) * theta).sum(1)                                          # [P] fitted variance
        scale = S.diagonal().abs().max() + mu.abs().max() ** 2
        bound = 4 * S.diagonal()[P].clamp_min(0) + 1e-6 * scale
        if not (torch.isfinite(theta).all() and torch.isfinite(beta).all()) or bool((fitted > bound).any()):
            raise CalibrationError(f"the affine fit of {len(P)} units on {len(K)} kept ones broke down numerically "
                                   "(non-finite or exploding coefficients); pass a larger ridge=, more calibration "
                                   "samples, or replacement='constant'")
    return beta, theta


def affine_risk(Hbar: torch.Tensor, S: torch.Tensor, K: list[int], P: list[int], theta: torch.Tensor) -> float:
    """1/2 tr(Hbar_PP E[r r^T]) for the residual r = a_P - beta - theta a_K (zero mean by beta)."""
    SPP, SPK, SKK = S[P][:, P], S[P][:, K], S[K][:, K]
    R = SPP - theta @ SPK.T - SPK @ theta.T + theta @ SKK @ theta.T
    return 0.5 * float((Hbar[P][:, P] * R).sum())


def constant_risk(stats: Statistics, name: str, P: list[int], cP: torch.Tensor) -> float:
    """R(P) for constants cP, with the cross terms when the d x d sums were kept, else diagonal."""
    k = stats.curvature[name]
    c = stats.moments[name].mean.clone()
    c[P] = cP
    lin = linear_term(stats, name, c)[P].sum()
    if k.H0 is not None:   # 1_P^T M 1_P from the P x P blocks alone (`constant_matrix` restricted to P)
        idx = torch.as_tensor(P, dtype=torch.long)
        H0, H1, H2 = (h.index_select(0, idx).index_select(1, idx) for h in (k.H0, k.H1, k.H2))
        cP = c[idx]
        quad = (torch.outer(cP, cP) * H0).sum() - 2 * (cP[:, None] * H1).sum() + H2.sum()
        return float(lin + 0.5 * quad / k.n)
    quad = 0.5 * (c * c * k.sh - 2 * c * k.sha + k.sha2)[P].sum() / k.n
    return float(lin + quad)
