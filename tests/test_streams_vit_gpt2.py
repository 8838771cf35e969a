"""The zoo's GPT-2 and ViT streams as sites.

GPT-2 code reads the stream's width (`B, T, C = x.shape`, C sizing the qkv split, `C // heads` and the
merge view): the compiled graph reads the original width as a constant there. ViT's stream starts with a
class token concatenated to the patch embedding and a position embedding stored as Parameters: their
slices along the channels are writers. Either way the compiled module equals the original with the
report's interventions applied as hooks, and shrinks."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.passes.norms import StreamNorm
from fxabstract.zoo import transformers as zt
from test_norm_streams import hooked_error, randomize_norms, stream_points


def small_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(zt.gpt2(vocab=64, dim=32, depth=2, heads=4, context=16)).eval()


def last_axis_size_reads(gm) -> list[str]:
    """The nodes of gm that index the last axis of a `x.shape` of a [B, T, d] value (`C` of `B, T, C = x.shape`)."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].target is getattr and n.args[1] in (2, -1)]


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_gpt2_reads_the_original_width_as_a_constant_and_its_stream_compiles_exactly(replacement):
    model = small_gpt2()
    ids = torch.randint(0, 64, (32, 12))
    analysis = fxa.analyse(model, ids.split(16))
    assert {s.tie for s in analysis.sites if s.tie} == {"tok.stream"}, analysis.ineligible
    assert "tok" not in analysis.ineligible
    result = analysis.compile(keep={"tok.stream": 16}, replacement=replacement, round_to=1)
    points = stream_points(result.report)["tok.stream"]
    assert len(points) == 5 and all(len(p["kept"]) == 16 for p in points), [len(p["kept"]) for p in points]
    m = result.module
    assert m.get_submodule("tok").embedding_dim == 16 and m.get_submodule("pos").embedding_dim == 16
    qkv = m.get_submodule("blocks.0.attn.qkv")
    assert (qkv.in_features, qkv.out_features) == (18, 96), "reads 16 kept channels + 2 features, writes 3 d"
    assert m.get_submodule("blocks.1.attn.proj").out_features == 16
    assert last_axis_size_reads(m) == [], f"C is a constant in the compiled graph: {m.code}"
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in m.parameters()) < before
    err = hooked_error(model, result, torch.randint(0, 64, (5, 9)))      # B and T stay dynamic
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}"


def test_gpt2_with_its_stream_and_heads_reduced_exports_to_onnx_with_parity(tmp_path):
    model = small_gpt2()
    ids = torch.randint(0, 64, (32, 12))
    analysis = fxa.analyse(model, ids.split(16))
    result = analysis.compile(keep={"tok.stream": 24, "blocks.0.attn.heads": 16}, replacement="affine", round_to=1)
    assert result.module.get_submodule("blocks.0.attn.qkv").out_features == 48
    assert result.module.get_submodule("tok").embedding_dim == 24
    assert hooked_error(model, result, torch.randint(0, 64, (3, 7))) <= 1e-5
    info = fxa.to_onnx(result.module, ids[:4], str(tmp_path / "gpt2.onnx"))      # raises without parity
    assert info["max_abs_diff"] <= 1e-4


class WidthReads(nn.Module):
    """A pre-norm block that reads the stream's width at a point (`h.size(-1)`) and on its normaliser's
    output (`B, T, _ = n.size()`, `n.shape[-1]`), each sizing a view of the FFN's hidden layer."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp, self.norm, self.fc1 = nn.Linear(6, d), nn.LayerNorm(d), nn.Linear(d, 4 * d)
        self.fc2, self.norm2, self.head = nn.Linear(4 * d, d), nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        C = h.size(-1)
        n = self.norm(h)
        B, T, _ = n.size()
        a = self.fc1(n).view(B, T, 2, 2 * C).relu().flatten(2)
        h = h + self.fc2(a.view(B, T, 4, n.shape[-1]).flatten(2))
        return self.head(self.norm2(h))


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_width_reads_at_a_point_and_on_a_normaliser_become_the_original_width(replacement):
    torch.manual_seed(0)
    model = randomize_norms(WidthReads()).eval()
    x = torch.randn(32, 5, 6)
    result = fxa.abstract(model, x.split(16), keep={"inp.stream": 8}, replacement=replacement, round_to=1)
    assert [len(p["kept"]) for p in stream_points(result.report)["inp.stream"]] == [8, 8]
    assert result.module.get_submodule("inp").out_features == 8
    assert isinstance(result.module.get_submodule("norm"), StreamNorm)
    err = hooked_error(model, result, torch.randn(4, 7, 6))
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}"


class WholeShape(WidthReads):
    """Uses a normaliser output's shape with the width inside, as a tuple: `torch.ones(n.shape[1:])`."""

    def forward(self, x):
        h = self.inp(x)
        n = self.norm(h)
        h = h + self.fc2(torch.relu(self.fc1(n)))
        return self.head(self.norm2(h)) + torch.ones(n.shape[1:]).sum()


def test_a_shape_used_whole_with_the_width_inside_refuses_the_stream_with_the_reason():
    torch.manual_seed(0)
    result = fxa.abstract(WholeShape().eval(), [torch.randn(16, 5, 6)], keep=0.5, round_to=1)
    assert not stream_points(result.report)
    reason = result.report["ineligible"]["inp"]
    assert reason.startswith("residual stream:") and "shape of `norm`" in reason, reason
    assert "could not be rewritten to the original width" in reason, reason


def small_vit(ctor) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_norms(ctor(image=16, patch=4, dim=32)).eval()
    with torch.no_grad():
        model.cls.normal_()                    # a trained class token, not the zeros of initialisation
    return model


@pytest.mark.parametrize("ctor", [zt.ViT, zt.timm_vit], ids=["vit", "timm_vit"])
@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_vit_patch_class_token_and_position_embedding_write_one_stream(ctor, replacement):
    model = small_vit(ctor)
    x = torch.randn(32, 3, 16, 16)
    analysis = fxa.analyse(model, x.split(16))
    assert {s.tie for s in analysis.sites if s.tie} == {"patch.stream"}, analysis.ineligible
    first = next(s for s in analysis.sites if s.name == "patch.stream.0")
    assert [q.module for q in first.pieces] == ["patch", "cls", "pos"]
    assert "norm" in next(s for s in analysis.sites if s.name == "patch.stream.4").norms, "the head reads norm(x)[:, 0]"
    result = analysis.compile(keep={"patch.stream": 16}, replacement=replacement, round_to=1)
    points = stream_points(result.report)["patch.stream"]
    assert len(points) == 5 and all(len(p["kept"]) == 16 for p in points), [len(p["kept"]) for p in points]
    m = result.module
    assert m.get_submodule("patch").out_channels == 16
    assert tuple(m.cls.shape) == (1, 1, 16) and tuple(m.pos.shape) == (1, 17, 16)
    assert m.get_submodule("head").in_features == 18 and isinstance(m.get_submodule("norm"), StreamNorm)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in model.parameters())
    assert model.cls.shape[-1] == 32 and model.patch.out_channels == 32, "the user's model is untouched"
    err = hooked_error(model, result, torch.randn(5, 3, 16, 16))
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}"


def test_a_vit_with_a_reduced_stream_exports_to_onnx_with_parity(tmp_path):
    model = small_vit(zt.timm_vit)
    x = torch.randn(32, 3, 16, 16)
    result = fxa.abstract(model, x.split(16), keep={"patch.stream": 24}, replacement="affine", round_to=1)
    assert result.module.get_submodule("patch").out_channels == 24
    info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "vit.onnx"))      # raises without parity
    assert info["max_abs_diff"] <= 1e-4


class SpelledClassToken(zt.ViT):
    """A ViT whose class token is expanded with its width spelled out (`expand(B, 1, 32)`)."""

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.size(0), 1, 32), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_a_class_token_expanded_to_a_spelled_width_refuses_the_stream_with_the_reason():
    torch.manual_seed(0)
    result = fxa.abstract(SpelledClassToken(image=16, patch=4, dim=32).eval(), [torch.randn(16, 3, 16, 16)],
                          keep=0.5, round_to=1)
    assert not stream_points(result.report)
    reason = result.report["ineligible"]["blocks.0.mlp.fc2"]
    assert reason.startswith("residual stream:") and "concatenates `expand`" in reason, reason


@pytest.mark.parametrize("options", [dict(score="cwvar"), dict(selection="local", replacement="affine")],
                         ids=["cwvar", "local"])
def test_consumer_weight_scores_read_a_normalised_stream_through_the_normalisers_readers(options):
    """cwvar and layer-local selection weigh a unit by its consumers' columns: a stream normaliser's are its
    Linear readers' W diag(gamma)."""
    model = small_vit(zt.ViT)
    x = torch.randn(32, 3, 16, 16)
    result = fxa.abstract(model, x.split(16), keep=0.5, round_to=1, **options)
    assert stream_points(result.report)["patch.stream"]
    assert hooked_error(model, result, x[:5]) <= 1e-5
