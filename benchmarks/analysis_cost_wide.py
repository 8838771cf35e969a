#!/usr/bin/env python
"""What the analysis costs where the d x d work dominates: an MLP 64-2048-2048-10 (two sites of 2,048
units, random weights: cost does not depend on them) over N = 16,384 samples in batches of 256, against
one forward+backward pass over the same batches (cross-entropy, parameter gradients). One torch thread;
medians of interleaved repeats after a warm-up. The exact curvature (10 rows per sample in every d x d
sum) is timed on the first 2,048 samples only, beside a forward+backward pass over those.

    python benchmarks/analysis_cost_wide.py          # writes benchmarks/results/analysis_cost_wide.md
    python benchmarks/analysis_cost_wide.py --quick  # N = 2,048 and 512: a smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxabstract as fxa  # noqa: E402
from fxabstract.output.files import write_atomic  # noqa: E402


def model_and_data(n: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 10))
    x = torch.randn(n, 64)
    y = torch.randint(0, 10, (n,))
    return model.eval(), list(zip(x.split(256), y.split(256)))


def forward_backward(model, batches):
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()


def runs(model, batches) -> dict:
    return {
        "forward+backward": lambda: forward_backward(model, batches),
        "the default (joint, constant, measured allocation: 1 probe, the 3 joint d x d sums)":
            lambda: fxa.abstract(model, batches, keep=0.5),
        "diagonal, constant, 1 probe":
            lambda: fxa.abstract(model, batches, keep=0.5, allocation="predicted", selection="diagonal",
                                 curvature="hutchinson", probes=1),
    }


def timed(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--exact-n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.exact_n, args.repeats = 2048, 512, 1
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, batches = model_and_data(args.n)
    main_t = timed(runs(model, batches), args.repeats)
    print(main_t, flush=True)
    small = batches[:args.exact_n // 256]
    exact_t = timed({"forward+backward": lambda: forward_backward(model, small),
                     "joint, constant, exact curvature (10 rows per sample), the 3 joint d x d sums":
                         lambda: fxa.abstract(model, small, keep=0.5, allocation="predicted", curvature="exact")},
                    1)
    print(exact_t, flush=True)
    rows = [f"| {name} | {args.n:,} | {1000 * t:,.0f} | {t / main_t['forward+backward']:.1f}x |"
            for name, t in main_t.items()]
    rows += [f"| {name} | {args.exact_n:,} | {1000 * t:,.0f} | {t / exact_t['forward+backward']:.1f}x |"
             for name, t in exact_t.items()]
    text = "\n".join([
        "# Analysis cost on wide sites",
        "",
        f"Written by `python benchmarks/analysis_cost_wide.py` in {time.perf_counter() - t0:.0f} s on "
        f"{platform.machine()}, one torch thread, torch {torch.__version__}.",
        "",
        "MLP 64-2048-2048-10 (two sites of 2,048 units, random weights), batches of 256. Each analysis row is "
        "the whole `abstract` call (capture, the one pass, selection at keep 0.5, replace, fold); medians of "
        f"{args.repeats} interleaved repeats after a warm-up "
        "(the exact row: one run after a warm-up). The ratio is against forward+backward over the same samples.",
        "",
        "| run | N | ms | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        "The arithmetic: with one probe the default's d x d sums take, per sample, 2 sites x (two symmetric "
        "products of d^2 / 2 and one general of d^2) = 4 d^2 float32 multiply-adds; forward+backward takes about "
        "3 x (64 d + d^2 + 10 d), a little over 3 d^2, in float32.",
        "",
    ])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "analysis_cost_wide.md")
    write_atomic(path, text.encode())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
