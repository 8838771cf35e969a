"""The `fxabstract` command: compile the built-in demo or a user's model, write ONNX and the report.

    fxabstract compile                                   # the demo: a digits MLP (trained once, cached)
    fxabstract compile --model mynet:build --checkpoint weights.pt --data calib.pt --out build/

Both write model.onnx, report.json and summary.png (fidelity against keep, budget per site; needs
matplotlib) into --out and print a summary table. A user's mistake is one
line on stderr, `fxabstract: error: ...`, and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pickle
import re
import sys
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .abstraction import BUDGETS, REPLACEMENTS, SELECTIONS, analyse, needs_matrices
from .data import logits
from .demo import CACHE_NAME, cache_dir, demo_model, digits_data
from .errors import FxAbstractError, FxAbstractWarning
from .output.files import staged, write_atomic
from .output.onnx import to_onnx
from .output.plots import summary_png
from .output.report import dumps
from .passes.scores import SCORES
from .verify import iia

OUTPUTS = ("model.onnx", "report.json", "summary.png")
SWEEP = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)     # keeps of the fidelity sweep in summary.png


class UsageError(Exception):
    """A mistake on the command line or in a file it names."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits; we want the one-line error of main()
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split()) or type(exc).__name__  # no terminal colours
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _keep(text: str):
    """--keep 0.25 (fraction of units), 128 (units in total) or fc1=64,fc2=32 (units per site)."""
    try:
        if "=" in text:
            return {name.strip(): int(count) for name, count in (pair.split("=") for pair in text.split(","))}
        keep = float(text) if any(c in text for c in ".eE") else int(text)
        if isinstance(keep, float) and not 0 < keep <= 1:
            raise ValueError
        return keep
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --keep {text!r}: give a fraction in (0, 1] (0.25), a unit "
                                         "count (128) or per-site counts (fc1=64,fc2=32)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxabstract", description="Compile a trained network into a smaller, faithful "
                                                    "causal abstraction of it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="compile")
    c = commands.add_parser("compile", help="compile the built-in demo, or --model with --data",
                            description="Without --model: the built-in demo (a digits MLP).")
    c.add_argument("--model", metavar="MODULE:FACTORY", help="import MODULE (from the current folder or "
                   "installed) and call FACTORY() for the nn.Module")
    c.add_argument("--checkpoint", metavar="PATH", help="state dict to load into the model (torch.save)")
    c.add_argument("--data", metavar="PATH", help="calibration inputs (torch.save): a Tensor, or a dict "
                   "with 'x' (inputs) and optionally 'y' (labels)")
    c.add_argument("--fit-data", metavar="PATH", help="more inputs (torch.save, like --data), run forward only, "
                   "to fit the affine replacements on (with --model)")
    c.add_argument("--batch-size", type=int, default=256, help="calibration batch size (default 256)")
    c.add_argument("--out", default=".", help="folder for model.onnx and report.json (default: here)")
    c.add_argument("--force", action="store_true", help="overwrite model.onnx / report.json in --out")
    c.add_argument("--keep", type=_keep, default=0.25, help="fraction kept (0.25), units kept in total "
                   "(128) or per site (fc1=64,fc2=32); default 0.25")
    c.add_argument("--budget", choices=BUDGETS, default="units", help="what --keep counts: units (default), or "
                   "macs: --keep is the fraction of the sites' MACs per sample kept")
    c.add_argument("--score", choices=SCORES, default="logit-mse")
    c.add_argument("--replacement", choices=REPLACEMENTS, default="affine")
    c.add_argument("--selection", choices=SELECTIONS, default="joint")
    c.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this; 1 = off")
    c.add_argument("--seed", type=int, default=0)
    return parser


def prepare_out(out: str, force: bool) -> bool:
    """Create --out, check it is writable, and refuse to overwrite earlier outputs without --force.
    Returns whether the folder was created (main removes it again if the compile then fails)."""
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror}; choose another --out") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output folder {out} is not writable; choose another --out")
    existing = [name for name in OUTPUTS if os.path.exists(os.path.join(out, name))]
    if existing and not force:
        raise UsageError(f"{' and '.join(existing)} already in {out}; pass --force to overwrite or choose "
                         "another --out")
    return created


def _load(path: str, what: str):
    if not os.path.isfile(path):
        raise UsageError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a pickled Python object: it could run code, so it is not loaded
            raise UsageError(f"{what} file {path} holds Python objects that torch.load(weights_only=True) refuses "
                             "to unpickle; save tensors only: torch.save(model.state_dict(), path) or "
                             "torch.save({'x': x, 'y': y}, path)") from None
        raise UsageError(f"{what} file {path} is not a file written by torch.save (torch.load(weights_only=True) "
                         "cannot read it); write it with torch.save") from None
    except Exception as exc:  # unpickling raises many types
        raise UsageError(f"cannot read {what} file {path} with torch.load(weights_only=True) "
                         f"({type(exc).__name__}: {_one_line(exc, 160)}); write it with torch.save") from None


def _build(spec: str, module_name: str, factory_name: str):
    """Import `module_name` (and nothing else) and call its `factory_name()`."""
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the user's module raises on import
        raise UsageError(f"cannot import module {module_name!r} ({type(exc).__name__}: {_one_line(exc)}); "
                         "run from the folder that holds it, or install it") from None
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise UsageError(f"module {module_name!r} has no {factory_name!r}")
    if not callable(factory):
        raise UsageError(f"{spec} is a {type(factory).__name__}, not callable; name a function or class "
                         "that returns the nn.Module")
    try:
        return factory()
    except Exception as exc:  # the user's factory
        raise UsageError(f"{spec}() failed ({type(exc).__name__}: {_one_line(exc)})") from None


def load_model(spec: str, checkpoint: str | None) -> nn.Module:
    """`module:factory` -> factory(), with the checkpoint's state dict loaded into it."""
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name or ":" in factory_name:
        raise UsageError(f"--model must be module:factory (for example mynet:build), got {spec!r}")
    folder = os.getcwd()
    added = folder not in sys.path  # a console script does not see the user's folder by default;
    if added:                       # it is on the path only while the named module loads and builds,
        sys.path.insert(0, folder)  # so no later import (onnx, sklearn, ...) can pick up a file from it
    try:
        model = _build(spec, module_name, factory_name)
    finally:
        if added:
            sys.path.remove(folder)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        state = _load(checkpoint, "checkpoint")
        bad = (not isinstance(state, dict) or not state
               or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()))
        if bad:
            raise UsageError(f"checkpoint {checkpoint} holds a {type(state).__name__} that is not a state dict "
                             "(names -> tensors); save it with torch.save(model.state_dict(), path)")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageError(f"checkpoint {checkpoint} does not fit {spec}(): {_one_line(exc)}") from None
    return model.eval()


def load_data(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Tensor of inputs, or {'x': inputs, 'y': labels (optional)} -> (x [n, ...], y [n] or None)."""
    obj = _load(path, "data")
    if isinstance(obj, torch.Tensor):
        x, y = obj, None
    elif isinstance(obj, dict) and isinstance(obj.get("x"), torch.Tensor):
        x, y = obj["x"], obj.get("y")
    else:
        raise UsageError(f"data file {path} holds a {type(obj).__name__}; save a Tensor of inputs or a dict "
                         "{'x': inputs, 'y': labels}")
    if x.dim() == 0 or len(x) == 0:
        raise UsageError(f"data file {path} holds no samples; the first axis of its inputs is the batch axis")
    if y is not None and (not isinstance(y, torch.Tensor) or y.dim() == 0 or len(y) != len(x)):
        raise UsageError(f"data file {path}: 'y' must be a Tensor with one label per input ({len(x)})")
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).reshape(len(x), -1).any(1).nonzero()[0])
        raise UsageError(f"data file {path}: the inputs contain NaN or inf (first at sample {bad}); "
                         "clean or drop those samples")
    return x, y


def _top1(module: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([logits(module(xb)).argmax(-1) for xb in x.split(batch_size)])


def evaluate(model, result, x, y, swap_ps, trials, args) -> dict:
    """Accuracy (with labels), top-1 agreement and IIA per site on (x, y)."""
    dense, compiled = _top1(model, x, args.batch_size), _top1(result.module.eval(), x, args.batch_size)
    ev = {"samples": len(x), "agreement": float((dense == compiled).double().mean())}
    if y is not None and y.dim() == 1 and not y.is_floating_point():
        ev["accuracy"] = {"before": float((dense == y).double().mean()),
                          "after": float((compiled == y).double().mean())}
    _note("measuring interchange interventions...")
    ev["iia"] = {str(p): iia(model, result, x, swap_p=p, trials=trials, seed=args.seed) for p in swap_ps}
    return ev


def fidelity_sweep(analysis, x, dense: torch.Tensor, args) -> list[dict]:
    """Compile the analysis at every keep of SWEEP; top-1 agreement and logit-MSE against the dense logits."""
    rows, analysis.progress = [], False      # one bar for the sweep, none per compile
    for keep in tqdm(SWEEP, desc="fidelity sweep", unit="keep", leave=False):
        r = analysis.compile(keep, args.replacement, args.selection, args.round_to, budget=args.budget)
        with torch.no_grad():
            z = torch.cat([logits(r.module(xb)) for xb in x.split(args.batch_size)])
        rows.append({"keep": keep, "kept": sum(len(s["kept"]) for s in r.report["sites"]),
                     "units": sum(s["units"] for s in r.report["sites"]),
                     "agreement": float((z.argmax(-1) == dense.argmax(-1)).double().mean()),
                     "logit_mse": float(0.5 * (z.double() - dense.double()).pow(2).sum(-1).mean()),
                     "parameters": r.report["parameters"]["after"]})
    return rows


def compile_and_write(model, batches, x, y, swap_ps, trials, args, where: str, fit_data=None) -> None:
    """Compile, evaluate on (x, y), export, write report.json and summary.png, and print the table."""
    analysis = analyse(model, batches, score=args.score, seed=args.seed, progress=True,
                           matrices=needs_matrices(args.score, args.replacement, args.selection), fit_data=fit_data)
    result = analysis.compile(args.keep, args.replacement, args.selection, args.round_to, budget=args.budget)
    ev = evaluate(model, result, x, y, swap_ps, trials, args)
    with torch.no_grad():
        dense = torch.cat([logits(model(xb)) for xb in x.split(args.batch_size)])
    ev["sweep"] = fidelity_sweep(analysis, x, dense, args)
    _note("exporting ONNX...")
    onnx_path, report_path, png_path = (os.path.join(args.out, name) for name in OUTPUTS)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # not "torchvision is not installed"
    png = _has_matplotlib()
    with staged(args.out, OUTPUTS if png else OUTPUTS[:2]) as staging:  # all files or none, even on Ctrl-C
        _write_outputs(result, ev, x, staging, png)
    print_table(result, ev, where)
    if png:
        print(f"wrote {onnx_path}, {report_path} and {png_path}")
    else:
        print(f"wrote {onnx_path} and {report_path} (summary.png skipped: pip install 'fxabstract[bench]' for matplotlib)")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _write_outputs(result, ev: dict, x: torch.Tensor, folder: str, png: bool) -> None:
    """model.onnx, report.json and (with matplotlib) summary.png into `folder`; the report names the ONNX
    file relative to itself, so the same compile gives the same bytes whatever --out is."""
    ev["onnx"] = {**to_onnx(result.module, x[:4], os.path.join(folder, OUTPUTS[0])), "path": OUTPUTS[0]}
    write_atomic(os.path.join(folder, OUTPUTS[1]), dumps({**result.report, "evaluation": ev}))
    if png:
        summary_png(result.report, ev["sweep"], os.path.join(folder, OUTPUTS[2]))


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def print_table(result, ev: dict, where: str) -> None:
    """The per-site summary, then the evaluation: accuracy, agreement, IIA, parameters, ONNX parity."""
    print(result.summary())
    print(f"\nevaluation on {where} ({ev['samples']} samples)")
    if "accuracy" in ev:
        print(f"  {'accuracy':<20} {_pct(ev['accuracy']['before'])} -> {_pct(ev['accuracy']['after'])}")
    print(f"  {'top-1 agreement':<20} {_pct(ev['agreement'])} (compiled vs dense)")
    for p, sites in ev["iia"].items():
        for i, (name, r) in enumerate(sites.items()):
            label = f"IIA, swap p = {p}" if i == 0 else ""
            print(f"  {label:<20} {name:<12} {_pct(r['iia']):>7}  95% CI [{_pct(r['ci95'][0])}, "
                  f"{_pct(r['ci95'][1])}]  ({r['trials']} trials)")
    before, after = result.report["parameters"]["before"], result.report["parameters"]["after"]
    print(f"  {'parameters':<20} {before:,} -> {after:,} ({after / before:.1%})")
    if "macs" in result.report:
        before, after = result.report["macs"]["before"], result.report["macs"]["after"]
        print(f"  {'MACs per sample':<20} {before:,} -> {after:,} ({after / before:.1%})")
    onnx = ev["onnx"]
    verdict = "ok" if onnx["relative_diff"] < 1e-4 else "MISMATCH"
    print(f"  {'ONNX parity':<20} {verdict}: max |onnxruntime - torch| = {onnx['max_abs_diff']:.2g} "
          f"(relative {onnx['relative_diff']:.2g})")


def compile_demo(args) -> None:

    if not os.path.exists(os.path.join(cache_dir(), CACHE_NAME)):
        _note("training demo model (first run only)...")
    model = demo_model()
    x_train, y_train, x_test, y_test = digits_data()
    batches = list(zip(x_train.split(args.batch_size), y_train.split(args.batch_size)))  # pairs: 'ce' works
    _note(f"compiling the demo digits MLP on {len(x_train)} training samples...")
    compile_and_write(model, batches, x_test, y_test, (0.1, 0.5), 10_000, args, "the test split")


def compile_user(args) -> None:
    x, y = load_data(args.data)
    model = load_model(args.model, args.checkpoint)
    try:
        with torch.no_grad():
            model(x[:2])
    except Exception as exc:  # the data does not fit the model
        raise UsageError(f"{args.model}() fails on the inputs of {args.data} (shape {list(x.shape)}): "
                         f"{type(exc).__name__}: {_one_line(exc, 200)}") from None
    split = lambda t: t.split(args.batch_size)  # noqa: E731
    batches = list(zip(split(x), split(y))) if y is not None else list(split(x))
    fit_data = load_data(args.fit_data)[0].split(args.batch_size) if args.fit_data else None
    _note(f"compiling {args.model} on {len(x)} samples...")
    compile_and_write(model, batches, x, y, (0.5,), 2_000, args, args.data, fit_data)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """FxAbstractWarning as one `fxabstract: warning: ...` line; other warnings as Python shows them."""
    if issubclass(category, FxAbstractWarning):
        print(f"fxabstract: warning: {_one_line(message, 1000)}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")


def main(argv=None) -> int:
    """Entry point of the `fxabstract` console script; returns the exit status."""
    with warnings.catch_warnings():  # restores warnings.showwarning afterwards
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", FxAbstractWarning)
        return _main(argv)


def _main(argv) -> int:
    out, created = None, False
    try:
        args = build_parser().parse_args(argv)
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.budget == "macs" and not isinstance(args.keep, float):
            raise UsageError(f"--budget macs takes --keep as a fraction of the MACs (for example 0.9), got {args.keep!r}")
        if args.model and not args.data:
            raise UsageError("--model needs --data: a file of calibration inputs saved with torch.save")
        if not args.model and (args.data or args.checkpoint or args.fit_data):
            raise UsageError("--data, --fit-data and --checkpoint need --model module:factory (the demo brings its own)")
        out = args.out
        created = prepare_out(out, args.force)
        if args.model:
            compile_user(args)
        else:
            compile_demo(args)
        return 0
    except (UsageError, FxAbstractError) as exc:
        print(f"fxabstract: error: {_one_line(exc, 1000)}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("fxabstract: interrupted", file=sys.stderr)
        status = 130
    if created and not os.listdir(out):  # a failed compile leaves nothing behind, not even its --out
        os.rmdir(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
