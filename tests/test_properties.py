"""Issue 5, properties over randomly generated architectures (hypothesis): compile never mutates its
input, keep = 1.0 is the identity (bitwise), the compiled module equals the original under the
report's interventions, and the report round-trips through JSON.

An architecture is a list of blocks (dense with dropout, a site with two consumers, a residual MLP
block) between an optional Flatten and a Linear head. Supporting a new layer family (conv,
attention) in the property tests is one more entry in `BLOCKS`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxabstract as fxa
from fxabstract.verify import relative_error
from test_exactness import hooked_vs_compiled
from test_nothing_lost import assert_unchanged, snapshot

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "leaky": lambda: nn.LeakyReLU(0.05), "sigmoid": nn.Sigmoid}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


@PROPERTY
@given(arch=architectures(), seed=st.integers(0, 2**16), training=st.booleans(),
       replacement=st.sampled_from(["constant", "affine"]))
def test_compile_never_mutates_the_model(arch, seed, training, replacement):
    model, calibration, _ = instantiate(arch, seed)
    model.train(training)
    before = snapshot(model)
    fxa.abstract(model, calibration, keep=0.5, replacement=replacement)
    assert_unchanged(model, before, f"abstract on {arch}")


@PROPERTY
@given(arch=architectures(), seed=st.integers(0, 2**16), replacement=st.sampled_from(["constant", "affine"]),
       round_to=st.sampled_from([1, 8]))
def test_keep_one_is_the_identity_bitwise(arch, seed, replacement, round_to):
    model, calibration, x = instantiate(arch, seed)
    result = fxa.abstract(model, calibration, keep=1.0, replacement=replacement, round_to=round_to)
    assert all(not s["replaced"] for s in result.report["sites"]), "keep=1.0 replaces no unit"
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x)), f"keep=1.0 must reproduce the model bitwise ({arch})"


@PROPERTY
@given(arch=architectures(), seed=st.integers(0, 2**16), keep=st.floats(0.05, 0.9),
       score=st.sampled_from(["logit-mse", "kl", "ce", "variance", "cwvar", "magnitude", "random"]),
       replacement=st.sampled_from(["constant", "affine"]), selection=st.sampled_from(["joint", "diagonal"]),
       round_to=st.sampled_from([1, 1, 8]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_compiled_module_equals_the_model_under_the_report_interventions(arch, seed, keep, score, replacement,
                                                                          selection, round_to, dtype):
    model, calibration, x = instantiate(arch, seed, dtype)
    result = fxa.abstract(model, calibration, keep=keep, score=score, replacement=replacement, selection=selection,
                          round_to=round_to)
    event(f"units replaced: {'some' if any(s['replaced'] for s in result.report['sites']) else 'none'}")
    z_hooks, z_compiled = hooked_vs_compiled(model, result, x)    # hooks built from the JSON round trip
    err = relative_error(z_hooks, z_compiled)
    assert err <= TOL[dtype], f"exactness against hooks fails for {arch} ({score}, {replacement}): {err:.3g}"


@PROPERTY
@given(arch=architectures(), seed=st.integers(0, 2**16), keep=st.floats(0.05, 1.0),
       replacement=st.sampled_from(["constant", "affine"]))
def test_report_round_trips_through_json(arch, seed, keep, replacement):
    model, calibration, _ = instantiate(arch, seed)
    report = fxa.abstract(model, calibration, keep=keep, replacement=replacement).report
    text = json.dumps(report, allow_nan=False)            # strict JSON: no NaN or inf anywhere
    assert json.loads(text) == report, "the report must hold JSON-native values only and survive a round trip"
