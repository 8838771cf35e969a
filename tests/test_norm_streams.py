"""Residual streams read by LayerNorm and RMSNorm (pre-norm transformers): the hidden size is a site.

The compiled normaliser computes its statistics over the kept channels and the replacement values,
and its readers take the removed channels' normalised values as one or two extra features, so the
compiled module equals the original with the report's interventions applied as hooks (at the
normalisers' inputs) to float precision."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxabstract as fxa
from fxabstract.zoo import transformers as zt
from fxabstract.cost import module_macs
from fxabstract.passes.norms import StreamNorm
from fxabstract.verify import intervene, relative_error


def hooked_error(model, result, *x) -> float:
    report = json.loads(json.dumps(result.report))
    with torch.no_grad(), intervene(model, report):
        hooked = model(*x)
    with torch.no_grad():
        return float(relative_error(hooked, result.module(*x)))


def stream_points(report) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in report["sites"]:
        if s.get("stream"):
            out.setdefault(s["stream"], []).append(s)
    return out


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d)
    if kind == "layernorm-no-bias":
        return nn.LayerNorm(d, bias=False)
    if kind == "layernorm-no-affine":
        return nn.LayerNorm(d, elementwise_affine=False)
    return nn.RMSNorm(d, eps=1e-6)


class PreNormMLP(nn.Module):
    """x0 = inp(x) on [B, T, features]; x_t = x_(t-1) + fc2(gelu(fc1(norm_t(x_(t-1))))); head(norm(x_T))."""

    def __init__(self, d_in: int, d: int, hidden: list[int], kind: str):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norms = nn.ModuleList(make_norm(kind, d) for _ in hidden)
        self.fc1 = nn.ModuleList(nn.Linear(d, h) for h in hidden)
        self.fc2 = nn.ModuleList(nn.Linear(h, d) for h in hidden)
        self.norm, self.head = make_norm(kind, d), nn.Linear(d, 5)

    def forward(self, x):
        h = self.inp(x)
        for norm, a, b in zip(self.norms, self.fc1, self.fc2):
            h = h + b(torch.nn.functional.gelu(a(norm(h))))
        return self.head(self.norm(h))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-like normaliser weights (not the ones and zeros of initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "layernorm-no-bias", "layernorm-no-affine"])
@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_a_pre_norm_stream_compiles_exactly_and_shrinks_the_hidden_size(kind, replacement):
    torch.manual_seed(0)
    model = randomize_norms(PreNormMLP(6, 24, [32, 32], kind)).eval()
    x = torch.randn(48, 5, 6) + 0.5
    result = fxa.abstract(model, x.split(16), keep={"inp.stream": 16}, replacement=replacement, round_to=1)
    points = stream_points(result.report)["inp.stream"]
    assert len(points) == 3 and all(len(p["kept"]) == 16 for p in points), "three points keep 16 of 24"
    assert all(p["norms"] for p in points), f"every point is read by a normaliser: {points}"
    assert result.module.get_submodule("inp").out_features == 16, "the hidden size itself shrinks"
    assert result.module.get_submodule("fc2.0").out_features == 16
    assert isinstance(result.module.get_submodule("norm"), StreamNorm)
    extra = 1 if kind == "rmsnorm" else 2
    assert result.module.get_submodule("head").in_features == 16 + extra, "one or two per-position features"
    err = hooked_error(model, result, torch.randn(7, 9, 6))      # another sequence length
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}"


def test_the_gpt_hidden_size_is_a_site_with_embeddings_heads_and_ffns():
    torch.manual_seed(0)
    model = randomize_norms(zt.GPT(vocab=40, dim=32, depth=2, heads=4, context=16)).eval()
    ids = torch.randint(0, 40, (32, 12))
    for replacement in ("constant", "affine"):
        result = fxa.abstract(model, ids.split(16), keep=0.6, replacement=replacement, round_to=1)
        points = stream_points(result.report)
        assert len(points) == 1, f"one stream through the decoder: {sorted(points)}"
        (name, ps), = points.items()
        kept = len(ps[0]["kept"])
        writers = {q["module"] for p in ps for q in p["producers"]}
        assert {"tok", "pos", "blocks.0.attn.proj", "blocks.0.mlp.fc2"} <= writers, writers
        names = [s["name"] for s in result.report["sites"]]
        assert any("mlp.fc1" in n for n in names) and any("attn" in n for n in names), names
        err = hooked_error(model, result, torch.randint(0, 40, (5, 9)))
        assert err <= 1e-5, f"{replacement}: compiled vs hooks {err:.2e}"
        if kept < 32:
            assert result.module.get_submodule("tok").embedding_dim == kept


def test_a_hidden_size_reduced_by_a_quarter_exports_to_onnx_with_parity(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(zt.GPT(vocab=40, dim=32, depth=2, heads=4, context=16)).eval()
    ids = torch.randint(0, 40, (32, 12))
    analysis = fxa.analyse(model, ids.split(16))
    stream = next(s.tie for s in analysis.sites if s.tie)
    result = analysis.compile(keep={stream: 24}, replacement="affine", round_to=1)
    assert result.module.get_submodule("tok").embedding_dim == 24
    info = fxa.to_onnx(result.module, ids[:4], str(tmp_path / "gpt.onnx"))     # raises without parity
    assert info["max_abs_diff"] <= 1e-4


def test_an_affine_normaliser_counts_its_macs():
    torch.manual_seed(0)
    model = randomize_norms(PreNormMLP(6, 24, [32], "layernorm")).eval()
    x = torch.randn(32, 4, 6)
    constant = fxa.abstract(model, x.split(16), keep={"inp.stream": 16}, round_to=1)
    affine = fxa.abstract(model, x.split(16), keep={"inp.stream": 16}, replacement="affine", round_to=1)
    macs_c, macs_a = module_macs(constant.module, x[:2]), module_macs(affine.module, x[:2])
    assert "norm" not in macs_c or macs_c["norm"] == 0
    assert macs_a["norm"] == 4 * 8 * 16, f"4 positions x 8 rebuilt channels x 16 kept: {macs_a.get('norm')}"


def test_a_normaliser_read_by_something_else_refuses_the_stream_with_the_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.norm, self.fc1, self.fc2, self.head = (nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 32),
                                                                  nn.Linear(32, 16), nn.Linear(16, 3))

        def forward(self, x):
            h = self.inp(x)
            h = h + self.fc2(torch.relu(self.fc1(torch.tanh(self.norm(h)))))
            return self.head(h)

    result = fxa.abstract(Odd().eval(), [torch.randn(32, 6)], keep=0.5, round_to=1)
    assert [s["name"] for s in result.report["sites"]] == ["fc1"]
    reason = result.report["ineligible"]["inp"]
    assert reason.startswith("residual stream:") and "normaliser `norm`" in reason and "tanh" in reason, reason


@st.composite
def pre_norm_models(draw):
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    kind = draw(st.sampled_from(["layernorm", "rmsnorm", "layernorm-no-affine"]))
    d = draw(st.integers(4, 16))
    model = PreNormMLP(draw(st.integers(2, 6)), d, draw(st.lists(st.integers(2, 12), min_size=1, max_size=3)), kind)
    return randomize_norms(model, seed).eval(), torch.randn(32, draw(st.integers(1, 4)), model.inp.in_features)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=pre_norm_models(), replacement=st.sampled_from(["constant", "affine"]),
       selection=st.sampled_from(["joint", "diagonal"]), keep=st.sampled_from([0.3, 0.5, 0.8]))
def test_random_pre_norm_networks_compile_exactly(case, replacement, selection, keep):
    model, x = case
    result = fxa.abstract(model, x.split(16), keep=keep, replacement=replacement, selection=selection, round_to=1,
                          allocation="predicted")
    assert stream_points(result.report), "every model here has a normalised stream"
    err = hooked_error(model, result, x[:7])
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}\n{model}\n{result.summary()}"


def randomize_written_out_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_a_written_out_rmsnorm_reads_the_llama_stream_exactly(replacement):
    """Llama code writes RMSNorm out (x * rsqrt(mean(x^2) + eps) * w): capture makes it an nn.RMSNorm,
    so the decoder's hidden size is a site and the compiled module equals the hooked original."""
    torch.manual_seed(0)
    model = randomize_written_out_norms(zt.Llama(vocab=40, dim=32, depth=2, heads=4, kv_heads=2, context=16)).eval()
    ids = torch.randint(0, 40, (32, 12))
    analysis = fxa.analyse(model, ids.split(16))
    streams = {s.tie for s in analysis.sites if s.tie}
    assert streams == {"tok.stream"}, f"one stream from the token embedding: {streams}"
    result = analysis.compile(keep={"tok.stream": 24}, replacement=replacement, round_to=1)
    points = stream_points(result.report)["tok.stream"]
    norms = {n for p in points for n in p["norms"]}
    assert {"blocks.0.attn_norm", "blocks.0.ffn_norm", "norm"} <= norms, norms
    assert result.module.get_submodule("tok").embedding_dim == 24
    assert isinstance(result.module.get_submodule("norm"), StreamNorm)
    err = hooked_error(model, result, torch.randint(0, 40, (5, 9)))
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}"


class CastNorm(nn.Module):
    """Hugging Face's RMSNorm: an upcast to float32, the statistics, a cast back, then the weight."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


class CastDecoder(nn.Module):
    """Token and position embeddings (the position one [1, T, d], broadcast over the batch), a cast, and
    pre-norm FFN blocks with CastNorm."""

    def __init__(self, vocab: int = 30, d: int = 16, depth: int = 2, dtype=torch.float32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.norms = nn.ModuleList(CastNorm(d) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(d, 24) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(24, d) for _ in range(depth))
        self.norm, self.head = CastNorm(d), nn.Linear(d, vocab)
        self.to(dtype)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = self.tok(ids) + self.pos(positions).to(self.tok.weight.dtype)
        for norm, a, b in zip(self.norms, self.fc1, self.fc2):
            h = h + b(torch.nn.functional.silu(a(norm(h))))
        return self.head(self.norm(h))


def test_casts_and_a_broadcast_position_embedding_stay_in_the_stream():
    torch.manual_seed(0)
    model = CastDecoder().eval()
    ids = torch.randint(0, 30, (32, 10))
    analysis = fxa.analyse(model, ids.split(16))
    stream = next((s.tie for s in analysis.sites if s.tie), None)
    assert stream is not None, f"no stream site: {analysis.ineligible}"
    writers = {p.module for s in analysis.sites if s.tie == stream for p in s.pieces}
    assert {"tok", "pos", "fc2.0", "fc2.1"} <= writers, writers
    for replacement in ("constant", "affine"):
        result = analysis.compile(keep={stream: 12}, replacement=replacement, round_to=1)
        assert result.module.get_submodule("pos").embedding_dim == 12
        err = hooked_error(model, result, torch.randint(0, 30, (3, 7)))
        assert err <= 1e-5, f"{replacement}: compiled vs hooks {err:.2e}"


def test_an_rmsnorm_that_upcasts_is_not_taken_for_an_nn_rmsnorm():
    """In a float64 model, CastNorm computes in float32: nn.RMSNorm would not, so capture leaves it
    written out and the stream is refused with the reason."""
    torch.manual_seed(0)
    model = CastDecoder(dtype=torch.float64).eval()
    analysis = fxa.analyse(model, [torch.randint(0, 30, (16, 10))])
    assert not any(s.tie for s in analysis.sites)
    assert not any(isinstance(m, nn.RMSNorm) for m in analysis.gm.modules())
    assert analysis.ineligible["tok"].startswith("residual stream:"), analysis.ineligible["tok"]
