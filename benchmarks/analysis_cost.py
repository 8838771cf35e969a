#!/usr/bin/env python
"""What the analysis costs (issue 4): time against one forward+backward pass, against brute-force
ablation, and memory as the calibration set grows.

1. Time: the full analysis (capture, moments, curvature, scores, selection at one keep) over the N
   training samples of the digits MLP, against one forward+backward pass (cross-entropy, parameter
   gradients) over the same N samples in the same batches; medians of repeated runs, interleaved.
2. Brute force: a 64-1024-1024-10 MLP (2,048 units) on digits. Exact single-unit Interventional Risk
   R_j = E 1/2 ||z - z_{do(a_j := c_j)}||^2 by one forward pass over the calibration set per unit,
   against the analysis' logit-mse scores (same constants c_j): speed ratio and Spearman.
3. Memory: peak RSS above the loaded model while analysing N = 1k, 10k, 100k samples streamed from a
   generator (digits with jitter), each N in a fresh process; and the per-site state, O(d) for the
   diagonal statistics, O(d^2) with the d x d sums (joint selection, affine replacement).

    python benchmarks/analysis_cost.py            # writes benchmarks/results/analysis_cost.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxabstract as fxa  # noqa: E402
from fxabstract.demo import DigitsMLP, demo_model, digits_data, train  # noqa: E402
from fxabstract.passes.scores import unit_scores  # noqa: E402
from fxabstract.output.files import write_atomic  # noqa: E402
from fxabstract.zoo import cifar_resnet  # noqa: E402

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}  # no heap reuse in RSS

def log(*args):
    print(*args, flush=True)


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ----------------------------------------------------------------------------------------------- 1. time

def forward_backward(model, batches):
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()


SETTINGS = {
    "the default (joint, constant, measured allocation; probes=None: 2 probes at N=1258, 1 at N=10064)": dict(
        allocation="measured"),
    "the default with allocation=\"predicted\"": dict(),
    "diagonal, constant (exact curvature: 10 VJPs)": dict(selection="diagonal", replacement="constant",
                                                          curvature="exact"),
    "joint, constant (exact, the 3 joint d x d sums)": dict(selection="joint", replacement="constant",
                                                            curvature="exact"),
    "joint, constant (exact, all 7 d x d sums)": dict(selection="joint", replacement="constant", curvature="exact",
                                                      matrices=True),
    "joint, affine (exact, all 7 d x d sums)": dict(selection="joint", replacement="affine", curvature="exact"),
    "diagonal, constant (Hutchinson, 1 probe)": dict(selection="diagonal", replacement="constant",
                                                     curvature="hutchinson", probes=1),
    "diagonal, constant (Hutchinson, 4 probes)": dict(selection="diagonal", replacement="constant",
                                                      curvature="hutchinson", probes=4),
    "joint, constant (Hutchinson, 1 probe, the 3 joint d x d sums)": dict(
        selection="joint", replacement="constant", curvature="hutchinson", probes=1),
    "joint, constant (Hutchinson, 2 probes, the 3 joint d x d sums)": dict(
        selection="joint", replacement="constant", curvature="hutchinson", probes=2),
    "joint, constant (Hutchinson, 1 probe, all 7 d x d sums)": dict(
        selection="joint", replacement="constant", curvature="hutchinson", probes=1, matrices=True),
}


def _abstract(model, batches, matrices=None, **opts):
    """fxa.abstract, or (matrices=True) the same through analyse with every d x d sum, as before the
    joint-only statistics: the side-by-side cost of the affine sums a constant compile does not read."""
    allocation = opts.pop("allocation", "predicted")
    if matrices is None:
        return fxa.abstract(model, batches, keep=0.5, allocation=allocation, **opts)
    analysis_opts = {k: opts.pop(k) for k in ("curvature", "probes") if k in opts}
    return fxa.analyse(model, batches, matrices=matrices, **analysis_opts).compile(0.5, allocation="predicted", **opts)


def time_runs(model, batches, repeats: int) -> dict[str, float]:
    """Median seconds of forward+backward and of each analysis setting, interleaved, after a warm-up."""
    runs = {"forward+backward": lambda: forward_backward(model, batches)}
    for name, opts in SETTINGS.items():
        runs[name] = lambda opts=opts: _abstract(model, batches, **dict(opts))
    for run in runs.values():
        run()
    times = {k: [] for k in runs}
    for _ in range(repeats):           # every repeat times every run once: drift hits all alike
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def time_vs_training_pass(repeats: int, copies: int) -> tuple[str, dict]:
    model = demo_model()
    x, y, _, _ = digits_data()
    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([x] + [x + 0.05 * torch.randn(x.shape, generator=gen) for _ in range(copies - 1)])
    ys = y.repeat(copies)
    small = list(zip(x.split(256), y.split(256)))
    large = list(zip(xs.split(256), ys.split(256)))
    t_small, t_large = time_runs(model, small, repeats), time_runs(model, large, repeats)
    fb_s, fb_l = t_small["forward+backward"], t_large["forward+backward"]
    rows = [[name, f"{1000 * t_small[name]:.0f}", f"{t_small[name] / fb_s:.1f}x", f"{1000 * t_large[name]:.0f}",
             f"{t_large[name] / fb_l:.1f}x", f"{(t_large[name] - t_small[name]) / (fb_l - fb_s):.1f}x"]
            for name in t_small]
    n_s, n_l = len(x), len(xs)
    text = (f"Digits MLP (64-256-256-10; sites fc1 and fc2, 512 units; 10 outputs), batches of 256, medians of "
            f"{repeats} interleaved repeats after a warm-up. N = {n_s} (the training split) and N = {n_l} (the "
            f"split and {copies - 1} jittered copies). The analysis is `fxa.abstract(keep=0.5)`, with "
            "`allocation=\"predicted\"` except in the first row (the true default, whose allocation measures each "
            "site's risk at its operating point): capture, the one pass for moments and curvature, scores, selection, "
            "replace and fold. Constant replacement reads only three of the seven d x d sums (H0, H1, H2, "
            "`matrices=\"joint\"`, what `abstract` gathers for it); the constant rows marked 'all 7' analyse with "
            "`matrices=True` and then compile, as `abstract` did before. The last column is the cost per extra sample, (t(N_large) - t(N_small)) over the "
            "same difference for forward+backward: it leaves out the fixed cost (capture, selection, fold).\n\n"
            + md_table(["run", f"ms, N={n_s}", "ratio", f"ms, N={n_l}", "ratio", "per extra sample"], rows))
    return text, {"small": t_small, "large": t_large}


# ----------------------------------------------------------------------------------------------- 2. brute force

def exact_ablation_risks(model, x, site_layer, consumer, constants, z):
    """R_j for every unit j of the site read by `consumer`: one forward pass over x per unit."""
    risks = []
    for j in range(len(constants)):
        def hook(module, args, j=j):
            a = args[0].clone()
            a[:, j] = constants[j]
            return (a,)
        h = consumer.register_forward_pre_hook(hook)
        with torch.no_grad():
            zi = model(x)
        h.remove()
        risks.append(float(0.5 * (z.double() - zi.double()).pow(2).sum(-1).mean()))
    return torch.tensor(risks)


def brute_force(n: int) -> tuple[str, dict]:
    x, y, _, _ = digits_data()
    torch.manual_seed(0)
    model = train(DigitsMLP(1024), x, y, epochs=10)
    cal = x[:n]
    batches = list(cal.split(256))
    def analyse():
        analysis = fxa.analyse(model, batches, matrices=False, curvature="exact")
        return {s.name: unit_scores("logit-mse", s, analysis.stats, analysis.gm) for s in analysis.sites}

    analyse()                                  # warm-up
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        scores = analyse()
        runs.append(time.perf_counter() - t)
    t_analysis = statistics.median(runs)
    with torch.no_grad():
        z = model(cal)
    t = time.perf_counter()
    exact = {name: exact_ablation_risks(model, cal, name, model.fc2 if name == "fc1" else model.fc3,
                                        scores[name][1], z) for name in scores}
    t_brute = time.perf_counter() - t
    rows, pooled_s, pooled_r = [], [], []

    def row(name, s, r):
        alive = r > 0                          # dead units: exact risk 0 and score 0, a tie in both rankings
        rho, rho_alive = spearmanr(s.numpy(), r.numpy()).statistic, spearmanr(s[alive].numpy(), r[alive].numpy()).statistic
        gap = float(((s[alive] - r[alive]).abs() / r[alive]).median())
        return [name, len(s), f"{rho:.4f}", int(alive.sum()), f"{rho_alive:.4f}", f"{gap:.1e}"], rho

    for name, (s, _) in scores.items():
        rows.append(row(name, s, exact[name])[0])
        pooled_s.append(s)
        pooled_r.append(exact[name])
    last, rho_all = row("both (one global ranking)", torch.cat(pooled_s), torch.cat(pooled_r))
    rows.append(last)
    units = sum(len(s) for s in pooled_s)
    text = (f"A 64-1024-1024-10 ReLU MLP trained on digits ({units} units), calibration set N = {n}. "
            f"Brute force: {units} forward passes over the N samples, each with one unit held at its constant "
            f"c*_j (the analysis' curvature-weighted mean), giving the exact single-unit risk. The analysis: "
            f"`fxa.analyse(matrices=False, curvature=\"exact\")` (capture, one pass, exact curvature) plus the logit-mse scores, "
            f"median of 3 runs after a warm-up; the brute force is one run.\n\n"
            f"- analysis {t_analysis:.2f} s, brute force {t_brute:.1f} s: **{t_brute / t_analysis:.0f}x faster** "
            f"(target >= 50x)\n- Spearman of the scores against the exact ablation risk:\n\n"
            + md_table(["site", "units", "Spearman", "units with risk > 0", "Spearman on them",
                        "median abs(score - risk) / risk"], rows))
    return text, {"analysis_s": t_analysis, "brute_s": t_brute, "spearman": rho_all}


# ----------------------------------------------------------------------------------------------- 3. memory

def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_child(n: int, matrices: bool) -> dict:
    torch.set_num_threads(1)
    model = demo_model()
    x, _, _, _ = digits_data()
    gen = torch.Generator().manual_seed(0)

    def stream():      # n distinct samples, drawn batch by batch, never held together
        for start in range(0, n, 256):
            b = min(256, n - start)
            idx = torch.randint(0, len(x), (b,), generator=gen)
            yield x[idx] + 0.05 * torch.randn(b, x.shape[1], generator=gen)

    fxa.analyse(model, [x[:256]], matrices=matrices, curvature="exact")       # warm up allocators, lazy imports
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                      # reset the peak (VmHWM) to the current RSS
    base = _rss_kb("VmRSS")
    t = time.perf_counter()
    analysis = fxa.analyse(model, stream(), matrices=matrices, curvature="exact")
    seconds = time.perf_counter() - t
    peak = _rss_kb("VmHWM")
    state = sum(v.numel() * v.element_size() for s in analysis.sites
                for obj in (analysis.stats.moments[s.name], analysis.stats.curvature[s.name])
                for v in vars(obj).values() if isinstance(v, torch.Tensor))
    return {"n": analysis.stats.curvature[analysis.sites[0].name].n, "base_mb": base / 1024,
            "peak_above_base_mb": (peak - base) / 1024, "state_kb": state / 1024, "seconds": seconds}


def memory(ns) -> tuple[str, list]:
    rows, raw = [], []
    for matrices in (False, True):
        for n in ns:
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), str(int(matrices))],
                                 capture_output=True, text=True, check=True, env=CHILD_ENV)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            raw.append({**r, "matrices": matrices})
            log(f"  memory N={n} matrices={matrices}: {r}")
            rows.append(["d x d (joint / affine)" if matrices else "diagonal (O(d))", f"{r['n']:,}",
                         f"{r['state_kb']:.0f}", f"{r['peak_above_base_mb']:.1f}", f"{r['base_mb']:.0f}",
                         f"{r['seconds']:.1f}"])
    text = ("Digits MLP (sites of d = 256 units), calibration streamed from a generator in batches of 256 "
            "(digits samples with Gaussian jitter), each run in a fresh process after a warm-up. "
            "`peak above base` is the peak RSS during `fxa.analyse` minus the RSS before it (Linux "
            "VmHWM after resetting it; glibc's mmap threshold is fixed at 128 KiB so freed tensors leave the "
            "RSS); the 512-sample reservoir is part of it.\n\n"
            + md_table(["statistics", "N", "state per model (KiB)", "peak above base (MiB)", "base RSS (MiB)",
                        "seconds"], rows))
    return text, raw


SEQUENTIAL_MODELS = {   # name -> (factory, input shape, batch); Hutchinson with 1 probe
    "MLP 256-(1024 x 8)-10, GELU": (lambda: nn.Sequential(*[m for i in range(8) for m in (
        nn.Linear(256 if i == 0 else 1024, 1024), nn.GELU())], nn.Linear(1024, 10)), (256,), 2048),
    "ResNet-20-style (CIFAR 32x32)": (cifar_resnet, (3, 32, 32), 256),
}


def sequential_child(name: str, sequential: bool) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    factory, shape, batch = SEQUENTIAL_MODELS[name]
    model = factory().eval()
    x = torch.randn(batch, *shape)
    options = dict(matrices=False, curvature="hutchinson", probes=1, sequential=sequential)
    fxa.analyse(model, [x[:8]], **options)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    t = time.perf_counter()
    fxa.analyse(model, [x], **options)
    return {"peak_above_base_mb": (_rss_kb("VmHWM") - base) / 1024, "seconds": time.perf_counter() - t}


def sequential_memory() -> str:
    rows = []
    for name in SEQUENTIAL_MODELS:
        r = {}
        for mode in (False, True):
            out = subprocess.run([sys.executable, __file__, "--sequential-child", name, str(int(mode))],
                                 capture_output=True, text=True, check=True, env=CHILD_ENV)
            r[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([name, SEQUENTIAL_MODELS[name][2], f"{r[False]['peak_above_base_mb']:.0f}", f"{r[True]['peak_above_base_mb']:.0f}",
                     f"{r[False]['seconds']:.1f}", f"{r[True]['seconds']:.1f}"])
        log("  " + " | ".join(str(c) for c in rows[-1]))
    return ("`fxa.analyse(sequential=True)` (one block per site, passes/sequential.py) against the whole-model "
            "pass, on one batch with Hutchinson curvature (1 probe), each in a fresh process as in "
            "section 3. Both give the same statistics (tests/test_sequential.py).\n\n"
            + md_table(["model", "batch", "whole: peak above base (MiB)", "sequential: peak above base (MiB)",
                        "whole: s", "sequential: s"], rows))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=8, help="N_large = copies x the training split")
    parser.add_argument("--brute-n", type=int, default=512)
    parser.add_argument("--ns", default="1000,10000,100000")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sequential-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], bool(args.memory_child[1]))))
        return
    if args.sequential_child:
        print(json.dumps(sequential_child(args.sequential_child[0], args.sequential_child[1] == "1")))
        return
    torch.set_num_threads(1)
    started = time.time()
    log("1. analysis vs forward+backward")
    t1, _ = time_vs_training_pass(args.repeats, args.copies)
    log(t1)
    log("2. brute-force ablation")
    t2, _ = brute_force(args.brute_n)
    log(t2)
    log("3. memory")
    t3, _ = memory([int(v) for v in args.ns.split(",")])
    log(t3)
    log("4. sequential mode")
    t4 = sequential_memory()
    log(t4)
    head = (f"# Analysis cost\n\nWritten by `python benchmarks/analysis_cost.py` in {time.time() - started:.0f} s "
            f"on {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), one torch thread, "
            f"torch {torch.__version__}.\n")
    text = "\n\n".join([head, "## 1. Analysis against one forward+backward pass", t1,
                        "## 2. Against brute-force ablation", t2, "## 3. Memory as N grows", t3,
                        "## 4. Sequential mode", t4]) + "\n"
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "analysis_cost.md"), text.encode())
    log(f"wrote {os.path.join(args.out, 'analysis_cost.md')}")


if __name__ == "__main__":
    main()
