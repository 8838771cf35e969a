"""Issue 5, security: the CLI never executes code from a data file or checkpoint (torch.load with
weights_only=True), and `--model module:factory` imports only the module the user names."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fxabstract.cli import main
from test_cli import assert_one_line_error, user_files  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Unpickling this object calls open(marker, "w"): code execution, if the loader allows it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("which", ["--data", "--checkpoint"])
def test_a_pickle_with_code_in_a_data_file_is_refused_unexecuted(user_files, capsys, which):  # noqa: F811
    folder, module = user_files
    marker = folder / "executed"
    torch.save({"x": Payload(str(marker))}, folder / "evil.pt")
    files = {"--data": "data.pt", "--checkpoint": None, which: "evil.pt"}
    args = [a for flag, path in files.items() if path for a in (flag, path)]
    status = main(["compile", "--model", f"{module}:build", *args, "--out", "o"])
    assert_one_line_error(capsys, status, "weights_only=True")
    assert not marker.exists(), f"loading {which} must not run code from the file"


def test_a_pickled_module_as_checkpoint_is_refused(user_files, capsys):  # noqa: F811
    """torch.save(model) instead of torch.save(model.state_dict()): refused, with the fix named."""
    folder, module = user_files
    torch.save(torch.nn.Linear(2, 2), folder / "whole.pt")
    status = main(["compile", "--model", f"{module}:build", "--checkpoint", "whole.pt", "--data", "data.pt"])
    assert_one_line_error(capsys, status, "torch.save")


SHADOW = "open(__file__ + '.imported', 'w').close()\nraise ImportError('shadowed')\n"


def test_model_import_does_not_let_the_current_folder_shadow_other_modules(user_files):  # noqa: F811
    """Files in the current folder named like modules fxabstract imports later (onnx, onnxruntime,
    sklearn) must not be imported: only --model's module is loaded from there. Run as the console
    script runs (the current folder not on sys.path), in a fresh interpreter."""
    folder, module = user_files
    for name in ("onnx", "onnxruntime", "onnxscript", "sklearn"):
        (folder / f"{name}.py").write_text(SHADOW)
    script = ("import sys, os; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
              f"sys.path.insert(0, {ROOT!r}); from fxabstract.cli import main; "
              f"sys.exit(main(['compile', '--model', '{module}:build', '--data', 'data.pt', '--out', 'o']))")
    run = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    imported = sorted(p.name for p in folder.iterdir() if p.name.endswith(".imported"))
    assert not imported, f"only the named module may be imported from the current folder, also got {imported}"
    assert run.returncode == 0, f"the compile must succeed: {run.stderr[-2000:]}"
