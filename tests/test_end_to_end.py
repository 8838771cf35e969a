"""The whole path a user takes, on the kinds of models people deploy: abstract -> exactness (the report's
interventions as hooks on the original equal the compiled module) -> iia or the interchange error ->
certificate where it is defined -> save -> load -> to_onnx (onnxruntime parity) -> the command line.

The models: a BERT-style encoder with an attention mask (keyword inputs, padded batches of different
lengths), a GPT-style decoder (per-position logits, any length), a regression MLP (one output value), a
model with dict outputs, a model only torch.export can capture (a Python branch on a size), and an
nn.Sequential compiled by torch.compile with fxa.backend."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxabstract as fxa
from fxabstract.cli import main
from fxabstract.data import Inputs, select_output
from fxabstract.errors import ConfigError, FxAbstractWarning
from fxabstract.verify import intervene, relative_error
from fxabstract.output.tensors import read_report

MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


class MaskedEncoder(nn.Module):
    """BERT-style: token and position embeddings, multi-head self-attention whose keys are masked by
    attention_mask, a GELU FFN, post-norm, a masked mean pool and a 3-class head."""

    def __init__(self, vocab=40, dim=32, heads=4, hidden=64, classes=3, context=16):
        super().__init__()
        torch.manual_seed(0)
        self.dim, self.heads = dim, heads
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        B, T, h = input_ids.size(0), input_ids.size(1), self.heads
        dh = self.dim // h
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        q, k, v = (f(x).view(B, T, h, dh).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * dh ** -0.5
        att = att.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, self.dim)
        x = self.ln1(x + self.proj(y))
        x = self.ln2(x + self.down(F.gelu(self.up(x))))
        m = attention_mask[..., None].to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1.0))


def decoder():
    torch.manual_seed(1)
    from fxabstract.zoo.transformers import GPT
    return GPT(vocab=24, dim=32, depth=2, heads=4, context=16)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


class DictHeads(nn.Module):
    """{"embedding": [B, 12], "logits": [B, 5]}: the logits are preserved by default."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2, self.cls = nn.Linear(8, 40), nn.Linear(40, 12), nn.Linear(12, 5)

    def forward(self, x):
        e = self.fc2(torch.relu(self.fc1(x)))
        return {"embedding": e, "logits": self.cls(torch.relu(e))}


class SizeBranch(nn.Module):
    """A Python branch on an input size: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc1, self.fc2, self.head = nn.Linear(10, 48), nn.Linear(48, 32), nn.Linear(32, 4)

    def forward(self, x):
        if x.shape[1] > 8:
            x = x * 0.5
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def sequential():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(7, 40), nn.ReLU(), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 3))
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The models' module, written where the command line can import it: (folder, module name, module)."""
    folder = tmp_path_factory.mktemp("e2e")
    name = f"e2emodels_{folder.name.replace('-', '_')}"
    (folder / f"{name}.py").write_text(MODELS)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return folder, name, module


def _tokens(n: int, length: int, vocab: int, seed: int, padded: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(2, length + 1, (n,), generator=gen) if padded else torch.full((n,), length)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _run(module, inputs: Inputs, output=None):
    with torch.no_grad():
        return select_output(inputs.run(module), output)


def assert_exact(model, result, inputs: Inputs, output=None, bound: float = 1e-5) -> None:
    """The report's interventions as hooks on the original equal the compiled module."""
    with torch.no_grad(), intervene(model, result.report):
        hooked = select_output(inputs.run(model), output)
    err = relative_error(hooked, _run(result.module, inputs, output))
    assert err <= bound, f"hooks vs compiled: relative error {err:.3g} > {bound}"


def assert_saved_and_exported(model, result, inputs: Inputs, folder, output=None, pickles: bool = True):
    """save -> load: the loaded module equals the compiled one and the loaded report reproduces it through
    intervene; to_onnx: onnxruntime equals the compiled module at another batch size."""
    example = inputs.take(slice(0, 4))
    names = result.save(str(folder / "saved"), example_inputs=example.kwargs or example.args)
    assert ("module.pt" in names) == pickles, names
    loaded = fxa.load(str(folder / "saved"))
    assert loaded.report["files"] == names
    assert torch.equal(_run(loaded.module, inputs, output), _run(result.module, inputs, output)), \
        "the loaded module computes what the compiled one does"
    with torch.no_grad(), intervene(model, loaded.report):
        hooked = select_output(inputs.run(model), output)
    assert relative_error(hooked, _run(result.module, inputs, output)) <= 1e-5, "the loaded report reproduces it"
    path = folder / "model.onnx"
    info = fxa.to_onnx(result, example.kwargs or example.args, str(path))
    assert info["relative_diff"] <= info["tolerance"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = inputs.take(slice(0, 7))
    feeds = dict(zip([i.name for i in session.get_inputs()], [t.numpy() for t in (*check.args, *check.kwargs.values())]))
    got = session.run(None, feeds)
    with torch.no_grad():
        out = check.run(result.module)
    expected = [out] if isinstance(out, torch.Tensor) else list(out.values()) if isinstance(out, dict) else list(out)
    for e, g in zip(expected, got):
        assert np.abs(e.numpy() - g).max() <= 1e-4 * max(1.0, float(e.abs().max())), "onnxruntime = the module"
    return loaded


def _cli(folder, monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    status = main(["compile", *args])
    _, err = capsys.readouterr()
    return status, err


def test_an_encoder_with_an_attention_mask_and_padded_batches(models, tmp_path, monkeypatch, capsys):
    folder, name, code = models
    model = code.MaskedEncoder().eval()
    calibration = [_tokens(48, 12, 40, 0), _tokens(48, 9, 40, 1), _tokens(48, 16, 40, 2)]   # three lengths
    result = fxa.abstract(model, calibration, keep=0.5, replacement="affine", round_to=1)
    assert result.report["mask"] == "attention_mask", "the attention mask is followed by default"
    assert any(s["replaced"] for s in result.report["sites"])
    for length in (5, 12, 16):                                  # any length the original runs on
        assert_exact(model, result, Inputs((), _tokens(20, length, 40, 10 + length)))
    evaluation = Inputs((), _tokens(64, 14, 40, 7))
    iia = fxa.iia(model, result, evaluation.kwargs, trials=256)
    assert all(0.0 <= r["iia"] <= 1.0 and r["output_kind"] == "classes" for r in iia.values()), iia
    bound = fxa.certificate(model, result, evaluation.kwargs)
    assert 0.0 <= bound["bound"] <= 1.0, bound
    assert_saved_and_exported(model, result, evaluation, tmp_path, pickles=True)
    torch.save(_tokens(96, 12, 40, 3), folder / "tokens.pt")
    status, err = _cli(folder, monkeypatch, capsys, "--model", f"{name}:MaskedEncoder", "--data", "tokens.pt",
                       "--batch-size", "48", "--round-to", "1", "--out", "encoder")
    assert status == 0, err
    assert (folder / "encoder" / "model.onnx").exists()


def test_a_decoder_with_per_position_logits(models, tmp_path, monkeypatch, capsys):
    folder, name, code = models
    model = code.decoder().eval()
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 24, (32, length), generator=gen) for length in (12, 8, 15)]
    result = fxa.abstract(model, calibration, keep=0.5, round_to=1)
    for length in (1, 3, 15):     # (torch.export guards this model's length 16, its context: see the next test)
        assert_exact(model, result, Inputs((torch.randint(0, 24, (10, length), generator=gen),), {}))
    evaluation = Inputs((torch.randint(0, 24, (64, 12), generator=gen),), {})
    iia = fxa.iia(model, result, evaluation.args[0], trials=128, output_kind="classes")
    assert all(0.0 <= r["iia"] <= 1.0 for r in iia.values()), "IIA per position of the next-token logits"
    with pytest.raises(ConfigError, match="one prediction per sample"):
        fxa.certificate(model, result, evaluation.args[0], output_kind="classes")
    last = fxa.certificate(model, result, evaluation.args[0], output=lambda z: z[:, -1], output_kind="classes")
    assert 0.0 <= last["bound"] <= 1.0, "the last position's logits can be certified"
    assert_saved_and_exported(model, result, evaluation, tmp_path, pickles=False)   # captured by torch.export
    torch.save(torch.randint(0, 24, (64, 12), generator=gen), folder / "ids.pt")
    status, err = _cli(folder, monkeypatch, capsys, "--model", f"{name}:decoder", "--data", "ids.pt",
                       "--batch-size", "32", "--round-to", "1", "--out", "decoder")
    assert status == 0, err


def test_a_length_a_torch_export_guard_refuses_is_a_calibration_error(models):
    _, _, code = models
    model = code.decoder().eval()     # fx cannot trace it; torch.export's program refuses length 16 (its context)
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 24, (8, length), generator=gen) for length in (12, 16)]
    with pytest.raises(fxa.errors.CalibrationError, match="batch 1 .*Guard failed"):
        fxa.abstract(model, calibration, keep=0.5, round_to=1)


def test_a_regression_mlp_gets_errors_not_agreement(models, tmp_path, monkeypatch, capsys):
    folder, name, code = models
    model = code.Regressor().eval()
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    result = fxa.abstract(model, list(x[:300].split(100)), keep=0.5, replacement="affine", round_to=1)
    assert_exact(model, result, Inputs((x[300:],), {}))
    iia = fxa.iia(model, result, x[300:], trials=256)
    for r in iia.values():
        assert "iia" not in r and r["output_kind"] == "values", "a discrete match is not defined for a value"
        assert r["interchange_error"] > 0.0 and -1.0 <= r["cosine"] <= 1.0, r
    with pytest.raises(ConfigError, match="top-1"):
        fxa.certificate(model, result, x[300:])
    assert_saved_and_exported(model, result, Inputs((x[300:],), {}), tmp_path)
    torch.save(x[:300], folder / "reg.pt")
    torch.save(x[300:], folder / "reg_eval.pt")
    status, err = _cli(folder, monkeypatch, capsys, "--model", f"{name}:Regressor", "--data", "reg.pt",
                       "--eval-data", "reg_eval.pt", "--round-to", "1", "--out", "regressor")
    assert status == 0, err
    evaluation = read_report(str(folder / "regressor"))["evaluation"]
    assert evaluation["output_kind"] == "values" and "agreement" not in evaluation, evaluation
    assert evaluation["relative_error"] > 0.0 and evaluation["evaluated_on"] == "eval-data"


def test_a_model_with_dict_outputs(models, tmp_path, monkeypatch, capsys):
    folder, name, code = models
    model = code.DictHeads().eval()
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxa.abstract(model, [x[:200]], keep=0.5, round_to=1)
    said = [str(w.message) for w in caught if issubclass(w.category, FxAbstractWarning) and "tensors" in str(w.message)]
    assert len(said) == 1 and "logits" in said[0], f"one warning naming the output chosen: {said}"
    assert result.report["output"] == "logits"
    assert_exact(model, result, Inputs((x[200:],), {}), output="logits")
    iia = fxa.iia(model, result, x[200:], trials=256)
    assert all(r["output_kind"] == "classes" for r in iia.values())
    assert 0.0 <= fxa.certificate(model, result, x[200:])["bound"] <= 1.0
    embedding = fxa.abstract(model, [x[:200]], keep=0.5, round_to=1, output="embedding")
    assert all(r["output_kind"] == "values" for r in fxa.iia(model, embedding, x[200:], trials=64).values())
    assert_saved_and_exported(model, result, Inputs((x[200:],), {}), tmp_path, output="logits")
    torch.save(x[:200], folder / "dict.pt")
    status, err = _cli(folder, monkeypatch, capsys, "--model", f"{name}:DictHeads", "--data", "dict.pt",
                       "--output", "embedding", "--round-to", "1", "--out", "dictheads")
    assert status == 0, err


def test_a_model_only_torch_export_captures(models, tmp_path, monkeypatch, capsys):
    folder, name, code = models
    model = code.SizeBranch().eval()
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(0))
    result = fxa.abstract(model, list(x[:200].split(100)), keep=0.5, replacement="affine", round_to=1)
    assert_exact(model, result, Inputs((x[200:],), {}))
    assert 0.0 <= fxa.certificate(model, result, x[200:])["bound"] <= 1.0
    assert all(0.0 <= r["iia"] <= 1.0 for r in fxa.iia(model, result, x[200:], trials=256).values())
    assert_saved_and_exported(model, result, Inputs((x[200:],), {}), tmp_path, pickles=False)
    torch.save(x[:200], folder / "branch.pt")
    status, err = _cli(folder, monkeypatch, capsys, "--model", f"{name}:SizeBranch", "--data", "branch.pt",
                       "--round-to", "1", "--out", "branch")
    assert status == 0, err


def test_a_sequential_through_torch_compile(models, tmp_path):
    _, _, code = models
    model = code.sequential().eval()
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(0))
    calibration = list(x[:200].split(100))
    backend = fxa.backend(calibration, keep=0.5, round_to=1, then_backend="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        z = compiled(x[200:])
    (result,) = backend.abstractions
    direct = fxa.abstract(model, calibration, keep=0.5, round_to=1)
    same = [(s["units"], s["kept"], [r["unit"] for r in s["replaced"]]) for s in direct.report["sites"]]
    assert [(s["units"], s["kept"], [r["unit"] for r in s["replaced"]]) for s in result.report["sites"]] == same, \
        "the backend compiles what fxa.abstract does"
    assert relative_error(_run(direct.module, Inputs((x[200:],), {})), z) <= 1e-6
    assert_exact(model, result, Inputs((x[200:],), {}))
    assert all(0.0 <= r["iia"] <= 1.0 for r in fxa.iia(model, result, x[200:], trials=256).values())
    assert_saved_and_exported(model, result, Inputs((x[200:],), {}), tmp_path)
    torch._dynamo.reset()
