"""Residual streams as sites: the channels tied through a chain of adds lose the same units at every
point (every writer's row, every reader's column), and the compiled module equals the original with
the report's interventions applied as hooks at every point's readers."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import fxabstract as fxa
from fxabstract import zoo
from fxabstract.cost import module_macs
from fxabstract.errors import ConfigError
from fxabstract.verify import intervene, relative_error


def hooked_error(model, result, x) -> float:
    report = json.loads(json.dumps(result.report))
    with torch.no_grad(), intervene(model, report):
        hooked = model(x)
    with torch.no_grad():
        return float(relative_error(hooked, result.module(x)))


def streams(report) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in report["sites"]:
        if s.get("stream"):
            out.setdefault(s["stream"], []).append(s)
    return out


def cifar_resnet() -> nn.Module:
    return zoo.randomize_batch_norm(zoo.kaiming_init(zoo.cifar_resnet())).eval()


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("selection", ["joint", "diagonal"])
def test_cifar_resnet_streams_compile_exactly_and_shrink(replacement, selection):
    torch.manual_seed(0)
    model = cifar_resnet()
    x = torch.randn(32, 3, 16, 16)
    result = fxa.abstract(model, x.split(8), keep=0.5, replacement=replacement, selection=selection, round_to=1,
                          allocation="predicted")
    found = streams(result.report)
    assert len(found) >= 3, f"one stream per stage, found {sorted(found)}"
    for name, points in found.items():
        assert len({tuple(p["kept"]) for p in points}) == 1, f"{name}: every point keeps the same channels"
    assert any(len(p[0]["kept"]) < p[0]["units"] for p in found.values()), "some stream must lose channels"
    stem = result.module.get_submodule("conv1")
    first = next(p for p in found.values() if "conv1" in [q["module"] for q in p[0]["producers"]])
    assert stem.out_channels == len(first[0]["kept"])
    err = hooked_error(model, result, torch.randn(6, 3, 16, 16))
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}"


def test_a_compiled_stream_exports_to_onnx_with_parity(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet()
    x = torch.randn(16, 3, 16, 16)
    result = fxa.abstract(model, x.split(8), keep=0.5, replacement="affine", round_to=1)
    assert streams(result.report)
    info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "resnet.onnx"))      # raises without parity
    assert info["max_abs_diff"] <= 1e-4


def test_streams_enter_the_macs_budget_and_the_compiled_macs_match():
    torch.manual_seed(0)
    model = cifar_resnet()
    x = torch.randn(32, 3, 16, 16)
    result = fxa.abstract(model, x.split(8), keep=0.6, budget="macs", round_to=1, allocation="predicted")
    assert result.report["macs"]["after"] < result.report["macs"]["before"]
    assert module_macs(result.module, x[:2]) and hooked_error(model, result, x[:5]) <= 1e-5


def test_keep_counts_a_stream_once_by_its_name():
    torch.manual_seed(0)
    model = cifar_resnet()
    x = torch.randn(16, 3, 16, 16)
    analysis = fxa.analyse(model, x.split(8))
    ties = sorted({s.tie for s in analysis.sites if s.tie})
    assert ties, "the CIFAR ResNet has residual streams"
    result = analysis.compile(keep={ties[0]: 8}, round_to=1)
    for point in streams(result.report)[ties[0]]:
        assert len(point["kept"]) == 8
    points = [s.name for s in analysis.sites if s.tie == ties[0]]
    with pytest.raises(ConfigError, match="stream"):
        fxa.abstract(model, x.split(8), keep=0.5, sites=[points[0]], round_to=1)


class ResidualMLP(nn.Module):
    """A residual MLP on features: x0 = inp(x); x_t = x_(t-1) + fc2(relu(fc1(x_(t-1)))); head(relu(x_T))."""

    def __init__(self, d_in: int, width: int, hidden: list[int], post_relu: bool):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.fc1 = nn.ModuleList(nn.Linear(width, h) for h in hidden)
        self.fc2 = nn.ModuleList(nn.Linear(h, width) for h in hidden)
        self.head = nn.Linear(width, 3)
        self.post_relu = post_relu

    def forward(self, x):
        h = self.inp(x)
        for a, b in zip(self.fc1, self.fc2):
            h = h + b(torch.relu(a(h)))
            if self.post_relu:
                h = torch.relu(h)
        return self.head(h)


class ResidualConv(nn.Module):
    """Conv stages: a stem, identity blocks, a projection block (stride 2) per later stage."""

    def __init__(self, widths: list[int], blocks: int, pad: bool):
        super().__init__()
        p = 1 if pad else 0
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            stage = nn.ModuleList()
            for b in range(blocks):
                stride = 2 if i > 0 and b == 0 else 1
                stage.append(nn.ModuleDict({
                    "conv1": nn.Conv2d(c, w, 3, stride=stride, padding=1), "bn1": nn.BatchNorm2d(w),
                    "conv2": nn.Conv2d(w, w, 3 if pad else 1, padding=p), "bn2": nn.BatchNorm2d(w),
                    **({"down": nn.Conv2d(c, w, 1, stride=stride)} if stride > 1 or c != w else {})}))
                c = w
            self.stages.append(stage)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        h = self.stem(x)
        for stage in self.stages:
            for blk in stage:
                y = blk["bn2"](blk["conv2"](torch.relu(blk["bn1"](blk["conv1"](h)))))
                h = torch.relu(y + (blk["down"](h) if "down" in blk else h))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


@st.composite
def residual_models(draw):
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        model = ResidualMLP(draw(st.integers(3, 8)), draw(st.integers(4, 16)),
                            draw(st.lists(st.integers(2, 12), min_size=1, max_size=3)), draw(st.booleans()))
        x = torch.randn(48, model.inp.in_features)
    else:
        widths = draw(st.lists(st.integers(3, 10), min_size=1, max_size=2))
        model = ResidualConv(widths, draw(st.integers(1, 2)), draw(st.booleans()))
        x = torch.randn(24, 3, 8, 8)
    return zoo.randomize_batch_norm(model, seed=seed).eval(), x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=residual_models(), replacement=st.sampled_from(["constant", "affine"]),
       selection=st.sampled_from(["joint", "diagonal"]), keep=st.sampled_from([0.3, 0.5, 0.8]))
def test_random_residual_networks_compile_exactly(case, replacement, selection, keep):
    model, x = case
    result = fxa.abstract(model, x.split(x.shape[0] // 2), keep=keep, replacement=replacement, selection=selection,
                          round_to=1, allocation="predicted")
    assert streams(result.report), "every residual model here has a stream"
    err = hooked_error(model, result, x[:7])
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}\n{model}\n{result.summary()}"
