"""Issue 5, nothing lost: the user's model is bitwise unchanged by every public call, and every file
fxabstract writes lands whole or not at all (failures injected at the worst moment)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import fxabstract as fxa
import fxabstract.cli
import fxabstract.output.files
import fxabstract.output.saving
import fxabstract.output.tensors
from fxabstract.cli import main
from fxabstract.errors import FxAbstractWarning, OutputError
from test_cli import user_files  # noqa: F401  (fixture)
from test_robustness import TrainingNet


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a call could change: values (bitwise), Parameter objects, modes, flags and hooks."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": {k: id(v) for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_unchanged(model, before: dict, call: str) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys(), f"{call} changed the model's parameters/buffers"
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{call} changed {k} of the user's model"
    for key in ("objects", "training", "requires_grad", "hooks"):
        assert after[key] == before[key], f"{call} changed the model's {key}"


def test_every_public_call_leaves_the_model_and_the_result_bitwise_unchanged(tmp_path):
    model = TrainingNet().train()          # training mode: BatchNorm would update its running stats
    calibration, x = [torch.randn(32, 6) for _ in range(3)], torch.randn(40, 6)
    before = snapshot(model)
    calls = {
        "analyse": lambda: fxa.analyse(model, calibration),
        "abstract": lambda: fxa.abstract(model, calibration, keep=0.5, replacement="affine", round_to=1),
    }
    results = {name: call() for name, call in calls.items()}
    for name in calls:
        assert_unchanged(model, before, name)
    result = results["analyse"].compile(0.5, replacement="affine")
    assert_unchanged(model, before, "Analysis.compile")
    compiled = snapshot(result.module)
    with torch.no_grad():
        target = int(copy.deepcopy(model).eval()(x[:1]).argmax())    # a class the data contains, for explain

    def intervene():
        with fxa.intervene(model, result.report):
            pass

    later = {
        "iia": lambda: fxa.iia(model, result, x, trials=100),
        "certificate": lambda: fxa.certificate(model, result, x),
        "intervene": intervene,
        "to_onnx (user's model)": lambda: fxa.to_onnx(model, x[:4], str(tmp_path / "user.onnx")),
        "to_onnx": lambda: fxa.to_onnx(result.module, x[:4], str(tmp_path / "m.onnx")),
        "save": lambda: result.save(str(tmp_path / "saved")),
        "explain": lambda: fxa.explain(model, x, target=target),
        "combine": lambda: fxa.combine(model, [result], x, samples=10),
    }
    for name, call in later.items():
        call()
        assert_unchanged(model, before, name)
        assert_unchanged(result.module, compiled, f"{name} (on the compiled module)")


# ----------------------------------------------------------------------------- atomic writes

def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(".fxabstract-"))


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failure, where):
    path = tmp_path / "report.json"
    path.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(fxabstract.output.files.os, where, fail)
    expected = OutputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        fxabstract.output.files.write_atomic(str(path), b"new" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b"old", "an interrupted write must leave the previous file intact"
    assert leftovers(tmp_path) == [], "an interrupted write must remove its temporary file"


def test_interrupted_save_writes_neither_file(tmp_path, monkeypatch):
    model = TrainingNet().eval()
    result = fxa.abstract(model, [torch.randn(32, 6)], keep=0.5)

    def interrupt(report):
        raise KeyboardInterrupt

    monkeypatch.setattr(fxabstract.output.tensors, "dumps", interrupt)   # the last file: the others are staged
    with pytest.raises(KeyboardInterrupt):
        result.save(str(tmp_path))
    assert os.listdir(tmp_path) == [], f"save must write every file or none, found {os.listdir(tmp_path)}"


@pytest.mark.parametrize("target, failure, status", [
    (fxabstract.cli, KeyboardInterrupt(), 130),             # Ctrl-C after model.onnx, at the report
    (fxabstract.output.files.os, OSError(28, "No space left on device"), 2),   # disk full at the first write
], ids=["ctrl-c", "disk-full"])
def test_interrupted_cli_compile_leaves_no_output(user_files, monkeypatch, capsys, target, failure, status):  # noqa: F811
    folder, module = user_files

    def fail(*args):
        raise failure

    monkeypatch.setattr(target, "write_report" if target is fxabstract.cli else "fsync", fail)
    code = main(["compile", "--model", f"{module}:build", "--data", "data.pt", "--out", "build"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == status, f"an interrupted compile exits with {status}, got {code}: {err}"
    assert "Traceback" not in err, err
    assert not (folder / "build").exists(), \
        f"no output, new or partial, not even the --out folder it created: {list((folder / 'build').rglob('*'))}"


def test_an_unwritable_demo_cache_warns_and_the_demo_still_trains(tmp_path, monkeypatch):
    from fxabstract import demo

    (tmp_path / "afile").write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "afile"))
    monkeypatch.setattr(demo, "train", lambda model, x, y: model.eval())   # the cache is what is tested
    with pytest.warns(FxAbstractWarning, match="cannot cache the demo model"):
        model = demo.demo_model()
    assert isinstance(model, demo.DigitsMLP), "the demo model is returned even when it cannot be cached"


def test_certify_leaves_the_model_bitwise_unchanged():
    from fxabstract.interpret.groups import GroupMLP, cyclic_table, domain

    torch.manual_seed(0)
    table = cyclic_table(7)
    model = GroupMLP(7, embed=8, width=16).train()
    xy, _ = domain(table)
    result = fxa.abstract(model, [xy], keep=8, sites=["hidden"], round_to=1)
    before = snapshot(model)
    fxa.certify(model, result, table)
    assert_unchanged(model, before, "certify")
