#!/usr/bin/env python
"""Real MobileNetV2 (torchvision's ImageNet weights), no fine-tuning: does letting the planner remove
residual-stream channels too beat removing expansion channels only, at the same MACs?

The MAC budget of each ratio f is what removing round(f d) expansion channels in every block saves (the
uniform removal of `benchmarks/mobilenet_v2.py`). Three site sets share that budget:
- expansion only: the 16 expansion sites `features.N.conv.0.0` (as in mobilenet_v2.py);
- expansion + streams: those and the residual streams of the five stages with repeated blocks
  (`features.N.conv.2.stream.k`: every point of a stream keeps the same channels; each stream is one
  budget unit whose MACs are those of its writers (the projection convs) and readers (the next blocks'
  expansion convs));
- every site: all 35 sites fxabstract finds (adds the stem, the first block's projection, the last
  projection and the 1280-channel head conv).
Everything else as mobilenet_v2.py's best row at -30%: score kl, affine replacement, joint
selection, one global budget in MACs on the predicted (second-order) risks, affine maps fitted on the 192
calibration crops plus 576 more crops (`fit_data`), `round_to=1`. One analysis over every site; the three
sets are views of it (the statistics of a site do not depend on which other sites are analysed).
Calibration and evaluation use disjoint photos (`fxabstract.zoo.photos`).

    python benchmarks/mobilenet_v2_streams.py               # writes benchmarks/results/mobilenet_v2_streams.md
    python benchmarks/mobilenet_v2_streams.py --quick --out /tmp/m
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxabstract as fxa  # noqa: E402
from fxabstract.cost import module_macs, site_macs, unit_macs  # noqa: E402
from fxabstract.output.files import write_atomic  # noqa: E402
from fxabstract.zoo.photos import crops  # noqa: E402
from mobilenet_v2 import CAL_PHOTOS, EVAL_PHOTOS, RIDGE, SITES, count_params, fidelity, load_model, log  # noqa: E402

STREAMS = r"features\.\d+\.conv\.2\.stream\.\d+"
SETS = {"expansion only": SITES, "expansion + residual streams": f"{SITES}|{STREAMS}", "every site": ".*"}
SETTINGS = (("kl", "affine", "joint"),)   # mobilenet_v2.py's best setting at -30%


def view(analysis: fxa.Analysis, pattern: str) -> fxa.Analysis:
    """The analysis restricted to the sites whose name matches `pattern` (whole name)."""
    import re
    sites = [s for s in analysis.sites if re.fullmatch(pattern, s.name)]
    return fxa.Analysis(analysis.gm, sites, analysis.ineligible, analysis.stats, analysis.score, analysis.seed)


def removed_by_kind(entries: list[dict]) -> dict[str, int]:
    """Channels removed, by kind of site; a residual stream counts once (its points keep the same channels)."""
    out, seen = {"expansion": 0, "stream": 0, "other": 0}, set()
    for entry in entries:
        if entry.get("stream"):
            if entry["stream"] in seen:
                continue
            seen.add(entry["stream"])
        kind = "stream" if entry.get("stream") else "expansion" if entry["name"].endswith("conv.0.0") else "other"
        out[kind] += entry["units"] - len(entry["kept"])
    return out


def run(args) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    model = load_model()
    x_cal = crops(CAL_PHOTOS, args.cal, args.size, seed=0)
    x_eval = crops(EVAL_PHOTOS, args.eval, args.size, seed=1)
    extra = crops(CAL_PHOTOS, args.fit_extra, args.size, seed=10).split(32) if args.fit_extra else None
    with torch.no_grad():
        z_dense = torch.cat([model(b) for b in x_eval.split(32)])
    info = {"dense_params": count_params(model), "dense_macs": sum(module_macs(model, x_eval[:1]).values()),
            "timings": {}}
    analyses = {}
    for score in sorted({s for s, _, _ in SETTINGS}):
        t = time.perf_counter()
        analyses[score] = fxa.analyse(model, x_cal.split(16), score=score, probes=args.probes, fit_data=extra)
        info["timings"][f"analyse {score}"] = time.perf_counter() - t
        log(f"analysed {score} ({len(analyses[score].sites)} sites) in {info['timings'][f'analyse {score}']:.0f} s")
    base = analyses[SETTINGS[0][0]]
    macs = module_macs(base.gm, x_eval[:1])
    expansion = view(base, SITES).sites
    per_unit = {s.name: unit_macs(s, macs) for s in expansion}
    info["sets"] = {name: (len(view(base, p).sites), sum(s.n_units for s in view(base, p).sites),
                           site_macs(view(base, p).sites, macs)) for name, p in SETS.items()}
    rows = [{"ratio": 0.0, "set": "dense", "setting": "-", "params": info["dense_params"], "macs": info["dense_macs"],
             **fidelity(model, x_eval, z_dense)}]
    views = {(score, name): view(analyses[score], p) for score in analyses for name, p in SETS.items()}
    for f in args.ratios:          # the views live across ratios: each computes its risk curves once
        target = sum(float(per_unit[s.name][:round(f * s.n_units)].sum()) for s in expansion)
        for score, rep, sel in SETTINGS:
            for set_name in SETS:
                a = views[score, set_name]
                keep = 1 - target / site_macs(a.sites, macs)
                t = time.perf_counter()
                result = a.compile(keep, rep, sel, round_to=1, ridge=RIDGE, allocation="predicted", budget="macs")
                row = {"ratio": f, "set": set_name, "setting": f"{score} {rep} {sel}",
                       "params": count_params(result.module), "target": target,
                       "macs": sum(module_macs(result.module, x_eval[:1]).values()),
                       "removed": removed_by_kind(result.report["sites"]),
                       **fidelity(result.module, x_eval, z_dense)}
                rows.append(row)
                log(f"{f:.0%} {row['setting']:22s} {set_name:30s} agree {row['agree']:.3f} KL {row['kl']:.3f} "
                    f"MACs {row['macs'] / 1e6:.1f}M removed {row['removed']} ({time.perf_counter() - t:.0f} s)")
    return rows, info


def write_markdown(rows: list[dict], info: dict, args, path: str) -> None:
    t = info["timings"]
    lines = [
        "# MobileNetV2 (real ImageNet weights): expansion channels only, or residual-stream channels too",
        "",
        f"Written by `python benchmarks/mobilenet_v2_streams.py{' ' + ' '.join(args.argv) if args.argv else ''}` "
        f"(torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} CPU threads; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + ").",
        "",
        f"Calibration: {args.cal} crops of {', '.join(CAL_PHOTOS)} (seed 0) at {args.size}x{args.size}, plus "
        f"{args.fit_extra} more crops of the same photos for the affine fits (`fit_data`); evaluation: {args.eval} "
        f"crops of {', '.join(EVAL_PHOTOS)} (seed 1). Hutchinson curvature with {args.probes} probes, `round_to=1`, "
        f"ridge {RIDGE}. Each ratio's MAC budget is what removing that fraction of the expansion channels in every "
        "block saves; every row saves at least that much, taking the removal with the least predicted risk per "
        "MAC saved first over the sites of its set. Agreement ± its standard error over 5 blocks of evaluation crops.",
        "",
        "| site set | sites | units | their MACs/image |",
        "|---|---|---|---|",
        *[f"| {name} | {n} | {u:,} | {m / 1e6:.1f}M |" for name, (n, u, m) in info["sets"].items()],
        "",
        f"Dense model: {info['dense_params']:,} parameters, {info['dense_macs'] / 1e6:.1f}M MACs per image.",
        "",
        "| budget (expansion channels' MACs) | setting | site set | top-1 agreement | top-5 overlap | KL | "
        "channels removed (expansion / stream / other) | parameters | MACs/image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        rm = r["removed"]
        lines.append(f"| -{r['ratio']:.0%} | {r['setting']} | {r['set']} | {r['agree']:.3f} ± {r['agree_se']:.3f} | "
                     f"{r['top5']:.3f} | {r['kl']:.3f} | {rm['expansion']} / {rm['stream']} / {rm['other']} | "
                     f"{r['params']:,} | {r['macs'] / 1e6:.1f}M |")
    lines += ["", "## Verdict", ""]
    for f in args.ratios:
        for setting in dict.fromkeys(r["setting"] for r in rows[1:]):
            by = {r["set"]: r for r in rows[1:] if r["ratio"] == f and r["setting"] == setting}
            e, s = by["expansion only"], by["expansion + residual streams"]
            verdict = "at least as high" if s["agree"] >= e["agree"] else "LOWER"
            if s["removed"]["stream"] == 0:
                verdict += " (the planner removed no stream channel: by predicted risk per MAC saved, " \
                           "expansion channels were cheaper at this budget)"
            lines.append(f"- -{f:.0%}, {setting}: with streams {s['agree']:.3f} (KL {s['kl']:.3f}) vs expansion only "
                         f"{e['agree']:.3f} (KL {e['kl']:.3f}): {verdict}; every site {by['every site']['agree']:.3f} "
                         f"(KL {by['every site']['kl']:.3f}).")
    write_atomic(path, ("\n".join(lines) + "\n").encode())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cal", type=int, default=192)
    ap.add_argument("--eval", type=int, default=960)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--fit-extra", type=int, default=576)
    ap.add_argument("--ratios", default="0.1,0.3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.ratios = [float(f) for f in args.ratios.split(",")]
    if args.quick:
        args.size, args.cal, args.eval, args.probes, args.fit_extra = 64, 32, 32, 2, 32
    torch.set_num_threads(args.threads)
    rows, info = run(args)
    os.makedirs(args.out, exist_ok=True)
    write_markdown(rows, info, args, os.path.join(args.out, "mobilenet_v2_streams.md"))
    log(f"wrote {os.path.join(args.out, 'mobilenet_v2_streams.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
