"""Attention heads of Llama-style attention: rotary position embeddings and q/k RMSNorm on q and k
(per-head ops over head_dim: a head's rows stay that head's), and grouped-query attention, where
h query heads share h_kv key/value heads. Decision (gqa.py): units are removed one query head at a
time (its q rows, its output-projection columns); a kv head's k and v rows go once all its query
heads are, and the repeat of k and v becomes an index_select of the kept query heads' kv heads.
The compiled module equals the original with the report's hooks (docs/math.md §1), through torch.fx and
torch.export, and the compile changes the outputs (the check is not vacuous).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxabstract as fxa
from fxabstract.zoo import transformers as zt
from fxabstract.errors import NoSiteError
from fxabstract.verify import intervene, relative_error

TOL = 1e-5
HEADS = r"blocks\.\d+\.attn\.heads"


def _no_fx(monkeypatch):
    """Make torch.fx fail so that capture falls back to torch.export (the path HF models take)."""
    def refuse(*args, **kwargs):
        raise RuntimeError("symbolic tracing disabled by the test")
    monkeypatch.setattr(torch.fx, "symbolic_trace", refuse)


def _errors(model, result, *inputs, **kwinputs) -> tuple[float, float]:
    """(compiled vs hooked original, compiled vs original): relative errors on the first output."""
    report = json.loads(json.dumps(result.report))               # the hooks read the JSON alone
    pick = lambda z: z if isinstance(z, torch.Tensor) else z[0]  # noqa: E731
    with torch.no_grad():
        z = pick(model(*inputs, **kwinputs))
        with intervene(model, report):
            z_hooks = pick(model(*inputs, **kwinputs))
        z_compiled = pick(result.module(*inputs, **kwinputs))
    return relative_error(z_hooks, z_compiled), relative_error(z, z_compiled)


def _exported(result) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in result.module.graph.nodes)


def _check_gqa_site(site, attn, original, dh=8, G=4):
    """Whole query heads kept; q keeps their rows; k and v keep the rows of the kv heads they read, in order."""
    kept = site["kept"]
    heads = sorted({u // dh for u in kept})
    assert site["group"] == dh and 0 < len(heads) < 8, "units are removed one query head at a time"
    assert kept == [u for g in heads for u in range(g * dh, g * dh + dh)], "whole heads"
    rows = [r for j in sorted({g // G for g in heads}) for r in range(j * dh, j * dh + dh)]
    assert attn.q.out_features == attn.o.in_features == len(kept) and attn.k.out_features == len(rows)
    assert torch.equal(attn.q.weight, original.q.weight[kept]), "q keeps the kept query heads' rows"
    assert torch.equal(attn.k.weight, original.k.weight[rows]), "k keeps the rows of the kv heads still read"
    assert torch.equal(attn.v.weight, original.v.weight[rows]), "v keeps the rows of the kv heads still read"


def _llama(**kw):
    torch.manual_seed(0)
    return zt.Llama(**kw).eval(), torch.randint(0, 50, (24, 16))


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("kv_repeat,qk_norm,replacement", [
    ("expand", False, "constant"), ("expand", False, "affine"), ("expand", True, "affine"),
    ("interleave", False, "constant"), ("sdpa", True, "constant")])
def test_llama_gqa_rotary_heads_fold_exactly(kv_repeat, qk_norm, replacement, front_end, monkeypatch):
    """8 query heads on 2 kv heads: 4 query heads removed in each layer; q keeps their rows, k and v
    the rows of the kv heads they read; the compiled module equals the hooked original at two batch sizes."""
    model, x = _llama(qk_norm=qk_norm, kv_repeat=kv_repeat)
    if front_end == "export":
        _no_fx(monkeypatch)
    result = fxa.abstract(model, x.split(8), keep=0.5, round_to=1, allocation="predicted", replacement=replacement,
                          sites=HEADS)
    assert _exported(result) == (front_end == "export"), "the capture must use the front end under test"
    sites = result.report["sites"]
    assert [s["name"] for s in sites] == ["blocks.0.attn.heads", "blocks.1.attn.heads"], result.report["ineligible"]
    assert sum(len(s["kept"]) for s in sites) == 64, "keep 0.5 of the 128 head units of both layers"
    for i, site in enumerate(sites):
        _check_gqa_site(site, result.module.get_submodule(f"blocks.{i}.attn"), model.blocks[i].attn)
    for batch in (x, x[:5]):
        exact, change = _errors(model, result, batch)
        assert exact <= TOL, f"{kv_repeat}, qk_norm={qk_norm}: compiled vs hooks relative error {exact:.2e}"
        assert change > 1e-3, f"the compile must change the outputs (got {change:.2e}): the check would be vacuous"


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("kv_repeat", ["expand", "interleave", "sdpa"])
def test_kv_head_is_deleted_when_all_its_query_heads_are(kv_repeat, front_end, monkeypatch):
    """Query heads 0-3 (kv head 0) barely reach the output: removing them deletes kv head 0's rows of k
    and v; the repeat becomes index_select([0, 0, 0, 0]) over the one kept kv head, exactly."""
    model, x = _llama(kv_repeat=kv_repeat)
    if front_end == "export":
        _no_fx(monkeypatch)
    with torch.no_grad():
        model.blocks[0].attn.o.weight[:, :32] *= 0.02
    result = fxa.abstract(model, x.split(8), keep={"blocks.0.attn.heads": 32}, round_to=1, allocation="predicted",
                          replacement="affine", sites=["blocks.0.attn.heads"])
    site = result.report["sites"][0]
    assert site["kept"] == list(range(32, 64)), "the four weak heads of kv head 0 go"
    attn = result.module.get_submodule("blocks.0.attn")
    _check_gqa_site(site, attn, model.blocks[0].attn)
    assert attn.k.out_features == attn.v.out_features == 8, "kv head 0 is deleted from k and v"
    exact, change = _errors(model, result, x)
    assert exact <= TOL and change > 1e-4, (exact, change)


def test_llama_global_keep_finds_head_sites():
    """With every site eligible, the attention blocks are head sites next to the SwiGLU sites."""
    model, x = _llama()
    result = fxa.abstract(model, x.split(8), keep=0.5, round_to=1, allocation="predicted")
    names = {s["name"]: s for s in result.report["sites"]}
    assert {"blocks.0.attn.heads", "blocks.1.attn.heads"} <= set(names), result.report["ineligible"]
    assert all(len(names[n]["kept"]) % 8 == 0 for n in names if n.endswith("heads"))
    exact, _ = _errors(model, result, x)
    assert exact <= TOL, f"compiled vs hooks relative error {exact:.2e}"


def test_llama_exports_to_onnx_with_parity(tmp_path):
    model, x = _llama(qk_norm=True)
    result = fxa.abstract(model, x.split(8), keep=0.5, round_to=1, allocation="predicted", replacement="affine",
                          sites=HEADS)
    info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "llama.onnx"))
    assert info["relative_diff"] <= 1e-4, f"onnxruntime differs from torch by {info['relative_diff']:.2e}"


class QKNormAttention(nn.Module):
    """Self-attention with a torch norm module over head_dim on q and k (nn.RMSNorm or nn.LayerNorm,
    weight [dh] shared by the heads), applied on [B, T, h, dh] (before the transpose) or [B, h, T, dh]."""

    def __init__(self, dim: int = 32, heads: int = 4, norm: str = "rms", before_transpose: bool = True):
        super().__init__()
        self.heads, self.before = heads, before_transpose
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        make = (lambda: nn.RMSNorm(dim // heads)) if norm == "rms" else (lambda: nn.LayerNorm(dim // heads))
        self.q_norm, self.k_norm = make(), make()
        for m in (self.q_norm, self.k_norm):
            nn.init.uniform_(m.weight, 0.5, 1.5)

    def forward(self, x):
        B, T, C = x.size(0), x.size(1), x.size(2)
        q, k, v = (f(x).view(B, T, self.heads, C // self.heads) for f in (self.q, self.k, self.v))
        if self.before:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # [B, h, T, dh]
        if not self.before:
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class QKNormNet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 32), QKNormAttention(**kw), nn.Linear(32, 5)

    def forward(self, x):                                                           # [B, T, 8]
        return self.out(torch.tanh(self.attn(self.inp(x))).mean(1))


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("norm,before_transpose", [("rms", True), ("rms", False), ("layer", True), ("layer", False)])
def test_qk_norm_modules_over_head_dim_fold_exactly(norm, before_transpose, front_end, monkeypatch):
    """nn.RMSNorm / nn.LayerNorm over head_dim on q and k (aten.rms_norm, aten.layer_norm through
    torch.export) are per-head ops: two of four heads removed, exact."""
    torch.manual_seed(0)
    model, x = QKNormNet(norm=norm, before_transpose=before_transpose).eval(), torch.randn(24, 6, 8)
    if front_end == "export":
        _no_fx(monkeypatch)
    result = fxa.abstract(model, x.split(8), keep={"attn.heads": 16}, round_to=1, allocation="predicted",
                          replacement="affine", sites=["attn.heads"])
    assert _exported(result) == (front_end == "export"), "the capture must use the front end under test"
    site = result.report["sites"][0]
    assert site["group"] == 8 and len(site["kept"]) == 16
    assert result.module.get_submodule("attn.q").out_features == 16
    assert torch.equal(result.module.get_submodule("attn.q_norm").weight, model.attn.q_norm.weight), "shared by heads"
    exact, change = _errors(model, result, x)
    assert exact <= TOL and change > 1e-3, (exact, change)


class PerHeadGain(nn.Module):
    """Attention whose queries are scaled by a learned gain per head: not the same op for every head."""

    def __init__(self, dim: int = 32, heads: int = 4, per_unit: bool = False):
        super().__init__()
        self.heads, self.q, self.k, self.v, self.o = heads, *(nn.Linear(dim, dim) for _ in range(4))
        shape = (dim,) if per_unit else (heads, 1, 1)                              # [h * dh] or [h, 1, 1]
        self.per_unit, self.gain = per_unit, nn.Parameter(torch.rand(shape) + 0.5)

    def forward(self, x):
        B, T, C = x.size(0), x.size(1), x.size(2)
        q, k, v = (f(x) * self.gain if self.per_unit and f is self.q else f(x) for f in (self.q, self.k, self.v))
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q if self.per_unit else q * self.gain, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


def test_per_head_operand_is_refused_naming_the_node():
    """An op between q and the attention whose operand differs per head keeps the heads ineligible,
    with a reason that names the operand and the node."""
    torch.manual_seed(0)
    with pytest.raises(NoSiteError, match=r"q: `gain` \(read by `mul`\) differs per head"):
        fxa.abstract(PerHeadGain(), torch.randn(16, 6, 32).split(8), keep=0.5, round_to=1, allocation="predicted")


def test_per_unit_operand_across_heads_is_refused_naming_the_node():
    """q_proj(x) * gain[h * dh] before the view: gain would need its entries deleted too; refused."""
    torch.manual_seed(0)
    with pytest.raises(NoSiteError, match=r"q: `mul` reads an operand with one value per unit of several heads"):
        fxa.abstract(PerHeadGain(per_unit=True), torch.randn(16, 6, 32).split(8), keep=0.5, round_to=1,
                     allocation="predicted")


class GQAForm(nn.Module):
    """4 query heads on 2 kv heads, in forms fxabstract refuses: one fused projection split in
    (q, k, v) (`split`) or sliced (`slice`, Phi-3 style), and k/v tiled (`tile`: query head g reads kv
    head g % 2, so the heads sharing a kv head are not adjacent)."""

    def __init__(self, form: str, dim: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.form, self.h, self.kv, self.dh = form, heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.dh)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, h, kv, dh = x.size(0), x.size(1), self.h, self.kv, self.dh
        qkv = self.qkv(x)
        if self.form == "slice":
            q, k, v = qkv[..., :h * dh], qkv[..., h * dh:(h + kv) * dh], qkv[..., (h + kv) * dh:]
        else:
            q, k, v = qkv.split([h * dh, kv * dh, kv * dh], dim=-1)
        q = q.reshape(B, T, h, dh).transpose(1, 2)
        k, v = (t.reshape(B, T, kv, dh).transpose(1, 2) for t in (k, v))
        if self.form == "tile":
            k, v = k.repeat(1, h // kv, 1, 1), v.repeat(1, h // kv, 1, 1)
        else:
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, h * dh))


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("form,why", [
    ("split", "`1.qkv` projects q and the shared k or v of grouped-query attention"),
    ("slice", "its split piece `"), ("tile", "`repeat` (repeat) between a projection and the attention")])
def test_unsupported_gqa_forms_are_refused_naming_the_node(form, why, front_end, monkeypatch):
    """Forms that are not handled leave the projections ineligible with a reason naming the node."""
    if front_end == "export":
        _no_fx(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), GQAForm(form), nn.Tanh(), nn.Linear(32, 5))
    result = fxa.abstract(net, torch.randn(16, 6, 8).split(8), keep=0.5, round_to=1, allocation="predicted")
    assert not any(s["name"].endswith("heads") for s in result.report["sites"])
    reason = result.report["ineligible"]["1.qkv"]
    assert why in reason, reason


class MultiQuery(nn.Module):
    """Multi-query attention (one k/v head for all query heads), k and v broadcast by expand(B, h, T, dh)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.dh = heads, dim // heads
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, self.dh), nn.Linear(dim, self.dh)

    def forward(self, x):
        B, T, h, dh = x.size(0), x.size(1), self.h, self.dh
        q = self.q(x).view(B, T, h, dh).transpose(1, 2)
        k, v = (f(x).view(B, T, 1, dh).transpose(1, 2).expand(B, h, T, dh) for f in (self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, h * dh))


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_multi_query_attention_heads_fold_exactly(front_end, monkeypatch):
    """h_kv = 1: query heads are removed one at a time, the k/v head stays (some query head reads it)
    and the expand becomes index_select([0, 0]) over it."""
    if front_end == "export":
        _no_fx(monkeypatch)
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(8, 32), MultiQuery(), nn.Tanh(), nn.Linear(32, 5)).eval(), torch.randn(24, 6, 8)
    result = fxa.abstract(net, x.split(8), keep={"1.heads": 16}, round_to=1, allocation="predicted",
                          replacement="affine", sites=["1.heads"])
    attn = result.module.get_submodule("1")
    assert attn.q.out_features == 16 and attn.k.out_features == attn.v.out_features == 8
    exact, change = _errors(net, result, x)
    assert exact <= TOL and change > 1e-3, (exact, change)


HF = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
      "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
      "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {})}


@pytest.mark.parametrize("arch,attn_implementation,replacement", [
    ("llama", "eager", "constant"), ("llama", "eager", "affine"), ("llama", "sdpa", "affine"),
    ("qwen3", "eager", "affine"), ("gemma3", "eager", "constant"), ("qwen2", "sdpa", "constant")])
def test_hf_gqa_heads_fold_exactly(arch, attn_implementation, replacement):
    """Hugging Face decoders through torch.export (4 query heads on 2 kv heads, rotary; Qwen2 has q/k/v
    biases; Qwen3 and Gemma3 add q/k RMSNorm over head_dim, Gemma3 a weightless v norm and (1 + w) weights)."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, extra = HF[arch]      # every one is in transformers >= 4.51 (the test extra's pin)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=100, use_cache=False, attn_implementation=attn_implementation, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    x = torch.randint(0, 100, (16, 12))
    result = fxa.abstract(model, [{"input_ids": b} for b in x.split(8)], keep=0.5, round_to=1,
                          allocation="predicted", replacement=replacement, sites=r".*self_attn\.heads")
    sites = result.report["sites"]
    assert len(sites) == 2 and all(s["group"] == 16 for s in sites), result.report["ineligible"]
    assert sum(len(s["kept"]) for s in sites) == 64, "keep 0.5 of the 128 head units"
    for i, site in enumerate(sites):
        attn = result.module.get_submodule(f"model.layers.{i}.self_attn")
        kv = {u // 32 for u in site["kept"]}                         # kv head of query head u // 16: u // 32
        assert attn.q_proj.out_features == len(site["kept"])
        assert attn.k_proj.out_features == attn.v_proj.out_features == 16 * len(kv)
    report = json.loads(json.dumps(result.report))
    with torch.no_grad():
        z = model(input_ids=x).logits
        with intervene(model, report):
            z_hooks = model(input_ids=x).logits
        out = result.module(input_ids=x)
    z_compiled = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    assert relative_error(z_hooks, z_compiled) <= TOL, "compiled vs hooks"
    assert relative_error(z, z_compiled) > 1e-3, "the compile must change the outputs"
