"""Sequential calibration (one block of the graph at a time) makes the abstraction the whole-model
pass makes: the block-wise backward sweep is the chain rule of the whole-graph VJP."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.capture import capture
from fxabstract.passes.sequential import blocks_at_sites
from fxabstract.sites import annotate_shapes, find_sites
from fxabstract.zoo import LeNet, ResNet


def deep_mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.GELU(),
                         nn.Linear(16, 5))


MODELS = {   # name -> (factory, input shape)
    "mlp, three sites": (deep_mlp, (10,)),
    "LeNet, conv sites and a flatten": (LeNet, (1, 8, 8)),
    "ResNet, residual streams cross the cuts": (lambda: ResNet((1, 1), (8, 16), classes=10, cifar=True), (3, 8, 8)),
}
OPTIONS = [dict(keep=0.5), dict(keep=0.5, replacement="affine", score="kl"), dict(keep=0.25, score="ce")]


def assert_same(a: dict, b: dict, what: str):
    assert [s["kept"] for s in a["sites"]] == [s["kept"] for s in b["sites"]], f"{what}: kept units must match"
    for sa, sb in zip(a["sites"], b["sites"]):
        assert torch.allclose(torch.tensor(sa["scores"]), torch.tensor(sb["scores"]), rtol=1e-6, atol=1e-12), \
            f"{what}: the scores at {sa['name']} must match"
        for ra, rb in zip(sa["replaced"], sb["replaced"]):
            got = ra.get("constant", ra.get("beta"))
            want = rb.get("constant", rb.get("beta"))
            assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), f"{what}: replacement of unit {ra['unit']}"
    assert abs(a["predicted_risk"] - b["predicted_risk"]) <= 1e-6 * max(1e-12, abs(a["predicted_risk"])), what


@pytest.mark.parametrize("name", MODELS)
def test_sequential_mode_equals_the_whole_model_mode(name):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2))
    calibration = list(zip(x.split(32), y.split(32)))
    for options in OPTIONS:
        whole = fxa.abstract(model, calibration, **options)
        sequential = fxa.abstract(model, calibration, sequential=True, **options)
        assert any(s["replaced"] for s in whole.report["sites"]), "the test must remove units"
        assert_same(sequential.report, whole.report, f"{name} {options}")
        with torch.no_grad():
            assert torch.allclose(sequential.module(x), whole.module(x), rtol=1e-5, atol=1e-6), \
                f"{name} {options}: the compiled modules must compute the same"


def test_blocks_end_at_sites_and_cover_the_graph():
    gm = capture(deep_mlp())
    annotate_shapes(gm, [torch.randn(2, 10)])
    sites, _ = find_sites(gm)
    blocks = blocks_at_sites(gm, sites)
    assert [b[-1].name for b in blocks[:-1]] == [s.node for s in sites], "each block but the last ends at a site"
    assert blocks[-1][-1].op == "output", "the last block ends at the output"
    computing = [n for n in gm.graph.nodes if n.op != "placeholder"]
    assert [n for b in blocks for n in b] == computing, "the blocks partition the graph's nodes, in order"
