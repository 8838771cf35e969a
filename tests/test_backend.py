"""The torch.compile back end: Dynamo's graph, abstracted, equals `fxa.abstract(...).module`; graphs
split by a graph break go on untouched; options are checked before compiling."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.zoo import LeNet, ResNet


class BnMLP(nn.Module):
    """6 -> 32 (BatchNorm, ReLU) -> 16 (ReLU) -> 4: in Dynamo's graph the layers are function calls."""

    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Linear(32, 16), nn.Linear(16, 4)
        self.graph_break = graph_break

    def forward(self, x):
        h = torch.relu(self.bn(self.fc1(x)))
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.fc3(torch.relu(self.fc2(h)))


def trained_like(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("options", [dict(keep=0.5), dict(keep=0.25, replacement="affine", selection="diagonal")])
def test_backend_output_equals_the_abstract_module(options):
    model = trained_like(BnMLP())
    calibration = list(torch.randn(200, 6, generator=torch.Generator().manual_seed(1)).split(50))
    be = fxa.backend(calibration, then_backend="eager", **options)
    compiled = torch.compile(model, backend=be)
    x = torch.randn(7, 6)
    reference = fxa.abstract(model, calibration, **options)
    with torch.no_grad():
        got, expected, dense = compiled(x), reference.module(x), model(x)
    assert be.passed_through == [], f"a whole-model graph must be abstracted: {be.passed_through}"
    (result,) = be.abstractions
    assert [s["name"] for s in result.report["sites"]] == ["fc1", "fc2"], \
        "Dynamo's functional layers must be found as the same sites as in the traced model"
    assert result.report["sites"] == reference.report["sites"], "the backend must make the same abstraction"
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), \
        f"torch.compile output must equal fxa.abstract(...).module's: {(got - expected).abs().max():.3g}"
    assert (got - dense).abs().max() > 1e-3, "the abstraction must differ from the dense model (test not vacuous)"


def test_backend_recompiles_for_a_new_batch_size_without_a_second_analysis():
    model = trained_like(BnMLP())
    calibration = list(torch.randn(120, 6).split(40))
    be = fxa.backend(calibration, keep=0.5, then_backend="eager")
    compiled = torch.compile(model, backend=be)
    reference = fxa.abstract(model, calibration, keep=0.5).module
    with torch.no_grad():
        for batch in (3, 11, 5):    # 11 makes Dynamo recompile with a symbolic batch size
            x = torch.randn(batch, 6)
            assert torch.allclose(compiled(x), reference(x), rtol=0, atol=1e-6), f"batch {batch} must match"
    assert len(be.abstractions) == 1, "a recompile of the same graph must reuse the abstraction"


def test_conv_model_through_dynamo_equals_the_abstract_module():
    """LeNet flattens with x.view(x.size(0), -1): a static Dynamo graph bakes the batch size in, so
    calibration batches of another size need dynamic=True (the batch size stays symbolic)."""
    torch.manual_seed(0)
    model = LeNet().eval()
    calibration = list(torch.randn(64, 1, 8, 8).split(32))
    be = fxa.backend(calibration, keep=0.5, then_backend="eager")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        got = torch.compile(model, backend=be, dynamic=True)(x)
        expected = fxa.abstract(model, calibration, keep=0.5).module(x)
    assert be.abstractions and not be.passed_through, f"LeNet must be abstracted: {be.passed_through}"
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), "conv sites through Dynamo must match fxa.abstract"


def test_resnet_with_batchnorm_under_dynamic_shapes_equals_the_abstract_module():
    """dynamic=True lifts BatchNorm's momentum as an input (a 0-d tensor read with .item()): a constant."""
    torch.manual_seed(0)
    model = ResNet((1, 1), (8, 16), classes=10, cifar=True).eval()
    calibration = list(torch.randn(64, 3, 8, 8).split(32))
    be = fxa.backend(calibration, keep=0.5, then_backend="eager")
    x = torch.randn(5, 3, 8, 8)
    reference = fxa.abstract(model, calibration, keep=0.5)
    with torch.no_grad():
        got, expected = torch.compile(model, backend=be, dynamic=True)(x), reference.module(x)
    assert not be.passed_through, f"the ResNet must be abstracted: {be.passed_through}"
    assert be.abstractions[0].report["sites"] == reference.report["sites"], "the same abstraction as fxa.abstract"
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), "residual conv sites through Dynamo must match"


def test_a_graph_specialised_to_the_batch_size_asks_for_dynamic_shapes():
    torch.manual_seed(0)
    be = fxa.backend(list(torch.randn(64, 1, 8, 8).split(32)), keep=0.5, then_backend="eager")
    with pytest.raises(Exception, match=r"dynamic=True"):
        torch.compile(LeNet().eval(), backend=be)(torch.randn(4, 1, 8, 8))


def test_graph_break_subgraphs_go_on_untouched_with_a_warning():
    model = trained_like(BnMLP(graph_break=True))
    be = fxa.backend([torch.randn(50, 6)], keep=0.5, then_backend="eager")
    x = torch.randn(5, 6)
    with pytest.warns(UserWarning, match="unabstracted"), torch.no_grad():
        got = torch.compile(model, backend=be)(x)
    assert len(be.passed_through) == 2 and not be.abstractions, \
        f"both sides of a graph break must be passed through: {be.passed_through}"
    assert "graph break" in be.passed_through[0] and "resumes" in be.passed_through[1], be.passed_through
    with torch.no_grad():
        assert torch.allclose(got, model(x), rtol=0, atol=1e-6), "a passed-through model must compute the dense output"


def test_training_mode_graphs_are_not_abstracted():
    model = trained_like(BnMLP()).train()
    be = fxa.backend([torch.randn(50, 6)], keep=0.5, then_backend="eager")
    with pytest.warns(UserWarning, match="training mode"):
        torch.compile(model, backend=be)(torch.randn(8, 6))
    assert not be.abstractions, "a train-mode graph (batch statistics, dropout) must not be abstracted"


@pytest.mark.slow
def test_inductor_compiles_the_abstraction():
    model = trained_like(BnMLP())
    calibration = list(torch.randn(200, 6).split(50))
    be = fxa.backend(calibration, keep=0.5)                         # then_backend="inductor"
    x = torch.randn(7, 6)
    with torch.no_grad():
        got, expected = torch.compile(model, backend=be)(x), fxa.abstract(model, calibration, keep=0.5).module(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), "inductor must compute the abstraction"


def test_backend_options_are_checked_before_compiling():
    with pytest.raises(ConfigError, match="then_backend"):
        fxa.backend([torch.randn(4, 6)], then_backend="no-such-backend")
    with pytest.raises(ConfigError, match="score"):
        fxa.backend([torch.randn(4, 6)], score="nope")
    with pytest.raises(ConfigError, match="unknown options"):
        fxa.backend([torch.randn(4, 6)], kepe=0.5)


@pytest.mark.parametrize("keyword", [False, True])
def test_a_sequential_through_torch_compile_is_abstracted(keyword):
    """nn.Sequential reaches the back end as `Module.__call__(*args)`: its input is L['args'][0], not a
    local. It must be abstracted like any model, and equal fxa.abstract's module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    calibration = list(torch.randn(256, 8, generator=torch.Generator().manual_seed(1)).split(64))
    be = fxa.backend(calibration, keep=0.5, then_backend="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(9, 8)
    with torch.no_grad():
        got = compiled(input=x) if keyword else compiled(x)
        expected = fxa.abstract(model, calibration, keep=0.5).module(x)
    assert be.passed_through == [], f"the Sequential graph must be abstracted: {be.passed_through}"
    assert len(be.abstractions) == 1 and be.abstractions[0].report["sites"], "one abstraction with sites"
    assert torch.allclose(got, expected, atol=1e-6), "torch.compile with the back end must equal fxa.abstract"
