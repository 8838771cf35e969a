"""Verification (docs/math.md §1, §4): exactness against hooks, interchange interventions, certificate.

    >>> with intervene(model, result.report):      # the report's replacements as forward pre-hooks
    ...     z_hooks = model(x)
    >>> relative_error(z_hooks, result.module(x))   # ~1e-7 in float32: the compile step is exact
    >>> iia(model, result, x_eval, swap_p=0.5)      # per site: IIA with a 95% interval, logit-MSE
    >>> certificate(model, result, x_eval)          # bound on top-1 disagreement from the margin
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from torch import nn

from .checks import check_eval_inputs, check_interventions, check_report
from .data import logits, split_batch
from .errors import CalibrationError


def units_view(a: torch.Tensor, how: str, d: int) -> torch.Tensor:
    """A consumer's input with the site's units on the last axis: [B, ..., d]."""
    if how == "channels":
        return a.movedim(1, -1)
    if how == "flattened":
        return a.reshape(a.shape[0], d, -1).movedim(1, -1)
    return a


def units_restore(u: torch.Tensor, how: str, like: torch.Tensor) -> torch.Tensor:
    """The inverse of `units_view`: back to the consumer's input layout."""
    return u if how == "features" else u.movedim(-1, 1).reshape(like.shape)


def _replacement_hook(site: dict, like: torch.Tensor, how: str):
    K = torch.tensor(site["kept"], dtype=torch.long, device=like.device)
    P = torch.tensor([r["unit"] for r in site["replaced"]], dtype=torch.long, device=like.device)
    beta = torch.tensor([r.get("constant", r.get("beta")) for r in site["replaced"]], dtype=torch.float64)
    theta = torch.tensor([r["theta"] if r["kind"] == "affine" else [0.0] * len(K) for r in site["replaced"]],
                         dtype=torch.float64).reshape(len(P), len(K))

    def hook(module, args):
        a = units_view(args[0], how, site["units"]).clone()
        a[..., P] = beta.to(a) + a[..., K] @ theta.to(a).T      # do(a_P := beta + theta a_K)
        return (units_restore(a, how, args[0]), *args[1:])

    return hook


@contextmanager
def intervene(model: nn.Module, report: dict):
    """Apply the report's replacements to `model` with forward pre-hooks on every consumer.

    This reads the report alone (JSON-safe), so anyone can check a compiled module against it."""
    check_report(model, report)
    like = next(model.parameters())
    handles = []
    try:
        for site in report["sites"]:
            if site["replaced"]:   # an SE squeeze (a "branches" entry) has its own replacement, same units
                for read in [site] + [{**b, "kept": site["kept"]} for b in site.get("branches", [])]:
                    reads = read.get("reads") or {c: "features" for c in read["consumers"]}
                    handles += [model.get_submodule(c).register_forward_pre_hook(_replacement_hook(read, like, how))
                                for c, how in reads.items()]
        yield model
    finally:
        for h in handles:
            h.remove()


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |reference - other| / max(1, max |reference|)."""
    reference, other = reference.detach(), other.detach()
    return float((reference - other).abs().max() / reference.abs().max().clamp_min(1.0))


def gather(data, limit: int = 100_000) -> torch.Tensor:
    """Inputs of an evaluation set as one tensor: a Tensor, or an iterable of batches."""
    if isinstance(data, torch.Tensor):
        return data
    xs, n = [], 0
    for batch in data:
        args, kwargs, _ = split_batch(batch)
        if kwargs or len(args) != 1:
            raise CalibrationError("interchange interventions need single-tensor inputs; pass a Tensor of inputs")
        xs.append(args[0])
        n += len(args[0])
        if n >= limit:
            break
    if not xs:
        raise CalibrationError("the evaluation data is empty; pass at least one batch of inputs")
    return torch.cat(xs)[:limit]


def _wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval for a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def swap_run(model: nn.Module, site: dict, cols, x_base, x_src, mask):
    """Run model on x_base with the site's units `cols` (None = all) swapped to x_src's where mask."""
    reads = site.get("reads") or {c: "features" for c in site["consumers"]}
    first = next(iter(reads))
    seen = {}
    record = model.get_submodule(first).register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0]))
    try:
        with torch.no_grad():
            model(x_src)
    finally:
        record.remove()
    d = len(site["kept"]) if cols is None else site["units"]      # the compiled module has the kept units only
    src = units_view(seen["a"], reads[first], d)

    def swap(how):
        def hook(module, args):
            a = units_view(args[0], how, d).clone()
            m = mask.view(mask.shape[0], *([1] * (a.dim() - 2)), mask.shape[1])
            if cols is None:
                a = torch.where(m, src, a)
            else:
                a[..., cols] = torch.where(m, src[..., cols], a[..., cols])
            return (units_restore(a, how, args[0]), *args[1:])
        return hook

    handles = [model.get_submodule(c).register_forward_pre_hook(swap(how)) for c, how in reads.items()]
    try:
        with torch.no_grad():
            return logits(model(x_base))
    finally:
        for h in handles:
            h.remove()


def iia(model: nn.Module, result, data, swap_p: float = 0.5, trials: int = 10_000, seed: int = 0,
        batch_size: int = 2048) -> dict:
    """Interchange intervention accuracy per site (docs/math.md §4).

    Each trial draws a base and a source input and a Bernoulli(swap_p) mask over the kept units K;
    a_K := mask ? a_K(source) : a_K(base) in the original (removed units keep their base values) and in
    the compiled abstraction (removed units follow their replacement). IIA = P[argmax agrees]."""
    check_interventions(swap_p, trials, batch_size)
    original = copy.deepcopy(model).eval()
    compiled = result.module
    x = gather(data).to(next(original.parameters()).device)
    check_eval_inputs(original, x)
    out = {}
    for index, site in enumerate(result.report["sites"]):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        K = torch.tensor(site["kept"], dtype=torch.long, device=x.device)
        agree, mse, done = 0, 0.0, 0
        while done < trials:
            b = min(batch_size, trials - done)
            base = torch.randint(0, len(x), (b,), generator=gen)
            src = torch.randint(0, len(x), (b,), generator=gen)
            mask = (torch.rand(b, len(K), generator=gen) < swap_p).to(x.device)
            z = swap_run(original, site, K, x[base], x[src], mask)
            zc = swap_run(compiled, site, None, x[base], x[src], mask)
            agree += int((z.argmax(-1) == zc.argmax(-1)).sum())
            mse += float(0.5 * (z.double() - zc.double()).pow(2).sum(-1).sum())
            done += b
        out[site["name"]] = {"iia": agree / trials, "ci95": _wilson(agree, trials), "logit_mse": mse / trials,
                             "trials": trials, "swap_p": swap_p}
    return out


def certificate(model: nn.Module, result, data) -> dict:
    """Margin certificate (docs/math.md §4): P(top-1 disagreement) <= P(m <= 2 eps) + D2 / eps^2, for all eps.

    m is the dense model's top-1 margin, D2 = E||z_c - z||^2; the bound is minimised over eps."""
    original = copy.deepcopy(model).eval()
    x = gather(data).to(next(original.parameters()).device)
    check_eval_inputs(original, x)
    with torch.no_grad():
        z = logits(original(x)).double()
        zc = logits(result.module(x)).double()
    top2 = z.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).sort().values                   # [n], ascending
    D2 = float((zc - z).pow(2).sum(-1).mean())
    n = len(margin)
    eps = (margin / 2).clamp_min(1e-12)
    bounds = (torch.arange(1, n + 1, dtype=torch.float64) / n) + D2 / eps**2   # at eps = m_(i)/2
    i = int(torch.argmin(bounds))
    return {"bound": min(1.0, float(bounds[i])), "eps": float(eps[i]), "D2": D2,
            "disagreement": float((z.argmax(-1) != zc.argmax(-1)).double().mean()), "samples": n}
