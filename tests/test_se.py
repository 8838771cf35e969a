"""Squeeze-and-excitation (MobileNetV3, EfficientNet): the expansion channels x of an SE block are read
twice, by the excitation y = x * gate(fc2(act(fc1(pool(x))))) and by the squeeze pool(x). Unit j is one
site: expand row j (with its BatchNorm and depthwise channels), fc2's row j (its gate), fc1's input
column j and the projection's input column j. The report carries two replacements per site: the usual
one at the projection's input, and a "branches" entry for fc1's input (the squeeze, on the SE path only).
The compiled module equals the original with both applied by hooks (docs/math.md §1), under torch.fx and
torch.export, for constant and affine replacement; ONNX parity holds; what is not matched stays
ineligible with a reason naming the node.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxabstract as fxa
from fxabstract import zoo
from fxabstract.cost import unit_macs
from fxabstract.verify import relative_error
from fxabstract.zoo import kaiming_init, randomize_batch_norm

from test_architectures import TOL, _check_exact
from test_split import _front


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Block(nn.Module):
    """expand -> BN -> hardswish -> depthwise -> BN -> hardswish -> SE -> project -> BN, + shortcut."""

    def __init__(self, c: int, e: int):
        super().__init__()
        self.exp = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.Hardswish())
        self.se = SE(e)
        self.proj = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.proj(self.se(self.dw(self.exp(x))))


def tiny_se() -> nn.Module:
    """The two-block SE model of the issue."""
    torch.manual_seed(0)
    return randomize_batch_norm(kaiming_init(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), Block(16, 32), Block(16, 32),
                                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))))


class TorchvisionSE(nn.Module):
    """torchvision.ops.SqueezeExcitation's spelling: pooling as a module, `scale * input` (the gate first),
    in-place activations around it."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.avgpool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = nn.ReLU(inplace=True), nn.Hardsigmoid(inplace=True)

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.Hardswish(inplace=True))


class TorchvisionBlock(nn.Module):
    def __init__(self, c: int, e: int):
        super().__init__()
        self.block = nn.Sequential(_conv_bn(c, e, 1), _conv_bn(e, e, 3, groups=e), TorchvisionSE(e, e // 4),
                                   nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)))

    def forward(self, x):
        return x + self.block(x)


def torchvision_se() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norm(kaiming_init(nn.Sequential(_conv_bn(3, 16, 3, 2), TorchvisionBlock(16, 64),
                                                           TorchvisionBlock(16, 48), nn.AdaptiveAvgPool2d(1),
                                                           nn.Flatten(), nn.Linear(16, 10))))


MODELS = {"tiny_se": (tiny_se, (3, 16, 16)), "mobilenet_v3_small": (zoo.mobilenet_v3_small, (3, 32, 32)),
          "efficientnet_block": (zoo.efficientnet_block, (3, 32, 32)), "torchvision_se": (torchvision_se, (3, 32, 32))}
SE_SITES = {"tiny_se": ["1.exp.0", "2.exp.0"],
            "mobilenet_v3_small": ["features.0.0", "features.4.block.0.0", "features.5.block.0.0",
                                   "features.6.block.0.0"],
            "efficientnet_block": ["blocks.0.expand.0", "blocks.1.expand.0"],
            "torchvision_se": ["1.block.0.0", "2.block.0.0"]}


def _model(name: str, front_end: str):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model, prefix = _front(factory(), front_end)
    return model, prefix, torch.randn(32, *shape)


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_se_expansion_channels_fold_exactly(name, replacement, front_end):
    model, prefix, x = _model(name, front_end)
    result = fxa.abstract(model, x.split(16), keep=0.5, round_to=1, replacement=replacement, allocation="predicted")
    sites = {s["name"]: s for s in result.report["sites"]}
    for se in SE_SITES[name]:
        site = sites.get(prefix + se)
        assert site is not None, f"{name}: the SE expansion {se} must be a site ({result.report['ineligible']})"
        assert len(site["branches"]) == 1, f"{name}: site {se} must carry its SE squeeze as a branch"
        branch = site["branches"][0]
        assert [r["unit"] for r in branch["replaced"]] == [r["unit"] for r in site["replaced"]], \
            "the squeeze replaces the same units as the site"
    assert result.report["parameters"]["after"] < result.report["parameters"]["before"], "the network must shrink"
    with torch.no_grad():
        moved = relative_error(model(x), result.module(x))
    assert moved > 1e-3, f"{name}: the replacements must change the outputs (else exactness checks a constant)"
    for batch in (x, x[:3]):
        err = _check_exact(model, result, batch)
        assert err <= TOL, f"{name} ({replacement}, {front_end}): compiled vs hooks relative error {err:.2e}"


def test_the_hooks_apply_the_squeeze_replacement():
    """`intervene` applies the branch's own replacement at fc1: other constants there change the output
    (and the compiled module, which folded the report's constants, no longer matches)."""
    model, _, x = _model("tiny_se", "fx")
    result = fxa.abstract(model, x.split(16), keep=0.5, round_to=1, replacement="constant", allocation="predicted")
    assert _check_exact(model, result, x) <= TOL
    for site in result.report["sites"]:
        for branch in site.get("branches", []):
            for r in branch["replaced"]:
                r["constant"] += 10.0
    assert _check_exact(model, result, x) > 1e-3, "the squeeze's constants must reach fc1 through the hooks"


def test_se_site_deletes_every_reader_of_the_unit():
    """Unit j leaves expand row j, its BatchNorms and depthwise channel, fc2's row j, fc1's column j and
    the projection's column j; the gate view takes the kept width."""
    model, _, x = _model("efficientnet_block", "fx")
    result = fxa.abstract(model, x.split(16), keep={"blocks.0.expand.0": 24, "blocks.1.expand.0": 40},
                          round_to=1, replacement="affine")
    get = result.module.get_submodule
    for b, k in ((0, 24), (1, 40)):
        assert get(f"blocks.{b}.expand.0").out_channels == get(f"blocks.{b}.expand.1").num_features == k, \
            "expand rows and BatchNorm channels"
        dw = get(f"blocks.{b}.dw.0")
        assert dw.in_channels == dw.out_channels == dw.groups == k, "depthwise channels"
        assert get(f"blocks.{b}.fc2").out_features == k, "fc2 rows (the gates)"
        assert get(f"blocks.{b}.fc1").in_features == k, "fc1 columns (the squeeze)"
        assert get(f"blocks.{b}.project.0").in_channels == k, "projection columns"
    assert _check_exact(model, result, x[:5]) <= TOL


def test_se_units_cost_counts_the_squeeze():
    model, _, x = _model("tiny_se", "fx")
    from fxabstract.abstraction import capture_sites
    from fxabstract.cost import module_macs
    gm, sites, _ = capture_sites(model, x[:2])
    site = next(s for s in sites if s.name == "1.exp.0")
    macs = module_macs(gm, x[:1])
    assert float(unit_macs(site, macs).sum()) == pytest.approx(sum(
        macs[m] for m in ["1.exp.0", "1.dw.0", "1.se.fc2", "1.se.fc1", "1.proj.0"])), \
        "a unit's MACs: producer rows, depthwise channel, gate row, squeeze and projection columns"


@pytest.mark.parametrize("name,front_end", [("mobilenet_v3_small", "fx"), ("efficientnet_block", "fx"),
                                             ("efficientnet_block", "export")])
def test_se_models_export_to_onnx_with_parity(name, front_end, tmp_path):
    model, _, x = _model(name, front_end)
    result = fxa.abstract(model, x.split(16), keep=0.5, round_to=1, replacement="affine", allocation="predicted")
    info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "m.onnx"))
    assert info["relative_diff"] <= 1e-4, f"{name}: onnxruntime differs from torch by {info['relative_diff']:.2e}"


class _SELayers(nn.Module):
    """expand, SE fc1/fc2, projection and head of the unmatched-SE models below."""

    def __init__(self):
        super().__init__()
        self.exp, self.fc1, self.fc2 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.proj, self.head = nn.Conv2d(16, 8, 1), nn.Linear(8, 5)


class GateReadTwice(_SELayers):
    """The gate is also read by something else (a sum over it added to the output)."""

    def forward(self, x):
        h = F.relu(self.exp(x))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        y = self.proj(h * g).mean((2, 3)) + g.mean((2, 3)).sum(1, keepdim=True)
        return self.head(y)


class SqueezeReadTwice(_SELayers):
    """The squeeze is read by fc1 and by the head: not an affine-only reading."""

    def forward(self, x):
        h = F.relu(self.exp(x))
        s = F.adaptive_avg_pool2d(h, 1)
        y = self.proj(h * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))).mean((2, 3))
        return self.head(y) + s.flatten(1).sum(1, keepdim=True)


class ResidualSE(nn.Module):
    """SE on a residual stream: the gated value is x + conv(x), not a producer's path."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1)
        self.fc1, self.fc2, self.proj = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1), nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.conv(F.relu(h))
        y = self.proj(h * torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True))))))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("cls,producer,words", [
    (GateReadTwice, "exp", ["gated", "mul", "sigmoid"]),
    (GateReadTwice, "fc2", ["mul", "mean_1"]),
    (SqueezeReadTwice, "exp", ["SE branch", "adaptive_avg_pool2d"]),
    (ResidualSE, "stem", ["residual stream", "relu"]),
])
def test_unmatched_se_shapes_stay_ineligible_with_a_reason(cls, producer, words):
    torch.manual_seed(0)
    model = cls().eval()
    gm_sites = fxa.analyse(model, torch.randn(16, 3, 8, 8).split(8))
    assert producer not in {s.producer for s in gm_sites.sites}, f"{producer} must not be a site"
    reason = gm_sites.ineligible[producer]
    assert all(w in reason for w in words), f"{producer}: the reason must name {words}, got: {reason}"


@st.composite
def se_nets(draw):
    """A random stack of SE blocks: widths, activations, gate, squeeze form (conv on the pool, Linear on the
    flattened pool or spatial mean), optional residual and BatchNorm."""
    c, blocks = 8, []
    for _ in range(draw(st.integers(1, 2))):
        e = draw(st.sampled_from([8, 12, 16]))
        blocks.append(RandomSEBlock(c, e, draw(st.sampled_from(["conv", "flatten", "mean"])),
                                    draw(st.sampled_from([nn.Hardsigmoid, nn.Sigmoid])),
                                    draw(st.sampled_from([nn.ReLU, nn.Hardswish, nn.SiLU])), draw(st.booleans())))
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(c, 5))
    seed = draw(st.integers(0, 2**16))
    return randomize_batch_norm(kaiming_init(model, seed), seed)


class RandomSEBlock(nn.Module):
    def __init__(self, c: int, e: int, form: str, gate, act, residual: bool):
        super().__init__()
        self.form, self.residual, self.e = form, residual, e
        self.exp = nn.Sequential(nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), act())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e), act())
        linear = form != "conv"
        self.fc1 = nn.Linear(e, 4) if linear else nn.Conv2d(e, 4, 1)
        self.fc2 = nn.Linear(4, e) if linear else nn.Conv2d(4, e, 1)
        self.gate, self.proj = gate(), nn.Conv2d(e, c, 1)

    def forward(self, x):
        h = self.dw(self.exp(x))
        if self.form == "conv":
            g = self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        elif self.form == "flatten":
            g = self.gate(self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)))))
            g = g.view(-1, self.e, 1, 1)
        else:
            g = self.gate(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))[:, :, None, None]
        y = self.proj(h * g)
        return x + y if self.residual else y


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=se_nets(), replacement=st.sampled_from(["constant", "affine"]), keep=st.sampled_from([0.3, 0.6]))
def test_random_se_nets_compile_exactly(model, replacement, keep):
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = fxa.abstract(model, x.split(8), keep=keep, replacement=replacement, round_to=1, allocation="predicted")
    assert any(s.get("branches") for s in result.report["sites"]), "every SE block's expansion is a site"
    err = _check_exact(model, result, x)
    assert err <= TOL, f"compiled vs hooks: relative error {err:.2e}\n{model}\n{result.summary()}"
