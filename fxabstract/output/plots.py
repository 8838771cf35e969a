"""The summary plot the command line writes (summary.png): fidelity against keep, budget per site."""
from __future__ import annotations

from .files import write_png


def summary_png(report: dict, sweep: list[dict], path: str) -> bool:
    """Write a PNG: fidelity against keep (from `sweep`) and the budget per site (from `report`).
    Returns False, writing nothing, when matplotlib (the `bench` extra) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.2, 1]})
    keeps = [r["kept"] / r["units"] for r in sweep]
    left.plot(keeps, [100 * r["agreement"] for r in sweep], "o-", color="C0", label="top-1 agreement")
    left.set(xlabel="fraction of units kept", ylabel="top-1 agreement with the dense model (%)", xscale="log",
             title="fidelity against keep")
    mse = left.twinx()
    partial = [(k, r["logit_mse"]) for k, r in zip(keeps, sweep) if r["kept"] < r["units"]]  # keep 1: MSE ~ 0
    mse.plot([k for k, _ in partial], [v for _, v in partial], "s--", color="C1", label="logit-MSE")
    mse.set(ylabel="logit-MSE 1/2||z - z_c||^2", yscale="log")
    chosen = sum(len(s["kept"]) for s in report["sites"]) / sum(s["units"] for s in report["sites"])
    left.axvline(chosen, color="gray", linestyle=":", label=f"compiled ({chosen:.0%} kept)")
    left.legend(handles=left.get_lines() + mse.get_lines(), loc="lower right", fontsize=8)
    names = [s["name"] for s in report["sites"]]
    kept = [len(s["kept"]) for s in report["sites"]]
    right.barh(names, kept, color="C0", label="kept")
    right.barh(names, [len(s["replaced"]) for s in report["sites"]], left=kept, color="C7", label="replaced")
    right.set(xlabel="units", title="budget per site")
    right.invert_yaxis()
    right.legend(fontsize=8)
    fig.tight_layout()
    write_png(fig, path)
    plt.close(fig)
    return True
