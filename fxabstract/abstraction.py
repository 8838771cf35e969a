"""The pipeline (docs/architecture.md): capture -> sites -> calibrate (moments, curvature) -> scores -> select
-> replace -> fold. `abstract` runs it all; `analyse` stops after the data pass so one analysis can
be compiled at many budgets (`Analysis.compile`), which is what benchmarks and sweeps want.

    >>> result = abstract(model, calibration, keep=0.25, replacement="affine")
    >>> result.module(x)            # smaller GraphModule
    >>> result.report["sites"][0]["kept"]
"""
from __future__ import annotations

import itertools
import math
import os
import re
import warnings

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .capture import capture, linearize_addmm, modularize_rms_norms
from .cost import module_macs, site_macs
from .checks import REPORT_VERSION, check_options, check_ridge, check_statistics, checked_batches
from .data import Inputs, as_inputs, bind, default_output, first_tensor, select_output, split_batch, tensors_of
from .errors import CalibrationError, ConfigError, FxAbstractError, FxAbstractWarning, NoSiteError
from .output import saving
from .output.report import site_entry, summary
from .passes.budget import allocate, allowed_removals, expand_ties, granularity, macs_removals, tied_proxies
from .passes.calibrate import Statistics, add_fit_data, calibrate
from .passes.distributed import all_reduce, total_samples
from .passes.fold import fold
from .passes.replace import replace
from .passes.scores import JOINT_SCORES, OUTPUT_UNITS, SCORES
from .passes.measure import corrected_curve, first_samples, measure_plan, measured_risks, operating_points
from .passes.refit import check_fit, fit_pool, refit_outputs, refit_sequential
from .passes.select import curves, refitted_risk, tiny_calibration_ridge
from .passes.select import fit as fit_plan
from .sites import Site, annotate_shapes, find_sites

REPLACEMENTS = ("constant", "affine")
ALLOCATIONS = ("measured", "predicted")
BUDGETS = ("units", "macs")
SELECTIONS = ("joint", "diagonal", "local")
ROUND_TO = 8          # kept widths are multiples of this by default (hardware-friendly shapes)


def _count(gm: nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def _warn_if_short(macs: dict, target: float) -> None:
    """The allocation counts a layer that two sites share once (`cost.removal_macs`), so a budget is
    missed only where the removals allowed cannot save more: say so."""
    short = target - (macs["before"] - macs["after"])
    if short > 1e-6 * macs["before"]:
        warnings.warn(f"the MAC budget is missed by {short:,.0f} MACs per sample ({short / macs['before']:.1%}): "
                      "the removals allowed cannot save more (every site keeps a group of round_to units, a "
                      "producer joined by cat keeps a unit); raise keep or lower round_to", FxAbstractWarning,
                      stacklevel=3)


def _check_budget(keep, budget: str) -> None:
    choose(budget, BUDGETS, "budget")
    if budget == "macs" and (isinstance(keep, bool) or not isinstance(keep, float) or not 0 < keep <= 1):
        raise ConfigError(f"budget='macs' takes keep as a fraction in (0, 1] of the sites' MACs to keep, got "
                          f"{keep!r}; pass a float such as 0.9, or budget='units' for unit counts")


def choose(value, options, what):
    if value not in options:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")
    return value


class Abstraction:
    """A compiled abstraction: the smaller `module` and the `report` that describes it."""

    def __init__(self, module: fx.GraphModule, report: dict, example: tuple | None = None):
        self.module = module
        if isinstance(report, dict) and "version" not in report:   # the report format (checks.REPORT_SCHEMA)
            report = {"version": REPORT_VERSION, **report}
        self.report = report
        self.example = example        # a few calibration samples (positional inputs), for torch.export

    def summary(self) -> str:
        return summary(self.report)

    def save(self, folder: str, force: bool = False, example_inputs=None) -> list[str]:
        """Write into folder, all or none: module.pt2 (torch.export: no pickled code; `fxa.load` reads
        it), report.json with its coefficients in tensors.safetensors (output/tensors.py), and module.pt
        (the pickled GraphModule, as before) where the module pickles: not one captured through
        torch.export. The saved report's "files" lists what was written; so does the return value.
        Files get the permissions of the umask. An existing file there is an OutputError unless
        force=True. The export runs on example_inputs (a Tensor, a tuple of positional tensors or a
        dict of keyword tensors), or by default on two calibration samples."""
        if example_inputs is not None:
            example = as_inputs(example_inputs)
        else:
            example = None if self.example is None else Inputs(tuple(self.example), {})
        return saving.save(self.module, self.report, example, folder, force)

    def __repr__(self) -> str:
        return f"Abstraction(\n{self.summary()}\n)"


def load(folder: str) -> Abstraction:
    """The Abstraction saved in folder by `Abstraction.save`: the module from module.pt2 (no pickled
    code), the report from report.json and tensors.safetensors, as it was in memory (plus "files"),
    checked against the report schema (a ConfigError names what is wrong); `fxa.intervene` takes it."""
    module, report = saving.read(folder)
    return Abstraction(module, report)


class Analysis:
    """The result of the data pass over one model: sites and their statistics."""

    def __init__(self, gm: fx.GraphModule, sites: list[Site], ineligible: dict, stats: Statistics,
                 score: str, seed: int, progress: bool = False, output=None, mask: str | None = None):
        self.gm, self.sites, self.ineligible, self.stats = gm, sites, ineligible, stats
        self.score, self.seed = score, seed
        self.output = output          # which of the model's outputs is preserved (data.select_output)
        self.mask = mask              # the keyword input marking padded positions, or None
        self.progress = progress      # show a bar per pass (measured risk curves: one step per site)
        self._curves: dict = {}
        self._measured_cache: dict = {}
        self._plan: int | None = None   # measure_samples, once
        self._warned_ridge = False    # the tiny-calibration ridge warning is given once

    def compile(self, keep=0.5, replacement: str = "constant", selection: str = "joint",
                round_to: int | None = None, ridge: float = 1e-3, allocation: str = "measured",
                budget: str = "units", fit: str = "local", fit_options: dict | None = None) -> Abstraction:
        """Select, replace and fold at budget `keep`.

        allocation (global budgets of output-unit scores): "measured" allocates on the predicted curves,
        measures each site's risk around that allocation on calibration samples (passes/measure.py),
        corrects the curves by it and allocates again; "predicted" on the second-order curves alone.
        budget: "units" (keep counts units) or "macs" (keep is the fraction of the sites' MACs per sample
        kept, `cost.site_macs`: output-unit scores take the least risk per MAC saved first across sites,
        the others save that fraction at every site); the report then gives MACs before and after.
        round_to: kept widths are multiples of it (None: the default, 8). When no site is wider than
          round_to, nothing could be removed: a ConfigError for a round_to passed, a warning for the default.
        fit: how the replacement maps (beta, theta) are fitted once the units are chosen: "local" (the closed
          form at each site), "sequential" (each affine map refitted on the network whose earlier sites are
          replaced) or "outputs" (beta and theta moved by gradient descent on the output divergence to the
          dense model, with a ridge towards the closed form and early stopping on held-back samples);
          passes/refit.py. fit_options: for "outputs", `passes.refit.OUTPUT_FIT_DEFAULTS`'s keys; for
          "sequential", `SEQUENTIAL_DEFAULTS`'s (correct: the curvature-corrected target)."""
        explicit, round_to = round_to is not None, ROUND_TO if round_to is None else round_to
        choose(replacement, REPLACEMENTS, "replacement")
        choose(selection, SELECTIONS, "selection")
        choose(allocation, ALLOCATIONS, "allocation")
        _check_budget(keep, budget)
        if not isinstance(round_to, int) or round_to < 1:
            raise ConfigError(f"round_to = {round_to!r} must be a positive int (1 switches rounding off)")
        check_ridge(ridge)
        fit_options = check_fit(fit, fit_options)      # the defaults filled in
        if not isinstance(keep, dict) and keep not in (1, 1.0, sum(s.n_units for s in self.sites)) and all(
                len(allowed_removals(s.n_units, granularity(s, round_to))) == 1 for s in self.sites):
            message = (f"round_to = {round_to}{'' if explicit else ' (the default)'} is at least every site's width "
                       f"({', '.join(f'{s.name}: {s.n_units}' for s in self.sites)}): no unit could be removed; "
                       "lower round_to (1 switches rounding off)")
            if explicit:
                raise ConfigError(message)
            warnings.warn(message, FxAbstractWarning, stacklevel=2)
        with warnings.catch_warnings():          # the tiny-calibration warning: once per analysis, not per compile
            if self._warned_ridge:
                warnings.simplefilter("ignore", FxAbstractWarning)
            ridges = tiny_calibration_ridge({s.name: self.stats.moments[s.name].n for s in self.sites},
                                            {s.name: s.n_units for s in self.sites}, ridge)
        self._warned_ridge = True
        if self.score not in JOINT_SCORES:
            selection = "diagonal"  # variance, magnitude, random have no cross terms: they rank diagonally
        normal = [s for s in self.sites if s.name not in self.stats.diagonal]   # the others: memory fallback
        has = self.stats.curvature[normal[0].name].matrices if normal else True
        need = needs_matrices(self.score, replacement, selection)
        if (need is True and has is not True) or (need and not has):
            raise ConfigError(f"{selection} selection with {replacement} replacement needs the d x d statistics; "
                              f"analyse with matrices={need!r}" + (" (this analysis has only the joint ones)"
                                                                    if has else ""))
        cv = self.risk_curves(replacement, selection, ridges)
        if isinstance(keep, dict) or self.score not in OUTPUT_UNITS:
            allocation = "per-site"
        example = tuple(v[:2] if isinstance(v, torch.Tensor) else v for v in self.stats.reservoir[0][0])
        macs = module_macs(self.gm, *example) if budget == "macs" else None

        def removals() -> dict[str, int]:
            budget_sites, budget_cv = tied_proxies(self.sites, cv)      # a residual stream is one site here
            if macs is not None:
                found = macs_removals(budget_sites, budget_cv, macs, keep, self.score in OUTPUT_UNITS, round_to)
            else:
                found = allocate(budget_sites, budget_cv, keep, self.score, round_to)
            return expand_ties(found, self.sites)

        for s in self.sites:
            cv[s.name].measured = None
        removed = removals()                  # on the predicted curves
        measured: dict[str, dict[int, float]] = {}
        if allocation == "measured":          # measured where that allocation lands, then allocated again
            for s in tqdm(self.sites, desc="measure risk", unit="site", leave=False, disable=not self.progress):
                steps = allowed_removals(s.n_units, granularity(s, round_to))
                measured[s.name] = self._measured(s, cv[s.name], operating_points(removed[s.name], steps),
                                                  replacement, selection, ridges[s.name])
                cv[s.name].measured = corrected_curve(cv[s.name].curve, measured[s.name])
            removed = removals()
            for s in self.sites:              # the report's measured_risk is a measurement
                self._measured(s, cv[s.name], [removed[s.name]], replacement, selection, ridges[s.name])
        plans = [fit_plan(s, cv[s.name], removed[s.name], self.stats, self.score, *self._setting(s, replacement, selection),
                     ridges[s.name]) for s in self.sites]
        plans, fit_record = self._refit(plans, fit, fit_options, replacement, ridges)
        module = fold(replace(self.gm, plans))
        report = {
            "score": self.score, "replacement": replacement, "selection": selection,
            "keep": keep, "budget": budget, "round_to": round_to, "ridge": ridge, "seed": self.seed,
            "allocation": allocation, "fit": fit_record,
            **({"measured": {"samples": self.measure_samples(),
                             "points": {name: sorted(k for k in m if k) for name, m in measured.items()}}}
               if measured else {}),
            "curvature": {"divergence": self.stats.divergence, "method": self.stats.method,
                          "probes": self.stats.probes},
            "calibration_samples": self.stats.curvature[self.sites[0].name].n,
            "fit_samples": self.stats.fit_samples,
            "parameters": {"before": _count(self.gm), "after": _count(module)},
            "predicted_risk": sum(p.predicted_risk for p in plans),
            "sites": [{**site_entry(p, measured[p.site.name][removed[p.site.name]] if measured else None),
                       "ridge": ridges[p.site.name],
                       **({"statistics": f"diagonal: {self.stats.diagonal[p.site.name]}"}
                          if p.site.name in self.stats.diagonal else {})} for p in plans],
            "ineligible": self.ineligible,
            "output": describe_output(self.output),
            "mask": self.mask,
        }
        if macs is not None:
            report["macs"] = {"before": sum(macs.values()), "after": sum(module_macs(module, *example).values())}
            _warn_if_short(report["macs"], (1 - keep) * site_macs(self.sites, macs))
        result = Abstraction(module, report, example)
        result.output = self.output   # iia and certificate read the same output
        return result

    def _refit(self, plans: list, fit: str, options: dict | None, replacement: str, ridges: dict) -> tuple[list, dict]:
        """The plans with their maps refitted by `fit` (passes/refit.py), and the report's record of it."""
        if fit == "local":
            return plans, {"method": "local"}
        pool = fit_pool(self.stats)
        placeholders = [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]
        mask_index = placeholders.index(self.mask) if self.mask in placeholders else None
        if fit == "sequential":
            correct = options["correct"]
            plans = refit_sequential(self.gm, plans, pool, ridges, mask_index, self.stats if correct else None)
            record = {"method": "sequential", "samples": sum(len(first_tensor(i, {})) for i, _ in pool),
                      "correct": correct}
            if replacement == "constant":
                record["note"] = "constant replacements are not changed by a sequential fit"
        else:
            plans, record = refit_outputs(self.gm, plans, pool, self.stats, self.output, mask_index, self.seed, options)
        return [refitted_risk(p, self.stats, self.score) for p in plans], record

    def risk_curves(self, replacement: str = "constant", selection: str = "joint",
                    ridge: float | dict[str, float] = 1e-3) -> dict:
        """Per site name: the elimination order and predicted risk curve that `compile` allocates on
        (passes/select.py `Curves`), computed once per setting; for budgets of one's own (e.g. in MACs)."""
        if self.score not in JOINT_SCORES:
            selection = "diagonal"
        key = (replacement, selection, tuple(sorted(ridge.items())) if isinstance(ridge, dict) else ridge)
        if key not in self._curves:
            by_setting: dict[tuple[str, str], list[Site]] = {}    # memory-fallback sites have their own
            for s in self.sites:
                by_setting.setdefault(self._setting(s, replacement, selection), []).append(s)
            out = {}
            for (rep, sel), group in by_setting.items():
                out.update(curves(group, self.stats, self.gm, self.score, rep, sel, ridge, self.seed))
            self._curves[key] = {s.name: out[s.name] for s in self.sites}
        return self._curves[key]

    def _setting(self, site: Site, replacement: str, selection: str) -> tuple[str, str]:
        """(replacement, selection) for `site`: a site kept to O(d) statistics gets constant, diagonal."""
        return ("constant", "diagonal") if site.name in self.stats.diagonal else (replacement, selection)

    def _measured(self, site: Site, cv, ks: list[int], replacement: str, selection: str,
                  ridge: float) -> dict[int, float]:
        """The site's measured risks {k: R} at least at `ks` removed (`measured_risks`): each point is
        measured once per setting, so compiles at other budgets add points."""
        replacement, selection = self._setting(site, replacement, selection)
        points = self._measured_cache.setdefault((site.name, replacement, selection, ridge), {0: 0.0})
        new = [k for k in ks if k not in points]
        if new:
            values = measured_risks(
                self.gm, site, new, lambda j: fit_plan(site, cv, j, self.stats, self.score, replacement, selection, ridge),
                self.stats.reservoir, self.stats.divergence, self.output, self.measure_samples())
            points.update(zip(new, values))
        return points

    def measure_samples(self) -> int:
        """Calibration samples each measured risk runs on: about one forward pass of the calibration set
        for all of them (passes/measure.py `measure_plan`)."""
        if self._plan is None:
            with torch.no_grad():
                z = select_output(fx.Interpreter(self.gm).run(*first_samples(self.stats.reservoir, 1)[0][0]), self.output)
            rows = math.prod(z.shape[1:-1]) if z.dim() >= 3 else 1
            kept = sum(len(first_tensor(i, {})) for i, _ in self.stats.reservoir)
            self._plan = measure_plan(len(self.sites), self.stats.curvature[self.sites[0].name].n, kept, rows)
        return self._plan


def _select_sites(sites: list[Site], wanted) -> list[Site]:
    if wanted is None:
        return sites
    names = [s.name for s in sites]
    if isinstance(wanted, str):
        chosen = [s for s in sites if re.fullmatch(wanted, s.name)]
        if not chosen:
            raise ConfigError(f"sites regex {wanted!r} matches no site (a regex must match the whole name: "
                              f"'.*{wanted}.*' finds it inside one); sites are {names}")
        return _whole_streams(sites, chosen)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ConfigError(f"unknown sites {unknown}; sites are {names}")
    if not wanted:
        raise ConfigError(f"sites=[] selects no site; pass None for every site, or some of {names}")
    return _whole_streams(sites, [s for s in sites if s.name in set(wanted)])


def _whole_streams(sites: list[Site], chosen: list[Site]) -> list[Site]:
    """`chosen`, checked to hold every point of each residual stream it holds any of (a stream's
    writers lose their rows for every point at once)."""
    for s in chosen:
        if s.tie:
            missing = [t.name for t in sites if t.tie == s.tie and t not in chosen]
            if missing:
                raise ConfigError(f"sites selects part of the residual stream {s.tie!r} (not {missing}); select "
                                  f"all its points, e.g. the regex '{s.tie}\\..*', or none")
    return chosen


def analyse(model: nn.Module, calibration, score: str = "logit-mse", sites=None, curvature: str = "auto",
            probes: int | None = None, matrices: bool | str = True, seed: int = 0, progress: bool = False, *,
            distributed: bool = False, sequential: bool = False, fit_data=None, output=None,
            mask="auto", matrix_memory: int | None = None) -> Analysis:
    """Capture `model` (a copy) and stream `calibration` once through every selected site.

    distributed: `calibration` is this process's shard; the statistics are summed over the default
      torch.distributed process group (passes/distributed.py), so every rank gets the same analysis.
    sequential: hold one block's activations at a time (one block per site, passes/sequential.py)
      instead of the whole graph's; the statistics are the same.
    matrices: which d x d statistics to gather: True (every one: any compile), "joint" (only the
      curvature sums of joint selection with constant replacement: cheaper) or False (diagonal only).
    matrix_memory: the bytes the d x d statistics may take (None: a quarter of the machine's memory).
      Where they would take more, the widest sites (a residual stream's points together) keep O(d)
      statistics instead, with a warning: `compile` gives them diagonal selection and a constant
      replacement, and the report says so per site (`statistics`).
    fit_data: more batches (like `calibration`) run forward only, to fit affine replacements on the plain
      moments of calibration + fit_data (passes/calibrate.py `add_fit_data`): a forward pass costs a
      fraction of the curvature pass, and least squares gains from more samples."""
    choose(score, SCORES, "score")
    choose(curvature, ("auto", "exact", "hutchinson"), "curvature method")
    if matrices not in (True, False, "joint"):
        raise ConfigError(f"matrices = {matrices!r}; give True (every d x d statistic), \"joint\" (joint selection "
                          "with constant replacement only) or False")
    if probes is None:
        n = calibration_samples(calibration)
        probes = default_probes(total_samples(n) if distributed else n)
    check_options(probes=probes, seed=seed, sites=sites)
    batches = checked_batches(calibration)
    first = next(batches, None)
    if first is None:
        raise CalibrationError("the calibration data is empty; pass at least one batch of inputs")
    gm, found, ineligible = capture_sites(model, first)
    if not found:
        why = "; ".join(f"{k}: {v}" for k, v in ineligible.items()) or "it has no Linear or Conv layer"
        raise NoSiteError(f"{type(model).__name__} has no eligible site ({why}); "
                          "fxabstract needs hidden units between Linear or Conv layers")
    chosen = _select_sites(found, sites)
    levels, diagonal = _matrix_levels(chosen, matrices, matrix_memory)
    divergence = score if score in OUTPUT_UNITS else "logit-mse"
    output = _resolve_output(gm, first, output)
    mask = _resolve_mask(first, mask)
    stats = calibrate(gm, chosen, itertools.chain([first], batches), divergence, curvature, probes, levels,
                      seed, progress, sequential=sequential, output=output, mask=mask)
    stats.diagonal = diagonal
    if fit_data is not None:
        extra = _same_kind(checked_batches(fit_data, "fit_data"), first, "fit_data")
        stats = add_fit_data(gm, chosen, stats, extra, progress, mask=mask)
    if distributed:   # sum over ranks first, so that every rank checks (and fails on) the same statistics
        stats = all_reduce(stats)
    check_statistics(gm, stats)
    return Analysis(gm, chosen, ineligible, stats, score, seed, progress, output, mask)


def _resolve_mask(batch, mask) -> str | None:
    """The keyword input that marks padded positions: `mask` checked against the first batch, or for
    "auto" `attention_mask` when the batch has it."""
    _, kwargs, _ = split_batch(batch)
    if mask == "auto":
        return "attention_mask" if "attention_mask" in kwargs else None
    if mask is None or mask is False:
        return None
    if not isinstance(mask, str) or mask not in kwargs:
        raise ConfigError(f"mask={mask!r} names no keyword input of the calibration batches ({sorted(kwargs)}); pass "
                          "the name of the padding mask input, 'auto' or None")
    return mask


def describe_output(output) -> str:
    """How the report names the preserved output: "output" (the one Tensor), the index or key, or the
    callable's name."""
    if output is None:
        return "output"
    if callable(output):
        return f"callable {getattr(output, '__qualname__', type(output).__name__)}"
    return str(output)


def _resolve_output(gm: fx.GraphModule, batch, output):
    """The output selector: `output` checked on one run of the first batch, or the default one; a model
    with several output tensors and no `output` warns once, naming what is preserved."""
    args, kwargs, _ = split_batch(batch)
    like = next(iter(gm.parameters()), None)
    if like is not None:
        args = tuple(a.to(like.device) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to(like.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        out = fx.Interpreter(gm).run(*bind(gm, args, kwargs))
    z = select_output(out, output)                   # a bad output= is a ConfigError now, not mid-pass
    B = len(first_tensor(args, kwargs))
    if z.dim() == 0 or z.shape[0] != B:
        raise CalibrationError(f"the first calibration batch has {B} samples (the first axis of its inputs) but the "
                               f"model's output has shape {list(z.shape)}: give every input a batch axis (a list of "
                               "single samples, list(x), has none: pass [x] or x.split(64))")
    if output is not None:
        return output
    chosen = default_output(out)
    names = [name for name, _ in tensors_of(out)]
    if len(names) > 1:
        warnings.warn(f"the model returns {len(names)} tensors ({', '.join(names)}); preserving {chosen!r} "
                      f"(pass output= an index, a key or a callable to choose another)", FxAbstractWarning,
                      stacklevel=4)
    return chosen


def capture_sites(model: nn.Module, batch) -> tuple[fx.GraphModule, list[Site], dict[str, str]]:
    """Capture `model` (a copy; torch.export on `batch` when fx cannot trace it), record every value's
    shape on `batch`, and find the sites."""
    args, kwargs, _ = split_batch(batch)
    like = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    if like is not None:
        args = tuple(a.to(like.device) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to(like.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    gm = capture(model, (args, kwargs))
    try:
        annotate_shapes(gm, bind(gm, args, kwargs))
    except AssertionError as exc:       # a guard of a module torch.export captured with fixed sizes
        first = str(exc).strip().splitlines()[0]
        raise CalibrationError(f"the model refuses the first calibration batch's sizes ({first}): it was exported "
                               "with fixed sizes; export it with a dynamic batch axis (dynamic_shapes= "
                               "torch.export.Dim) or pass the original nn.Module, or calibrate with batches of the "
                               "exported sizes") from None
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CalibrationError(f"the model cannot run on the first calibration batch "
                               f"({str(exc).strip().splitlines()[0]}); give inputs of the shape and dtype "
                               "the model takes") from None
    linearize_addmm(gm)                 # torch.fx's Conv1D (GPT-2): its views' shapes are known now
    modularize_rms_norms(gm)            # written-out RMSNorms: their dtypes are known now
    found, ineligible = find_sites(gm)
    return gm, found, ineligible


def _same_kind(batches, first, what: str):
    """`batches`, checked to hold inputs of the calibration's shape (but for the batch axis) and dtype."""
    ref = first_tensor(*split_batch(first)[:2])
    for batch in batches:
        x = first_tensor(*split_batch(batch)[:2])
        if x.shape[1:] != ref.shape[1:] or x.dtype != ref.dtype:
            raise CalibrationError(f"{what} batches hold inputs of shape {tuple(x.shape[1:])} {x.dtype}, the calibration "
                                   f"data {tuple(ref.shape[1:])} {ref.dtype}; give {what} of the calibration's kind")
        yield batch


MATRIX_SUMS = {"joint": 3, True: 8}     # d x d float64 sums per site: H0, H1, H2 (+ 4 affine, + moments)


def machine_memory() -> int:
    """Physical memory in bytes (16 GiB where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _matrix_levels(sites: list[Site], matrices, budget: int | None) -> tuple[dict, dict[str, str]]:
    """{site: d x d statistics level}, and {site: why} for the sites kept to O(d) statistics: the widest
    first (a residual stream's points together) until the d x d sums fit in `budget` bytes."""
    levels = {s.name: matrices for s in sites}
    if not matrices:
        return levels, {}
    if budget is None:
        budget = machine_memory() // 4
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"matrix_memory = {budget!r} must be a number of bytes >= 0 (None: a quarter of the "
                          "machine's memory)")
    size = {s.name: MATRIX_SUMS[matrices] * 8 * s.n_units ** 2 for s in sites}
    groups: dict[str, list[Site]] = {}
    for s in sites:
        groups.setdefault(s.tie or s.name, []).append(s)
    total = sum(size.values())
    diagonal = {}
    for key in sorted(groups, key=lambda k: -max(s.n_units for s in groups[k])):
        if total <= budget:
            break
        for s in groups[key]:
            levels[s.name] = False
            total -= size[s.name]
            diagonal[s.name] = (f"its d x d statistics ({s.n_units} units) would take {size[s.name] / 2**30:.2f} GiB "
                                f"of a {budget / 2**30:.2f} GiB budget (matrix_memory)")
    if diagonal:
        warnings.warn(f"the d x d statistics of {len(diagonal)} site(s) ({', '.join(diagonal)}) do not fit in "
                      f"matrix_memory = {budget / 2**30:.2f} GiB: they get O(d) statistics, diagonal selection and "
                      "a constant replacement (raise matrix_memory, or select fewer sites)",
                      FxAbstractWarning, stacklevel=3)
    return levels, diagonal


SAMPLE_PROBES = 1536       # probes x samples the default aims at (docs/math.md §7)
MAX_PROBES = 16


def calibration_samples(calibration) -> int | None:
    """How many samples `calibration` holds, where that is known without iterating it (a list or tuple
    of batches, a DataLoader over a sized dataset); else None."""
    if isinstance(calibration, (list, tuple)):
        try:
            return sum(first_tensor(*split_batch(b)[:2]).shape[0] for b in calibration)
        except Exception:  # noqa: BLE001 - a malformed batch is checked_batches' to report
            return None
    dataset = getattr(calibration, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def default_probes(n: int | None) -> int:
    """Hutchinson probes per sample when none are given, for `n` calibration samples: the estimator's noise
    falls with probes x samples (docs/math.md §7) and its cost grows with probes alone, so aim at
    SAMPLE_PROBES in all: 1 probe for 1,536 samples or more, 8 for 192, at most MAX_PROBES; 4 where the
    sample count is not known (a generator)."""
    return 4 if not n else max(1, min(MAX_PROBES, -(-SAMPLE_PROBES // n)))


def needs_matrices(score: str, replacement: str, selection: str) -> bool | str:
    """Which d x d statistics these settings need: "joint" (the curvature sums of joint selection with
    constant replacement, for an output-unit score), True (every one: affine replacement, local
    selection, cwvar) or False."""
    if replacement == "affine" or (selection in ("joint", "local") and score in JOINT_SCORES and (
            selection == "local" or score not in OUTPUT_UNITS)):
        return True
    return "joint" if selection == "joint" and score in OUTPUT_UNITS else False


def abstract(model: nn.Module, calibration, keep=0.5, score: str = "logit-mse", replacement: str = "constant",
             selection: str = "joint", round_to: int | None = None, sites=None, *, curvature: str = "auto",
             probes: int | None = None, ridge: float = 1e-3, allocation: str = "measured", seed: int = 0,
             progress: bool = False, distributed: bool = False, sequential: bool = False,
             fit_data=None, budget: str = "units", output=None, mask="auto",
             matrix_memory: int | None = None, fit: str = "local", fit_options: dict | None = None) -> Abstraction:
    """Compile `model` into a smaller causal abstraction of it (docs/api.md).

    keep: float = global fraction of units kept; int = units kept in total; dict = units kept per site.
    score: logit-mse | kl | ce | variance | cwvar | magnitude | random. The first three are risks in
      output units and share one global budget; the others keep the same fraction at every site.
    selection: joint (cross terms between removed units, docs/math.md §3) | diagonal (closed-form ranking);
      | local (joint elimination with the consumers' Gram matrix W^T W as the curvature: optimal brain
      surgeon at the consumer; for logit-mse, kl and ce the order's risk is then measured in output units,
      so one global budget still allocates it); variance, magnitude and random always rank diagonally;
      cwvar's joint selection is layer-local.
    allocation: how a global budget of an output-unit score is split over sites: "measured" (the
      predicted curves corrected by each site's risk measured where their allocation lands, about one
      forward pass of the calibration set in all) or "predicted" (second order only).
    distributed: calibrate on this process's shard and sum the statistics over torch.distributed ranks.
    sequential: calibrate one block of the graph at a time (for models too large to analyse whole).
    fit_data: extra batches, forward only, on which affine replacements are fitted (with the calibration).
    budget: "units" (keep counts units) or "macs" (keep: the fraction of the sites' MACs per sample kept).
    output: which of the model's outputs the abstraction preserves: an index (a tuple output), a key (a
      dict or ModelOutput), or a callable (output -> Tensor). Default: the output itself when it is one
      Tensor, else its "logits", else its first tensor, with a warning that names the choice.
    mask: the keyword input whose zeros mark padded positions: "auto" (`attention_mask` when the batches
      have it), a name, or None (every position is real). Padded positions enter no statistic or fit.
    matrix_memory: the bytes the d x d statistics may take (`analyse`); None: a quarter of the memory.
    fit: "local" | "sequential" | "outputs": how the replacement maps are fitted (`Analysis.compile`); the
      extended fits run on the first 512 calibration samples and the first 4,096 of fit_data.
    """
    choose(replacement, REPLACEMENTS, "replacement")
    check_fit(fit, fit_options)
    choose(selection, SELECTIONS, "selection")
    _check_budget(keep, budget)
    matrices = needs_matrices(score, replacement, selection)
    analysis = analyse(model, calibration, score, sites, curvature, probes, matrices, seed, progress,
                       distributed=distributed, sequential=sequential, fit_data=fit_data, output=output, mask=mask,
                       matrix_memory=matrix_memory)
    return analysis.compile(keep, replacement, selection, round_to, ridge, allocation, budget, fit, fit_options)


__all__ = ["abstract", "analyse", "Abstraction", "Analysis", "FxAbstractError"]
