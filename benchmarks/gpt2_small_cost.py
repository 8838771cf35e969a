#!/usr/bin/env python
"""A GPT-2-small-sized model on this machine: what the default analysis costs against one
forward+backward pass, and its peak memory.

The model is the zoo's `gpt2` at GPT-2 small's size (12 blocks, d_model 768, 12 heads, FFN 3,072,
vocabulary 50,257, 1,024 positions, the unembedding tied to the token embedding: 124M parameters),
with random weights (the cost does not depend on them), over 256 sequences of 128 random token ids in
batches of 8. Each measurement runs in a fresh process, so its peak RSS (Linux VmHWM) is its own:

- forward+backward: next-token cross-entropy and parameter gradients over the same batches;
- the default `fxa.abstract(model, batches, keep=0.5)` (the whole call: capture, the one pass for the
  statistics, risk curves measured on the first 512 samples, selection, replace and fold), whole and
  with `sequential=True` (one block of the graph at a time).

    python benchmarks/gpt2_small_cost.py            # writes benchmarks/results/gpt2_small_cost.md
    python benchmarks/gpt2_small_cost.py --quick    # 2 blocks, 16 sequences: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RUNS = {
    "forward+backward": None,
    "the default abstract (keep 0.5)": {},
    "the default abstract, sequential=True": {"sequential": True},
}


def _model(depth: int):
    import torch
    from fxabstract.zoo.transformers import gpt2
    torch.manual_seed(0)
    model = gpt2(vocab=50257, dim=768, depth=depth, heads=12, context=1024)
    model.head.weight = model.tok.weight                       # GPT-2 ties the unembedding to the embedding
    return model.eval()


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def child(run: str, depth: int, sequences: int, length: int, batch: int) -> dict:
    """One measurement in this process: seconds and peak RSS."""
    import torch
    import torch.nn.functional as F
    import fxabstract as fxa
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = _model(depth)
    ids = torch.randint(0, 50257, (sequences, length), generator=torch.Generator().manual_seed(1))
    batches = list(ids.split(batch))
    params = sum(p.numel() for p in model.parameters())
    base = _peak_rss_mib()
    t = time.perf_counter()
    out = {"run": run, "parameters": params, "base_rss_mib": base}
    if RUNS[run] is None:
        for x in batches:
            model.zero_grad(set_to_none=True)
            logits = model(x)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    else:
        result = fxa.abstract(model, batches, keep=0.5, **RUNS[run])
        rep = result.report
        out.update(sites=len(rep["sites"]), units=sum(s["units"] for s in rep["sites"]),
                   kept=sum(len(s["kept"]) for s in rep["sites"]), curvature=rep["curvature"],
                   compiled_parameters=sum(p.numel() for p in result.module.parameters()),
                   statistics=sorted({s.get("statistics", "d x d") for s in rep["sites"]}))
    out["seconds"] = time.perf_counter() - t
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.sequences = 2, 16
    shape = (args.depth, args.sequences, args.length, args.batch)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return 0
    t0 = time.perf_counter()
    env = {**os.environ, "BENCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "MALLOC_MMAP_THRESHOLD_": "131072"}                 # freed tensors leave the RSS
    order = ["forward+backward", "the default abstract (keep 0.5)", "forward+backward",
             "the default abstract, sequential=True"]           # forward+backward before and after
    results = []
    for run in order:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", run, "--depth", str(args.depth),
               "--sequences", str(args.sequences), "--length", str(args.length), "--batch", str(args.batch)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    fb = [r["seconds"] for r in results if r["run"] == "forward+backward"]
    ref = sum(fb) / len(fb)
    rows = [f"| {r['run']} | {r['seconds']:,.0f} | {r['seconds'] / ref:.1f}x | {r['peak_rss_mib'] / 1024:.2f} |"
            for r in results]
    info = next(r for r in results if "sites" in r)
    text = "\n".join([
        "# A GPT-2-small-sized model: analysis cost and peak memory",
        "",
        f"Written by `python benchmarks/gpt2_small_cost.py` in {time.perf_counter() - t0:.0f} s on "
        f"{platform.machine()}, {args.threads} torch threads, one run per row, each in a fresh process.",
        "",
        f"The zoo `gpt2` at GPT-2 small's size: {args.depth} blocks, d_model 768, 12 heads, vocabulary 50,257, "
        f"the unembedding tied to the embedding ({results[0]['parameters'] / 1e6:.1f}M parameters, random weights); "
        f"{args.sequences} sequences of {args.length} random token ids in batches of {args.batch}. "
        f"The analysis found {info['sites']} sites ({info['units']:,} units; d x d statistics: "
        f"{', '.join(info['statistics'])}) and kept {info['kept']:,} at keep 0.5; curvature: "
        f"{info['curvature']['method']} with {info['curvature'].get('probes')} probes. The ratio is against "
        f"the mean of the two forward+backward runs ({fb[0]:,.0f} s and {fb[-1]:,.0f} s). Peak RSS is the "
        "whole process's (model and data included).",
        "",
        "| run | seconds | ratio | peak RSS (GiB) |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    os.makedirs(args.out, exist_ok=True)
    from fxabstract.output.files import write_atomic
    path = os.path.join(args.out, "gpt2_small_cost.md" if not args.quick else "gpt2_small_cost_quick.md")
    write_atomic(path, text.encode())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
