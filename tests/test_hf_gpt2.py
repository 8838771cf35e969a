"""Hugging Face GPT-2 through torch.export (issue 3, item 5): its Conv1D layers (`view -> addmm -> view`,
weight stored [in, out]) become nn.Linear layers at the same module paths, its MLP (c_fc -> gelu_new
written out as elementwise ops -> c_proj) is an FFN site and its attention (fused c_attn -> split ->
heads -> c_proj) a head site. At keep 50% the compiled module equals the original with the report's
hooks on the user's model, whose layers are still Conv1D (docs/math.md §1), and exports to ONNX with parity.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.abstraction import capture_sites
from fxabstract.capture import linearize_addmm
from fxabstract.cost import module_macs
from fxabstract.verify import intervene, relative_error

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SITES = ["h.0.attn.heads", "h.0.mlp.c_fc", "h.1.attn.heads", "h.1.mlp.c_fc"]


def _gpt2(attention: str):
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                                  attn_implementation=attention, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2Model(cfg).eval(), torch.randint(0, 100, (24, 12))


def _exact(model, result, ids) -> float:
    report = json.loads(json.dumps(result.report))               # the hooks read the JSON alone
    with torch.no_grad(), intervene(model, report):
        z_hooks = model(ids).last_hidden_state
    with torch.no_grad():
        return relative_error(z_hooks, result.module(ids)[0])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_sites_are_the_mlp_neurons_and_the_heads(attention):
    model, ids = _gpt2(attention)
    gm, sites, ineligible = capture_sites(model, ids[:8])
    assert [(s.name, s.n_units) for s in sites] == [(n, 64 if n.endswith("heads") else 256) for n in SITES]
    heads = sites[0]
    assert heads.group == 16 and heads.consumers == ["h.0.attn.c_proj"]
    assert {p.module for p in heads.pieces} == {"h.0.attn.c_attn"}
    # the residual stream (embeddings and MLP outputs): a reason, not a site. GPT2Model returns ln_f's output,
    # so the stream's last normaliser has no layer to fold into
    assert sorted(ineligible) == ["h.0.mlp.c_proj", "h.1.mlp.c_proj", "wpe", "wte"]
    assert all(r.startswith("residual stream: normaliser `ln_f`") for r in ineligible.values()), ineligible
    for path in ("h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.mlp.c_proj"):
        assert type(gm.get_submodule(path)) is nn.Linear, path
        assert type(model.get_submodule(path)).__name__ == "Conv1D", "the user's model is untouched"


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_gpt2_compiles_exactly_at_keep_half(attention, replacement, tmp_path):
    model, ids = _gpt2(attention)
    keep = {"h.0.attn.heads": 32, "h.1.attn.heads": 32, "h.0.mlp.c_fc": 128, "h.1.mlp.c_fc": 128}
    result = fxa.abstract(model, list(ids.split(8)), keep=keep, replacement=replacement, allocation="predicted")
    assert [len(s["kept"]) for s in result.report["sites"]] == [32, 128, 32, 128]
    assert result.module.get_submodule("h.0.attn.c_attn").out_features == 96        # two of four heads, q k v
    assert result.module.get_submodule("h.0.mlp.c_proj").in_features == 128
    assert _exact(model, result, ids) <= TOL, "GPT-2: compiled vs hooks"
    assert _exact(model, result, ids[:3]) <= TOL, "a batch size other than the traced one"
    if replacement == "affine":
        info = fxa.to_onnx(result.module, ids[:4], str(tmp_path / "gpt2.onnx"))
        assert info["relative_diff"] <= 1e-4, f"GPT-2: ONNX parity {info['relative_diff']:.2e}"


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_conv1d_becomes_a_linear_with_the_transposed_weight(front_end):
    """Through either front end the rewritten layer computes what Conv1D did (fx traces into Conv1D,
    and its views' shapes are known once a batch ran); a view -> addmm -> view that does not only
    flatten (the rows regrouped into other leading axes) is left alone."""
    torch.manual_seed(0)
    model = nn.Sequential(transformers.pytorch_utils.Conv1D(6, 4), nn.ReLU())
    torch.nn.init.normal_(model[0].bias)
    x = torch.randn(2, 6, 4)
    if front_end == "fx":
        gm, _, _ = capture_sites(model, x)
        assert not any(n.op == "call_method" for n in gm.graph.nodes), "the views' size arithmetic is gone"
    else:
        gm = torch.export.export(model, (x,)).module()
        assert linearize_addmm(gm) == 1
    layer = gm.get_submodule("0")
    assert type(layer) is nn.Linear and torch.equal(layer.weight, model[0].weight.t())
    assert torch.allclose(gm(x), model(x), atol=1e-6)

    class Regroup(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = transformers.pytorch_utils.Conv1D(6, 4)

        def forward(self, x):
            return torch.addmm(self.conv.bias, x.view(-1, 4), self.conv.weight).view(x.shape[0] * 2, -1, 6)

    regroup = torch.export.export(Regroup(), (x,)).module()
    assert linearize_addmm(regroup) == 0
    assert not any(isinstance(m, nn.Linear) for m in regroup.modules())


def test_conv1d_macs_are_counted_like_the_linear_it_becomes():
    model, ids = _gpt2("eager")
    gm, _, _ = capture_sites(model, ids[:8])
    before, captured = module_macs(model, ids[:8]), module_macs(gm, ids[:8])
    assert before == captured and len(before) == 8, (before, captured)
    assert before["h.0.mlp.c_fc"] == 12 * 64 * 256                      # per sample: tokens x in x out


def test_conv1d_mlp_through_fx_compiles_exactly():
    """fx traces into Conv1D; after the rewrite its gelu_new MLP is a site, exact against the hooks."""
    conv1d = transformers.pytorch_utils.Conv1D

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = conv1d(32, 8), conv1d(4, 32)

        def forward(self, x):
            h = self.c_fc(x)
            return self.c_proj(0.5 * h * (1 + torch.tanh(0.79788 * (h + 0.044715 * torch.pow(h, 3)))))

    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(64, 5, 8)
    result = fxa.abstract(model, list(x.split(16)), keep=0.5, replacement="affine")
    assert [(s["name"], len(s["kept"])) for s in result.report["sites"]] == [("c_fc", 16)]
    with torch.no_grad(), intervene(model, json.loads(json.dumps(result.report))):
        z_hooks = model(x)
    assert relative_error(z_hooks, result.module(x)) <= TOL
