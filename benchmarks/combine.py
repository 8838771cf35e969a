#!/usr/bin/env python
"""Combined abstractions (docs/math.md §5, Pîslar et al.) on the demo digits MLP: the strength-faithfulness
curve of each single candidate abstraction against their combination (fxa.combine).

Candidates: fxa.abstract with logit-mse scores, joint selection and affine replacement, on different
sites and budgets: fc1 only (keep 32, 16), fc2 only (keep 32, 16), both sites (global keep 1/8, 1/16).
Strength = fraction of parameters removed, averaged over the evaluation inputs (dense fallback: 0);
faithfulness = IIA at swap p = 0.5 of each input's set against every source input, from a second draw
of masks (the assignment never sees it). The combination beats a single candidate at a strength where
its faithfulness exceeds that candidate's curve (linearly interpolated between its points); it
dominates where it beats every single candidate.

    python benchmarks/combine.py                       # writes benchmarks/results/combine.{md,png}
    python benchmarks/combine.py --quick --out /tmp/c  # a fast smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxabstract as fxa  # noqa: E402
from fxabstract.demo import demo_model, digits_data  # noqa: E402
from fxabstract.output.files import write_atomic, write_png  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = (("fc1", 32), ("fc1", 16), ("fc2", 32), ("fc2", 16), (None, 0.125), (None, 0.0625))
LAMBDAS = (0.9, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.0)
MARGIN = 0.005                                   # a win or a loss must exceed this (faithfulness units)


def frontier(curve: list[dict], s: float) -> float:
    """Best faithfulness a single candidate reaches at strength >= s, interpolating linearly between its
    points (and the dense point (0, 1)); -inf where its curve never gets that strong."""
    pts = sorted({(0.0, 1.0), *((p["strength"], p["faithfulness"]) for p in curve)})
    best = [f for st, f in pts if st >= s]
    best += [f0 + (f1 - f0) * (s - s0) / (s1 - s0) for (s0, f0), (s1, f1) in zip(pts, pts[1:]) if s0 < s <= s1]
    return max(best, default=float("-inf"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.seeds = 60, 1
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    x_train, _, x_test, _ = digits_data()
    model = demo_model()
    calibration = list(x_train.split(256))
    analyses = {site: fxa.analyse(model, calibration, sites=None if site is None else [site], curvature="exact")
                for site in {s for s, _ in CANDIDATES}}
    candidates = [analyses[site].compile(keep, replacement="affine") for site, keep in CANDIDATES]
    runs = []
    for seed in range(args.seeds):
        x_eval = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed))]
        runs.append(fxa.combine(model, candidates, x_eval, lambdas=LAMBDAS, samples=args.samples, seed=seed))
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    write(args, candidates, runs, time.time() - start)
    return 0


def write(args, candidates, runs, elapsed) -> None:
    names = [f"{site or 'fc1+fc2'} keep {keep}" for site, keep in CANDIDATES]
    lines = ["# Combined abstractions on the digits MLP (fxa.combine)", "",
             f"Settings: demo MLP 64-256-256-10; candidates (logit-mse, joint, affine): "
             f"{', '.join(f'{n} (strength {s:.3f})' for n, s in zip(names, runs[0].strengths))}; "
             f"{args.samples} test inputs per run, {args.seeds} runs (seeds: input subset and masks), IIA at swap "
             f"p = 0.5 averaged over a candidate's sites, against every source input; faithfulness from held-out "
             f"masks; a win or loss must exceed {MARGIN}. One thread, {platform.machine()}, "
             f"torch {torch.__version__}; total {elapsed:.0f} s.", ""]
    dominated_at, lost_at = [], []
    for seed, run in enumerate(runs):
        lines += [f"## Run {seed}", "", "| lambda | combination: strength | faithfulness | coverage | inputs per candidate "
                  "(dense) | " + " | ".join(f"{n}: strength / faithfulness" for n in names) + " | combination dominates |",
                  "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
        for i, p in enumerate(run.curve):
            best_single = max(frontier(c, p["strength"]) for c in run.single_curves)
            wins = float("-inf") < best_single < p["faithfulness"] - MARGIN
            if wins:
                dominated_at.append((seed, p["strength"], p["faithfulness"], best_single))
            if p["faithfulness"] < best_single - MARGIN:
                lost_at.append((seed, p["strength"], p["faithfulness"], best_single))
            singles = " | ".join(f"{c[i]['strength']:.3f} / {c[i]['faithfulness']:.3f}" for c in run.single_curves)
            sizes = ", ".join(str(p["sizes"][c]) for c in range(len(names)))
            lines.append(f"| {p['lambda']} | {p['strength']:.3f} | {p['faithfulness']:.3f} | {p['coverage']:.3f} | "
                         f"{sizes} ({p['dense']}) | {singles} | {'yes' if wins else 'no'} (best single {best_single:.3f}) |")
        lines.append("")
    lines += ["## Against each single candidate", "",
              "| candidate | points where the combination is more faithful than it at a strength it reaches | strengths |",
              "|---|---|---|"]
    for c, name in enumerate(names):
        won = [p["strength"] for run in runs for p in run.curve
               if float("-inf") < frontier(run.single_curves[c], p["strength"]) < p["faithfulness"] - MARGIN]
        span = f"{min(won):.3f} - {max(won):.3f}" if won else "-"
        lines.append(f"| {name} | {len(won)} of {len(runs) * len(LAMBDAS)} | {span} |")
    lines += ["", "## Against the best single candidate at each strength (the upper envelope)", ""]
    if dominated_at:
        lines += [f"The combination beats every single candidate's curve at {len(dominated_at)} of "
                  f"{len(runs) * len(LAMBDAS)} points:", ""]
        lines += [f"- run {s}: strength {st:.3f}: faithfulness {f:.3f} vs best single {b:.3f} (+{f - b:.3f})"
                  for s, st, f, b in dominated_at]
    else:
        lines.append(f"Nowhere: at every point some single candidate is within {MARGIN} of the combination's "
                     "faithfulness at that strength, or better.")
    lines += ["", f"The combination is worse than the best single candidate at {len(lost_at)} of "
              f"{len(runs) * len(LAMBDAS)} points" + (":" if lost_at else ".")]
    lines += [f"- run {s}: strength {st:.3f}: faithfulness {f:.3f} vs best single {b:.3f} ({f - b:+.3f})"
              for s, st, f, b in lost_at]
    lines += ["", "Control: when sources were restricted to the inputs of the same set (an earlier definition), the "
              "combination looked 0.05-0.15 more faithful than every single candidate at almost every point, but "
              "so did four copies of one candidate: small sets agree with themselves. Counting every source "
              "removes that artifact (tests/test_interpretability.py::test_copies_of_one_candidate_gain_nothing_over_it)."]
    write_atomic(os.path.join(args.out, "combine.md"), ("\n".join(lines) + "\n").encode())
    plot(args, names, runs)
    print("\n".join(lines))


def plot(args, names, runs) -> None:

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    run = runs[0]
    for name, curve in zip(names, run.single_curves):
        pts = sorted((p["strength"], p["faithfulness"]) for p in curve)
        ax.plot(*zip(*pts), marker=".", alpha=0.7, label=f"single: {name}")
    pts = sorted((p["strength"], p["faithfulness"]) for p in run.curve)
    ax.plot(*zip(*pts), marker="o", color="black", lw=2, label="combination")
    ax.set_xlabel("strength (mean fraction of parameters removed)")
    ax.set_ylabel("faithfulness (IIA, p = 0.5, held-out masks)")
    ax.set_title("digits MLP: strength vs faithfulness (run 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_png(fig, os.path.join(args.out, "combine.png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
