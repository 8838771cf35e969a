"""Attention heads in the forms users bring (issue 3, item 4): one fused qkv projection (timm's
reshape/permute/unbind, GPT-2's split or chunk) and F.scaled_dot_product_attention (is_causal, a
boolean attn_mask) in place of softmax(q k^T) v. Removing head j deletes rows [j dh, (j+1) dh) of each
third of the fused weight, rewrites the head counts and split sizes, and folds the replacement into
the output projection: the compiled module equals the original with the report's hooks (docs/math.md §1),
through torch.fx and torch.export, and exports to ONNX with parity.
"""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxabstract as fxa
from fxabstract.zoo import transformers as zt
from fxabstract.abstraction import capture_sites
from fxabstract.verify import intervene, relative_error

TOL = 1e-5
SITE = "blocks.0.attn.heads"


def _exact(model, result, x) -> float:
    report = json.loads(json.dumps(result.report))               # the hooks read the JSON alone
    with torch.no_grad(), intervene(model, report):
        z_hooks = model(x)
    with torch.no_grad():
        return relative_error(z_hooks, result.module(x))


def _no_fx(monkeypatch):
    """Make torch.fx fail so that capture falls back to torch.export (the path HF models take)."""
    def refuse(*args, **kwargs):
        raise RuntimeError("symbolic tracing disabled by the test")
    monkeypatch.setattr(torch.fx, "symbolic_trace", refuse)


def _model(form: str, sdpa: bool, causal: bool):
    torch.manual_seed(0)
    attention = partial(zt.FusedAttention, form=form, sdpa=sdpa)
    if causal:
        return zt.GPT(dim=64, depth=1, attention=attention).eval(), torch.randint(0, 64, (24, 32))
    return zt.ViT(dim=64, depth=1, attention=attention).eval(), torch.randn(24, 3, 32, 32)


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("form,sdpa,causal,replacement", [
    ("unbind", True, False, "affine"), ("unbind", False, True, "constant"),
    ("split", True, True, "constant"), ("split", False, False, "affine"),
    ("chunk", True, False, "constant"), ("chunk", False, True, "affine")])
def test_fused_qkv_heads_fold_exactly(form, sdpa, causal, replacement, front_end, monkeypatch):
    """Two of four heads removed from a fused Linear(64, 192): each third keeps the kept heads' rows,
    in order, and the compiled module equals the hooked original at two batch sizes."""
    model, x = _model(form, sdpa, causal)
    if front_end == "export":
        _no_fx(monkeypatch)
    result = fxa.abstract(model, x.split(8), keep={SITE: 32}, replacement=replacement, sites=[SITE],
                          allocation="predicted")
    site = result.report["sites"][0]
    assert site["group"] == 16 and site["consumers"] == ["blocks.0.attn.proj"], site
    assert [p["rows"] for p in site["producers"]] == [[128, 192], [0, 64], [64, 128]], "pieces: v, q, k thirds"
    assert {p["module"] for p in site["producers"]} == {"blocks.0.attn.qkv"}
    kept = sorted({u // 16 for u in site["kept"]})
    assert len(kept) == 2 and site["kept"] == [u for h in kept for u in range(16 * h, 16 * h + 16)]
    rows = [third * 64 + u for third in range(3) for u in site["kept"]]
    qkv = result.module.get_submodule("blocks.0.attn.qkv")
    assert torch.equal(qkv.weight, model.blocks[0].attn.qkv.weight[rows]), "each third keeps the kept heads' rows"
    assert torch.equal(qkv.bias, model.blocks[0].attn.qkv.bias[rows])
    assert _exact(model, result, x) <= TOL, f"{form}, sdpa={sdpa}: compiled vs hooks"
    assert _exact(model, result, x[:5]) <= TOL, "another batch size"


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_with_three_projections_folds_exactly(causal, front_end, monkeypatch):
    """SDPA over three Linears, with a boolean causal attn_mask (broadcast over heads) or none."""
    torch.manual_seed(0)
    attention = partial(zt.Attention, sdpa=True)
    model, x = (zt.GPT(depth=1, attention=attention).eval(), torch.randint(0, 64, (24, 32))) if causal else \
        (zt.ViT(depth=1, attention=attention).eval(), torch.randn(24, 3, 32, 32))
    if front_end == "export":
        _no_fx(monkeypatch)
    result = fxa.abstract(model, x.split(8), keep={SITE: 32}, replacement="affine", sites=[SITE],
                          allocation="predicted")
    for p in "qkv":
        assert result.module.get_submodule(f"blocks.0.attn.{p}").out_features == 32, f"{p} must keep 2 heads' rows"
    assert _exact(model, result, x) <= TOL, "SDPA: compiled vs hooks"


class IndexedQKV(nn.Module):
    """Older timm: `q, k, v = qkv[0], qkv[1], qkv[2]` (aten.select under torch.export), attention
    dropout as a module between softmax and @ v, the inferred head width (-1) in the view."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.drop, self.fc = nn.Dropout(0.1), nn.Linear(dim, 5)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = self.drop(((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(-1))
        return self.fc(self.proj((att @ v).transpose(1, 2).reshape(B, N, C)).mean(1))


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_indexed_fused_qkv_folds_exactly(front_end, monkeypatch):
    torch.manual_seed(0)
    model, x = IndexedQKV().eval(), torch.randn(24, 7, 32)
    if front_end == "export":
        _no_fx(monkeypatch)
    result = fxa.abstract(model, x.split(8), keep={"heads": 16}, replacement="affine", sites=["heads"],
                          allocation="predicted")
    assert result.module.get_submodule("qkv").out_features == 48, "2 of 4 heads kept in each third"
    assert _exact(model, result, x) <= TOL, "indexed qkv: compiled vs hooks"


@pytest.mark.parametrize("name,front_end", [("timm_vit", "fx"), ("gpt2", "fx"), ("gpt2", "export")])
def test_fused_models_compile_at_half_the_units_and_export_to_onnx(name, front_end, tmp_path, monkeypatch):
    """The whole model at keep 50% (heads and FFN neurons on one budget), then ONNX parity."""
    if front_end == "export":
        _no_fx(monkeypatch)
    torch.manual_seed(0)
    model = getattr(zt, name)().eval()
    x = torch.randn(24, 3, 32, 32) if name == "timm_vit" else torch.randint(0, 64, (24, 32))
    result = fxa.abstract(model, x.split(8), keep=0.5, round_to=1, replacement="affine", allocation="predicted")
    names = [s["name"] for s in result.report["sites"] if not s.get("stream")]
    assert names == ["blocks.0.attn.heads", "blocks.0.mlp.fc1", "blocks.1.attn.heads", "blocks.1.mlp.fc1"], names
    units = {s.get("stream") or s["name"]: (len(s["kept"]), s["units"]) for s in result.report["sites"]}
    kept, total = sum(k for k, _ in units.values()), sum(u for _, u in units.values())   # a stream counts once
    assert total in (640, 704), f"640 head and FFN units, and the 64 stream channels where found: {units}"
    assert abs(kept - total / 2) <= 8, f"keep 50% of {total} eligible units, within half a head: kept {kept}"
    assert _exact(model, result, x) <= TOL, f"{name}: compiled vs hooks"
    info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "m.onnx"))
    assert info["relative_diff"] <= 1e-4, f"{name}: ONNX parity {info['relative_diff']:.2e}"


# --------------------------------------------------------------------------- forms not matched

class PerHeadMask(nn.Module):
    """SDPA with an additive mask that differs per head (ALiBi-like): heads cannot be sliced out of it."""

    def __init__(self, dim=32, heads=4, tokens=8):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("bias", torch.randn(1, heads, tokens, tokens))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)).mean(1)


class Interleaved(nn.Module):
    """A fused qkv laid out per head ([B, T, h, 3, dh], GPT-NeoX style): a head's q rows are not one block."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, self.heads, 3, C // self.heads).permute(3, 0, 2, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)).mean(1)


class SizeOfPiece(nn.Module):
    """The head width computed from the size of q's piece (C' / h): it would change with the head count."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, t.size(2) // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)).mean(1)


class PerHeadScoreBias(nn.Module):
    """softmax(q k^T + b) v with a learned bias per head on the scores (relative-position style)."""

    def __init__(self, dim=32, heads=4, tokens=8):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(1, heads, tokens, tokens))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = [t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        att = (0.5 * (q @ k.transpose(-2, -1)) + self.rel).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, C)).mean(1)


@pytest.mark.parametrize("model,words", [
    (PerHeadMask(), ["attention mask `bias`", "differs per head"]),
    (PerHeadScoreBias(), ["`rel`", "per head"]),
    (Interleaved(), ["not one block of `qkv`"]),
    (SizeOfPiece(), ["is also read by", "size"]),
])
def test_unmatched_attention_is_ineligible_with_a_reason_naming_the_node(model, words):
    _, sites, ineligible = capture_sites(model.eval(), torch.randn(4, 8, 32))
    assert not [s for s in sites if s.name.endswith("heads")], "the attention must not be matched"
    assert "qkv" in ineligible, ineligible
    assert all(w in ineligible["qkv"] for w in words), ineligible["qkv"]
