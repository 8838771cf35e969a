"""The `fxabstract` command: compile the built-in demo or a user's model, write ONNX and the report.

    fxabstract compile                                   # the demo: a digits MLP (trained once, cached)
    fxabstract compile --model mynet:build --checkpoint weights.pt --data calib.pt --eval-data test.pt --out build/
    fxabstract compile --model mynet:build --data calib.pt --sites '.*intermediate.*' --output logits --opset 17
    fxabstract sites                                     # the demo's sites, and why other layers are none
    fxabstract sites --model mynet:build --data calib.pt

`compile` writes model.onnx, report.json and summary.png (fidelity against keep, budget per site; needs
matplotlib; class outputs only) into --out, all or none, and prints a summary table. `sites` lists the
model's sites (units, kind, consumers) and every ineligible layer with its reason, compiling nothing.

Data files (--data, --eval-data, --fit-data) are written with torch.save and hold the model's inputs in
any form a calibration batch takes; every tensor's first axis is the batch axis:

    torch.save(x, "data.pt")                                            # one input: model(x)
    torch.save((x1, x2), "data.pt")                                     # positional inputs: model(x1, x2)
    torch.save({"input_ids": ids, "attention_mask": mask}, "data.pt")   # keyword inputs: model(**d)
    torch.save({"inputs": <any of the three>, "labels": y}, "data.pt")  # with labels (optional)
    torch.save({"x": <inputs>, "y": y}, "data.pt")                      # the same, the older spelling

A dict with an "inputs" key, or with only "x" (and "y"), is that wrapper; any other dict is keyword
inputs. Labels are class indices, one per prediction ([n], or [n, T] for a [n, T, classes] output), in
0 .. classes - 1; they give the accuracy before and after. The evaluation (agreement or error, accuracy,
interchange interventions, the fidelity sweep) runs on --eval-data, or without it on the calibration
data (which flatters every figure; the report's evaluation says which: "evaluated_on"). Its metrics fit
the preserved output: class logits get top-1 agreement, accuracy and IIA; regression and embedding
outputs get the relative error ||compiled - dense|| / ||dense|| over the set, the mean cosine, and per
site the interchange error and cosine (fxabstract.verify.iia), never an agreement.

A user's mistake is one line on stderr, `fxabstract: error: ...`, and exit status 2, never a traceback.
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

from .abstraction import (BUDGETS, REPLACEMENTS, SELECTIONS, analyse, calibration_samples, capture_sites,
                          default_probes, needs_matrices)
from .data import Inputs, default_output, logits, select_output
from .demo import CACHE_NAME, cache_dir, demo_model, digits_data
from .errors import FxAbstractError, FxAbstractWarning
from .output.files import staged
from .output.onnx import to_onnx
from .output.plots import summary_png
from .output.tensors import write_report
from .passes.scores import SCORES
from .passes.refit import FITS
from .verify import iia, output_kind

OUTPUTS = ("model.onnx", "report.json", "tensors.safetensors", "summary.png")   # the report is two files
SWEEP = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)     # keeps of the fidelity sweep in summary.png
DATA_HELP = ("(torch.save): a Tensor (one input), a tuple of positional tensors, a dict of keyword tensors, or "
             "{'inputs': any of those, 'labels': class indices} ({'x': ..., 'y': ...} also works); every "
             "tensor's first axis is the batch axis")


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


def _gib(text: str) -> int:
    """--matrix-memory 4 (GiB, may be fractional) -> bytes."""
    try:
        gib = float(text)
        if not 0 <= gib < float("inf"):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --matrix-memory {text!r}: give GiB as a number >= 0, "
                                         "e.g. 4 or 0.5") from None
    return int(gib * 2**30)


def _sites(text: str):
    """--sites fc1,fc2 (site names) or a regex that matches whole site names ('.*intermediate.*')."""
    if "," in text:
        names = [name.strip() for name in text.split(",")]
        if not all(names):
            raise argparse.ArgumentTypeError(f"invalid --sites {text!r}: an empty name in the list; give names "
                                             "separated by commas (fc1,fc2) or one regex")
        return names
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid --sites regex {text!r} ({exc}); give a regex that matches "
                                         "whole site names ('.*intermediate.*') or names separated by commas") from None
    return text


def _output(text: str):
    """--output 1 (an index into a tuple output) or logits (a key of a dict output)."""
    try:
        return int(text)
    except ValueError:
        return text


def _model_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--model", metavar="MODULE:FACTORY", help="import MODULE (from the current folder or "
                   "installed) and call FACTORY() for the nn.Module")
    c.add_argument("--checkpoint", metavar="PATH", help="state dict to load into the model (torch.save)")
    c.add_argument("--data", metavar="PATH", help=f"calibration inputs {DATA_HELP}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxabstract", description="Compile a trained network into a smaller, faithful "
                                                    "causal abstraction of it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compile,sites}")
    c = commands.add_parser("compile", help="compile the built-in demo, or --model with --data",
                            description="Without --model: the built-in demo (a digits MLP).")
    _model_arguments(c)
    c.add_argument("--eval-data", metavar="PATH", help="a held-out evaluation set, like --data (with --model): "
                   "agreement or error, accuracy, interchange interventions and the fidelity sweep are measured "
                   "on it; without it they are measured on the calibration data, which flatters them")
    c.add_argument("--fit-data", metavar="PATH", help="more inputs (torch.save, like --data), run forward only, "
                   "to fit the affine replacements on (with --model)")
    c.add_argument("--sites", type=_sites, metavar="REGEX|NAME,NAME", help="the sites to compile: names "
                   "separated by commas (fc1,fc2), or a regex that must match the WHOLE site name "
                   "('.*intermediate.*', not 'intermediate'); default: every site (`fxabstract sites` lists them)")
    c.add_argument("--output", type=_output, metavar="INDEX|KEY", help="which model output to preserve: an "
                   "index into a tuple output (0) or a key of a dict output (logits); default: the output "
                   "itself, else its 'logits', else its first tensor")
    c.add_argument("--opset", type=int, metavar="N", help="ONNX opset of model.onnx (default: to_onnx's)")
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
    c.add_argument("--fit", choices=FITS, default="local", help="how the replacement maps are fitted: local (the "
                   "closed form at each site, default), sequential (refitted on the network whose earlier sites are "
                   "replaced) or outputs (gradient descent on the output divergence, early stopping on held-back "
                   "calibration samples)")
    c.add_argument("--round-to", type=int, default=None, help="kept widths are multiples of this (default 8); 1 = off")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--matrix-memory", type=_gib, default=None, metavar="GIB",
                   help="GiB the d x d statistics may take (default: a quarter of the machine's memory); wider "
                        "sites get diagonal statistics and a constant replacement")
    s = commands.add_parser("sites", help="list the model's sites and why other layers are none; compiles nothing",
                            description="Without --model: the built-in demo (a digits MLP). The data's first "
                            "samples fix the shapes the sites are found with.")
    _model_arguments(s)
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


WRAPPERS = ({"inputs", "labels"}, {"x", "y"})   # the keys of a data file's {inputs, labels} wrapper


def _unwrap(obj, path: str):
    """A data file's object -> (inputs object, labels or None): see the module docstring."""
    if isinstance(obj, dict) and ("inputs" in obj or "x" in obj and set(obj) <= WRAPPERS[1]):
        key, allowed = ("inputs", WRAPPERS[0]) if "inputs" in obj else ("x", WRAPPERS[1])
        unknown = sorted(map(str, set(obj) - allowed))
        if unknown:
            raise UsageError(f"data file {path} has keys {unknown} beside {key!r}; save "
                             "{'inputs': inputs, 'labels': labels} (or {'x': inputs, 'y': labels}), or a dict of "
                             "keyword tensors without an 'inputs' key")
        return obj[key], obj.get("labels" if key == "inputs" else "y")
    return obj, None


def load_data(path: str) -> tuple[Inputs, torch.Tensor | None]:
    """A data file (module docstring) -> (the model's inputs, labels [n, ...] or None), checked: tensors
    only, non-empty, one batch size, finite."""
    inputs, labels = _unwrap(_load(path, "data"), path)
    if isinstance(inputs, torch.Tensor):
        named = [("the inputs", inputs)]
        inputs = Inputs((inputs,), {})
    elif isinstance(inputs, (tuple, list)):
        named = [(f"input {i}", v) for i, v in enumerate(inputs)]
        inputs = Inputs(tuple(inputs), {})
    elif isinstance(inputs, dict):
        named = [(f"input {k!r}", v) for k, v in inputs.items()]
        inputs = Inputs((), {str(k): v for k, v in inputs.items()})
    else:
        raise UsageError(f"data file {path} holds a {type(inputs).__name__}; save a Tensor of inputs, a tuple of "
                         "positional tensors, a dict of keyword tensors, or {'inputs': inputs, 'labels': labels}")
    if not named:
        raise UsageError(f"data file {path} holds no inputs (an empty {type(inputs).__name__}); save the model's "
                         "inputs as tensors")
    for name, v in named:
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"data file {path}: {name} is a {type(v).__name__}, not a tensor; save every input as "
                             "a tensor whose first axis is the batch axis")
        if v.dim() == 0 or len(v) == 0:
            raise UsageError(f"data file {path} holds no samples ({name} has shape {list(v.shape)}); the first "
                             "axis of every input is the batch axis")
    sizes = {len(v) for _, v in named}
    if len(sizes) > 1:
        raise UsageError(f"data file {path}: the inputs have different batch sizes "
                         f"({', '.join(f'{name} {len(v)}' for name, v in named)}); the first axis of every input "
                         "is the batch axis: give them the same length")
    for name, v in named:
        if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).reshape(len(v), -1).any(1).nonzero()[0])
            raise UsageError(f"data file {path}: {name} contains NaN or inf (first at sample {bad}); "
                             "clean or drop those samples")
    n = sizes.pop()
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or len(labels) != n:
            got = (f"{len(labels)} labels" if isinstance(labels, torch.Tensor) and labels.dim()
                   else f"a {type(labels).__name__}")
            raise UsageError(f"data file {path}: the labels must be a Tensor with one label per input ({n}), got "
                             f"{got}")
        if labels.is_floating_point() and not torch.isfinite(labels).all():
            raise UsageError(f"data file {path}: the labels contain NaN or inf; clean or drop those samples")
    return inputs, labels


def _signature(inputs: Inputs) -> list[tuple]:
    return ([(f"input {i}", a.dtype, tuple(a.shape[1:])) for i, a in enumerate(inputs.args)]
            + [(f"input {k!r}", v.dtype, tuple(v.shape[1:])) for k, v in inputs.kwargs.items()])


def _show(signature: list[tuple]) -> str:
    return ", ".join(f"{name} [{', '.join(['n', *map(str, shape)])}] {str(dtype).removeprefix('torch.')}"
                     for name, dtype, shape in signature)


def _same_inputs(inputs: Inputs, like: Inputs, path: str, like_path: str) -> None:
    """UsageError unless `inputs` (of file `path`) are the kind of `like`'s: the same inputs, dtypes and
    shapes but for the batch axis (the compiled module's shapes are those of the calibration data)."""
    got, want = _signature(inputs), _signature(like)
    if got != want:
        raise UsageError(f"data file {path} holds {_show(got)} but {like_path} holds {_show(want)}; give it inputs of "
                         "the calibration data's kind (the same inputs, dtypes and shapes but the batch axis)")


def check_runs(model: nn.Module, spec: str, inputs: Inputs, path: str):
    """The model's output on the first two samples of `inputs`; a UsageError when it fails on them."""
    try:
        with torch.no_grad():
            return inputs.take(slice(0, 2)).run(model)
    except Exception as exc:  # the data does not fit the model
        raise UsageError(f"{spec}() fails on the inputs of {path} ({inputs.describe()}): "
                         f"{type(exc).__name__}: {_one_line(exc, 200)}") from None


def output_of(out, output) -> tuple[str, int, int]:
    """("classes" or "values", classes per position, positions per sample) of the output that --output
    picks (default: the one analyse preserves) from the model's output `out` on a few samples."""
    z = select_output(out, output)          # a ConfigError names the output's tensors
    kind = output_kind(z, default_output(out) if output is None else output)
    classes = int(z.shape[-1]) if z.dim() else 1
    return kind, classes, logits(z).shape[1] // classes


def check_labels(labels: torch.Tensor | None, path: str, kind: str, classes: int, positions: int):
    """Class-index labels checked against the preserved output, as [n, positions]; None where there are
    none or they are not class indices (soft labels, regression targets: not used by the evaluation)."""
    if labels is None or kind != "classes" or labels.is_floating_point() or labels.is_complex():
        return None
    if labels.dtype == torch.bool:
        raise UsageError(f"data file {path}: the labels are booleans; save class indices (0 .. {classes - 1}) as "
                         "an integer tensor")
    if labels[0].numel() != positions:
        raise UsageError(f"data file {path}: the labels have shape {list(labels.shape)} but the model predicts "
                         f"{positions} class{'es' if positions > 1 else ''} per sample; give one label per "
                         "prediction")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise UsageError(f"data file {path}: the labels run from {low} to {high} but the model's output has "
                         f"{classes} classes (labels 0 .. {classes - 1}); give class indices of this model, or "
                         "--output the output they label")
    return labels.reshape(len(labels), positions)


def batches_of(inputs: Inputs, labels, size: int) -> list:
    """The data as a list of calibration batches of `size` samples (its length gives the bars a total):
    a Tensor, a dict, or (inputs, labels) pairs; positional inputs are always a pair's first item, as
    a bare tuple would be read as one."""
    out = []
    for start in range(0, len(inputs), size):
        part = inputs.take(slice(start, start + size))
        x = part.args[0] if len(part.args) == 1 and not part.kwargs else (part.args if part.args else part.kwargs)
        y = None if labels is None else labels[start:start + size]
        out.append((x, y) if y is not None or isinstance(x, tuple) else x)
    return out


def run_all(module: nn.Module, inputs: Inputs, output, batch_size: int, desc: str | None = None) -> torch.Tensor:
    """The preserved output of `module` on every sample, [n, o] in float64 (a bar where `desc`)."""
    starts = range(0, len(inputs), batch_size)
    with torch.no_grad():
        return torch.cat([logits(inputs.take(slice(i, i + batch_size)).run(module), output).double()
                          for i in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None)])


def fidelity(dense: torch.Tensor, compiled: torch.Tensor, kind: str, classes: int) -> dict:
    """Compiled against dense outputs ([n, o]): top-1 agreement and logit-MSE for class logits; for values
    the relative error ||compiled - dense|| / ||dense|| over the set and the mean cosine per sample."""
    if kind == "classes":
        top, top_c = (z.view(len(z), -1, classes).argmax(-1) for z in (dense, compiled))
        return {"agreement": float((top == top_c).double().mean()),
                "logit_mse": float(0.5 * (compiled - dense).pow(2).sum(-1).mean())}
    return {"relative_error": float((compiled - dense).norm() / dense.norm().clamp_min(1e-12)),
            "cosine": float(torch.nn.functional.cosine_similarity(dense, compiled, dim=-1).mean())}


def as_data(inputs: Inputs):
    """`inputs` as fxabstract.verify and to_onnx take them: a Tensor, a tuple of positional tensors or a dict
    of keyword tensors."""
    if inputs.args and inputs.kwargs:
        raise UsageError("the inputs mix positional and keyword tensors; save a tuple or a dict of them")
    return (inputs.args[0] if len(inputs.args) == 1 else inputs.args) if inputs.args else inputs.kwargs


class Evaluation:
    """What the evaluation runs on: the inputs, their class labels ([n, positions] or None), where they
    come from ("calibration" or "eval-data", and a name for the table), the output's kind and classes."""

    def __init__(self, inputs: Inputs, labels, source: str, name: str, kind: str, classes: int):
        self.inputs, self.labels, self.source, self.name = inputs, labels, source, name
        self.kind, self.classes = kind, classes


def evaluate(model, result, data: Evaluation, swap_ps, trials, args) -> dict:
    """Fidelity of the compiled module on `data` (`fidelity`), accuracy before and after (class labels),
    and the interchange interventions per site (verify.iia: IIA for classes, interchange error else)."""
    output = result.output
    dense = run_all(model, data.inputs, output, args.batch_size, "evaluate dense")
    compiled = run_all(result.module.eval(), data.inputs, output, args.batch_size, "evaluate compiled")
    ev = {"samples": len(data.inputs), "evaluated_on": data.source, "data": data.name, "output_kind": data.kind,
          **fidelity(dense, compiled, data.kind, data.classes)}
    if data.labels is not None:
        top, top_c = (z.view(len(z), -1, data.classes).argmax(-1) for z in (dense, compiled))
        ev["accuracy"] = {"before": float((top == data.labels).double().mean()),
                          "after": float((top_c == data.labels).double().mean())}
    _note("measuring interchange interventions...")
    key = "iia" if data.kind == "classes" else "interchange"
    ev[key] = {str(p): iia(model, result, as_data(data.inputs), swap_p=p, trials=trials, seed=args.seed)
               for p in swap_ps}
    return ev, dense


def fidelity_sweep(analysis, data: Evaluation, dense: torch.Tensor, args) -> list[dict]:
    """Compile the analysis at every keep of SWEEP; its fidelity (`fidelity`) against the dense outputs."""
    rows, analysis.progress = [], False      # one bar for the sweep, none per compile
    for keep in tqdm(SWEEP, desc="fidelity sweep", unit="keep", leave=False):
        r = analysis.compile(keep, args.replacement, args.selection, args.round_to, budget=args.budget)
        z = run_all(r.module, data.inputs, r.output, args.batch_size)
        rows.append({"keep": keep, "kept": sum(len(s["kept"]) for s in r.report["sites"]),
                     "units": sum(s["units"] for s in r.report["sites"]),
                     **fidelity(dense, z, data.kind, data.classes),
                     "parameters": r.report["parameters"]["after"]})
    return rows


def compile_and_write(model, batches, data: Evaluation, swap_ps, trials, args, fit_data=None) -> None:
    """Compile, evaluate on `data`, export, write report.json and summary.png, and print the table."""
    bars = [_bar(batches, "calibrate"), _bar(fit_data, "fit data")]
    try:
        analysis = analyse(model, bars[0], score=args.score, sites=args.sites, seed=args.seed,
                           matrices=needs_matrices(args.score, args.replacement, args.selection), fit_data=bars[1],
                           output=args.output, probes=default_probes(calibration_samples(batches)),
                           matrix_memory=args.matrix_memory)
    finally:   # an error in the analysis clears its bar, so the error line stands alone
        for bar in bars:
            if bar is not None:
                bar.close()
    analysis.progress = True   # the bars above have totals (analyse's own do not know the data's length)
    result = analysis.compile(args.keep, args.replacement, args.selection, args.round_to, budget=args.budget,
                              fit=args.fit)
    if data.source == "calibration":
        _note(f"note: no --eval-data, so every figure below is measured on the calibration data {data.name}, "
              "which flatters it; pass --eval-data FILE for a held-out set")
    ev, dense = evaluate(model, result, data, swap_ps, trials, args)
    ev["sweep"] = fidelity_sweep(analysis, data, dense, args)
    _note("exporting ONNX...")
    onnx_path, report_path, _, png_path = (os.path.join(args.out, name) for name in OUTPUTS)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # not "torchvision is not installed"
    png = data.kind == "classes" and _has_matplotlib()       # its plot is top-1 agreement against keep
    with staged(args.out, OUTPUTS if png else OUTPUTS[:3]) as staging:  # all files or none, even on Ctrl-C
        _write_outputs(result, ev, as_data(data.inputs.take(slice(0, 4))), staging, png, args.opset)
    print_table(result, ev)
    report_path += f" (its arrays in {OUTPUTS[2]})"
    if png:
        print(f"wrote {onnx_path}, {report_path} and {png_path}")
    elif data.kind != "classes":
        print(f"wrote {onnx_path} and {report_path} (summary.png skipped: it plots class predictions, which this "
              "output, not class logits, does not make; the report's sweep gives the relative error)")
    else:
        print(f"wrote {onnx_path} and {report_path} (summary.png skipped: pip install 'fxabstract[bench]' for matplotlib)")


def _bar(batches: list | None, desc: str):
    """A progress bar over a list of batches, with its total and so the time left."""
    return None if batches is None else tqdm(batches, desc=desc, unit="batch", total=len(batches), leave=False)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _write_outputs(result, ev: dict, example, folder: str, png: bool, opset: int | None) -> None:
    """model.onnx, report.json with tensors.safetensors (output/tensors.py: `fxa.load`'s format, read back
    with `read_report`) and (with matplotlib) summary.png into `folder`; the report names the ONNX file
    relative to itself, so the same compile gives the same bytes whatever --out is."""
    options = {} if opset is None else {"opset": opset}
    ev["onnx"] = {**to_onnx(result.module, example, os.path.join(folder, OUTPUTS[0]), **options), "path": OUTPUTS[0]}
    write_report(folder, {**result.report, "evaluation": ev})
    if png:
        summary_png(result.report, ev["sweep"], os.path.join(folder, OUTPUTS[3]))


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def print_table(result, ev: dict) -> None:
    """The per-site summary, then the evaluation: for class logits accuracy, agreement and IIA; for other
    outputs relative error, cosine and interchange error; then parameters, MACs and ONNX parity."""
    print(result.summary())
    where = f"the calibration data {ev['data']}" if ev["evaluated_on"] == "calibration" else ev["data"]
    output = "the model's output" if result.report["output"] == "output" else f"output {result.report['output']}"
    print(f"\nevaluation on {where} ({ev['samples']} samples; {output}: "
          f"{'class logits' if ev['output_kind'] == 'classes' else 'values, not class logits'})")
    if "accuracy" in ev:
        print(f"  {'accuracy':<20} {_pct(ev['accuracy']['before'])} -> {_pct(ev['accuracy']['after'])}")
    if ev["output_kind"] == "classes":
        print(f"  {'top-1 agreement':<20} {_pct(ev['agreement'])} (compiled vs dense)")
        for p, sites in ev["iia"].items():
            for i, (name, r) in enumerate(sites.items()):
                label = f"IIA, swap p = {p}" if i == 0 else ""
                print(f"  {label:<20} {name:<12} {_pct(r['iia']):>7}  95% CI [{_pct(r['ci95'][0])}, "
                      f"{_pct(r['ci95'][1])}]  ({r['trials']} trials)")
    else:
        print(f"  {'relative error':<20} {_pct(ev['relative_error'])} (||compiled - dense|| / ||dense||)")
        print(f"  {'cosine':<20} {ev['cosine']:.6f} (compiled vs dense, mean per sample)")
        for p, sites in ev["interchange"].items():
            for i, (name, r) in enumerate(sites.items()):
                label = f"interchange, p = {p}" if i == 0 else ""
                print(f"  {label:<20} {name:<12} error {_pct(r['interchange_error']):>7}  cosine {r['cosine']:.6f}  "
                      f"({r['trials']} trials)")
    before, after = result.report["parameters"]["before"], result.report["parameters"]["after"]
    print(f"  {'parameters':<20} {before:,} -> {after:,} ({after / before:.1%})")
    if "macs" in result.report:
        before, after = result.report["macs"]["before"], result.report["macs"]["after"]
        print(f"  {'MACs per sample':<20} {before:,} -> {after:,} ({after / before:.1%})")
    onnx = ev["onnx"]
    if "relative_diff" in onnx:
        verdict = "ok" if onnx["relative_diff"] < 1e-4 else "MISMATCH"
        print(f"  {'ONNX parity':<20} {verdict}: max |onnxruntime - torch| = {onnx['max_abs_diff']:.2g} "
              f"(relative {onnx['relative_diff']:.2g})")


def compile_demo(args) -> None:
    model = _demo()
    x_train, y_train, x_test, y_test = digits_data()
    batches = list(zip(x_train.split(args.batch_size), y_train.split(args.batch_size)))  # pairs: 'ce' works
    inputs = Inputs((x_test,), {})
    kind, classes, positions = output_of(check_runs(model, "the demo", inputs, "the test split"), args.output)
    data = Evaluation(inputs, check_labels(y_test, "the test split", kind, classes, positions), "eval-data",
                      "the test split", kind, classes)
    _note(f"compiling the demo digits MLP on {len(x_train)} training samples...")
    compile_and_write(model, batches, data, (0.1, 0.5), 10_000, args)


def _demo() -> nn.Module:
    if not os.path.exists(os.path.join(cache_dir(), CACHE_NAME)):
        _note("training demo model (first run only)...")
    return demo_model()


def compile_user(args) -> None:
    inputs, labels = load_data(args.data)
    model = load_model(args.model, args.checkpoint)
    kind, classes, positions = output_of(check_runs(model, args.model, inputs, args.data), args.output)
    checked = check_labels(labels, args.data, kind, classes, positions)
    if args.eval_data:
        eval_inputs, eval_labels = load_data(args.eval_data)
        _same_inputs(eval_inputs, inputs, args.eval_data, args.data)
        check_runs(model, args.model, eval_inputs, args.eval_data)
        data = Evaluation(eval_inputs, check_labels(eval_labels, args.eval_data, kind, classes, positions),
                          "eval-data", args.eval_data, kind, classes)
    else:
        data = Evaluation(inputs, checked, "calibration", args.data, kind, classes)
    batches = batches_of(inputs, labels, args.batch_size)
    fit_data = None
    if args.fit_data:
        fit_inputs, _ = load_data(args.fit_data)
        _same_inputs(fit_inputs, inputs, args.fit_data, args.data)
        fit_data = batches_of(fit_inputs, None, args.batch_size)
    _note(f"compiling {args.model} on {len(inputs)} samples...")
    compile_and_write(model, batches, data, (0.5,), 2_000, args, fit_data)


def site_kind(site) -> str:
    """A site's kind in words, for `fxabstract sites`."""
    kind = "channels" if site.axis == 1 and len(site.shape) > 1 else "features"
    if site.group > 1:
        kind = f"{site.n_units // site.group} attention heads of {site.group}" + (" (grouped-query)" if site.kv_shapes else "")
    if site.splits or ".piece" in site.name:
        kind += ", split piece"
    if site.branches:
        kind += ", squeeze-excitation"
    if site.parts > 1:
        kind += f", {site.parts} conv groups"
    if site.tie:
        kind += f", stream {site.tie}"
    return kind


def list_sites(args) -> None:
    """`fxabstract sites`: every site with its units, kind and consumers, and every ineligible layer with
    the reason; nothing is compiled."""
    if args.model:
        inputs, _ = load_data(args.data)
        model, name, where = load_model(args.model, args.checkpoint), args.model, args.data
    else:
        model, name, where = _demo(), "the demo digits MLP", "its training split"
        inputs = Inputs((digits_data()[0],), {})
    check_runs(model, name, inputs, where)
    first = batches_of(inputs, None, 8)[0]
    _, found, ineligible = capture_sites(model, first)
    units = sum(s.n_units for s in found if not s.tie) + sum({s.tie: s.n_units for s in found if s.tie}.values())
    once = ", a residual stream's counted once" if any(s.tie for s in found) else ""
    print(f"{len(found)} site{'s' if len(found) != 1 else ''} in {name} ({units} units{once}; "
          "--sites takes names separated by commas, or a regex matching whole names):")
    width = max([len("site")] + [len(s.name) for s in found])
    print(f"  {'site':<{width}} {'units':>6}  {'kind':<24} consumers")
    for s in found:
        print(f"  {s.name:<{width}} {s.n_units:>6}  {site_kind(s):<24} {', '.join(s.consumers)}")
    print(f"{len(ineligible)} ineligible layer{'s' if len(ineligible) != 1 else ''}{':' if ineligible else ''}")
    for layer, reason in ineligible.items():
        print(f"  {layer}: {reason}")


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


def _check_arguments(args) -> None:
    if args.model and not args.data:
        raise UsageError("--model needs --data: a file of calibration inputs saved with torch.save")
    if args.command == "sites":
        if not args.model and (args.data or args.checkpoint):
            raise UsageError("--data and --checkpoint need --model module:factory (the demo brings its own)")
        return
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.budget == "macs" and not isinstance(args.keep, float):
        raise UsageError(f"--budget macs takes --keep as a fraction of the MACs (for example 0.9), got {args.keep!r}")
    if args.opset is not None:   # checked now, not after the calibration
        import onnx  # noqa: PLC0415 (a second's import that --help need not pay)
        if not 7 <= args.opset <= onnx.defs.onnx_opset_version():
            raise UsageError(f"--opset {args.opset} is out of range; give an ONNX opset in "
                             f"7..{onnx.defs.onnx_opset_version()}")
    if not args.model and (args.data or args.checkpoint or args.fit_data or args.eval_data):
        raise UsageError("--data, --eval-data, --fit-data and --checkpoint need --model module:factory "
                         "(the demo brings its own)")


def _main(argv) -> int:
    out, created = None, False
    try:
        args = build_parser().parse_args(argv)
        _check_arguments(args)
        if args.command == "sites":
            list_sites(args)
            return 0
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
