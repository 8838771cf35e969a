"""Property (docs/math.md §1): on randomly generated conv networks — conv / BatchNorm / activation / pool /
depthwise / grouped / concat / split / padding / flatten in random order — compiling a replacement equals applying
the report's interventions to the original with hooks, to float precision."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxabstract as fxa
from fxabstract.verify import intervene, relative_error

ACTIVATIONS = [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish]


class Branches(nn.Module):
    """Two convs of the same input concatenated along channels (a fire module)."""

    def __init__(self, cin: int, a: int, b: int, act):
        super().__init__()
        self.left, self.right, self.act = nn.Conv2d(cin, a, 1), nn.Conv2d(cin, b, 3, padding=1), act()

    def forward(self, x):
        return torch.cat([self.act(self.left(x)), self.act(self.right(x))], 1)


class SplitBranches(nn.Module):
    """A conv split unequally along channels; each piece through an activation and its own 1x1 conv,
    re-joined by cat (each piece is a site; the cat of the branch convs is one more)."""

    def __init__(self, cin: int, sizes: list[int], outs: list[int], act):
        super().__init__()
        self.sizes, self.acts = sizes, nn.ModuleList(act() for _ in sizes)
        self.stem = nn.Conv2d(cin, sum(sizes), 3, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(s, o, 1) for s, o in zip(sizes, outs))

    def forward(self, x):
        pieces = self.stem(x).split(self.sizes, 1)         # indexed, not iterated: fx traces it
        return torch.cat([branch(act(pieces[i])) for i, (act, branch) in enumerate(zip(self.acts, self.branches))], 1)


@st.composite
def convnets(draw):
    """A random conv stack on [B, 3, 8, 8] inputs, ending in flatten + Linear (or pool + Linear)."""
    layers, c, size = [], 3, 8
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "depthwise", "grouped", "branches", "split", "pool"]))
        act = draw(st.sampled_from(ACTIVATIONS))
        if kind == "pool" and size >= 4:
            layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2)])))
            size //= 2
        elif kind == "depthwise":
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), act()]
        elif kind == "grouped":            # every group keeps as many channels (a grouped conv stays grouped)
            g = draw(st.integers(2, 4))
            if c % g:
                layers += [nn.Conv2d(c, g * draw(st.integers(1, 3)), 1), act()]
                c = layers[-2].out_channels
            out, k = g * draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
            layers += [nn.Conv2d(c, out, k, padding=k // 2, groups=g, bias=draw(st.booleans()))]
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(out))
            layers.append(act())
            c = out
        elif kind == "branches":
            a, b = draw(st.integers(2, 8)), draw(st.integers(2, 8))
            layers.append(Branches(c, a, b, act))
            c = a + b
        elif kind == "split":
            sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=3))
            outs = draw(st.lists(st.integers(2, 6), min_size=len(sizes), max_size=len(sizes)))
            layers.append(SplitBranches(c, sizes, outs, act))
            c = sum(outs)
        else:
            out, k = draw(st.integers(2, 12)), draw(st.sampled_from([1, 3]))
            pad = draw(st.sampled_from([0, k // 2])) if size > 2 else k // 2
            layers += [nn.Conv2d(c, out, k, padding=pad, bias=draw(st.booleans()))]
            size = size - k + 1 + 2 * pad
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(out))
            layers.append(act())
            c = out
    if draw(st.booleans()):
        layers += [nn.Conv2d(c, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * size * size, 5)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5)]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=convnets(), replacement=st.sampled_from(["constant", "affine"]),
       selection=st.sampled_from(["joint", "diagonal", "local"]), keep=st.sampled_from([0.3, 0.5, 0.8]))
def test_random_convnets_compile_exactly(model, replacement, selection, keep):
    torch.manual_seed(0)
    x = torch.randn(24, 3, 8, 8)
    try:
        result = fxa.abstract(model, x.split(12), keep=keep, replacement=replacement, selection=selection,
                              round_to=1, allocation="predicted")
    except fxa.errors.NoSiteError:
        return  # e.g. a single conv straight into the head: nothing between two affine layers
    report = json.loads(json.dumps(result.report))
    with torch.no_grad(), intervene(model, report):
        z_hooks = model(x)
    err = relative_error(z_hooks, result.module(x))
    assert err <= 1e-5, f"compiled vs hooks: relative error {err:.2e}\n{model}\n{result.summary()}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=convnets(), keep=st.floats(0.05, 0.95))
def test_random_convnets_mac_budget_counts_what_the_compiled_module_saves(model, keep):
    """cost.removal_macs (each layer keeps (1 - rho)(1 - kappa) of its MACs) equals the MACs the compiled
    module saves, on random stacks where sites share layers (a split's branch convs read one site and
    produce the next), and budget='macs' keeps at most `keep` of the sites' MACs when it does not warn."""
    import warnings
    from fxabstract.cost import module_macs, removal_macs, site_macs, unit_macs
    torch.manual_seed(0)
    x = torch.randn(24, 3, 8, 8)
    try:
        analysis = fxa.analyse(model, x.split(12), curvature="hutchinson", probes=2)
    except fxa.errors.NoSiteError:
        event("no site")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analysis.compile(keep, "constant", "diagonal", round_to=1, allocation="predicted", budget="macs")
    macs = module_macs(analysis.gm, x[:1])
    removed = {e["name"]: [r["unit"] for r in e["replaced"]] for e in result.report["sites"]}
    saved = result.report["macs"]["before"] - result.report["macs"]["after"]
    assert removal_macs(analysis.sites, removed, macs) == pytest.approx(saved, rel=1e-9, abs=1e-6), \
        f"{model}\n{result.summary()}"
    additive = sum(float(unit_macs(s, macs)[removed[s.name]].sum()) for s in analysis.sites)
    event("sites share a layer" if additive > saved * (1 + 1e-9) else "no shared layer")
    if not any("MAC budget is missed" in str(w.message) for w in caught):
        assert saved >= (1 - keep) * site_macs(analysis.sites, macs) * (1 - 1e-9)
