"""Issue 5, properties over randomly generated architectures (hypothesis): compile never mutates its
input, keep = 1.0 is the identity (bitwise), the compiled module equals the original under the
report's interventions, and the report round-trips through JSON.

Networks come from two families: MLPs built from blocks (dense with dropout, a site with two
consumers, a residual MLP block) between an optional Flatten and a Linear head, and the random conv
stacks of test_random_convnets.py. A new block is one more entry in `BLOCKS`; a new family is one
more branch in `networks`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from torch import nn

import fxabstract as fxa
from fxabstract.verify import relative_error
from test_exactness import hooked_vs_compiled
from test_nothing_lost import assert_unchanged, snapshot
from test_random_convnets import convnets

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "leaky": lambda: nn.LeakyReLU(0.05), "sigmoid": nn.Sigmoid}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Dense(nn.Module):
    """Linear -> activation -> dropout: the output is a site when the next block starts with a Linear."""

    def __init__(self, d_in: int, width: int, activation: str, dropout: float):
        super().__init__()
        self.linear, self.act = nn.Linear(d_in, width), ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.out_features = width

    def forward(self, x):
        return self.drop(self.act(self.linear(x)))


class Fork(nn.Module):
    """One site read by two Linear consumers whose outputs are added (several consumers, no residual)."""

    def __init__(self, d_in: int, width: int, activation: str, d_out: int):
        super().__init__()
        self.producer, self.act = nn.Linear(d_in, width), ACTIVATIONS[activation]()
        self.head_a, self.head_b = nn.Linear(width, d_out), nn.Linear(width, d_out)
        self.out_features = d_out

    def forward(self, x):
        h = self.act(self.producer(x))
        return self.head_a(h) + torch.tanh(self.head_b(h))


class Residual(nn.Module):
    """x + W2 act(W1 x): the hidden units are a site; W2's output, read by the add, is not."""

    def __init__(self, d_in: int, width: int, activation: str):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d_in, width), ACTIVATIONS[activation](), nn.Linear(width, d_in)
        self.out_features = d_in

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


# block kind -> (strategy for its arguments after d_in, constructor)
BLOCKS = {
    "dense": (st.tuples(st.integers(3, 32), st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from([0.0, 0.3])),
              Dense),
    "fork": (st.tuples(st.integers(3, 32), st.sampled_from(sorted(ACTIVATIONS)), st.integers(3, 16)), Fork),
    "residual": (st.tuples(st.integers(3, 32), st.sampled_from(sorted(ACTIVATIONS))), Residual),
}


@dataclass
class Architecture:
    in_shape: tuple            # per-sample input shape; two axes are flattened first
    blocks: list               # [(kind, args)]
    d_out: int


class RandomNet(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.flatten = nn.Flatten() if len(arch.in_shape) > 1 else nn.Identity()
        prev = int(torch.tensor(arch.in_shape).prod())
        self.blocks = nn.ModuleList()
        for kind, args in arch.blocks:
            self.blocks.append(BLOCKS[kind][1](prev, *args))
            prev = self.blocks[-1].out_features
        self.head = nn.Linear(prev, arch.d_out)

    def forward(self, x):
        x = self.flatten(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@st.composite
def architectures(draw) -> Architecture:
    in_shape = draw(st.sampled_from([(draw(st.integers(2, 10)),), (2, draw(st.integers(2, 5)))]))
    kinds = draw(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4))
    return Architecture(in_shape, [(k, draw(BLOCKS[k][0])) for k in kinds], draw(st.integers(2, 6)))


def instantiate(arch: Architecture, seed: int, dtype=torch.float32):
    """(model, calibration [(x, y)] x 2, held-out inputs x) for an architecture."""
    torch.manual_seed(seed)
    model = RandomNet(arch).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, *arch.in_shape, generator=gen, dtype=dtype)  # noqa: E731
    calibration = [(x(32), torch.randint(0, arch.d_out, (32,), generator=gen)) for _ in range(2)]
    return model, calibration, x(20)


@dataclass
class Network:
    """A drawn model with its data, from one family: MLP blocks (above) or conv stacks."""

    family: str
    model: nn.Module
    calibration: list
    x: torch.Tensor


@st.composite
def networks(draw, dtype=torch.float32) -> Network:
    """Most examples from the MLP blocks; some from test_random_convnets' conv stacks (conv, BatchNorm,
    depthwise, concat, padding, pool, flatten) on [B, 3, 8, 8]. A new family is one more branch."""
    seed = draw(st.integers(0, 2**16))
    if draw(st.sampled_from(["mlp", "mlp", "conv"])) == "mlp":
        return Network("mlp", *instantiate(draw(architectures()), seed, dtype))
    model = draw(convnets()).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(44, 3, 8, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 5, (12,), generator=gen)
    return Network("conv", model, [(x[:12], y), (x[12:24], y)], x[24:])


def compile_or_reject(net: Network, **options):
    """fxa.abstract, rejecting the example when a drawn conv stack has no site (one conv into the head), or
    when a round_to passed is at least every site's width (nothing could be removed: a ConfigError)."""
    try:
        return fxa.abstract(net.model, net.calibration, **options)
    except fxa.errors.NoSiteError:
        reject()
    except fxa.errors.ConfigError as exc:
        if options.get("round_to", 1) > 1 and "at least every site's width" in str(exc):
            reject()
        raise


@PROPERTY
@given(net=networks(), training=st.booleans(), replacement=st.sampled_from(["constant", "affine"]))
def test_compile_never_mutates_the_model(net, training, replacement):
    net.model.train(training)
    before = snapshot(net.model)
    compile_or_reject(net, keep=0.5, replacement=replacement)
    assert_unchanged(net.model, before, f"abstract on {net.model}")


@PROPERTY
@given(net=networks(), replacement=st.sampled_from(["constant", "affine"]), round_to=st.sampled_from([1, 8]))
def test_keep_one_is_the_identity_bitwise(net, replacement, round_to):
    result = compile_or_reject(net, keep=1.0, replacement=replacement, round_to=round_to)
    assert all(not s["replaced"] for s in result.report["sites"]), "keep=1.0 replaces no unit"
    with torch.no_grad():
        assert torch.equal(result.module(net.x), net.model(net.x)), \
            f"keep=1.0 must reproduce the model bitwise ({net.model})"


@PROPERTY
@given(data=st.data(), keep=st.floats(0.05, 0.9),
       score=st.sampled_from(["logit-mse", "kl", "ce", "variance", "cwvar", "magnitude", "random"]),
       replacement=st.sampled_from(["constant", "affine"]), selection=st.sampled_from(["joint", "diagonal", "local"]),
       round_to=st.sampled_from([1, 1, 8]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_compiled_module_equals_the_model_under_the_report_interventions(data, keep, score, replacement,
                                                                          selection, round_to, dtype):
    net = data.draw(networks(dtype))
    result = compile_or_reject(net, keep=keep, score=score, replacement=replacement, selection=selection,
                               round_to=round_to)
    event(f"{net.family}, units replaced: {'some' if any(s['replaced'] for s in result.report['sites']) else 'none'}")
    z_hooks, z_compiled = hooked_vs_compiled(net.model, result, net.x)    # hooks from the JSON round trip
    err = relative_error(z_hooks, z_compiled)
    assert err <= TOL[dtype], f"exactness against hooks fails ({score}, {replacement}): {err:.3g}\n{net.model}"


@PROPERTY
@given(net=networks(), keep=st.floats(0.05, 1.0), replacement=st.sampled_from(["constant", "affine"]))
def test_report_round_trips_through_json(net, keep, replacement):
    report = compile_or_reject(net, keep=keep, replacement=replacement).report
    text = json.dumps(report, allow_nan=False)            # strict JSON: no NaN or inf anywhere
    assert json.loads(text) == report, "the report must hold JSON-native values only and survive a round trip"


@pytest.mark.parametrize("head", ["conv", "flatten-linear"])
def test_cwvar_on_conv_sites(head):
    """cwvar = 1/2 ||W[:, j]||^2 Var(a_j) with the consumer's column j summed over its kernel taps (Conv)
    or over the block of features channel j feeds (Linear after a flatten)."""
    torch.manual_seed(0)
    tail = ([nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)]
            if head == "conv" else [nn.Flatten(), nn.Linear(8 * 64, 5)])
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), *tail).eval()
    x = torch.randn(24, 3, 8, 8)
    result = fxa.abstract(model, [x], keep=0.5, score="cwvar", round_to=1)
    W = (model[2] if head == "conv" else model[3]).weight.detach().double()
    with torch.no_grad():
        a = model[1](model[0](x)).double().movedim(1, -1).reshape(-1, 8)    # every position is a sample
    expected = 0.5 * W.reshape(W.shape[0], 8, -1).pow(2).sum((0, 2)) * a.var(0, unbiased=False)
    got = torch.tensor(result.report["sites"][0]["scores"], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-6), f"cwvar per channel: {got} != {expected}"


def test_magnitude_covers_every_producer_of_a_concat_site():
    from fxabstract import zoo
    torch.manual_seed(0)
    model = zoo.SqueezeNet().eval()
    result = fxa.abstract(model, [torch.randn(8, 3, 32, 32)], keep=0.5, score="magnitude")
    site = next(s for s in result.report["sites"] if s["name"] == "features.2.expand1x1")
    rows = torch.cat([model.get_submodule(f"features.2.expand{k}").weight.detach().double().flatten(1).norm(dim=1)
                      for k in ("1x1", "3x3")])
    assert torch.allclose(torch.tensor(site["scores"], dtype=torch.float64), rows), \
        "magnitude must be the row norms of both concatenated producers, in cat order"
