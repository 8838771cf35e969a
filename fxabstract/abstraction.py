"""The pipeline (docs/architecture.md): capture -> sites -> calibrate (moments, curvature) -> scores -> select
-> replace -> fold. `abstract` runs it all; `analyse` stops after the data pass so one analysis can
be compiled at many budgets (`Analysis.compile`), which is what benchmarks and sweeps want.

    >>> result = abstract(model, calibration, keep=0.25, replacement="affine")
    >>> result.module(x)            # smaller GraphModule
    >>> result.report["sites"][0]["kept"]
"""
from __future__ import annotations

import itertools
import re
import warnings

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .capture import capture, linearize_addmm
from .cost import module_macs, site_macs
from .checks import check_options, check_ridge, check_statistics, checked_batches
from .data import bind, first_tensor, split_batch
from .errors import CalibrationError, ConfigError, FxAbstractError, FxAbstractWarning, NoSiteError
from .output import saving
from .output.report import site_entry, summary
from .passes.budget import allocate, allowed_removals, granularity, macs_removals
from .passes.calibrate import Statistics, add_fit_data, calibrate
from .passes.distributed import all_reduce
from .passes.fold import fold
from .passes.replace import replace
from .passes.scores import JOINT_SCORES, OUTPUT_UNITS, SCORES
from .passes.measure import measured_curve
from .passes.select import curves, fit, tiny_calibration_ridge
from .sites import Site, annotate_shapes, find_sites

REPLACEMENTS = ("constant", "affine")
ALLOCATIONS = ("measured", "predicted")
BUDGETS = ("units", "macs")
SELECTIONS = ("joint", "diagonal", "local")


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
        self.report = report
        self.example = example        # a few calibration samples (positional inputs), for torch.export

    def summary(self) -> str:
        return summary(self.report)

    def save(self, folder: str, force: bool = False, example_inputs=None) -> None:
        """Write module.pt2 (torch.export: no pickled code; `fxa.load` reads it), module.pt (the
        pickled GraphModule, as before) and report.json into folder: all three or none; an existing
        file there is an OutputError unless force=True. The export runs on example_inputs, or by
        default on two calibration samples."""
        example = self.example if example_inputs is None else (
            example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
        saving.save(self.module, self.report, example, folder, force)

    def __repr__(self) -> str:
        return f"Abstraction(\n{self.summary()}\n)"


def load(folder: str) -> Abstraction:
    """The Abstraction saved in folder by `Abstraction.save`: the module from module.pt2 (no pickled
    code), the report from report.json."""
    module, report = saving.read(folder)
    return Abstraction(module, report)


class Analysis:
    """The result of the data pass over one model: sites and their statistics."""

    def __init__(self, gm: fx.GraphModule, sites: list[Site], ineligible: dict, stats: Statistics,
                 score: str, seed: int, progress: bool = False):
        self.gm, self.sites, self.ineligible, self.stats = gm, sites, ineligible, stats
        self.score, self.seed = score, seed
        self.progress = progress      # show a bar per pass (measured risk curves: one step per site)
        self._curves: dict = {}
        self._measured_cache: dict = {}

    def compile(self, keep=0.5, replacement: str = "constant", selection: str = "joint",
                round_to: int = 8, ridge: float = 1e-3, allocation: str = "measured",
                budget: str = "units") -> Abstraction:
        """Select, replace and fold at budget `keep`.

        allocation (global budgets of output-unit scores): "measured" allocates on each site's risk
        curve measured on the calibration reservoir; "predicted" on the second-order curves alone.
        budget: "units" (keep counts units) or "macs" (keep is the fraction of the sites' MACs per sample
        kept, `cost.site_macs`: output-unit scores take the least risk per MAC saved first across sites,
        the others save that fraction at every site); the report then gives MACs before and after."""
        choose(replacement, REPLACEMENTS, "replacement")
        choose(selection, SELECTIONS, "selection")
        choose(allocation, ALLOCATIONS, "allocation")
        _check_budget(keep, budget)
        if not isinstance(round_to, int) or round_to < 1:
            raise ConfigError(f"round_to = {round_to!r} must be a positive int (1 switches rounding off)")
        check_ridge(ridge)
        ridges = tiny_calibration_ridge({s.name: self.stats.moments[s.name].n for s in self.sites},
                                        {s.name: s.n_units for s in self.sites}, ridge)
        if self.score not in JOINT_SCORES:
            selection = "diagonal"  # variance, magnitude, random have no cross terms: they rank diagonally
        has_matrices = self.stats.curvature[self.sites[0].name].H0 is not None
        if needs_matrices(self.score, replacement, selection) and not has_matrices:
            raise ConfigError(f"{selection} selection with {replacement} replacement needs the d x d statistics; "
                              "analyse with matrices=True")
        cv = self.risk_curves(replacement, selection, ridges)
        if isinstance(keep, dict) or self.score not in OUTPUT_UNITS:
            allocation = "per-site"
        for s in tqdm(self.sites, desc="measure risk", unit="site", leave=False,
                      disable=not self.progress or allocation != "measured"):
            cv[s.name].measured = None
            if allocation == "measured":
                cv[s.name].measured = self._measured(s, cv[s.name], replacement, selection, ridges[s.name],
                                                    round_to)
        example = tuple(v[:2] if isinstance(v, torch.Tensor) else v for v in self.stats.reservoir[0][0])
        macs = module_macs(self.gm, *example) if budget == "macs" else None
        if macs is not None:
            removed = macs_removals(self.sites, cv, macs, keep, self.score in OUTPUT_UNITS, round_to)
        else:
            removed = allocate(self.sites, cv, keep, self.score, round_to)
        plans = [fit(s, cv[s.name], removed[s.name], self.stats, self.score, replacement, selection,
                     ridges[s.name]) for s in self.sites]
        module = fold(replace(self.gm, plans))
        report = {
            "score": self.score, "replacement": replacement, "selection": selection,
            "keep": keep, "budget": budget, "round_to": round_to, "ridge": ridge, "seed": self.seed,
            "allocation": allocation,
            "curvature": {"divergence": self.stats.divergence, "method": self.stats.method,
                          "probes": self.stats.probes},
            "calibration_samples": self.stats.curvature[self.sites[0].name].n,
            "fit_samples": self.stats.fit_samples,
            "parameters": {"before": _count(self.gm), "after": _count(module)},
            "predicted_risk": sum(p.predicted_risk for p in plans),
            "sites": [{**site_entry(p, None if cv[p.site.name].measured is None
                                    else float(cv[p.site.name].measured[len(p.removed)])),
                       "ridge": ridges[p.site.name]} for p in plans],
            "ineligible": self.ineligible,
        }
        if macs is not None:
            report["macs"] = {"before": sum(macs.values()), "after": sum(module_macs(module, *example).values())}
            _warn_if_short(report["macs"], (1 - keep) * site_macs(self.sites, macs))
        return Abstraction(module, report, example)

    def risk_curves(self, replacement: str = "constant", selection: str = "joint",
                    ridge: float | dict[str, float] = 1e-3) -> dict:
        """Per site name: the elimination order and predicted risk curve that `compile` allocates on
        (passes/select.py `Curves`), computed once per setting; for budgets of one's own (e.g. in MACs)."""
        if self.score not in JOINT_SCORES:
            selection = "diagonal"
        key = (replacement, selection, tuple(sorted(ridge.items())) if isinstance(ridge, dict) else ridge)
        if key not in self._curves:
            self._curves[key] = curves(self.sites, self.stats, self.gm, self.score, replacement, selection,
                                       ridge, self.seed)
        return self._curves[key]

    def _measured(self, site: Site, cv, replacement: str, selection: str, ridge: float, round_to: int):
        """The site's measured risk curve, cached per setting."""
        key = (site.name, replacement, selection, ridge, round_to)
        if key not in self._measured_cache:
            steps = allowed_removals(site.n_units, granularity(site, round_to))
            self._measured_cache[key] = measured_curve(
                self.gm, site, steps,
                lambda k: fit(site, cv, k, self.stats, self.score, replacement, selection, ridge),
                self.stats.reservoir, self.stats.divergence)
        return self._measured_cache[key]


def _select_sites(sites: list[Site], wanted) -> list[Site]:
    if wanted is None:
        return sites
    names = [s.name for s in sites]
    if isinstance(wanted, str):
        chosen = [s for s in sites if re.fullmatch(wanted, s.name)]
        if not chosen:
            raise ConfigError(f"sites regex {wanted!r} matches no site; sites are {names}")
        return chosen
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ConfigError(f"unknown sites {unknown}; sites are {names}")
    if not wanted:
        raise ConfigError(f"sites=[] selects no site; pass None for every site, or some of {names}")
    return [s for s in sites if s.name in set(wanted)]


def analyse(model: nn.Module, calibration, score: str = "logit-mse", sites=None, curvature: str = "auto",
            probes: int = 16, matrices: bool = True, seed: int = 0, progress: bool = False, *,
            distributed: bool = False, sequential: bool = False, fit_data=None) -> Analysis:
    """Capture `model` (a copy) and stream `calibration` once through every selected site.

    distributed: `calibration` is this process's shard; the statistics are summed over the default
      torch.distributed process group (passes/distributed.py), so every rank gets the same analysis.
    sequential: hold one block's activations at a time (one block per site, passes/sequential.py)
      instead of the whole graph's; the statistics are the same.
    fit_data: more batches (like `calibration`) run forward only, to fit affine replacements on the plain
      moments of calibration + fit_data (passes/calibrate.py `add_fit_data`): a forward pass costs a
      fraction of the curvature pass, and least squares gains from more samples."""
    choose(score, SCORES, "score")
    choose(curvature, ("auto", "exact", "hutchinson"), "curvature method")
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
    divergence = score if score in OUTPUT_UNITS else "logit-mse"
    stats = calibrate(gm, chosen, itertools.chain([first], batches), divergence, curvature, probes, matrices,
                      seed, progress, sequential=sequential)
    if fit_data is not None:
        extra = _same_kind(checked_batches(fit_data, "fit_data"), first, "fit_data")
        stats = add_fit_data(gm, chosen, stats, extra, progress)
    if distributed:   # sum over ranks first, so that every rank checks (and fails on) the same statistics
        stats = all_reduce(stats)
    check_statistics(gm, stats)
    return Analysis(gm, chosen, ineligible, stats, score, seed, progress)


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
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CalibrationError(f"the model cannot run on the first calibration batch "
                               f"({str(exc).strip().splitlines()[0]}); give inputs of the shape and dtype "
                               "the model takes") from None
    linearize_addmm(gm)                 # torch.fx's Conv1D (GPT-2): its views' shapes are known now
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


def needs_matrices(score: str, replacement: str, selection: str) -> bool:
    """Whether these settings need the d x d statistics (joint selection, affine replacement)."""
    return (selection in ("joint", "local") and score in JOINT_SCORES) or replacement == "affine"


def abstract(model: nn.Module, calibration, keep=0.5, score: str = "logit-mse", replacement: str = "constant",
             selection: str = "joint", round_to: int = 8, sites=None, *, curvature: str = "auto",
             probes: int = 16, ridge: float = 1e-3, allocation: str = "measured", seed: int = 0,
             progress: bool = False, distributed: bool = False, sequential: bool = False,
             fit_data=None, budget: str = "units") -> Abstraction:
    """Compile `model` into a smaller causal abstraction of it (docs/api.md).

    keep: float = global fraction of units kept; int = units kept in total; dict = units kept per site.
    score: logit-mse | kl | ce | variance | cwvar | magnitude | random. The first three are risks in
      output units and share one global budget; the others keep the same fraction at every site.
    selection: joint (cross terms between removed units, docs/math.md §3) | diagonal (closed-form ranking);
      | local (joint elimination with the consumers' Gram matrix W^T W as the curvature: optimal brain
      surgeon at the consumer; for logit-mse, kl and ce the order's risk is then measured in output units,
      so one global budget still allocates it); variance, magnitude and random always rank diagonally;
      cwvar's joint selection is layer-local.
    allocation: how a global budget of an output-unit score is split over sites: "measured" (each
      site's risk curve measured on up to 512 calibration samples) or "predicted" (second order only).
    distributed: calibrate on this process's shard and sum the statistics over torch.distributed ranks.
    sequential: calibrate one block of the graph at a time (for models too large to analyse whole).
    fit_data: extra batches, forward only, on which affine replacements are fitted (with the calibration).
    budget: "units" (keep counts units) or "macs" (keep: the fraction of the sites' MACs per sample kept).
    """
    choose(replacement, REPLACEMENTS, "replacement")
    choose(selection, SELECTIONS, "selection")
    _check_budget(keep, budget)
    matrices = needs_matrices(score, replacement, selection)
    analysis = analyse(model, calibration, score, sites, curvature, probes, matrices, seed, progress,
                       distributed=distributed, sequential=sequential, fit_data=fit_data)
    return analysis.compile(keep, replacement, selection, round_to, ridge, allocation, budget)


__all__ = ["abstract", "analyse", "Abstraction", "Analysis", "FxAbstractError"]
