"""Compact proofs (docs/math.md §5): a certified lower bound on a group-operation network's accuracy over
its whole finite domain, from its compiled abstraction plus a rigorous bound on the deviation of the
dense model from the abstraction.

    >>> table = symmetric_table(5)
    >>> model = train_group_model(table)                      # groups.GroupMLP: left/right embeddings
    >>> result = fxa.abstract(model, calibration, keep=32)    # keeps 32 hidden units
    >>> fxa.certify(model, result, table)["bound"]            # <= brute_force_accuracy(model, table)

The proof. The hidden pre-activation of input (x, y) is additive: pre(x, y) = L[x] + R[y] with
L = E_left W_left^T + b, R = E_right W_right^T (computed once, |G| x width each). The abstraction keeps
units K and replaces units P by phi = beta + Theta h_K; the dense model differs from it by
Delta(x, y) = U_P r(x, y) + E h_K + e, with r = relu(pre_P) - phi the replacement residual, U the
unembedding, and E, e the rounding residues of the fold (computed, tiny). So per input, in real
arithmetic, the gap between the label t's deviation and any other's is bounded per input by
    |Delta_t - Delta_o| <= gap(x, y) = min( sum_j max_o |U_tj - U_oj| |r_j|,  max_o ||U_tP - U_oP||_2 ||r||_2 )
plus the fold residue 2 (|E| hmax + |e|); gap <= 2 ||U_P r||_inf-style bounds always. It costs |G|^2 |P|
operations, against the |G|^2 width |G| of running the unembedding. An input is
certified when the abstraction's margin for its label exceeds the gap (at most twice the deviation
bound) plus rounding: then the dense model's label logit beats every other logit. The abstraction's
logits, relu(L_K[x] + R_K[y]) U'^T + b', cost |G|^2 |K| |G| in float32, like brute force but with |K| in place of width; the rounding
allowances are standard gamma_n = n u / (1 - n u) bounds for float32 dot products (u = 2^-24), so the
bound holds for the float32 model as it runs on CPU (any summation order; no TF32).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import ConfigError

U32 = 2.0 ** -24  # unit roundoff of float32


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): relative error bound of an n-term float32 dot product."""
    return n * U32 / (1 - n * U32)


def _structure(model: nn.Module, abstraction) -> tuple:
    """Check the model is a left/right-embedding network with one site `hidden` read by `unembed`."""
    names = ("left", "right", "hidden", "unembed")
    types = (nn.Embedding, nn.Embedding, nn.Linear, nn.Linear)
    if not all(isinstance(getattr(model, a, None), t) for a, t in zip(names, types)):
        raise ConfigError("certify needs a groups.GroupMLP-shaped model (left/right nn.Embedding, nn.Linear "
                          "hidden and unembed); build it with fxabstract.interpret.groups.GroupMLP")
    sites = abstraction.report["sites"]
    if len(sites) != 1 or sites[0]["producer"] != "hidden" or sites[0]["consumers"] != ["unembed"]:
        raise ConfigError("certify needs an abstraction of the single site `hidden`; compile with sites=['hidden']")
    return sites[0]


def _tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """L [n, width], R [n, width] in float64 with pre(x, y) = L[x] + R[y] (the bias is in L)."""
    d = model.left.embedding_dim
    W = model.hidden.weight.detach().double()
    b = model.hidden.bias.detach().double() if model.hidden.bias is not None else 0.0
    L = model.left.weight.detach().double() @ W[:, :d].T + b
    R = model.right.weight.detach().double() @ W[:, d:].T
    return L, R


def _dense_rounding(model: nn.Module, hmax: torch.Tensor) -> float:
    """Bound on |float32 logits - exact logits|_inf of the dense model over the domain (gamma_n bounds)."""
    d = model.left.embedding_dim
    W = model.hidden.weight.detach().double().abs()
    e = torch.cat([model.left.weight.detach().double().abs().amax(0), model.right.weight.detach().double().abs().amax(0)])
    bh = model.hidden.bias.detach().double().abs() if model.hidden.bias is not None else 0.0
    eps_h = _gamma(2 * d + 1) * (W @ e + bh)                             # hidden pre-activation error per unit
    U = model.unembed.weight.detach().double().abs()
    bu = model.unembed.bias.detach().double().abs() if model.unembed.bias is not None else 0.0
    width = U.shape[1]
    return float((_gamma(width + 1) * (U @ (hmax + eps_h) + bu) + U @ eps_h).max())


def _margins(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label logit minus the largest other logit: z [m, n] (overwritten), labels [m] -> [m]."""
    true = z.gather(1, labels[:, None]).squeeze(1)
    z.scatter_(1, labels[:, None], float("-inf"))
    return true - z.amax(1)


def _replacement(site: dict) -> tuple:
    """Kept K, replaced P, and phi = beta + Theta h_K from the report (float64)."""
    K = torch.tensor(site["kept"], dtype=torch.long)
    P = torch.tensor([r["unit"] for r in site["replaced"]], dtype=torch.long)
    beta = torch.tensor([r.get("constant", r.get("beta")) for r in site["replaced"]], dtype=torch.float64)
    theta = torch.tensor([r["theta"] if r["kind"] == "affine" else [0.0] * len(K) for r in site["replaced"]],
                         dtype=torch.float64).reshape(len(P), len(K))
    return K, P, beta, theta


def certify(model: nn.Module, abstraction, domain: torch.Tensor, batch_size: int = 2048) -> dict:
    """A sound lower bound on `model`'s accuracy over every (x, y) of the group whose multiplication
    table is `domain` ([n, n] long, groups.cyclic_table / symmetric_table), from `abstraction` (an
    fxa.abstract result on the site `hidden`) and a per-input bound on the deviation (docs/math.md §5).

    Returns {"bound", "certified" (count), "inputs", "mask" ([n, n] bool: the inputs (x, y) proven
    correct), "abstraction_accuracy", "gap_max", "gap_mean" (the certified bound on the deviation of
    the label-vs-other logit difference, rounding included), "rounding", "kept", "seconds"}."""
    start = time.perf_counter()
    site = _structure(model, abstraction)
    n = model.left.num_embeddings
    if not (isinstance(domain, torch.Tensor) and domain.shape == (n, n) and not domain.is_floating_point()):
        raise ConfigError(f"domain must be the group's [{n}, {n}] integer multiplication table "
                          "(fxabstract.interpret.groups.cyclic_table or symmetric_table)")
    K, P, beta, theta = _replacement(site)
    k, p = len(K), len(P)
    affine = p > 0 and bool(theta.abs().max() > 0)
    U1 = abstraction.module.get_submodule("unembed").weight.detach().cpu().float()  # [n, k] folded U'
    b1 = abstraction.module.get_submodule("unembed").bias.detach().cpu().float()
    U = model.unembed.weight.detach().cpu().double()                                # [n, width]
    bu = model.unembed.bias.detach().cpu().double() if model.unembed.bias is not None else torch.zeros(n)
    L, R = (t.cpu() for t in _tables(model))                                        # pre(x, y) = L[x] + R[y]
    hmax = torch.relu(L.amax(0) + R.amax(0))                                        # [width] bound on h
    # Fold residues: Delta = U_P r + E h_K + e with E = U_K + U_P Theta - U', e = b + U_P beta - b' (§5).
    E = U[:, K] + U[:, P] @ theta - U1.double()
    e = bu + U[:, P] @ beta - b1.double()
    fold_residue = float((E.abs() @ hmax[K]).max() + e.abs().max())
    UP = U[:, P]
    v = torch.maximum(UP - UP.amin(0), UP.amax(0) - UP)                            # [n, p] max_o |U_tj - U_oj|
    sq = UP.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * UP @ UP.T).amax(1).clamp_min(0)           # [n] max_o ||U_tP - U_oP||^2
    rho = d2.sqrt() + 2 * (8 * (p + 2) * 2.0 ** -53) ** 0.5 * float(sq.max()) ** 0.5  # + float64 rounding of d2
    # Float32 allowances (gamma_n bounds): hidden units, residual r, abstraction logits, dense logits.
    order = torch.cat([K, P])
    d_h = 3 * U32 * (L.abs().amax(0) + R.abs().amax(0))[order]                      # |h_hat - h| per unit
    d_hK, d_hP, hK, hP = d_h[:k], d_h[k:], hmax[K], hmax[P]
    phi_size = theta.abs() @ (hK + d_hK)
    d_r = (d_hP + 2 * U32 * (beta.abs() + hP + d_hP + phi_size) + _gamma(k + 2) * phi_size
           + theta.abs() @ d_hK)                                                    # [p] |r_hat - r|
    zmax = float((U1.double().abs() @ hK + b1.double().abs()).max())
    e_c = float((_gamma(k + 1) * (U1.double().abs() @ (hK + d_hK) + b1.double().abs())
                 + U1.double().abs() @ d_hK).max())
    rounding = 2 * (e_c + _dense_rounding(model, hmax) + fold_residue) + 4 * U32 * zmax
    sum_err = 1 + 4 * _gamma(p + 2)                                                 # float32 sums of p terms
    d_one, d_two = float((v @ d_r).max()), float(rho.max()) * float(d_r.norm())
    Lf, Rf = L[:, order].float(), R[:, order].float()
    bf, thf, vf, rhof = beta.float(), theta.float().T, v.float(), rho.float()
    certified = torch.zeros(n * n, dtype=torch.bool)
    correct, gap_max, gap_sum = 0, 0.0, 0.0
    chunk = max(1, batch_size // n)                                                 # rows x per step
    for i in range(0, n, chunk):
        rows = slice(i, min(n, i + chunk))
        labels = domain[rows].reshape(-1)
        h = (Lf[rows, None, :] + Rf[None, :, :]).clamp_min_(0).reshape(len(labels), k + p)  # relu [m, k + p]
        z_c = torch.addmm(b1, h[:, :k], U1.T)                                        # abstraction logits [m, n]
        margin = _margins(z_c, labels)
        correct += int((margin > 0).sum())
        r = h[:, k:] - bf                                                            # residual of phi (§5)
        if affine:
            r = torch.addmm(r, h[:, :k], thf, alpha=-1)
        ra = r.abs_()
        gap = torch.minimum((ra * vf.index_select(0, labels)).sum(1) * sum_err + d_one,  # max_o |Delta_t - Delta_o|
                            ra.norm(dim=1) * rhof.index_select(0, labels) * sum_err + d_two).double() + rounding
        certified[i * n:i * n + len(labels)] = margin.double() > gap                 # margin beats the gap
        gap_max, gap_sum = max(gap_max, float(gap.max())), gap_sum + float(gap.sum())
    total = n * n
    return {"bound": int(certified.sum()) / total, "certified": int(certified.sum()), "inputs": total,
            "mask": certified.reshape(n, n), "abstraction_accuracy": correct / total, "gap_max": gap_max,
            "gap_mean": gap_sum / total, "rounding": rounding, "kept": k, "seconds": time.perf_counter() - start}
