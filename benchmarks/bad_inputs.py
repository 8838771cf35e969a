"""The bad-input table (issue 5): every mistake a user can make, tried through the Python API and
through the `fxabstract compile` command, with what the user sees, the exit status, and whether a
traceback or a partial output file results.

    python benchmarks/bad_inputs.py              # the CLI in a subprocess per case (what a user runs)
    python benchmarks/bad_inputs.py --in-process # the CLI through fxabstract.cli.main (faster)

Writes benchmarks/results/bad_inputs.md. tests/test_bad_inputs.py runs the same CASES in-process.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fxabstract as fxa  # noqa: E402
from fxabstract.errors import FxAbstractError, FxAbstractWarning  # noqa: E402

NETS = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))

def wide():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3))

class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)

class AllTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def untraceable():
    return Untraceable()

def no_site():
    return nn.Sequential(nn.Linear(6, 3), nn.ReLU())

def tied():
    return AllTied()

def training():
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).train()

def half():
    return build().half()

def bfloat16():
    return build().bfloat16()

def regression():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))

def overflow():
    model = build().half()
    with torch.no_grad():
        model[0].weight.mul_(1e5)
    return model

class DictHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.cls = nn.Linear(6, 32), nn.Linear(32, 8), nn.Linear(8, 3)
    def forward(self, x):
        e = self.fc2(torch.relu(self.fc1(x)))
        return {"embedding": e, "logits": self.cls(torch.relu(e))}

def dictheads():
    return DictHeads()

class NaNOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
    def forward(self, x):
        return self.fc(x) * float("nan")

def nanout():
    return NaNOut()

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.up, self.out = nn.Embedding(20, 8), nn.Linear(8, 32), nn.Linear(32, 5)
    def forward(self, input_ids, attention_mask):
        return self.out(torch.relu(self.up(self.tok(input_ids)))) * attention_mask[..., None]

def tagger():
    return Tagger()
'''


class Payload:
    """Unpickling this calls open(<marker>, "w"): it would show that a file ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Workspace:
    """A folder with the user's module (`badnets`), data files and checkpoints, as a user would have."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "badnets.py").write_text(NETS)
        (folder / "afile").write_text("a file where a folder is expected")
        sys.path.insert(0, str(folder))
        try:
            self.nets = importlib.import_module("badnets")
        finally:
            sys.path.remove(str(folder))
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(200, 6, generator=gen)
        self.y = self.nets.build()(self.x).argmax(-1).detach()
        nan, inf = self.x.clone(), self.x.clone()
        nan[5, 2], inf[7, 1] = float("nan"), float("inf")
        files = {"data.pt": {"x": self.x, "y": self.y}, "unlabelled.pt": self.x, "nan.pt": nan, "inf.pt": inf,
                 "empty.pt": self.x[:0], "narrow.pt": self.x[:, :5], "double.pt": self.x.double(),
                 "ints.pt": self.x.long(), "tiny.pt": self.x[:20], "half.pt": self.x.half(),
                 "bfloat16.pt": self.x.bfloat16(), "weights.pt": self.nets.build().state_dict(),
                 "list.pt": [1, 2, 3], "module.pt": self.nets.build(), "other.pt": self.nets.wide().state_dict(),
                 "evil.pt": {"x": Payload(str(folder / "EXECUTED"))}}
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(2, 9, (64,), generator=gen)
        self.tokens = {"input_ids": torch.randint(0, 20, (64, 8), generator=gen),
                       "attention_mask": (torch.arange(8)[None] < lengths[:, None]).long()}
        files.update({"badlabels.pt": {"x": self.x, "y": self.y + 7}, "regression.pt": self.x,
                      "extrakeys.pt": {"inputs": self.x, "labels": self.y, "weights": self.y},
                      "sizes.pt": (self.x, self.x[:50]), "eval_narrow.pt": self.x[:, :5]})
        for name, obj in files.items():
            torch.save(obj, folder / name)
        (folder / "existing").mkdir()
        for name in ("model.onnx", "report.json", "module.pt"):
            (folder / "existing" / name).write_text("an earlier output")

    def result(self, **options):
        return fxa.abstract(self.nets.build(), [self.x[:100], self.x[100:]], keep=0.5, **options)

    def edited(self, edit):
        """intervene with a copy of an affine report after edit(report) (a hand-edited report)."""
        import copy
        report = copy.deepcopy(self.result(replacement="affine", round_to=1).report)
        edit(report)
        return fxa.intervene(self.nets.build(), report).__enter__()

    def saved(self, spoil=None) -> str:
        """A saved abstraction's folder, after spoil(folder) (a file removed or damaged); outside the
        workspace, whose new files count as partial output."""
        folder = Path(tempfile.mkdtemp(prefix="fxabstract-saved-")) / "saved"
        self.result(replacement="affine", round_to=1).save(str(folder))
        if spoil is not None:
            spoil(folder)
        return str(folder)


@dataclass
class Case:
    name: str                                   # what the user did
    api: Callable[[Workspace], object] | None   # the same mistake through the Python API
    cli: list[str] | None                       # arguments after `compile` ({m} = --model badnets:...)
    expect: str = "error"                       # "error", "warning" or "ok" (a documented policy)


def batches(ws: Workspace, x=None):
    x = ws.x if x is None else x
    return [x[:100], x[100:]]


def nan_batches(ws, bad):
    x = ws.x.clone()
    x[150, 0] = bad
    return batches(ws, x)


B = "badnets:build"
CASES = [
    Case("model with data-dependent control flow", lambda ws: fxa.abstract(ws.nets.untraceable(), batches(ws)),
         ["--model", "badnets:untraceable", "--data", "data.pt"]),
    Case("model with no eligible site", lambda ws: fxa.abstract(ws.nets.no_site(), batches(ws)),
         ["--model", "badnets:no_site", "--data", "data.pt"]),
    Case("tied weights between its only Linear layers", lambda ws: fxa.abstract(ws.nets.tied(), batches(ws)),
         ["--model", "badnets:tied", "--data", "data.pt"]),
    Case("empty calibration data", lambda ws: fxa.abstract(ws.nets.build(), []),
         ["--model", B, "--data", "empty.pt"]),
    Case("NaN in calibration data", lambda ws: fxa.abstract(ws.nets.build(), nan_batches(ws, float("nan"))),
         ["--model", B, "--data", "nan.pt"]),
    Case("inf in calibration data", lambda ws: fxa.abstract(ws.nets.build(), nan_batches(ws, float("inf"))),
         ["--model", B, "--data", "inf.pt"]),
    Case("inputs of the wrong shape", lambda ws: fxa.abstract(ws.nets.build(), batches(ws, ws.x[:, :5])),
         ["--model", B, "--data", "narrow.pt"]),
    Case("float64 inputs to a float32 model", lambda ws: fxa.abstract(ws.nets.build(), batches(ws, ws.x.double())),
         ["--model", B, "--data", "double.pt"]),
    Case("integer inputs", lambda ws: fxa.abstract(ws.nets.build(), batches(ws, ws.x.long())),
         ["--model", B, "--data", "ints.pt"]),
    Case("batches whose shape changes", lambda ws: fxa.abstract(ws.nets.build(), [ws.x, ws.x[:, :5]]), None),
    Case("one Tensor instead of a list of batches", lambda ws: fxa.abstract(ws.nets.build(), ws.x), None),
    Case("keep = 0", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), keep=0.0),
         ["--model", B, "--data", "data.pt", "--keep", "0.0"]),
    Case("keep = 1.5 (fraction > 1)", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), keep=1.5),
         ["--model", B, "--data", "data.pt", "--keep", "1.5"]),
    Case("keep = -1", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), keep=-1),
         ["--model", B, "--data", "data.pt", "--keep=-1"]),
    Case("keep more units than exist", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), keep=1000),
         ["--model", B, "--data", "data.pt", "--keep", "1000"]),
    Case("keep dict naming an unknown site", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), keep={"fc9": 4}),
         ["--model", B, "--data", "data.pt", "--keep", "fc9=4"]),
    Case("keep dict with a negative count", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), keep={"0": -1}),
         ["--model", B, "--data", "data.pt", "--keep", "0=-1"]),
    Case("unknown score", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), score="fisher"),
         ["--model", B, "--data", "data.pt", "--score", "fisher"]),
    Case("unknown replacement", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), replacement="linear"),
         ["--model", B, "--data", "data.pt", "--replacement", "linear"]),
    Case("score 'ce' without labels", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), score="ce"),
         ["--model", B, "--data", "unlabelled.pt", "--score", "ce"]),
    Case("'ce' labels out of range", lambda ws: fxa.abstract(ws.nets.build(), [(ws.x, ws.y + 5)], score="ce"), None),
    Case("invalid sites regex", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), sites="fc["), None),
    Case("zero Hutchinson probes", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), curvature="hutchinson",
                                                           probes=0), None),
    Case("checkpoint that is a list", None, ["--model", B, "--checkpoint", "list.pt", "--data", "data.pt"]),
    Case("checkpoint that is a pickled module", None, ["--model", B, "--checkpoint", "module.pt", "--data", "data.pt"]),
    Case("checkpoint of another architecture", None, ["--model", B, "--checkpoint", "other.pt", "--data", "data.pt"]),
    Case("data file with code in its pickle", None, ["--model", B, "--data", "evil.pt"]),
    Case("missing data file", None, ["--model", B, "--data", "nowhere.pt"]),
    Case("data file that is not a torch.save file", None, ["--model", B, "--data", "badnets.py"]),
    Case("--model without module:factory", None, ["--model", "badnets", "--data", "data.pt"]),
    Case("--model naming a module that does not exist", None, ["--model", "nosuchmodule:build", "--data", "data.pt"]),
    Case("output folder that cannot be created", lambda ws: ws.result().save(str(ws.folder / "afile" / "out")),
         ["--model", B, "--data", "data.pt", "--out", "afile/out"]),
    Case("ONNX path in a folder that does not exist", lambda ws: fxa.to_onnx(ws.result().module, ws.x[:4],
                                                                                str(ws.folder / "no" / "m.onnx")), None),
    Case("outputs already there, no force", lambda ws: ws.result().save(str(ws.folder / "existing")),
         ["--model", B, "--data", "data.pt", "--out", "existing"]),
    Case("IIA swap probability 1.5", lambda ws: fxa.iia(ws.nets.build(), ws.result(), ws.x, swap_p=1.5), None),
    Case("IIA on inputs of the wrong shape", lambda ws: fxa.iia(ws.nets.build(), ws.result(), ws.x[:, :5]), None),
    Case("intervene with another model's report", lambda ws: fxa.intervene(ws.nets.wide(), ws.result().report)
         .__enter__(), None),
    Case("bfloat16 model exported to ONNX", lambda ws: fxa.to_onnx(ws.nets.bfloat16(), ws.x[:4].bfloat16(),
                                                                     str(ws.folder / "bf16.onnx")),
         ["--model", "badnets:bfloat16", "--data", "bfloat16.pt"]),
    Case("fewer calibration samples than units", lambda ws: fxa.abstract(ws.nets.build(), [ws.x[:20]],
                                                                         replacement="affine"),
         ["--model", B, "--data", "tiny.pt"], expect="warning"),
    Case("float16 model whose activations overflow", lambda ws: fxa.abstract(ws.nets.overflow(), batches(ws, ws.x.half())),
         ["--model", "badnets:overflow", "--data", "half.pt"]),
    Case("model in training mode (BatchNorm, Dropout)", lambda ws: fxa.abstract(ws.nets.training(), batches(ws)),
         ["--model", "badnets:training", "--data", "data.pt"], expect="ok"),
    Case("float16 model", lambda ws: fxa.abstract(ws.nets.half(), batches(ws, ws.x.half())),
         ["--model", "badnets:half", "--data", "half.pt"], expect="ok"),
    # real models end to end: inputs, outputs, options
    Case("sites regex that matches no site name", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), sites="fc"),
         None),
    Case("round_to at least every site's width (nothing to remove)",
         lambda ws: fxa.abstract(ws.nets.build(), batches(ws), round_to=64),
         ["--model", B, "--data", "data.pt", "--round-to", "64"]),
    Case("fit_data an exhausted generator", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), replacement="affine",
                                                                    fit_data=iter([])), None),
    Case("calibration given as list(x) (samples without a batch axis)",
         lambda ws: fxa.abstract(ws.nets.build(), list(ws.x[:40])), None),
    Case("output= a key the model's output lacks", lambda ws: fxa.abstract(ws.nets.build(), batches(ws),
                                                                           output="hidden"), None),
    Case("mask= an input the batches lack", lambda ws: fxa.abstract(ws.nets.build(), batches(ws),
                                                                    mask="attention_mask"), None),
    Case("certificate of a regression (one-output) model",
         lambda ws: fxa.certificate(ws.nets.regression(), fxa.abstract(ws.nets.regression(), batches(ws)), ws.x), None),
    Case("iia with an unknown output_kind", lambda ws: fxa.iia(ws.nets.build(), ws.result(), ws.x, trials=10,
                                                               output_kind="labels"), None),
    Case("evaluation inputs whose batch sizes differ",
         lambda ws: fxa.iia(ws.nets.build(), ws.result(), {"input": ws.x[:10], "other": ws.x[:5]}, trials=10), None),
    # exporting
    Case("to_onnx of a model with dict outputs", lambda ws: fxa.to_onnx(ws.nets.dictheads(), ws.x[:4],
                                                                        str(ws.folder / "dict.onnx")), None, expect="ok"),
    Case("to_onnx given the Abstraction, not its module", lambda ws: fxa.to_onnx(ws.result(), ws.x[:4],
                                                                                 str(ws.folder / "result.onnx")),
         None, expect="ok"),
    Case("to_onnx with a negative tolerance", lambda ws: fxa.to_onnx(ws.result(), ws.x[:4], str(ws.folder / "t.onnx"),
                                                                     tolerance=-1), None),
    Case("to_onnx of a model whose outputs are NaN", lambda ws: fxa.to_onnx(ws.nets.nanout(), ws.x[:4],
                                                                            str(ws.folder / "nan.onnx")), None),
    Case("to_onnx of a file name instead of a module", lambda ws: fxa.to_onnx("model.pt", ws.x[:4],
                                                                              str(ws.folder / "s.onnx")), None),
    Case("save with example inputs the module cannot take",
         lambda ws: ws.result().save(str(ws.folder / "badexample"), example_inputs=ws.x[:4, :5]), None),
    # hand-edited and damaged reports
    Case("report with a theta one coefficient short",
         lambda ws: ws.edited(lambda r: r["sites"][0]["replaced"][0]["theta"].pop()), None),
    Case("report with a string beta",
         lambda ws: ws.edited(lambda r: r["sites"][0]["replaced"][0].update(beta="0.5")), None),
    Case("report with a replacement's kind changed",
         lambda ws: ws.edited(lambda r: r["sites"][0]["replaced"][0].update(kind="constant")), None),
    Case("report with a NaN beta",
         lambda ws: ws.edited(lambda r: r["sites"][0]["replaced"][0].update(beta=float("nan"))), None),
    Case("report with an empty site list", lambda ws: ws.edited(lambda r: r.update(sites=[])), None),
    Case("report of an unknown version", lambda ws: ws.edited(lambda r: r.update(version=99)), None),
    Case("load of a folder without a saved abstraction", lambda ws: fxa.load(str(ws.folder / "existing")), None),
    Case("load of a report.json without its tensors.safetensors",
         lambda ws: fxa.load(ws.saved(lambda f: (f / "tensors.safetensors").unlink())), None),
    Case("load of a truncated report.json",
         lambda ws: fxa.load(ws.saved(lambda f: (f / "report.json").write_text('{"sites": ['))), None),
    Case("load of a damaged module.pt2",
         lambda ws: fxa.load(ws.saved(lambda f: (f / "module.pt2").write_bytes(b"not a zip"))), None),
    # inputs and outputs
    Case("a torch.export module exported with a static batch",
         lambda ws: fxa.abstract(torch.export.export(ws.nets.build(), (ws.x[:8],)).module(), batches(ws)), None),
    Case("output= a callable that returns no tensor", lambda ws: fxa.abstract(ws.nets.build(), batches(ws),
                                                                              output=lambda z: z.shape), None),
    Case("output= an index into a one-tensor output", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), output=1),
         None),
    Case("certificate of per-position logits", lambda ws: fxa.certificate(
        ws.nets.tagger(), fxa.abstract(ws.nets.tagger(), [ws.tokens], round_to=1), ws.tokens,
        output_kind="classes"), None),
    Case("iia with zero trials", lambda ws: fxa.iia(ws.nets.build(), ws.result(), ws.x, trials=0), None),
    Case("fit_data whose inputs differ from the calibration's",
         lambda ws: fxa.abstract(ws.nets.build(), batches(ws), replacement="affine", fit_data=[ws.tokens]), None),
    Case("keep given as a string", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), keep="half"), None),
    Case("negative ridge", lambda ws: fxa.abstract(ws.nets.build(), batches(ws), replacement="affine", ridge=-1.0),
         None),
    Case("a regression model (one output value)", lambda ws: fxa.abstract(ws.nets.regression(), batches(ws)),
         ["--model", "badnets:regression", "--data", "regression.pt"], expect="ok"),
    # the command line's new options and data files
    Case("labels out of range in --data", None, ["--model", B, "--data", "badlabels.pt"]),
    Case("--eval-data with other inputs than --data", None, ["--model", B, "--data", "data.pt", "--eval-data",
                                                             "eval_narrow.pt"]),
    Case("--fit-data with other inputs than --data", None, ["--model", B, "--data", "data.pt", "--fit-data",
                                                            "eval_narrow.pt", "--replacement", "affine"]),
    Case("--output naming a key the model's output lacks", None, ["--model", B, "--data", "data.pt", "--output",
                                                                  "logits"]),
    Case("--opset out of range", None, ["--model", B, "--data", "data.pt", "--opset", "99"]),
    Case("invalid --sites regex", None, ["--model", B, "--data", "data.pt", "--sites", "fc["]),
    Case("--sites regex that matches no site name", None, ["--model", B, "--data", "data.pt", "--sites", "fc"]),
    Case("data file with an unknown key beside its inputs", None, ["--model", B, "--data", "extrakeys.pt"]),
    Case("data file whose inputs have different batch sizes", None, ["--model", B, "--data", "sizes.pt"]),
]


@dataclass
class Outcome:
    sees: str             # what the user sees: the exception, or the CLI's last stderr line
    kind: str             # "error", "warning", "ok", or "crash" (an exception that is not ours)
    status: int | None    # the CLI's exit status
    traceback: bool
    partial: list[str]    # files left behind that must not be there
    noise: list[str] = field(default_factory=list)   # CLI stderr lines that are not fxabstract's own


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _partial(folder: Path, before: set[str], failed: bool) -> list[str]:
    """New files after a failure, staging/temporary files, and new outputs that do not load."""
    import json

    import onnx

    bad = []
    for name in sorted(_files(folder) - before):
        path = folder / name
        if failed or any(part.startswith(".fxabstract-") for part in Path(name).parts):
            bad.append(name)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError:
                bad.append(name)
        elif path.suffix == ".onnx":
            try:
                onnx.checker.check_model(onnx.load(str(path)))
            except Exception:  # a truncated or corrupt file
                bad.append(name)
    return bad


def run_api(case: Case, ws: Workspace) -> Outcome:
    before, kind, tb = _files(ws.folder), "ok", False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.api(ws)
            sees = "no error"
        except FxAbstractError as exc:
            kind, sees = "error", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - that is what this table is looking for
            kind, sees, tb = "crash", f"{type(exc).__name__}: {exc}", True
    ours = [w for w in caught if issubclass(w.category, FxAbstractWarning)]
    if kind == "ok" and ours:
        kind, sees = "warning", f"FxAbstractWarning: {ours[0].message}"
    return Outcome(" ".join(sees.split()), kind, None, tb, _partial(ws.folder, before, kind in ("error", "crash")))


def run_cli(case: Case, ws: Workspace, index: int, in_process: bool) -> Outcome:
    args = ["compile", *case.cli]
    if "--out" not in args:
        args += ["--out", f"out{index}"]
    before = _files(ws.folder)
    if in_process:
        from fxabstract.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.chdir(ws.folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(args)
                tb = False
            except BaseException as exc:  # noqa: BLE001 - an exception escaping main is a traceback
                status, tb = 1, True
                print(f"Traceback: {type(exc).__name__}: {exc}", file=err)
        stdout, stderr = out.getvalue(), err.getvalue()
    else:
        script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from fxabstract.cli import main; sys.exit(main())"
        run = subprocess.run([sys.executable, "-c", script, *args], cwd=ws.folder, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        status, stdout, stderr = run.returncode, run.stdout, run.stderr
        tb = "Traceback" in stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("fxabstract: error:", "fxabstract: warning:"))]
    kind = {0: "ok", 2: "error"}.get(status, "crash")
    if kind == "ok" and any(line.startswith("fxabstract: warning:") for line in said):
        kind = "warning"
    sees = said[-1] if said else (stdout.strip().splitlines() or ["(nothing)"])[-1]
    bars = ("calibrate", "measure risk", "fidelity sweep", "fit data", "evaluate dense", "evaluate compiled")                    # fxabstract's tqdm bars
    noise = [line for line in lines if not line.startswith(OWN_LINES) and not any(b in line for b in bars)]
    return Outcome(sees, kind, status, tb, _partial(ws.folder, before, status != 0), noise)


# What the command itself writes to stderr: its one-line verdicts and progress notes.
OWN_LINES = ("fxabstract: ", "compiling ", "measuring interchange interventions", "exporting ONNX",
             "training demo model", "note: ")


def run_all(folder: Path, in_process: bool) -> list[tuple[Case, Outcome | None, Outcome | None]]:
    ws = Workspace(folder)
    rows = []
    for i, case in enumerate(CASES):
        api = run_api(case, ws) if case.api else None
        cli = run_cli(case, ws, i, in_process) if case.cli else None
        rows.append((case, api, cli))
    if (folder / "EXECUTED").exists():
        raise AssertionError("a data file ran code on load")
    return rows


def _cell(text: str, limit: int = 240) -> str:
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text.replace("|", "\\|")


def table(rows, in_process: bool, seconds: float) -> str:
    lines = ["# Bad inputs: what the user sees", "",
             f"`python benchmarks/bad_inputs.py{' --in-process' if in_process else ''}`: {len(rows)} cases, "
             f"each through the Python API and/or the `fxabstract compile` command "
             f"({'in-process' if in_process else 'one subprocess per case'}); {seconds:.0f} s. "
             "Expected: an `fxabstract.errors` exception (API) and exit status 2 with one "
             "`fxabstract: error:` line (CLI); the policy cases (expect ok or warning) compile. \"Other stderr "
             "lines\" counts what the command printed besides its own verdict and progress notes (log spam, "
             "warnings of other libraries); it is only seen when the CLI runs in a subprocess.", "",
             "| # | case | expect | API: what the user sees | CLI: what the user sees | exit | traceback | "
             "other stderr lines | partial file |",
             "|---|------|--------|-------------------------|-------------------------|------|-----------|"
             "--------------------|--------------|"]
    for i, (case, api, cli) in enumerate(rows, 1):
        tb = "yes" if (api and api.traceback) or (cli and cli.traceback) else "no"
        partial = ", ".join((api.partial if api else []) + (cli.partial if cli else [])) or "none"
        lines.append(f"| {i} | {case.name} | {case.expect} | {_cell(api.sees) if api else '(CLI only)'} | "
                     f"{_cell(cli.sees) if cli else '(API only)'} | {cli.status if cli else ''} | {tb} | "
                     f"{len(cli.noise) if cli else ''} | {partial} |")
    bad = [case.name for case, api, cli in rows
           if any(o and (o.kind != case.expect or o.traceback or o.partial or o.noise) for o in (api, cli))]
    lines += ["", f"Cases not as expected: {', '.join(bad) if bad else 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-process", action="store_true", help="run the CLI through main() (faster)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bad_inputs.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        rows = run_all(Path(folder), args.in_process)
    text = table(rows, args.in_process, time.perf_counter() - start)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
