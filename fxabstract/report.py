"""The JSON report: everything needed to re-apply the same interventions to the original model.

Per site: its name, producer, consumers, unit count, kept units (original numbering), and each
replaced unit with its kind and its constant or affine coefficients over the kept units; the
scores and the predicted risk. `write_atomic` is how every file fxabstract writes lands on disk.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from .errors import OutputError
from .passes.select import SitePlan


def site_entry(p: SitePlan, measured_risk: float | None = None) -> dict:
    s = p.site
    replaced = []
    for i, unit in enumerate(p.removed):
        if p.kind == "constant":
            replaced.append({"unit": unit, "kind": "constant", "constant": float(p.beta[i])})
        else:
            replaced.append({"unit": unit, "kind": "affine", "beta": float(p.beta[i]),
                             "theta": [float(t) for t in p.theta[i]]})
    return {"name": s.name, "producer": s.producer, "node": s.node, "chain": s.chain,
            "consumers": s.consumers, "units": s.n_units, "axis": s.axis, "shape": list(s.shape),
            "reads": s.reads, "producers": [{"module": q.module, "units": [q.lo, q.hi]} for q in s.pieces],
            "channel_ops": [{"module": q.module, "units": [q.lo, q.hi]} for q in s.channel_ops],
            "bias_maps": s.bias_maps, "group": s.group, "kept": p.kept, "replaced": replaced,
            "scores": [float(v) for v in p.scores], "predicted_risk": p.predicted_risk,
            "measured_risk": measured_risk}


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
    return "\n".join(rows)


def check_new(paths: list[str], force: bool) -> None:
    """OutputError if any of `paths` exists and force is not set: nothing is overwritten unasked."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise OutputError(f"{' and '.join(existing)} already {'exist' if len(existing) > 1 else 'exists'}; "
                          "pass force=True (--force) to overwrite, or choose another path")


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
