"""Grouped convolutions (ResNeXt): channels go the same number from every group, so a grouped conv stays
grouped; a replaced channel read by a grouped conv is replaced within its group; the fold is exact."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract import zoo
from fxabstract.errors import ConfigError
from fxabstract.verify import intervene, relative_error


def resnext() -> nn.Module:
    torch.manual_seed(0)
    return zoo.randomize_batch_norm(zoo.kaiming_init(zoo.ResNeXt())).eval()


class GroupedStack1d(nn.Module):
    """Conv1d: a dense producer read by a grouped conv (groups=4, zero padding: bias maps), whose output
    is read by a dense 1x1 conv and, through a flatten, a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 24, 3, padding=1)
        self.b = nn.Conv1d(24, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm1d(16)
        self.c = nn.Conv1d(16, 6, 1)
        self.head = nn.Linear(6 * 10, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.b(torch.relu(self.a(x)))))
        return self.head(torch.tanh(self.c(h)).flatten(1))


def exact(model, result, x) -> float:
    report = json.loads(json.dumps(result.report))
    with torch.no_grad(), intervene(model, report):
        hooked = model(x)
    with torch.no_grad():
        return float(relative_error(hooked, result.module(x)))


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("selection", ["joint", "diagonal", "local"])
def test_resnext_compiles_exactly_and_its_convs_stay_grouped(replacement, selection):
    model = resnext()
    x = torch.randn(24, 3, 16, 16)
    result = fxa.abstract(model, x.split(8), keep=0.5, replacement=replacement, selection=selection, round_to=1,
                          allocation="predicted")
    sites = {s["name"]: s for s in result.report["sites"]}
    assert {"blocks.0.conv1.0", "blocks.0.conv2.0", "blocks.1.conv1.0", "blocks.1.conv2.0"} <= set(sites)
    assert sum(len(s["kept"]) for s in sites.values()) < sum(s["units"] for s in sites.values())
    assert all("parts" not in s for s in sites.values() if s.get("stream")), "the stream has no grouped layer"
    for name in ("blocks.0.conv1.0", "blocks.0.conv2.0", "blocks.1.conv1.0", "blocks.1.conv2.0"):
        site = sites[name]
        assert site["parts"] == 8 and site["fit_parts"] == (8 if name.endswith("conv1.0") else 1)
        per_group = [sum(1 for u in site["kept"] if u // 8 == j) for j in range(8)]     # 64 units, 8 groups
        assert len(set(per_group)) == 1 and per_group[0] >= 1, f"{name}: kept per group {per_group}"
    for block in ("blocks.0", "blocks.1"):
        conv = result.module.get_submodule(f"{block}.conv2.0")
        conv = getattr(conv, "conv", conv)                       # a zero-padded fold wraps it with a bias map
        assert conv.groups == 8, f"{block}.conv2 is no longer grouped: {conv}"
        assert conv.in_channels == len(sites[f"{block}.conv1.0"]["kept"])
        assert conv.out_channels == len(sites[f"{block}.conv2.0"]["kept"])
    err = exact(model, result, torch.randn(10, 3, 16, 16))
    assert err <= 1e-5, f"compiled vs hooks: {err:.2e}"


def test_a_channel_read_by_a_grouped_conv_is_replaced_within_its_group():
    """blocks.0.conv1's channels are read by conv2 (8 groups of 8): every affine coefficient that reads a
    kept channel of another group is zero; conv2's own output (read by a dense 1x1) may read any kept one."""
    model = resnext()
    x = torch.randn(32, 3, 16, 16)
    result = fxa.abstract(model, x.split(8), keep=0.5, replacement="affine", round_to=1, allocation="predicted")
    sites = {s["name"]: s for s in result.report["sites"]}
    within = 0
    for name in ("blocks.0.conv1.0", "blocks.1.conv1.0"):
        kept = sites[name]["kept"]
        for r in sites[name]["replaced"]:
            for k, t in zip(kept, r["theta"]):
                if k // 8 == r["unit"] // 8:
                    within += t != 0
                else:
                    assert t == 0, f"{name} unit {r['unit']} reads channel {k} of another group ({t})"
    assert within > 0, "the within-group fit must use the kept channels of the group"
    free = sites["blocks.0.conv2.0"]
    across = sum(t != 0 for r in free["replaced"] for k, t in zip(free["kept"], r["theta"]) if k // 8 != r["unit"] // 8)
    assert across > 0, "a site read by a dense conv is fitted on every kept channel"


def test_grouped_conv1d_with_padding_folds_exactly_and_exports(tmp_path):
    torch.manual_seed(1)
    model = GroupedStack1d().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(48, 3, 10)
    for replacement in ("constant", "affine"):
        result = fxa.abstract(model, x.split(16), keep=0.5, replacement=replacement, round_to=1)
        assert {s["name"] for s in result.report["sites"]} == {"a", "b", "c"}
        assert exact(model, result, torch.randn(7, 3, 10)) <= 1e-5
    info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "grouped.onnx"))   # raises without parity
    assert info["max_abs_diff"] <= 1e-4
    b = result.module.get_submodule("b")
    assert getattr(b, "conv", b).groups == 4


def test_keep_one_is_the_identity_and_keep_counts_respect_the_groups():
    model = resnext()
    x = torch.randn(16, 3, 16, 16)
    analysis = fxa.analyse(model, x.split(8))
    same = analysis.compile(keep=1.0, round_to=1)
    with torch.no_grad():
        assert torch.equal(same.module(x), model(x)) or float(relative_error(model(x), same.module(x))) <= 1e-6
    with pytest.raises(ConfigError, match=r"keep\['blocks.0.conv1.0'\] = 30 must be a multiple of 8.*grouped"):
        analysis.compile(keep={"blocks.0.conv1.0": 30}, round_to=1)
    result = analysis.compile(keep={"blocks.0.conv1.0": 24}, round_to=1)
    assert len({s["name"]: s for s in result.report["sites"]}["blocks.0.conv1.0"]["kept"]) == 24


def test_a_depthwise_conv_beside_another_reader_is_refused_with_the_reason():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.dw, self.pw, self.head = (nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                                   nn.Conv2d(8, 8, 1), nn.Linear(8, 2))

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head((self.dw(h) + self.pw(h)).mean((2, 3)))

    with pytest.raises(fxa.errors.NoSiteError, match="depthwise convolution `dw` .*no channel can go"):
        fxa.abstract(TwoReaders().eval(), [torch.randn(8, 3, 6, 6)], keep=0.5)
