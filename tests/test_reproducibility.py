"""Issue 5, reproducibility: the same inputs and seed give byte-identical report.json and model.onnx,
in one process or another (another hash seed), whatever --out is; the seed alone drives the random
score, Hutchinson probes and IIA sampling (the global torch RNG does not matter)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fxabstract as fxa
from fxabstract.cli import main
from fxabstract.output.report import dumps
from test_cli import user_files  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("report.json", "tensors.safetensors", "model.onnx")


def compile_args(module: str, out: str, seed: int = 0) -> list[str]:
    return ["compile", "--model", f"{module}:build", "--data", "data.pt", "--keep", "0.5", "--score", "random",
            "--seed", str(seed), "--out", out]


def test_cli_outputs_are_byte_identical_across_runs_and_folders(user_files, capsys):  # noqa: F811
    folder, module = user_files
    assert main(compile_args(module, "a")) == 0
    assert main(compile_args(module, "b")) == 0
    for name in FILES:
        assert (folder / "a" / name).read_bytes() == (folder / "b" / name).read_bytes(), \
            f"{name} must be byte-identical when compiled twice, into different folders"
    assert main(compile_args(module, "d", seed=1)) == 0
    assert (folder / "d" / "report.json").read_bytes() != (folder / "a" / "report.json").read_bytes(), \
        "--seed must reach the random score and IIA sampling"


@pytest.mark.slow
def test_cli_outputs_are_byte_identical_in_another_process(user_files, capsys):  # noqa: F811
    """A fresh interpreter with another hash seed (set and dict-of-set orders change) writes the same bytes."""
    folder, module = user_files
    assert main(compile_args(module, "a")) == 0
    script = (f"import sys; sys.path.insert(0, {ROOT!r}); from fxabstract.cli import main; "
              f"sys.exit(main({compile_args(module, 'c')!r}))")
    run = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"})
    assert run.returncode == 0, run.stderr[-2000:]
    for name in FILES:
        assert (folder / "a" / name).read_bytes() == (folder / "c" / name).read_bytes(), \
            f"{name} must be byte-identical in another process with another hash seed"


def test_results_do_not_depend_on_the_global_rng():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.Tanh(),
                                torch.nn.Linear(12, 80)).eval()   # 80 outputs: Hutchinson probes by default
    calibration, x = [torch.randn(32, 6) for _ in range(2)], torch.randn(50, 6)
    reports, iias = [], []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        result = fxa.abstract(model, calibration, keep=0.5, score="random", seed=5)
        reports.append(dumps(result.report))
        iias.append(fxa.iia(model, result, x, trials=200, seed=5))
    assert fxa.abstract(model, calibration, keep=0.5, score="random", seed=5).report["curvature"]["method"] \
        == "hutchinson", "the model must exercise the Hutchinson probes"
    assert reports[0] == reports[1], "the report must depend on `seed`, not on the global torch RNG"
    assert iias[0] == iias[1], "IIA must depend on `seed`, not on the global torch RNG"


def test_saved_report_is_byte_identical(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    calibration = [torch.randn(32, 6)]
    for out in ("a", "b"):
        fxa.abstract(model, calibration, keep=0.5, replacement="affine").save(str(tmp_path / out))
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes(), \
        "save must write the same report.json for the same compile"
