"""How big a saved report is: every number inline in report.json (earlier versions) against
report.json plus tensors.safetensors (now).

    python benchmarks/report_size.py

1. A 2 x 1024 MLP (64 -> 1024 -> 1024 -> 10, random weights), compiled at keep 0.5 with affine
   replacement on 2,048 random calibration inputs, saved with `Abstraction.save`.
2. A BERT-base-sized report: 12 FFN sites of 3,072 units, each keeping 1,536 and replacing 1,536 with
   affine maps of 1,536 coefficients (the shape of a BERT-base FFN compile at keep 0.5). Its numbers are
   random float64: the sizes depend on the shapes only, and compiling BERT-base on this machine is not
   what this measures.

Writes benchmarks/results/report_size.md.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxabstract as fxa  # noqa: E402
from fxabstract.output.report import dumps  # noqa: E402
from fxabstract.output.tensors import read_report, write_report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "report_size.md")


def mlp_report() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    x = torch.randn(2048, 64)
    return fxa.abstract(model.eval(), list(x.split(512)), keep=0.5, replacement="affine",
                        curvature="exact").report


def bert_base_report(layers: int = 12, d: int = 3072, kept: int = 1536) -> dict:
    gen = torch.Generator().manual_seed(0)
    sites = []
    for layer in range(layers):
        perm = torch.randperm(d, generator=gen).tolist()
        keep, removed = sorted(perm[:kept]), sorted(perm[kept:])
        theta = (torch.randn(len(removed), kept, generator=gen, dtype=torch.float64) * 0.01).tolist()
        beta = torch.randn(len(removed), generator=gen, dtype=torch.float64).tolist()
        name = f"encoder.layer.{layer}.intermediate.dense"
        sites.append({"name": name, "units": d, "kept": keep, "consumers": [f"encoder.layer.{layer}.output.dense"],
                      "replaced": [{"unit": u, "kind": "affine", "beta": b, "theta": t}
                                   for u, b, t in zip(removed, beta, theta)],
                      "scores": torch.rand(d, generator=gen, dtype=torch.float64).tolist()})
    return {"version": 1, "replacement": "affine", "sites": sites}


def measure(report: dict, repeats: int = 3) -> dict:
    """Sizes of one write, and the medians of `repeats` writes and reads (shared machines are noisy)."""
    inline = len(dumps(report))
    writes, reads = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            write_report(folder, report)
            writes.append(time.perf_counter() - start)
            sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}
            start = time.perf_counter()
            back = read_report(folder)
            reads.append(time.perf_counter() - start)
    written, read = statistics.median(writes), statistics.median(reads)
    exact = back == report
    return {"inline": inline, "json": sizes["report.json"], "tensors": sizes["tensors.safetensors"],
            "write_s": written, "read_s": read, "exact": exact}


def mb(n: int) -> str:
    return f"{n / 1e6:,.3f} MB" if n < 1e7 else f"{n / 1e6:,.0f} MB"


def main() -> None:
    rows = []
    for name, build in (("2 x 1024 MLP, affine, keep 0.5 (compiled)", mlp_report),
                        ("BERT-base-sized: 12 FFN sites of 3,072, affine, keep 0.5 (report shape)",
                         bert_base_report)):
        m = measure(build())
        rows.append((name, m))
        print(f"{name}: inline {mb(m['inline'])}; now report.json {mb(m['json'])} + tensors.safetensors "
              f"{mb(m['tensors'])}; write {m['write_s']:.2f} s, read {m['read_s']:.2f} s; exact {m['exact']}")
    lines = ["# Report size on disk", "",
             f"`python benchmarks/report_size.py`; Python {platform.python_version()}, torch {torch.__version__}.", "",
             "| report | every number inline (before) | report.json now | tensors.safetensors | write (median of 3) | read (median of 3) | "
             "read back exactly |", "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {mb(m['inline'])} | {mb(m['json'])} | {mb(m['tensors'])} | {m['write_s']:.2f} s | "
                     f"{m['read_s']:.2f} s | {m['exact']} |")
    lines += ["", "The BERT-base-sized row is a report of that shape with random coefficients (the sizes depend on "
              "the shapes only); the MLP row is a real compile."]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
