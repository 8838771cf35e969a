"""The `fxabstract compile` command: the demo end to end, a user's model, and one-line user errors."""
import contextlib
import io
import os

import pytest
import torch

from fxabstract.cli import main
from fxabstract.output.tensors import read_report

USER_MODEL = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))

not_callable = 3
"""


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """One XDG cache for the module: the demo model is trained once, then loaded."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("xdg-cache")
        mp.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def demo_run(cache_home, tmp_path_factory):
    """Run the demo once into a fresh folder: (out folder, exit status, stdout, stderr).
    capsys is per test, so this module-scoped run captures its output by hand."""
    out = tmp_path_factory.mktemp("demo-out")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["compile", "--out", str(out)])
    return out, status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A module:factory in the current folder, its state dict, and a data file with labels."""
    monkeypatch.chdir(tmp_path)
    module = f"usernet_{tmp_path.name.replace('-', '_')}"          # unique: imports are cached
    (tmp_path / f"{module}.py").write_text(USER_MODEL)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 3))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    x = torch.randn(300, 6)
    torch.save({"x": x, "y": net(x).argmax(-1)}, tmp_path / "data.pt")
    return tmp_path, module


def assert_one_line_error(capsys, status, fragment):
    """Exit status 2 and one `fxabstract: error:` line on stderr, the last (progress notes may precede it)."""
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").strip().splitlines()
    assert status == 2, f"a user mistake exits with status 2, got {status}: {err}"
    assert "Traceback" not in err, f"a user mistake never shows a traceback: {err}"
    assert [line for line in lines if "error" in line] == lines[-1:], f"one error line, the last: {err!r}"
    assert lines[-1].startswith("fxabstract: error: "), f"the error line is prefixed: {lines[-1]!r}"
    assert fragment in lines[-1], f"the message says what was wrong ({fragment!r}): {lines[-1]}"


def test_demo_compiles_writes_onnx_and_report(demo_run):
    out, status, stdout, stderr = demo_run
    assert status == 0, f"the demo exits 0; stderr: {stderr}"
    assert "training demo model (first run only)" in stderr, "the first run says it is training"
    assert (out / "model.onnx").stat().st_size > 0, "the demo writes model.onnx"
    report = read_report(str(out))
    for site in report["sites"]:
        assert len(site["kept"]) < site["units"], f"site {site['name']} keeps fewer units than it had"
    assert report["parameters"]["after"] < report["parameters"]["before"], "the compiled module is smaller"
    ev = report["evaluation"]
    assert ev["agreement"] > 0.9, f"top-1 agreement with the dense model is high: {ev['agreement']}"
    assert set(ev["iia"]) == {"0.1", "0.5"}, "IIA is measured at swap p = 0.1 and 0.5"
    assert ev["onnx"]["relative_diff"] < 1e-4, "onnxruntime matches torch"
    assert [r["keep"] for r in ev["sweep"]] == [1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625], "the fidelity sweep"
    assert ev["sweep"][0]["agreement"] == 1.0, "keeping every unit agrees with the dense model everywhere"
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "summary.png is written beside the report"
    for line in ("top-1 agreement", "IIA, swap p = 0.1", "IIA, swap p = 0.5", "95% CI", "accuracy",
                 "ONNX parity", "parameters", "predicted risk"):
        assert line in stdout, f"the printed table has a {line!r} line:\n{stdout}"


def test_demo_refuses_to_overwrite_without_force(demo_run, capsys):
    out = demo_run[0]
    before = (out / "report.json").read_bytes()
    status = main(["compile", "--out", str(out)])
    assert_one_line_error(capsys, status, "--force")
    assert (out / "report.json").read_bytes() == before, "the earlier report is left alone"


def test_user_model_with_checkpoint_and_data(user_files, capsys):
    folder, module = user_files
    status = main(["compile", "--model", f"{module}:build", "--checkpoint", "weights.pt", "--data", "data.pt",
                   "--batch-size", "100", "--keep", "0.5", "--out", "build"])
    stdout = capsys.readouterr().out
    assert status == 0, "a user model with checkpoint and data compiles"
    assert (folder / "build" / "model.onnx").exists(), "model.onnx is written into --out"
    report = read_report(str(folder / "build"))
    assert sum(len(s["kept"]) for s in report["sites"]) < sum(s["units"] for s in report["sites"]), \
        "the user's model is reduced"
    assert report["evaluation"]["accuracy"]["before"] == 1.0, "the checkpoint was loaded (labels are its argmax)"
    assert "top-1 agreement" in stdout and "IIA, swap p = 0.5" in stdout, stdout


def test_user_model_with_fit_data(user_files, capsys):
    folder, module = user_files
    torch.save(torch.randn(500, 6), folder / "fit.pt")
    status = main(["compile", "--model", f"{module}:build", "--checkpoint", "weights.pt", "--data", "data.pt",
                   "--fit-data", "fit.pt", "--batch-size", "100", "--keep", "0.5", "--out", "fitbuild"])
    assert status == 0, capsys.readouterr().err
    report = read_report(str(folder / "fitbuild"))
    assert report["fit_samples"] == 500, "--fit-data is passed to the analysis as fit_data"


def test_user_model_with_a_mac_budget(user_files, capsys):
    folder, module = user_files
    status = main(["compile", "--model", f"{module}:build", "--checkpoint", "weights.pt", "--data", "data.pt",
                   "--budget", "macs", "--keep", "0.5", "--round-to", "1", "--batch-size", "100", "--out", "macs"])
    out, err = capsys.readouterr()
    assert status == 0, err
    report = read_report(str(folder / "macs"))
    assert report["budget"] == "macs", "--budget is passed to the compile"
    assert report["macs"]["before"] == 6 * 32 + 32 * 16 + 16 * 3, "the report gives the model's MACs per sample"
    assert report["macs"]["after"] < 0.75 * report["macs"]["before"], report["macs"]
    assert f"MACs per sample      {report['macs']['before']:,} -> {report['macs']['after']:,}" in out, out


def test_user_model_with_a_matrix_memory_budget_and_probes_from_the_data(user_files, capsys):
    folder, module = user_files
    status = main(["compile", "--model", f"{module}:build", "--checkpoint", "weights.pt", "--data", "data.pt",
                   "--keep", "0.5", "--round-to", "1", "--batch-size", "100", "--matrix-memory", "0.00005",
                   "--out", "mm"])
    out, err = capsys.readouterr()
    assert status == 0, err
    report = read_report(str(folder / "mm"))
    wide, narrow = report["sites"]                 # 32 units: 8 sums x 8 B x 32^2 = 64 KiB > 52 KiB; 16 fit
    assert wide["statistics"].startswith("diagonal:") and "statistics" not in narrow, report["sites"]
    assert {r["kind"] for r in wide["replaced"]} == {"constant"}
    assert {r["kind"] for r in narrow["replaced"]} == {"affine"}
    assert report["curvature"] == {"divergence": "logit-mse", "method": "exact", "probes": None}, \
        "300 samples: 6 probes, more than the 3 outputs, so exact"


@pytest.mark.parametrize("args, fragment", [
    (["--data", "missing.pt"], "data file not found: missing.pt"),
    (["--model", "no_colon", "--data", "data.pt"], "--model must be module:factory"),
    (["--model", "no_such_module_xyz:build", "--data", "data.pt"], "cannot import module 'no_such_module_xyz'"),
    (["--model", "{module}:missing", "--data", "data.pt"], "has no 'missing'"),
    (["--model", "{module}:not_callable", "--data", "data.pt"], "not callable"),
    (["--model", "{module}:build"], "--model needs --data"),
    (["--fit-data", "data.pt"], "--fit-data and --checkpoint need --model"),
    (["--model", "{module}:build", "--data", "data.pt", "--fit-data", "missing.pt"], "data file not found: missing.pt"),
    (["--model", "{module}:build", "--checkpoint", "bad.pt", "--data", "data.pt"], "not a state dict"),
    (["--model", "{module}:build", "--checkpoint", "nofile.pt", "--data", "data.pt"], "checkpoint file not found"),
    (["--model", "{module}:build", "--data", "data.pt", "--keep", "2.0"], "invalid --keep"),
    (["--model", "{module}:build", "--data", "data.pt", "--keep", "1"], "out of range"),   # found by the core
    (["--model", "{module}:build", "--data", "data.pt", "--score", "nope"], "invalid choice"),
    (["--model", "{module}:build", "--data", "data.pt", "--budget", "macs", "--keep", "12"],
     "--budget macs takes --keep as a fraction"),
    (["--model", "{module}:build", "--data", "data.pt", "--matrix-memory", "-1"], "invalid --matrix-memory"),
    (["--out", "afile.txt"], "cannot create output folder"),
])
def test_user_mistakes_are_one_line_errors(user_files, capsys, args, fragment):
    folder, module = user_files
    torch.save([1, 2, 3], folder / "bad.pt")
    (folder / "afile.txt").write_text("not a folder")
    args = [a.format(module=module) for a in args]
    if "--model" not in args and "--data" in args:          # --data without --model is its own mistake
        args = ["--model", f"{module}:build"] + args
    status = main(["compile", *args])
    assert_one_line_error(capsys, status, fragment)
    assert not os.path.exists(folder / "model.onnx"), "nothing is written after a mistake"
