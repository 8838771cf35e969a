"""Input checks: a user's mistake with data, options or a report becomes one `fxabstract.errors`
exception naming the problem and the fix, raised before work starts (or at the batch that shows it).

    >>> for batch in checked_batches(calibration): ...   # CalibrationError at the first bad batch
    >>> check_options(probes=16, seed=0, sites=None)
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import math
import re

import torch
import torch.fx as fx
from torch import nn

from .data import Inputs, split_batch
from .errors import CalibrationError, ConfigError


def _tensors(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    named = [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    return [(name, t) for name, t in named if isinstance(t, torch.Tensor)]


def _describe(signature: list) -> str:
    return ", ".join(f"{name} [B, {', '.join(map(str, shape))}] {str(dtype).removeprefix('torch.')}"
                     for name, dtype, shape in signature)


def checked_batches(calibration, what: str = "calibration"):
    """Yield the calibration batches, each checked: non-empty, finite, and with the inputs, dtypes and
    ranks of the first batch. Sizes other than the batch axis may differ (a tokenizer's padding=True
    gives every batch its own length); a size the model cannot take fails at that batch."""
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
        elif [(n, d, len(s)) for n, d, s in signature] != [(n, d, len(s)) for n, d, s in first]:
            raise CalibrationError(f"{what} batch {i} has {_describe(signature)} but batch 0 had "
                                   f"{_describe(first)}; give every batch the same inputs, dtypes and number of axes "
                                   "(sizes may differ)")
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


def check_eval_inputs(model: nn.Module, inputs: Inputs) -> None:
    """CalibrationError unless the evaluation `inputs` are non-empty, finite, and run through `model`."""
    tensors = inputs.tensors()
    if not tensors or len(inputs) == 0:
        raise CalibrationError(f"the evaluation data has no samples ({inputs.describe() or 'no tensor'}); "
                               "pass at least one input")
    if len({len(t) for t in tensors}) > 1:
        raise CalibrationError(f"the evaluation inputs have different batch sizes ({inputs.describe()}); give every "
                               "input the same first axis")
    if any((t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all() for t in tensors):
        raise CalibrationError("the evaluation data contains NaN or inf; clean or drop those samples")
    try:
        with torch.no_grad():
            inputs.take(slice(0, 2)).run(model)
    except Exception as exc:  # whatever the user's forward raises on inputs it cannot take
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"the model cannot run on the evaluation data ({inputs.describe()}): "
                               f"{reason}; give inputs of the shape and dtype the model takes") from None


REPORT_SCHEMA = json.loads(importlib.resources.files(__package__).joinpath("report.schema.json").read_text())
REPORT_VERSION = max(REPORT_SCHEMA["properties"]["version"]["enum"])   # the version new reports carry
REFERENCES = ("$tensor", "$records")   # how a saved report.json points into tensors.safetensors (output/tensors.py)
FIX = "pass an unedited report written by fxabstract (result.report, or fxa.load(folder).report)"


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:   # an int past the float range is still a finite number
        return True


def _plain(values: list, integers: bool) -> bool:
    """True when `values` are surely all ints (integers) or finite ints and floats, checked at C speed:
    a NaN or inf makes the sum NaN or inf. False sends the list to the item-by-item check, which also
    clears a list whose finite sum overflowed."""
    types = set(map(type, values))
    if integers or not types <= {int, float}:
        return types <= {int}
    try:
        return math.isfinite(sum(values))
    except OverflowError:
        return False


def _plain_replacement(r) -> bool:
    """True when `r` surely follows the schema's replacement (a shortcut past the validator for the
    thousands of them in a report): a unit, a kind and its finite coefficients, nothing else."""
    if type(r) is not dict or type(r.get("unit")) is not int or r["unit"] < 0:
        return False
    numbers = ("constant",) if r.get("kind") == "constant" else ("beta",) if r.get("kind") == "affine" else None
    if numbers is None or r.keys() != {"unit", "kind", *numbers, *(("theta",) if numbers == ("beta",) else ())}:
        return False
    value = r[numbers[0]]
    return type(value) in (int, float) and _finite(value) and (
        numbers == ("constant",) or type(r["theta"]) is list and _plain(r["theta"], False))


@functools.cache
def _report_validator():
    """The JSON Schema validator of report.schema.json, where `number` means a finite number and an
    `integer` is an int. Arrays of plain ints or floats are checked in one pass (a report holds
    millions of coefficients); only an array with a bad item is walked item by item, to name it."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine_many({
        "number": lambda c, v: base.TYPE_CHECKER.is_type(v, "number") and _finite(v),
        "integer": lambda c, v: isinstance(v, int) and not isinstance(v, bool)})
    standard_items = base.VALIDATORS["items"]

    def items(validator, subschema, instance, schema):
        kind = subschema.get("type") if isinstance(subschema, dict) and len(subschema) == 1 else None
        if isinstance(instance, list) and kind in ("number", "integer") and _plain(instance, kind == "integer"):
            return
        if isinstance(instance, list) and subschema == {"$ref": "#/$defs/replacement"} and all(
                map(_plain_replacement, instance)):
            return
        yield from standard_items(validator, subschema, instance, schema)

    return jsonschema.validators.extend(base, validators={"items": items}, type_checker=checker)(REPORT_SCHEMA)


def _value_text(value) -> str:
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else f"{value} (infinite)"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    return f"a list of {len(value)}" if isinstance(value, list) else f"a {type(value).__name__}"


def _schema_problem(error) -> str:
    """One line: where in the report the first schema violation is, what is wrong, and the fix."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    subject = f"the report's {where}" if where else "the report"
    rule, value, instance = error.validator, error.validator_value, error.instance
    if isinstance(instance, dict) and any(key in instance for key in REFERENCES):
        return (f"{subject} is a reference into tensors.safetensors (a report.json as saved); read a saved report "
                "with fxa.load(folder).report or fxabstract.output.tensors.read_report(folder)")
    if where == "version":
        return (f"{subject} is {_value_text(instance)}, but this fxabstract reads report version "
                f"{' or '.join(map(str, value))}; upgrade fxabstract, or compile the report again with this one")
    if rule == "type":
        what = f"is {_value_text(instance)}, not {'a finite number' if value == 'number' else f'of type {value}'}"
    elif rule in ("enum", "const"):
        what = f"is {_value_text(instance)}, not {' or '.join(map(repr, value if rule == 'enum' else [value]))}"
    elif rule == "required":
        what = f"has no {', '.join(repr(k) for k in value if k not in instance)}"
    elif rule == "minItems":
        what = f"has {len(instance)} items, fewer than {value}" if value > 1 else \
            "is empty (a compile has at least one site)" if where == "sites" else "is empty"
    elif rule == "minimum":
        what = f"is {_value_text(instance)}, below {value}"
    else:
        what = f"is invalid ({error.message[:120]})"
    return f"{subject} {what}; {FIX}"


def _error_order(error) -> tuple:
    """A version problem first (the rest may be another format's), then in report order."""
    path = list(error.absolute_path)
    return path[:1] != ["version"], [(0, p, "") if isinstance(p, int) else (1, 0, p) for p in path]


def validate_report(report) -> None:
    """ConfigError unless `report` is a valid fxabstract report: it follows report.schema.json (kinds,
    finite coefficients, a known version, at least one site) and each site's kept and replaced units
    split its units, each affine theta with one coefficient per kept unit. The message names the first
    problem and the fix."""
    if not isinstance(report, dict) or not isinstance(report.get("sites"), list):
        raise ConfigError("intervene needs an fxabstract report (result.report, or fxa.load(folder).report)")
    errors = sorted(_report_validator().iter_errors(report), key=_error_order)
    if errors:
        error = errors[0]
        raise ConfigError(_schema_problem(error))
    for site in report["sites"]:
        units, kept, name = site["units"], site["kept"], site["name"]
        if sorted(kept + [r["unit"] for r in site["replaced"]]) != list(range(units)):
            raise ConfigError(f"the report's site {name!r} does not split its {units} units into kept and replaced; "
                              f"{FIX}")
        for owner in [site] + site.get("branches", []):
            for r in owner["replaced"]:
                if r["kind"] == "affine" and len(r["theta"]) != len(kept):
                    raise ConfigError(f"the report's site {name!r} replaces unit {r['unit']} with {len(r['theta'])} "
                                      f"theta coefficients for {len(kept)} kept units (theta needs one per kept unit); "
                                      f"{FIX}")


def check_report(model: nn.Module, report) -> None:
    """ConfigError unless `report` is a valid fxabstract report (`validate_report`) whose consumers exist
    in `model`."""
    validate_report(report)
    modules = dict(model.named_modules())
    for site in report["sites"]:
        consumers = site["consumers"] + [c for b in site.get("branches", []) for c in b["consumers"]]
        missing = [c for c in consumers if c not in modules]
        if missing:
            raise ConfigError(f"the report's site {site['name']!r} names consumers {missing} that "
                              f"{type(model).__name__} does not have; pass the model the report was compiled from")


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
