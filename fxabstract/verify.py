"""Verification (docs/math.md §1, §4): exactness against hooks, interchange interventions, certificate.

    >>> with intervene(model, result.report):      # the report's replacements as forward pre-hooks
    ...     z_hooks = model(x)
    >>> relative_error(z_hooks, result.module(x))   # ~1e-7 in float32: the compile step is exact
    >>> iia(model, result, x_eval, swap_p=0.5)      # per site: IIA with a 95% interval, logit-MSE
    >>> iia(model, result, {"input_ids": ids, "attention_mask": mask})   # keyword inputs, as in calibration
    >>> certificate(model, result, x_eval)          # bound on top-1 disagreement from the margin
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .capture import copy_module
from .checks import check_eval_inputs, check_interventions, check_report
from .data import Inputs, as_inputs, logits, output_kind, select_output
from .errors import CalibrationError, ConfigError


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
    """Inputs of an evaluation set as one tensor, for tools that take a single-tensor model input."""
    inputs = as_inputs(data, limit)
    if inputs.kwargs or len(inputs.args) != 1 or not isinstance(inputs.args[0], torch.Tensor):
        raise CalibrationError(f"this tool needs single-tensor inputs, got {inputs.describe()}; pass a Tensor of inputs")
    return inputs.args[0]


def _kind(model: nn.Module, inputs: Inputs, output, kind: str | None) -> tuple[str, int]:
    """(output kind, classes per position) of the preserved output on one sample."""
    with torch.no_grad():
        z = select_output(inputs.take(slice(0, 1)).run(model), output)
    if kind not in (None, "classes", "values"):
        raise ConfigError(f"output_kind={kind!r} must be None (decide from the output), 'classes' or 'values'")
    return kind or output_kind(z, output), int(z.shape[-1]) if z.dim() else 1


def _wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval for a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def swap_run(model: nn.Module, site: dict, cols, x_base, x_src, mask, output=None, where=None):
    """Run model on x_base with the site's units `cols` (None = all) swapped to x_src's where mask: the
    preserved output (`data.select_output`) as [B, o]. x_base, x_src: Tensors or `Inputs`. where: [B, T]
    bool, the positions swapped at a [B, T, d] site value (the source's real tokens: a padded source
    position gives nothing)."""
    x_base, x_src = (x if isinstance(x, Inputs) else Inputs((x,), {}) for x in (x_base, x_src))
    reads = site.get("reads") or {c: "features" for c in site["consumers"]}
    first = next(iter(reads))
    seen = {}
    record = model.get_submodule(first).register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0]))
    try:
        with torch.no_grad():
            x_src.run(model)
    finally:
        record.remove()
    d = len(site["kept"]) if cols is None else site["units"]      # the compiled module has the kept units only
    src = units_view(seen["a"], reads[first], d)

    def swap(how):
        def hook(module, args):
            a = units_view(args[0], how, d).clone()
            m = mask.view(mask.shape[0], *([1] * (a.dim() - 2)), mask.shape[1])
            if where is not None and a.dim() == 3 and a.shape[1] == where.shape[1]:
                m = m & where[:, :, None]
            if cols is None:
                a = torch.where(m, src, a)
            else:
                a[..., cols] = torch.where(m, src[..., cols], a[..., cols])
            return (units_restore(a, how, args[0]), *args[1:])
        return hook

    handles = [model.get_submodule(c).register_forward_pre_hook(swap(how)) for c, how in reads.items()]
    try:
        with torch.no_grad():
            return logits(x_base.run(model), output)
    finally:
        for h in handles:
            h.remove()


def iia(model: nn.Module, result, data, swap_p: float = 0.5, trials: int = 10_000, seed: int = 0,
        batch_size: int = 2048, output=None, output_kind: str | None = None) -> dict:
    """Interchange interventions per site (docs/math.md §4).

    Each trial draws a base and a source input and a Bernoulli(swap_p) mask over the kept units K;
    a_K := mask ? a_K(source) : a_K(base) in the original (removed units keep their base values) and in
    the compiled abstraction (removed units follow their replacement).

    data: a Tensor, a tuple of positional tensors, a dict of keyword tensors, or an iterable of batches.
    output: which of the model's outputs to compare (default: the one the abstraction preserves).
    output_kind: "classes" or "values" (default: decided by `output_kind`). For class logits: IIA =
    P[top-1 agrees] (per position for a [B, T, V] output) with a 95% Wilson interval, and the logit-MSE.
    For values (regression, embeddings), where a top-1 match is not defined: the interchange error
    E ||z_c - z|| / ||z|| and the mean cosine between the two outputs; no IIA is reported. Positions
    padded by the report's mask input (attention_mask) enter no metric."""
    check_interventions(swap_p, trials, batch_size)
    original = copy_module(model).eval()
    compiled = result.module
    output = getattr(result, "output", None) if output is None else output
    x = as_inputs(data).to(next(original.parameters()).device)
    check_eval_inputs(original, x)
    kind, classes = _kind(original, x, output, output_kind)
    mask_name = result.report.get("mask") or "attention_mask"
    padding = x.kwargs.get(mask_name)                                         # [n, T]: 0 at padded positions
    out = {}
    for index, site in enumerate(result.report["sites"]):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        K = torch.tensor(site["kept"], dtype=torch.long, device=x.args[0].device if x.args else None)
        agree, positions, mse, error, cosine, done = 0, 0, 0.0, 0.0, 0.0, 0
        while done < trials:
            b = min(batch_size, trials - done)
            base = torch.randint(0, len(x), (b,), generator=gen)
            src = torch.randint(0, len(x), (b,), generator=gen)
            mask = (torch.rand(b, len(K), generator=gen) < swap_p).to(K.device)
            where = padding[src] != 0 if isinstance(padding, torch.Tensor) and padding.dim() == 2 else None
            z = swap_run(original, site, K, x.take(base), x.take(src), mask, output, where).double()
            zc = swap_run(compiled, site, None, x.take(base), x.take(src), mask, output, where).double()
            z, zc = z.view(b, -1, classes), zc.view(b, -1, classes)                # [b, positions, classes]
            real = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
            if isinstance(padding, torch.Tensor) and padding.dim() == 2 and padding.shape[1] == z.shape[1] > 1:
                real = padding[base].to(z.device) != 0                               # padded positions: no metric
            z, zc = z * real[..., None], zc * real[..., None]
            if kind == "classes":
                agree += int(((z.argmax(-1) == zc.argmax(-1)) & real).sum())
                positions += int(real.sum())
                mse += float(0.5 * (z - zc).pow(2).sum())
            else:
                z, zc = z.reshape(b, -1), zc.reshape(b, -1)
                error += float(((zc - z).norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-12)).sum())
                cosine += float(torch.nn.functional.cosine_similarity(z, zc, dim=-1).sum())
            done += b
        if kind == "classes":
            out[site["name"]] = {"iia": agree / positions, "ci95": _wilson(agree, positions), "logit_mse": mse / trials,
                                 "trials": trials, "swap_p": swap_p, "output_kind": kind}
        else:
            out[site["name"]] = {"interchange_error": error / trials, "cosine": cosine / trials, "trials": trials,
                                 "swap_p": swap_p, "output_kind": kind}
    return out


def certificate(model: nn.Module, result, data, output=None, output_kind: str | None = None) -> dict:
    """Margin certificate (docs/math.md §4): P(top-1 disagreement) <= P(m <= 2 eps) + D2 / eps^2, for all eps.

    m is the dense model's top-1 margin, D2 = E||z_c - z||^2; the bound is minimised over eps. Defined for
    class logits [B, C] only: other outputs are a ConfigError. data, output, output_kind: as for `iia`."""
    original = copy_module(model).eval()
    output = getattr(result, "output", None) if output is None else output
    x = as_inputs(data).to(next(original.parameters()).device)
    check_eval_inputs(original, x)
    kind, classes = _kind(original, x, output, output_kind)
    if kind != "classes":
        raise ConfigError("the certificate bounds top-1 disagreement, which this output does not have (it is not "
                          "class logits [batch, classes]); use fxa.iia's interchange error and cosine, or pass "
                          "output_kind='classes' if the output is class logits")
    with torch.no_grad():
        z = logits(x.run(original), output).double()
        zc = logits(x.run(result.module), output).double()
    if z.shape[1] != classes:
        raise ConfigError(f"the certificate takes one prediction per sample; this output has {z.shape[1] // classes} "
                          "positions per sample: pass output= a callable that picks one position's logits")
    top2 = z.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).sort().values                   # [n], ascending
    D2 = float((zc - z).pow(2).sum(-1).mean())
    n = len(margin)
    eps = (margin / 2).clamp_min(1e-12)
    bounds = (torch.arange(1, n + 1, dtype=torch.float64) / n) + D2 / eps**2   # at eps = m_(i)/2
    i = int(torch.argmin(bounds))
    return {"bound": min(1.0, float(bounds[i])), "eps": float(eps[i]), "D2": D2,
            "disagreement": float((z.argmax(-1) != zc.argmax(-1)).double().mean()), "samples": n}
