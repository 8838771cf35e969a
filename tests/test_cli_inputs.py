"""The `fxabstract` command on real models' inputs and outputs: data files holding keyword (dict) or
positional (tuple) inputs and labels, a held-out --eval-data, --sites, --output and --opset, metrics
that fit the output (relative error and cosine for a regression or embedding output, never agreement),
`fxabstract sites`, checked labels, and nothing written when the ONNX export fails its parity check."""
import importlib.util
import os
import re

import onnx
import pytest
import torch

import fxabstract.cli as cli
from fxabstract.cli import main
from fxabstract.errors import ExportError
from fxabstract.output.tensors import read_report

MODELS = """
import torch
from torch import nn


class Encoder(nn.Module):
    '''Token embedding, an FFN per position, a masked mean pool, 4 classes: keyword inputs.'''

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(30, 16)
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        h = self.tok(input_ids)
        h = h + self.down(torch.relu(self.up(h)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


class TwoInputs(nn.Module):
    '''model(x, y): two positional inputs, 3 classes.'''

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 24), nn.Linear(5, 24)
        self.mid, self.head = nn.Linear(24, 32), nn.Linear(32, 3)

    def forward(self, x, y):
        return self.head(torch.relu(self.mid(torch.relu(self.a(x) + self.b(y)))))


class Regressor(nn.Module):
    '''One output: a regression, where top-1 agreement means nothing.'''

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(6, 32), nn.Linear(32, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class DictHeads(nn.Module):
    '''{"logits": [B, 5], "embedding": [B, 12]}.'''

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 12)
        self.cls = nn.Linear(12, 5)

    def forward(self, x):
        e = self.fc2(torch.relu(self.fc1(x)))
        return {"logits": self.cls(torch.relu(e)), "embedding": e}


class Classifier(nn.Module):
    '''Three named sites (fc1, fc2, fc3) and 3 classes.'''

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The current folder holds a module of test models (a unique name: imports are cached); returns
    (folder, module name)."""
    monkeypatch.chdir(tmp_path)
    module = f"climodels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(MODELS)
    return tmp_path, module


def _model(folder, module: str, name: str):
    """A model of the test module, built as the command builds it (the same seed, the same weights)."""
    spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return getattr(code, name)().eval()


def _tokens(n: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (n,), generator=gen)
    return {"input_ids": torch.randint(0, 30, (n, 10), generator=gen),
            "attention_mask": (torch.arange(10)[None] < lengths[:, None]).long()}


def _run(capsys, *args):
    """main(["compile", *args]): (exit status, stdout, stderr)."""
    status = main(["compile", *args])
    out, err = capsys.readouterr()
    return status, out, err


def _report(folder) -> dict:
    return read_report(str(folder))


def assert_one_line_error(err: str, status: int, fragment: str) -> None:
    lines = err.replace("\r", "\n").strip().splitlines()
    assert status == 2, f"a user mistake exits with status 2, got {status}: {err}"
    assert "Traceback" not in err, err
    assert [line for line in lines if "error" in line] == lines[-1:], f"one error line, the last: {err!r}"
    assert lines[-1].startswith("fxabstract: error: ") and fragment in lines[-1], (fragment, lines[-1])


def test_keyword_inputs_from_a_dict_file(work, capsys):
    folder, module = work
    torch.save(_tokens(180), folder / "tokens.pt")                    # a plain dict of keyword tensors
    status, out, err = _run(capsys, "--model", f"{module}:Encoder", "--data", "tokens.pt", "--batch-size", "60",
                            "--round-to", "1", "--out", "build")
    assert status == 0, err
    report = _report(folder / "build")
    assert report["calibration_samples"] == 180, "every sample of the dict's tensors is calibrated on"
    ev = report["evaluation"]
    assert ev["output_kind"] == "classes" and 0.0 <= ev["agreement"] <= 1.0, ev
    assert set(ev["iia"]["0.5"]) == {s["name"] for s in report["sites"]}, "IIA per site on keyword inputs"
    assert [i.name for i in onnx.load(folder / "build" / "model.onnx").graph.input] == ["input_ids", "attention_mask"]
    assert re.search(r"calibrate: +\d+%\|[^|]*\| \d/3 \[", err), f"the calibration bar has its total, 3 batches: {err!r}"


def test_keyword_inputs_with_labels_in_the_wrapper(work, capsys):
    folder, module = work
    tokens = _tokens(120)
    with torch.no_grad():
        labels = _model(folder, module, "Encoder")(**tokens).argmax(-1)
    torch.save({"inputs": tokens, "labels": labels}, folder / "tokens.pt")
    status, out, err = _run(capsys, "--model", f"{module}:Encoder", "--data", "tokens.pt", "--batch-size", "60",
                            "--score", "ce", "--out", "build")
    assert status == 0, err
    accuracy = _report(folder / "build")["evaluation"]["accuracy"]
    assert accuracy["before"] == 1.0, "the labels (the dense model's predictions) are read from the wrapper"
    assert "accuracy" in out, out


def test_positional_inputs_from_a_tuple_file_and_opset(work, capsys):
    folder, module = work
    torch.manual_seed(0)
    torch.save((torch.randn(120, 6), torch.randn(120, 5)), folder / "pair.pt")   # model(x, y), no labels
    status, out, err = _run(capsys, "--model", f"{module}:TwoInputs", "--data", "pair.pt", "--batch-size", "40",
                            "--opset", "17", "--out", "build")
    assert status == 0, err
    report = _report(folder / "build")
    assert report["calibration_samples"] == 120 and "accuracy" not in report["evaluation"], report["evaluation"]
    proto = onnx.load(folder / "build" / "model.onnx")
    assert len(proto.graph.input) == 2, "both positional inputs are inputs of the ONNX model"
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17, "--opset is passed to the export"


def test_a_regression_output_is_measured_by_relative_error_not_agreement(work, capsys):
    folder, module = work
    torch.manual_seed(0)
    torch.save(torch.randn(160, 6), folder / "x.pt")
    status, out, err = _run(capsys, "--model", f"{module}:Regressor", "--data", "x.pt", "--batch-size", "80",
                            "--round-to", "1", "--out", "build")
    assert status == 0, err
    report = _report(folder / "build")
    ev = report["evaluation"]
    assert ev["output_kind"] == "values", ev
    assert "agreement" not in ev and "iia" not in ev and "accuracy" not in ev, f"no class metrics: {sorted(ev)}"
    assert 0.0 < ev["relative_error"] < 1.0 and -1.0 <= ev["cosine"] <= 1.0, ev
    entries = ev["interchange"]["0.5"]
    assert set(entries) == {s["name"] for s in report["sites"]}
    assert all("interchange_error" in e and "iia" not in e for e in entries.values()), entries
    assert ev["sweep"][0]["relative_error"] < 1e-6, "keeping every unit reproduces the output"
    assert all("agreement" not in r and "relative_error" in r for r in ev["sweep"]), ev["sweep"]
    assert "relative error" in out and "interchange, p = 0.5" in out, out
    assert "agreement" not in out and "IIA" not in out, f"the table has no class columns:\n{out}"
    assert not (folder / "build" / "summary.png").exists(), "the agreement plot is not drawn for a regression"


def test_eval_data_is_what_the_figures_are_measured_on(work, capsys):
    folder, module = work
    net = _model(folder, module, "Classifier")
    torch.manual_seed(0)
    x, x_eval = torch.randn(300, 6), 3 * torch.randn(150, 6) + 1
    with torch.no_grad():
        y_eval = net(x_eval).argmax(-1)
    torch.save({"x": x, "y": torch.randint(0, 3, (300,))}, folder / "calib.pt")   # labels of chance accuracy
    torch.save({"inputs": x_eval, "labels": y_eval}, folder / "eval.pt")          # the model's own predictions
    common = ["--model", f"{module}:Classifier", "--data", "calib.pt", "--batch-size", "100", "--keep", "0.25"]
    status, out, err = _run(capsys, *common, "--out", "calib")
    assert status == 0, err
    assert "no --eval-data" in err and "calibration data" in err, "a run without --eval-data says what it measures"
    status, out, err_eval = _run(capsys, *common, "--eval-data", "eval.pt", "--out", "held")
    assert status == 0, err_eval
    assert "no --eval-data" not in err_eval, err_eval
    on_calib, on_eval = _report(folder / "calib")["evaluation"], _report(folder / "held")["evaluation"]
    assert on_calib["evaluated_on"] == "calibration" and on_eval["evaluated_on"] == "eval-data"
    assert (on_calib["samples"], on_eval["samples"]) == (300, 150)
    assert on_eval["accuracy"]["before"] == 1.0 and on_calib["accuracy"]["before"] < 0.6, \
        "accuracy is measured against the evaluation file's labels"
    assert on_eval["agreement"] != on_calib["agreement"], "agreement is measured on the evaluation data"
    assert on_eval["iia"] != on_calib["iia"] and on_eval["sweep"] != on_calib["sweep"]
    assert "evaluation on eval.pt (150 samples" in out, out


@pytest.mark.parametrize("sites, chosen", [("fc[12]", ["fc1", "fc2"]), ("fc1,fc3", ["fc1", "fc3"])])
def test_sites_restrict_the_compile(work, capsys, sites, chosen):
    folder, module = work
    torch.manual_seed(0)
    torch.save(torch.randn(200, 6), folder / "x.pt")
    status, out, err = _run(capsys, "--model", f"{module}:Classifier", "--data", "x.pt", "--batch-size", "100",
                            "--sites", sites, "--out", "build")
    assert status == 0, err
    assert [s["name"] for s in _report(folder / "build")["sites"]] == chosen, f"--sites {sites}"


def test_output_picks_a_key_of_a_dict_output(work, capsys):
    folder, module = work
    torch.manual_seed(0)
    torch.save(torch.randn(160, 8), folder / "x.pt")
    status, out, err = _run(capsys, "--model", f"{module}:DictHeads", "--data", "x.pt", "--batch-size", "80",
                            "--output", "embedding", "--round-to", "1", "--out", "build")
    assert status == 0, err
    assert "warning" not in err, f"an output chosen with --output is not warned about: {err}"
    report = _report(folder / "build")
    assert report["output"] == "embedding", "--output is passed to the analysis"
    assert report["evaluation"]["output_kind"] == "values" and "relative_error" in report["evaluation"]
    assert "output embedding: values" in out, out


def test_sites_command_lists_sites_kinds_and_refusals(work, capsys):
    folder, module = work
    torch.save(_tokens(16), folder / "tokens.pt")
    before = sorted(os.listdir(folder))
    assert main(["sites", "--model", f"{module}:Encoder", "--data", "tokens.pt"]) == 0
    out = capsys.readouterr().out
    assert "1 site in" in out and "up" in out and "48" in out and "features" in out, out
    assert "down: residual stream: it is read by `sum_1`" in out, f"a residual's producer is refused with its reason:\n{out}"
    assert "head: it is read by the model output" in out, out
    assert sorted(os.listdir(folder)) == before, "listing sites writes nothing"


def test_sites_command_names_attention_heads(work, capsys):
    folder, _ = work
    torch.save(torch.randint(0, 64, (8, 32)), folder / "ids.pt")
    assert main(["sites", "--model", "fxabstract.zoo.transformers:GPT", "--data", "ids.pt"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "blocks.0.attn.heads" in line)
    assert "64" in line and "4 attention heads of 16" in line, line


@pytest.mark.parametrize("data, fragment", [
    ({"x": torch.randn(60, 6), "y": torch.full((60,), 3)}, "labels run from 3 to 3 but the model's output has 3 classes"),
    ({"inputs": torch.randn(60, 6), "labels": -torch.ones(60, dtype=torch.long)}, "labels run from -1 to -1"),
    ({"inputs": torch.randn(60, 6), "labels": torch.zeros(50, dtype=torch.long)}, "one label per input (60), got 50"),
    ({"inputs": torch.randn(60, 6), "labels": torch.zeros(60, 2, dtype=torch.long)}, "predicts 1 class per sample"),
    ({"inputs": torch.randn(60, 6), "label": torch.zeros(60, dtype=torch.long)}, "has keys ['label'] beside 'inputs'"),
    (torch.randn(0, 6), "holds no samples"),
    ((), "holds no inputs"),
    ({"x": torch.randn(60, 6), "y": torch.tensor([0.0] * 59 + [float("nan")])}, "labels contain NaN"),
    (torch.tensor([[0.0] * 6] * 5 + [[float("inf")] * 6]), "contains NaN or inf (first at sample 5)"),
    ((torch.randn(60, 6), torch.randn(50, 6)), "different batch sizes (input 0 60, input 1 50)"),
    ({"a": torch.randn(60, 6), "b": 3}, "input 'b' is a int, not a tensor"),
    ("text", "holds a str"),
])
def test_bad_data_files_are_one_line_errors(work, capsys, data, fragment):
    folder, module = work
    torch.save(data, folder / "bad.pt")
    status, out, err = _run(capsys, "--model", f"{module}:Classifier", "--data", "bad.pt", "--out", "build")
    assert_one_line_error(err, status, fragment)
    assert not (folder / "build").exists(), "nothing is written after a mistake"


@pytest.mark.parametrize("args, fragment", [
    (["--eval-data", "eval9.pt"], "eval9.pt: the labels run from 0 to 9"),
    (["--eval-data", "narrow.pt"], "narrow.pt holds input 0 [n, 5] float32 but x.pt holds input 0 [n, 6] float32"),
    (["--sites", "fc"], "matches no site"),                   # a regex matches whole site names
    (["--sites", "fc1,nope"], "unknown sites ['nope']"),
    (["--sites", "fc("], "invalid --sites regex"),
    (["--opset", "3"], "--opset 3 is out of range"),
])
def test_bad_options_are_one_line_errors(work, capsys, args, fragment):
    folder, module = work
    torch.save(torch.randn(60, 6), folder / "x.pt")
    torch.save({"inputs": torch.randn(30, 6), "labels": torch.arange(30) % 10}, folder / "eval9.pt")
    torch.save(torch.randn(30, 5), folder / "narrow.pt")
    status, out, err = _run(capsys, "--model", f"{module}:Classifier", "--data", "x.pt", *args, "--out", "build")
    assert_one_line_error(err, status, fragment)
    assert not (folder / "build").exists(), "nothing is written after a mistake"


def test_output_that_is_not_a_key_is_one_line_error(work, capsys):
    folder, module = work
    torch.save(torch.randn(60, 8), folder / "x.pt")
    status, out, err = _run(capsys, "--model", f"{module}:DictHeads", "--data", "x.pt", "--output", "logit",
                            "--out", "build")
    assert_one_line_error(err, status, "output='logit' does not pick a tensor")
    assert "['logits', 'embedding']" in err, "the message names the output's tensors"


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_onnx_parity_check_writes_nothing(work, capsys, monkeypatch, existing):
    folder, module = work
    torch.manual_seed(0)
    torch.save(torch.randn(100, 6), folder / "x.pt")
    if existing:
        (folder / "build").mkdir()

    def parity_failure(module, example_inputs, path, **kwargs):
        with open(path, "wb") as f:                         # a partial file where the export writes
            f.write(b"partial")
        raise ExportError("onnxruntime differs from torch at output 'output' by 0.5 (relative 0.5 > tolerance "
                          "0.0001); nothing written; try another exporter= or opset=")

    monkeypatch.setattr(cli, "to_onnx", parity_failure)
    status, out, err = _run(capsys, "--model", f"{module}:Classifier", "--data", "x.pt", "--batch-size", "50",
                            "--out", "build")
    assert_one_line_error(err, status, "onnxruntime differs from torch")
    if existing:
        assert os.listdir(folder / "build") == [], "an --out that existed is left empty: no partial file"
    else:
        assert not (folder / "build").exists(), "an --out the failed run created is removed again"
