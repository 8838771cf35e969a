"""Padded sequence batches: batches of different lengths calibrate together, padded positions
(attention_mask == 0) enter no statistic, junk in them does not change the compiled module, and the
compiled module runs on any length the original runs on (fx and torch.export captures)."""
from __future__ import annotations

import pytest
import torch

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.verify import intervene, relative_error
from test_outputs_inputs import Encoder


class ShapeBranch(Encoder):
    """A Python branch on a size: torch.fx cannot trace it, torch.export can (with the length dynamic)."""

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] > 512:
            raise ValueError("too long")
        return super().forward(input_ids, attention_mask)


def padded_batches(lengths=(7, 12, 9, 15), per_batch: int = 64, seed: int = 0, junk: int | None = None):
    """One batch per entry of `lengths`, each padded to its own length (a tokenizer's padding=True):
    real tokens, then padding (token 0, mask 0); junk=k writes random tokens from seed k there instead."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for T in lengths:
        ids = torch.randint(1, 30, (per_batch, T), generator=gen)
        real = torch.randint(2, T + 1, (per_batch,), generator=gen)
        mask = (torch.arange(T)[None] < real[:, None]).long()
        pad = torch.zeros_like(ids) if junk is None else torch.randint(
            1, 30, ids.shape, generator=torch.Generator().manual_seed(junk + T))
        batches.append({"input_ids": torch.where(mask.bool(), ids, pad), "attention_mask": mask})
    return batches


def _states_equal(a, b) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("replacement, score", [("constant", "variance"), ("affine", "logit-mse")])
def test_junk_in_padded_positions_does_not_change_the_compiled_module(replacement, score):
    """(A curvature-weighted constant ignores padding even unmasked: the model's own mask zeroes its
    gradient there; plain moments, which variance and the affine fit read, do not.)"""
    torch.manual_seed(0)
    model = Encoder().eval()
    options = dict(keep=0.5, replacement=replacement, score=score, round_to=1)
    clean = fxa.abstract(model, padded_batches(), **options)
    junk = fxa.abstract(model, padded_batches(junk=7), **options)
    assert clean.report["mask"] == "attention_mask", "the attention_mask input is followed by default"
    assert _states_equal(clean, junk), "tokens at padded positions must not change the compiled module"
    unmasked = fxa.abstract(model, padded_batches(junk=7), mask=None, **options)
    assert not _states_equal(clean, unmasked), "with mask=None the padded positions count (the check can fail)"


def test_padded_positions_enter_no_statistic():
    torch.manual_seed(0)
    model = Encoder().eval()
    batches = padded_batches()
    analysis = fxa.analyse(model, batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert analysis.stats.moments["up"].n == real, "the site's moments count the real tokens only"
    acts = []
    hook = model.up.register_forward_hook(lambda m, a, out: acts.append(out.detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    pooled = torch.cat([torch.relu(a)[b["attention_mask"].bool()] for a, b in zip(acts, batches)]).double()
    assert torch.allclose(analysis.stats.moments["up"].mean, pooled.mean(0), atol=1e-9), \
        "the site mean is the mean over real tokens"


@pytest.mark.parametrize("cls", [Encoder, ShapeBranch])
def test_batches_of_different_lengths_compile_and_run_on_any_length(cls):
    torch.manual_seed(0)
    model = cls().eval()
    result = fxa.abstract(model, padded_batches(), keep=0.5, replacement="affine", round_to=1)
    for T in (5, 15, 23):                       # shorter, equal, longer than every calibration batch
        batch = padded_batches((T,), per_batch=16, seed=T)[0]
        with torch.no_grad(), intervene(model, result.report):
            z_hooks = model(**batch)
        assert relative_error(z_hooks, result.module(**batch)) < 1e-5, f"length {T}: hooks must equal the compiled module"
    scores = fxa.iia(model, result, padded_batches((11,), per_batch=32, seed=5)[0], trials=100)
    assert all(0.0 <= v["iia"] <= 1.0 for v in scores.values())


def test_an_unknown_mask_name_is_a_config_error():
    with pytest.raises(ConfigError, match="mask='padding'"):
        fxa.abstract(Encoder().eval(), padded_batches(), keep=0.5, mask="padding")


class TokenTagger(torch.nn.Module):
    """Per-token logits {"logits": [B, T, 5]}: a per-position FFN, so padded tokens never reach real ones."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(30, 16)
        self.up, self.down = torch.nn.Linear(16, 40), torch.nn.Linear(40, 5)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.down(torch.relu(self.up(self.tok(input_ids))))}


def test_padded_positions_enter_no_metric():
    torch.manual_seed(0)
    model = TokenTagger().eval()
    result = fxa.abstract(model, padded_batches(), keep=0.25, round_to=1)
    clean, junk = padded_batches((12,), 128, seed=3)[0], padded_batches((12,), 128, seed=3, junk=11)[0]
    a, b = (fxa.iia(model, result, data, trials=300)["up"] for data in (clean, junk))
    assert a["output_kind"] == "classes", "a [B, T, V] 'logits' output is class logits per position"
    assert a["iia"] == b["iia"] and a["logit_mse"] == pytest.approx(b["logit_mse"], rel=1e-9), \
        "tokens at padded positions must not change IIA or the logit-MSE"
    assert 0.0 < a["iia"] < 1.0, "a quarter of the units kept: interchange agreement is partial"
