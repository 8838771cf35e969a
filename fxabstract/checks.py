"""Input checks: a user's mistake with data, options or a report becomes one `fxabstract.errors`
exception naming the problem and the fix, raised before work starts (or at the batch that shows it).

    >>> for batch in checked_batches(calibration): ...   # CalibrationError at the first bad batch
    >>> check_options(probes=16, seed=0, sites=None)
"""
from __future__ import annotations

import math
import re

import torch
import torch.fx as fx
from torch import nn

from .data import split_batch
from .errors import CalibrationError, ConfigError


def _tensors(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    named = [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    return [(name, t) for name, t in named if isinstance(t, torch.Tensor)]


def _describe(signature: list) -> str:
    return ", ".join(f"{name} [B, {', '.join(map(str, shape))}] {str(dtype).removeprefix('torch.')}"
                     for name, dtype, shape in signature)


def checked_batches(calibration, what: str = "calibration"):
    """Yield the calibration batches, each checked: non-empty, finite, and with the inputs' trailing
    shapes and dtypes of the first batch (the sites' shapes are fixed by it)."""
    if isinstance(calibration, (torch.Tensor, str, bytes, dict)):
        raise CalibrationError(f"{what} is a {type(calibration).__name__}, not an iterable of batches; "
                               "pass a list of batches such as [x] or x.split(256), or a DataLoader")
    try:
        iterator = iter(calibration)
    except TypeError:
        raise CalibrationError(f"{what} is a {type(calibration).__name__}, not an iterable of batches; "
                               "pass a list of batches, a DataLoader or a generator") from None
    first = None
    for i, batch in enumerate(iterator):
        args, kwargs, targets = split_batch(batch)
        tensors = _tensors(args, kwargs)
        for name, t in tensors:
            if t.dim() == 0 or t.shape[0] == 0:
                raise CalibrationError(f"{what} batch {i}: {name} has no samples (shape {list(t.shape)}); "
                                       "the first axis is the batch axis, drop empty batches")
            if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
                raise CalibrationError(f"{what} batch {i}: {name} contains NaN or inf; "
                                       "clean or drop those samples")
        if isinstance(targets, torch.Tensor) and targets.is_floating_point() and not torch.isfinite(targets).all():
            raise CalibrationError(f"{what} batch {i}: the targets contain NaN or inf; "
                                   "clean or drop those samples")
        if len({t.shape[0] for _, t in tensors}) > 1:
            raise CalibrationError(f"{what} batch {i}: its inputs have different batch sizes "
                                   f"{[t.shape[0] for _, t in tensors]}; give every input the same first axis")
        signature = [(name, t.dtype, tuple(t.shape[1:])) for name, t in tensors]
        if first is None:
            first = signature
        elif signature != first:
            raise CalibrationError(f"{what} batch {i} has {_describe(signature)} but batch 0 had "
                                   f"{_describe(first)}; give every batch the same shapes (but the batch axis) "
                                   "and dtypes")
        yield batch


def check_ridge(ridge: float) -> None:
    """ConfigError unless ridge is a finite number >= 0."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ConfigError(f"ridge = {ridge!r} must be a finite number >= 0 (relative to each unit's variance)")


def check_options(*, probes: int, seed: int, sites) -> None:
    """ConfigError for a malformed analysis option."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes = {probes!r} must be a positive int (Hutchinson probes per sample)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed = {seed!r} must be an int")
    if sites is None:
        return
    if isinstance(sites, str):
        try:
            re.compile(sites)
        except re.error as exc:
            raise ConfigError(f"sites = {sites!r} is not a valid regex ({exc}); "
                              "pass a regex or a list of site names") from None
    elif not isinstance(sites, (list, tuple, set)) or not all(isinstance(s, str) for s in sites):
        raise ConfigError(f"sites = {sites!r} must be None, a regex string or a list of site names")


def check_interventions(swap_p: float, trials: int, batch_size: int) -> None:
    """ConfigError for IIA options out of range."""
    if isinstance(swap_p, bool) or not isinstance(swap_p, (int, float)) or not 0 <= swap_p <= 1:
        raise ConfigError(f"swap_p = {swap_p!r} must be a probability in [0, 1]")
    for name, value in (("trials", trials), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} = {value!r} must be a positive int")


def check_eval_inputs(model: nn.Module, x: torch.Tensor) -> None:
    """CalibrationError unless x [n, ...] is non-empty, finite, and runs through `model`."""
    if x.dim() == 0 or len(x) == 0:
        raise CalibrationError(f"the evaluation data has no samples (shape {list(x.shape)}); pass at least one input")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise CalibrationError("the evaluation data contains NaN or inf; clean or drop those samples")
    try:
        with torch.no_grad():
            model(x[:2])
    except Exception as exc:  # whatever the user's forward raises on inputs it cannot take
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"the model cannot run on the evaluation data (shape {list(x.shape)}, {x.dtype}): "
                               f"{reason}; give inputs of the shape and dtype the model takes") from None


def check_report(model: nn.Module, report) -> None:
    """ConfigError unless `report` is an fxabstract report whose sites and consumers exist in `model`."""
    if not isinstance(report, dict) or not isinstance(report.get("sites"), list):
        raise ConfigError("intervene needs an fxabstract report (result.report, or report.json loaded with json.load)")
    modules = dict(model.named_modules())
    for site in report["sites"]:
        try:
            units, kept, consumers = site["units"], site["kept"], site["consumers"]
            removed = [r["unit"] for r in site["replaced"]]
        except (KeyError, TypeError):
            raise ConfigError("the report's site entries lack units/kept/replaced/consumers; "
                              "pass a report written by fxabstract") from None
        consumers = consumers + [c for b in site.get("branches", []) for c in b.get("consumers", [])]
        missing = [c for c in consumers if c not in modules]
        if missing:
            raise ConfigError(f"the report's site {site.get('name')!r} names consumers {missing} that "
                              f"{type(model).__name__} does not have; pass the model the report was compiled from")
        if sorted(kept + removed) != list(range(units)):
            raise ConfigError(f"the report's site {site.get('name')!r} does not split its {units} units into kept "
                              "and replaced; pass an unedited report")


def check_statistics(gm: fx.GraphModule, stats) -> None:
    """CalibrationError if the model overflowed or made NaN on the calibration data: in the statistics
    of a site, or in the outputs of any calibration sample. A compile from such statistics would be
    silently wrong."""
    dtype = next(gm.parameters()).dtype
    fix = (f"({dtype} overflow, or NaN from the model itself); compile a wider copy (model.float()) or "
           "rescale the inputs")
    for name, moments in stats.moments.items():
        curvature = [v for v in vars(stats.curvature[name]).values() if isinstance(v, torch.Tensor)]
        if not all(bool(torch.isfinite(t).all()) for t in [moments.s1, moments.s2, *curvature]):
            at_site = not (torch.isfinite(moments.s1).all() and torch.isfinite(moments.s2).all())
            where = f"at site {name!r}" if at_site else f"after site {name!r}"
            raise CalibrationError(f"the model computes NaN or inf {where} on the calibration data {fix}")
    for name, moments in stats.branch_moments.items():
        if not (torch.isfinite(moments.s1).all() and torch.isfinite(moments.s2).all()):
            raise CalibrationError(f"the model computes NaN or inf at SE branch {name!r} on the calibration data {fix}")
    if stats.nonfinite_outputs:   # counted by the calibration pass itself, over every sample
        raise CalibrationError(f"the model's outputs are NaN or inf on the calibration data {fix}")
