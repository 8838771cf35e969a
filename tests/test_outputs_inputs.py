"""Several inputs and any output, end to end through the public API: keyword (dict) and positional
(tuple) inputs in abstract, iia and certificate; output= (an index, a key, a callable) and the
one-time warning when a model returns several tensors; metrics that fit the output (IIA for class
logits, interchange error and cosine for regression and embedding outputs, the certificate refused)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError, FxAbstractWarning
from fxabstract.verify import intervene, relative_error


class Encoder(nn.Module):
    """Token embedding, an FFN per position, a masked mean pool and a 4-class head: keyword inputs."""

    def __init__(self, vocab: int = 30, dim: int = 16, hidden: int = 48, classes: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.tok(input_ids)
        h = h + self.down(torch.relu(self.up(h)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 24), nn.Linear(3, 24)
        self.mid, self.head = nn.Linear(24, 16), nn.Linear(16, 6)

    def forward(self, x, y):
        return self.head(torch.relu(self.mid(torch.relu(self.a(x) + self.b(y)))))


class DictHeads(nn.Module):
    """Returns {"logits": [B, 5], "embedding": [B, 12]}: two outputs, one of them class logits."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 12)
        self.cls = nn.Linear(12, 5)

    def forward(self, x):
        e = self.fc2(torch.relu(self.fc1(x)))
        return {"logits": self.cls(torch.relu(e)), "embedding": e}


def _batches(n: int = 256, length: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(64), mask.split(64))]


def test_keyword_inputs_run_through_abstract_iia_and_certificate():
    torch.manual_seed(0)
    model = Encoder().eval()
    calibration = _batches()
    result = fxa.abstract(model, calibration, keep=0.5, replacement="affine", round_to=1)
    evaluation = _batches(96, seed=1)[0]                       # a dict of keyword tensors
    with torch.no_grad(), intervene(model, result.report):
        z_hooks = model(**evaluation)
    assert relative_error(z_hooks, result.module(**evaluation)) < 1e-5, "hooks must equal the compiled module"
    scores = fxa.iia(model, result, evaluation, trials=200)
    assert set(scores) == {s["name"] for s in result.report["sites"]}
    for entry in scores.values():
        assert entry["output_kind"] == "classes" and 0.0 <= entry["iia"] <= 1.0 and entry["trials"] == 200
    assert 0.0 <= fxa.certificate(model, result, evaluation)["bound"] <= 1.0
    batches = fxa.iia(model, result, _batches(128, seed=2), trials=50)   # an iterable of dict batches
    assert set(batches) == set(scores)


def test_tuple_inputs_are_positional_everywhere():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, y = torch.randn(256, 5), torch.randn(256, 3)
    result = fxa.abstract(model, [((x[i:i + 64], y[i:i + 64]), None) for i in range(0, 256, 64)], keep=0.5,
                          round_to=1)
    scores = fxa.iia(model, result, (x[:80], y[:80]), trials=100)
    assert all(0.0 <= v["iia"] <= 1.0 for v in scores.values())
    certificate = fxa.certificate(model, result, (x[:80], y[:80]))
    assert certificate["samples"] == 80


def test_a_regression_output_gets_errors_not_an_iia_of_one():
    """One output per sample: top-1 agreement is always 1 there, so IIA would say nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    x = torch.randn(256, 6)
    result = fxa.abstract(model, x.split(64), keep=0.25, round_to=1)
    scores = fxa.iia(model, result, x[:100], trials=200)
    for entry in scores.values():
        assert "iia" not in entry and entry["output_kind"] == "values", "IIA is not defined for a regression output"
        assert entry["interchange_error"] > 0.0, "a compressed regression model is not exact under interchange"
        assert -1.0 <= entry["cosine"] <= 1.0
    dense = fxa.abstract(model, x.split(64), keep=1.0, round_to=1)
    assert all(v["interchange_error"] < 1e-5 for v in fxa.iia(model, dense, x[:100], trials=50).values()), \
        "keeping every unit must give no interchange error"
    with pytest.raises(ConfigError, match="certificate"):
        fxa.certificate(model, result, x[:100])


def test_several_outputs_warn_once_and_output_picks_one():
    torch.manual_seed(0)
    model = DictHeads().eval()
    x = torch.randn(256, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxa.abstract(model, x.split(64), keep=0.5, round_to=1)
    said = [str(w.message) for w in caught if issubclass(w.category, FxAbstractWarning) and "returns 2" in str(w.message)]
    assert len(said) == 1 and "'logits'" in said[0], f"one warning naming the preserved output, got {said}"
    assert result.report["output"] == "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxAbstractWarning)      # a named output: no warning
        embedded = fxa.abstract(model, x.split(64), keep=0.5, round_to=1, output="embedding")
        picked = fxa.abstract(model, x.split(64), keep=0.5, round_to=1, output=lambda out: out["embedding"])
    assert embedded.report["output"] == "embedding" and picked.report["output"].startswith("callable")
    assert [s["kept"] for s in embedded.report["sites"]] == [s["kept"] for s in picked.report["sites"]], \
        "a key and a callable that pick the same tensor must give the same abstraction"
    assert all(v["output_kind"] == "values" for v in fxa.iia(model, embedded, x[:64], trials=50).values())
    assert all(v["output_kind"] == "classes" for v in fxa.iia(model, result, x[:64], trials=50).values())
    with pytest.raises(ConfigError, match="output='nope'"):
        fxa.abstract(model, x.split(64), keep=0.5, output="nope")
