#!/usr/bin/env python
"""Causal explanatory graphs: fxa.explain (the project's node effects, method="effects", with each of its
`effect` settings; and Ahmad et al.'s path interventions, method="paths") against captum's attributions,
on LeNet-5 (digits upsampled to 32x32, the paper's architecture), the digits MLP and a small digits CNN,
each trained from scratch on several seeds.

Unit space (per hidden site, every class; baselines are captum's layer attributions at the site, averaged
over the class inputs: integrated gradients, saliency = |gradient|, GradientShap, InputXGradient):
- spearman: bootstrap rank stability. Five bootstrap resamples of the training split; per class and site,
  the Spearman correlation of the unit scores over the union of both resamples' top-k units, averaged
  over the ten pairs of resamples (higher: more stable).
- deletion_auc: on the test inputs the model assigns to the class, the method's top-k units resample-
  ablated (set to their values on a random input of another class); the drop of the class logit as a
  fraction of the drop when every unit of the site is resampled, (z - z_k) / (z - z_0), averaged over
  k = 1, 2, 4, ... up to half the units (higher: more faithful).
- sufficiency_auc: every unit except the top-k resampled the same way; the fraction of the class logit's
  change recovered, (z_k - z_0) / (z - z_0), averaged over the same k (higher: the top units carry more
  of the class). Resample ablation is neutral between the methods: none of them scores a unit by setting
  it to another input's value (fxabstract's effects set a constant, the paths method zeroes weights).
Input space (LeNet-5 and the CNN: maps built from the selected units of the last conv layer and the conv
before it, `Explanation.input_maps`: the paths method's causes, and for fxabstract its top units, as many
per site as the paths method selected; baselines are captum's input attributions):
- local_lipschitz: quantus.LocalLipschitzEstimate, 10 Gaussian perturbations (mean 0.1, std 0.1, the
  paper's settings), every map taken in absolute value and normalised by its maximum (lower: more stable).
  local_lipschitz_raw: the same with the maps as they are, which is how the paper scored its baselines
  (its own maps were normalised); the paper's ordering is read on paths' normalised figure against the
  baselines' raw ones.
- irof: quantus.IROF (SLIC superpixels removed in attribution order, mean baseline; higher: more faithful).
Intervals: paired bootstrap (2,000 resamples) of the difference to the best baseline, over classes x seeds
(unit space) or inputs x seeds (input space).

    python benchmarks/explain.py                        # writes benchmarks/results/explain.{md,json}
    python benchmarks/explain.py --quick --out /tmp/e   # a fast smoke run
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fxabstract as fxa  # noqa: E402
from fxabstract.demo import DigitsMLP, digits_data, train  # noqa: E402
from fxabstract.interpret.explanations import UnitProbe, producer_of  # noqa: E402
from fxabstract.output.files import write_atomic  # noqa: E402
from fxabstract.zoo import LeNet5  # noqa: E402

OURS = ("fxabstract", "fxabstract (mean)", "fxabstract (zero)")
BASELINES = ("IntegratedGradients", "Saliency", "GradientShap", "InputXGradient")
UNIT_METHODS = OURS + ("paths",) + BASELINES
INPUT_METHODS = ("fxabstract", "paths") + BASELINES
EFFECT = {"fxabstract": "optimal", "fxabstract (mean)": "mean", "fxabstract (zero)": "zero"}


class DigitsCNN(nn.Module):
    """[1, 8, 8] -> conv 8 -> ReLU -> conv 16 -> ReLU -> avgpool 2 -> Linear 10; sites: the two ReLUs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x.reshape(-1, 1, 8, 8)))))
        return self.fc(F.avg_pool2d(x, 2).flatten(1))


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.reshape(-1, 1, 8, 8), size=32, mode="bilinear", align_corners=False)


def flat(x):
    return x


def as_map(x):
    return x.reshape(-1, 1, 8, 8)


MODELS = (("LeNet-5 (digits 32x32)", LeNet5, upsample), ("digits MLP 64-256-256-10", DigitsMLP, flat),
          ("digits CNN conv8-conv16-fc", DigitsCNN, as_map))


def models(seed: int, epochs: int, only: int | None = None):
    """[(name, model, x_train, y_train, x_test, y_test)] for one training seed (the `only`-th model)."""
    x_train, y_train, x_test, y_test = digits_data()
    out = []
    for name, make, shape in (MODELS if only is None else MODELS[only:only + 1]):
        torch.manual_seed(seed)
        xs, xt = shape(x_train), shape(x_test)
        out.append((name, train(make(), xs, y_train, epochs=epochs, seed=seed), xs, y_train, xt, y_test))
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else 1.0


# ------------------------------------------------------------------------------------------ unit scores

def layer_baselines(probe: UnitProbe, x: torch.Tensor, target: int, baselines_x: torch.Tensor, steps: int) -> dict:
    """{method: {site: [d]}}: captum's layer attributions at each site (the probe's identity edit modules),
    summed over positions and averaged over the class inputs x."""
    from captum.attr import LayerGradientShap, LayerGradientXActivation, LayerIntegratedGradients

    layers = [probe.edits[s] for s in probe.sites]
    per = {"IntegratedGradients": [LayerIntegratedGradients(probe.gm, layer).attribute(       # one layer at a time:
               x, baselines=torch.zeros_like(x), target=target, n_steps=steps) for layer in layers],  # they depend on each other
           "Saliency": [a.abs() for a in LayerGradientXActivation(probe.gm, layers, multiply_by_inputs=False).attribute(
               x, target=target)],
           "GradientShap": [LayerGradientShap(probe.gm, layer).attribute(
               x, baselines=baselines_x, target=target, n_samples=steps // 2, stdevs=0.0) for layer in layers],
           "InputXGradient": LayerGradientXActivation(probe.gm, layers).attribute(x, target=target)}
    out = {m: {} for m in BASELINES}
    for m, attrs in per.items():
        for s, a in zip(probe.sites, attrs):
            out[m][s] = a.detach().reshape(len(x), a.shape[1], -1).sum(2).mean(0)
    return out


def unit_scores(model, probe, x_cal, y_cal, target, steps, gen) -> tuple[dict, dict]:
    """({method: {site: scores [d]}}, {method: explanation graph}) on one calibration sample."""
    out, graphs = {}, {}
    for m in OURS:
        g = fxa.explain(model, x_cal, target=target, top=0, effect=EFFECT[m])
        out[m] = {s: g.effects(s) for s in probe.sites}
    g = fxa.explain(model, x_cal, target=target, method="paths", labels=y_cal)
    graphs["paths"] = g
    by_layer = {s["name"]: torch.tensor(s["effects"]) for s in g.graph["sites"]}
    out["paths"] = {s: by_layer.get(producer_of(probe.gm, s), torch.full((probe_units(probe, s),), float("nan")))
                    for s in probe.sites}
    z = probe.run(x_cal)
    xt = x_cal[z.argmax(1) == target]
    donors = x_cal[torch.randint(0, len(x_cal), (16,), generator=gen)]
    out.update(layer_baselines(probe, xt, target, donors, steps))
    return out, graphs


def probe_units(probe: UnitProbe, site: str) -> int:
    return probe.seen(site).shape[1]


def unit_metrics(probe, scores, x_test, target, ks, gen) -> dict:
    """{(method, site): (deletion_auc, sufficiency_auc)} on the test inputs of the class."""
    z = probe.run(x_test, record=True)
    seen = {s: probe.seen(s) for s in probe.sites}
    mask = z.argmax(1) == target
    xt, base = x_test[mask], z[mask, target]
    others = torch.nonzero(~mask).flatten()
    donor = others[torch.randint(0, len(others), (len(xt),), generator=gen)]
    out = {}
    for s in probe.sites:
        d = seen[s].shape[1]
        donor_vals = seen[s][donor]
        z0 = probe.run(xt, {s: (list(range(d)), donor_vals)})[:, target]
        for m, sc in scores.items():
            if torch.isnan(sc[s]).any():
                out[m, s] = (None, None)
                continue
            order = sc[s].argsort(descending=True)
            dele, suff = [], []
            for k in [k for k in ks if k <= d // 2]:
                top, rest = order[:k], order[k:]
                zk = probe.run(xt, {s: (top.tolist(), donor_vals[:, top])})[:, target]
                dele.append(float((base - zk).mean() / (base - z0).mean()))
                zs = probe.run(xt, {s: (rest.tolist(), donor_vals[:, rest])})[:, target]
                suff.append(float((zs - z0).mean() / (base - z0).mean()))
            out[m, s] = (statistics.mean(dele), statistics.mean(suff))
    return out


# ------------------------------------------------------------------------------------------ input maps

def input_explainers(net, graphs_by_class, probe, steps, baselines_x):
    """{method: explain_func(model, inputs, targets, **kw) -> np.ndarray like inputs} for quantus."""
    from captum.attr import GradientShap, InputXGradient, IntegratedGradients, Saliency

    def torchify(inputs, targets):
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        return x, torch.as_tensor(np.asarray(targets)).long()

    def ours(kind):
        def fn(model, inputs, targets, **kw):
            x, y = torchify(inputs, targets)
            maps = torch.zeros(x.shape[0], *x.shape[-2:])
            for c in y.unique().tolist():
                idx = y == c
                maps[idx] = graphs_by_class[kind][c].input_maps(x[idx])
            return maps[:, None].numpy()
        return fn

    def captum(cls, **attr_kw):
        def fn(model, inputs, targets, **kw):
            x, y = torchify(inputs, targets)
            x.requires_grad_(True)
            extra = dict(attr_kw)
            if cls is GradientShap:
                extra["baselines"] = baselines_x
            a = cls(net).attribute(x, target=y, **extra)
            return a.detach().numpy()
        return fn

    return {"fxabstract": ours("fxabstract"), "paths": ours("paths"),
            "IntegratedGradients": captum(IntegratedGradients, n_steps=steps),
            "Saliency": captum(Saliency, abs=True),
            "GradientShap": captum(GradientShap, n_samples=steps, stdevs=0.0),
            "InputXGradient": captum(InputXGradient)}


def input_metrics(model, fns, x, y, perturbations) -> dict:
    """{method: {"local_lipschitz": [...], "local_lipschitz_raw": [...], "irof": [...]}} per input."""
    import quantus

    if not hasattr(np, "trapz"):       # quantus 0.6's AUC calls np.trapz, which numpy 2.4 removed
        np.trapz = np.trapezoid
    out = {}
    xs, ys = x.numpy(), y.numpy()
    for m, fn in fns.items():
        row = {}
        for key, norm in (("local_lipschitz", True), ("local_lipschitz_raw", False)):
            np.random.seed(0)                   # the same perturbations for every method: paired figures
            metric = quantus.LocalLipschitzEstimate(    # Gaussian noise, Euclidean norms, the max over samples
                nr_samples=perturbations, perturb_std=0.1, perturb_mean=0.1, abs=norm, normalise=norm,
                disable_warnings=True)
            row[key] = [float(v) for v in metric(model=model, x_batch=xs, y_batch=ys, a_batch=None,
                                                  explain_func=fn, device="cpu", channel_first=True)]
        irof = quantus.IROF(segmentation_method="slic", perturb_baseline="mean",
                            abs=True, normalise=True,
                            return_aggregate=False, disable_warnings=True)
        row["irof"] = [float(v) for v in irof(model=model, x_batch=xs, y_batch=ys, a_batch=None,
                                               explain_func=fn, device="cpu", channel_first=True)]
        out[m] = row
    return out


# ------------------------------------------------------------------------------------------ the run

def evaluate(name, model, x_train, y_train, x_test, y_test, seed, args) -> dict:
    probe = UnitProbe(model)
    probe.run(x_train[:2], record=True)
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, len(x_train), (len(x_train),), generator=gen) for _ in range(args.resamples)]
    stab = {(m, s): [] for m in UNIT_METHODS for s in probe.sites}
    faith = {(m, s): [] for m in UNIT_METHODS for s in probe.sites}
    graphs = {"fxabstract": {}, "paths": {}}
    for target in range(args.classes):
        per = [unit_scores(model, probe, x_train[i], y_train[i], target, args.layer_steps, gen) for i in samples]
        full, g_full = unit_scores(model, probe, x_train, y_train, target, args.layer_steps, gen)
        graphs["paths"][target] = g_full["paths"]
        ours = fxa.explain(model, x_train, target=target, top=max(probe_units(probe, s) for s in probe.sites))
        causes = {s["name"]: len(s["causes"]) for s in g_full["paths"].graph["sites"]}
        for site in ours.graph["sites"]:                   # as many units per site as the paths method selected
            site["top"] = site["top"][:causes.get(producer_of(probe.gm, site["name"]), 0)]
        graphs["fxabstract"][target] = ours
        for m in UNIT_METHODS:
            for s in probe.sites:
                k = min(args.top, len(full[m][s]) // 2)
                vals = []
                for (p, _), (q, _) in itertools.combinations(per, 2):
                    if torch.isnan(p[m][s]).any() or torch.isnan(q[m][s]).any():
                        continue
                    tp = set(p[m][s].argsort(descending=True)[:k].tolist())
                    tq = set(q[m][s].argsort(descending=True)[:k].tolist())
                    union = torch.tensor(sorted(tp | tq))
                    vals.append(spearman(p[m][s][union], q[m][s][union]))
                stab[m, s].append(statistics.mean(vals) if vals else None)
        for key, v in unit_metrics(probe, full, x_test, target, args.ks, gen).items():
            faith[key].append(v)
    rows = []
    for m in UNIT_METHODS:
        for s in probe.sites:
            st = [v for v in stab[m, s] if v is not None]
            de = [v[0] for v in faith[m, s] if v[0] is not None]
            su = [v[1] for v in faith[m, s] if v[1] is not None]
            rows.append({"model": name, "seed": seed, "site": s, "method": m, "local_lipschitz": None,
                         "local_lipschitz_raw": None, "irof": None,
                         "spearman": statistics.mean(st) if st else None,
                         "deletion_auc": statistics.mean(de) if de else None,
                         "sufficiency_auc": statistics.mean(su) if su else None,
                         "per_class": {"spearman": stab[m, s], "deletion_auc": [v[0] for v in faith[m, s]],
                                       "sufficiency_auc": [v[1] for v in faith[m, s]]}})
    if not isinstance(model, DigitsMLP):
        z = probe.run(x_test)
        pick = torch.cat([torch.nonzero((z.argmax(1) == c) & (y_test == c)).flatten()[:args.inputs_per_class]
                          for c in range(args.classes)])
        baselines_x = x_train[torch.randint(0, len(x_train), (16,), generator=gen)]
        fns = input_explainers(model, graphs, probe, args.steps, baselines_x)
        for m, vals in input_metrics(model, fns, x_test[pick], y_test[pick], args.perturbations).items():
            rows.append({"model": name, "seed": seed, "site": "input", "method": m,
                         "local_lipschitz": float(np.nanmean(vals["local_lipschitz"])),
                         "local_lipschitz_raw": float(np.nanmean(vals["local_lipschitz_raw"])),
                         "irof": float(np.nanmean(vals["irof"])), "spearman": None, "deletion_auc": None,
                         "sufficiency_auc": None, "per_input": vals})
    return {"rows": rows, "sites": probe.sites}


def paired_interval(a: list, b: list, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b and its paired bootstrap 95% interval (pairs with a None dropped)."""
    d = np.array([x - y for x, y in zip(a, b) if x is not None and y is not None and np.isfinite(x - y)])
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (reps, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    args.resamples, args.classes, args.top, args.steps, args.epochs = (3, 2, 10, 8, 5) if args.quick else (5, 10, 10, 16, 30)
    args.inputs_per_class, args.perturbations = (3, 3) if args.quick else (10, 10)
    args.seeds = 1 if args.quick else args.seeds
    args.ks, args.layer_steps = (1, 2, 4, 8, 16), args.steps // 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    rows, sites = [], {}
    jobs = [(seed, k) for seed in range(args.seeds) for k in range(len(MODELS))]
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(run_job, [(seed, k, args) for seed, k in jobs]):
            print(f"seed {r['seed']} {r['name']}: test accuracy {r['accuracy']:.3f} ({time.time() - start:.0f} s)",
                  flush=True)
            rows += r["rows"]
            sites[r["name"]] = r["sites"]
    write(args, rows, sites, time.time() - start)
    return 0


def run_job(job) -> dict:
    """One (seed, model) pair in a worker process of one thread."""
    seed, k, args = job
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    name, model, xs, ys, xt, yt = models(seed, args.epochs, only=k)[0]
    r = evaluate(name, model, xs, ys, xt, yt, seed, args)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return {**r, "seed": seed, "name": name, "accuracy": acc}


def fmt(v, digits=3):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def write(args, rows, sites, elapsed) -> None:
    mean = statistics.mean
    slim = [{k: v for k, v in r.items() if k not in ("per_class", "per_input")} for r in rows]
    write_atomic(os.path.join(args.out, "explain.json"), (json.dumps(slim, indent=1) + "\n").encode())
    lines = ["# Causal explanatory graphs: fxa.explain against captum's attributions", "",
             f"Written by `python benchmarks/explain.py{' --quick' if args.quick else ''}` in {elapsed:.0f} s "
             f"({platform.machine()}, {args.workers} worker processes of one torch thread, torch {torch.__version__}, "
             f"captum and quantus). {args.seeds} training seed(s) "
             f"per model; {args.resamples} bootstrap resamples, {args.classes} classes, top-k = {args.top} (or half "
             f"the units) for stability; deletion and sufficiency over k in {list(args.ks)}; input space: "
             f"{args.inputs_per_class} correctly classified test inputs per class, {args.perturbations} perturbations; "
             f"integrated gradients with {args.steps} steps and GradientShap with {args.steps} samples on the input "
             f"({args.layer_steps} and {args.layer_steps // 2} at the sites). Figures are means over seeds "
             "(and classes or inputs); the metrics are defined in the script's docstring. Per-row figures: "
             "[explain.json](explain.json).", ""]

    def agg(model, site, method, key):
        vals = [r[key] for r in rows if r["model"] == model and r["site"] == site and r["method"] == method
                and r[key] is not None]
        return mean(vals) if vals else None

    def pooled(model, site, method, key, per):
        out = []
        for r in rows:
            if r["model"] == model and r["site"] == site and r["method"] == method:
                out += r[per][key]
        return out

    verdicts = []
    for model, ss in sites.items():
        lines += [f"## {model}", "", "| site | method | spearman (stability) | deletion AUC | sufficiency AUC |",
                  "|---|---|---|---|---|"]
        for s in ss:
            for m in UNIT_METHODS:
                lines.append(f"| {s} | {m} | {fmt(agg(model, s, m, 'spearman'))} | "
                             f"{fmt(agg(model, s, m, 'deletion_auc'))} | {fmt(agg(model, s, m, 'sufficiency_auc'))} |")
            for key in ("spearman", "deletion_auc", "sufficiency_auc"):
                best = max(BASELINES + ("paths",), key=lambda m: agg(model, s, m, key) or -1e9)
                for m in OURS[:1]:
                    d, lo, hi = paired_interval(pooled(model, s, m, key, "per_class"),
                                                pooled(model, s, best, key, "per_class"))
                    verdicts.append(f"- {model}, {s}, {key}: {m} - {best} (best other) = {d:+.3f} "
                                    f"[{lo:+.3f}, {hi:+.3f}]")
        if any(r["model"] == model and r["site"] == "input" for r in rows):
            lines += ["", "| input space | local Lipschitz (abs, normalised) | local Lipschitz (raw) | IROF |",
                      "|---|---|---|---|"]
            for m in INPUT_METHODS:
                lines.append(f"| {m} | {fmt(agg(model, 'input', m, 'local_lipschitz'))} | "
                             f"{fmt(agg(model, 'input', m, 'local_lipschitz_raw'))} | {fmt(agg(model, 'input', m, 'irof'))} |")
            for key, better in (("local_lipschitz", min), ("irof", max)):
                best = better(BASELINES + ("paths",), key=lambda m: agg(model, "input", m, key))
                d, lo, hi = paired_interval(pooled(model, "input", "fxabstract", key, "per_input"),
                                            pooled(model, "input", best, key, "per_input"))
                verdicts.append(f"- {model}, input, {key}: fxabstract - {best} (best other) = {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            paper = agg(model, "input", "paths", "local_lipschitz")
            raw = {m: agg(model, "input", m, "local_lipschitz_raw") for m in BASELINES}
            verdicts.append(f"- {model}, the paper's ordering (paths normalised {fmt(paper)} against the baselines "
                            f"raw: {', '.join(f'{m} {fmt(v)}' for m, v in raw.items())}): "
                            f"{'reproduced' if all(paper < v for v in raw.values()) else 'not reproduced'}; "
                            f"with every map normalised: paths {fmt(paper)}, best baseline "
                            f"{fmt(min(agg(model, 'input', m, 'local_lipschitz') for m in BASELINES))}")
        lines.append("")
    lines += ["## Differences to the best other method (paired bootstrap 95% intervals)", ""] + verdicts
    text = "\n".join(lines) + "\n"
    write_atomic(os.path.join(args.out, "explain.md"), text.encode())
    print(text)


if __name__ == "__main__":
    sys.exit(main())
