"""The JSON report: everything needed to re-apply the same interventions to the original model.

Per site: its name, producer, consumers, unit count, kept units (original numbering), and each
replaced unit with its kind and its constant or affine coefficients over the kept units; the
scores and the predicted risk. `write_atomic` is how every file fxabstract writes lands on disk.
`summary_png` draws the report next to a sweep over keep (the command line writes it as summary.png).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from .errors import OutputError
from .passes.select import SitePlan


def _piece(q) -> dict:
    """A layer's share of a site: its units, and which of its rows they are when not all of them
    (a piece of a split value, a GLU half)."""
    entry = {"module": q.module, "units": [q.lo, q.hi]}
    if q.start or q.total != q.hi - q.lo:
        entry["rows"] = [q.start, q.start + getattr(q, "block", q.hi - q.lo)]   # a SharedPiece: one k/v head
    return entry


def _replaced(p: SitePlan) -> list[dict]:
    replaced = []
    for i, unit in enumerate(p.removed):
        if p.kind == "constant":
            replaced.append({"unit": unit, "kind": "constant", "constant": float(p.beta[i])})
        else:
            replaced.append({"unit": unit, "kind": "affine", "beta": float(p.beta[i]),
                             "theta": [float(t) for t in p.theta[i]]})
    return replaced


def site_entry(p: SitePlan, measured_risk: float | None = None) -> dict:
    """A site's entry. A site with SE squeezes adds "branches": per branch the value its consumers
    read (node, chain from the SE input, consumers, reads) and its own "replaced" list over the site's
    kept units (the same unit numbers), which `verify.intervene` applies at those consumers."""
    s = p.site
    entry = {"name": s.name, "producer": s.producer, "node": s.node, "chain": s.chain,
             "consumers": s.consumers, "units": s.n_units, "axis": s.axis, "shape": list(s.shape),
             "reads": s.reads, "producers": [_piece(q) for q in s.pieces],
             "channel_ops": [_piece(q) for q in s.channel_ops],
             "bias_maps": s.bias_maps, "group": s.group, "kept": p.kept, "replaced": _replaced(p),
             "scores": [float(v) for v in p.scores], "predicted_risk": p.predicted_risk,
             "measured_risk": measured_risk}
    if p.branches:
        entry["branches"] = [{"name": b.site.name, "node": b.site.node, "chain": b.site.chain,
                              "consumers": b.site.consumers, "units": b.site.n_units, "axis": b.site.axis,
                              "shape": list(b.site.shape), "reads": b.site.reads, "bias_maps": b.site.bias_maps,
                              "replaced": _replaced(b)} for b in p.branches]
    return entry


def summary(report: dict) -> str:
    """A plain-text table of the report: per site and overall."""
    rows = [f"{'site':<24} {'units':>6} {'kept':>6} {'removed':>8} {'predicted risk':>15}"]
    for s in report["sites"]:
        rows.append(f"{s['name']:<24} {s['units']:>6} {len(s['kept']):>6} {len(s['replaced']):>8} "
                    f"{s['predicted_risk']:>15.4g}")
    rows.append(f"{'total':<24} {sum(s['units'] for s in report['sites']):>6} "
                f"{sum(len(s['kept']) for s in report['sites']):>6} "
                f"{sum(len(s['replaced']) for s in report['sites']):>8} {report['predicted_risk']:>15.4g}")
    rows.append(f"parameters {report['parameters']['before']:,} -> {report['parameters']['after']:,}  "
                f"(score {report['score']}, {report['replacement']}, {report['selection']} selection)")
    if "macs" in report:
        rows.append(f"MACs per sample {report['macs']['before']:,} -> {report['macs']['after']:,}  "
                    f"(budget in MACs, keep {report['keep']})")
    return "\n".join(rows)


def check_new(paths: list[str], force: bool) -> None:
    """OutputError if any of `paths` exists and force is not set: nothing is overwritten unasked."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise OutputError(f"{' and '.join(existing)} already {'exist' if len(existing) > 1 else 'exists'}; "
                          "pass force=True (--force) to overwrite, or choose another path")


def write_png(fig, path: str, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file.
    An OSError (missing or read-only folder, disk full) is an OutputError; the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fxabstract-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose a writable folder") from None
        raise


@contextmanager
def staged(folder: str, names: tuple[str, ...]):
    """Yield a hidden staging folder inside `folder`; when the block ends without error, rename each of
    `names` from it into `folder`. An error or Ctrl-C in the block leaves no output, new or partial;
    the staging folder is always removed."""
    try:
        staging = tempfile.mkdtemp(prefix=".fxabstract-", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write into {folder}: {exc.strerror or exc}; choose a writable folder") from None
    try:
        yield staging
        for name in names:
            try:
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
            except OSError as exc:
                raise OutputError(f"cannot write {os.path.join(folder, name)}: {exc.strerror or exc}; "
                                  "choose a writable folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def dumps(report: dict) -> bytes:
    return (json.dumps(report, indent=1) + "\n").encode()


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
