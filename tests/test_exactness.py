"""docs/math.md §1, the exact transformation: the compiled module equals the original model with the
report's interventions applied by forward pre-hooks, to floating-point precision.

The hooks are rebuilt from the report alone (after a JSON round trip), so these tests check that the
report is a complete, faithful description of what the compiler did.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxabstract as fxa
from fxabstract.verify import intervene, relative_error



TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ----------------------------------------------------------------------------- architectures

class SequentialMLP(nn.Module):
    """nn.Sequential with Flatten first and Dropout inside a site's chain; inputs [B, 4, 5]."""

    in_shape = (4, 5)

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(32, 24), nn.ReLU(), nn.Dropout(0.1), nn.Linear(24, 6))

    def forward(self, x):
        return self.net(x)


class HandWritten(nn.Module):
    """A hand-written forward mixing functional, torch, method and module activations."""

    in_shape = (12,)

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 20), nn.Linear(20, 18), nn.Linear(18, 16)
        self.fc4, self.fc5, self.fc6 = nn.Linear(16, 14), nn.Linear(14, 12), nn.Linear(12, 10)
        self.out = nn.Linear(10, 5)
        self.gelu, self.silu, self.leaky = nn.GELU(), nn.SiLU(), nn.LeakyReLU(0.1)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        h = self.fc3(h).relu()
        h = self.gelu(self.fc4(h))
        h = self.silu(self.fc5(h))
        h = self.leaky(self.fc6(h))
        return self.out(h)


class TwoConsumers(nn.Module):
    """One site read by two Linear consumers whose outputs are combined."""

    in_shape = (10,)

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 24)
        self.head_a = nn.Linear(24, 4)
        self.head_b = nn.Linear(24, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.head_a(h) + 0.5 * torch.tanh(self.head_b(h))


class DeepMLP(nn.Module):
    """Five hidden layers: five chained sites, each the producer of the next."""

    in_shape = (9,)

    def __init__(self):
        super().__init__()
        widths = [9, 20, 18, 16, 14, 12]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1], 3)

    def forward(self, x):
        for layer in self.hidden:
            x = F.silu(layer(x))
        return self.out(x)


class NoBias(nn.Module):
    """Linear layers with bias=False as producer (fc1, fc2) and as consumer (fc2, out)."""

    in_shape = (8,)

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16, bias=False)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.out = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.out(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


class ViewInput(nn.Module):
    """Image-shaped inputs [B, 1, 8, 8] flattened with x.view(x.shape[0], -1)."""

    in_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 24), nn.Linear(24, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SequenceMLP(nn.Module):
    """Per-token MLP on [B, T, d] inputs; site chains with arithmetic (h * 2 + 1) and clamp."""

    in_shape = (5, 6)

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x)) * 2 + 1
        h = torch.clamp(self.fc2(h), min=-1.0, max=2.0)
        return self.out(h)


ARCHITECTURES = [SequentialMLP, HandWritten, TwoConsumers, DeepMLP, NoBias, ViewInput, SequenceMLP]


def build(cls, dtype, seed=0):
    torch.manual_seed(seed)
    model = cls().to(dtype).eval()
    calibration = [torch.randn(32, *cls.in_shape, dtype=dtype) for _ in range(3)]
    x_eval = torch.randn(40, *cls.in_shape, dtype=dtype)
    return model, calibration, x_eval


def hooked_vs_compiled(model, result, x):
    """(z with the report's interventions as hooks on the original, z of the compiled module)."""
    report = json.loads(json.dumps(result.report))            # the report alone, JSON-safe
    with torch.no_grad(), intervene(model, report):
        z_hooks = model(x)
    with torch.no_grad():
        z_compiled = result.module(x)
    return z_hooks, z_compiled


def n_replaced(report) -> int:
    return sum(len(s["replaced"]) for s in report["sites"])


# ----------------------------------------------------------------------------- fixed architectures

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("selection", ["joint", "diagonal", "local"])
@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_compiled_module_equals_original_under_report_interventions(cls, replacement, selection, dtype):
    model, calibration, x = build(cls, dtype)
    result = fxa.abstract(model, calibration, keep=0.5, replacement=replacement, selection=selection, round_to=1)
    assert n_replaced(result.report) > 0, "keep=0.5 must replace some units (else the test is vacuous)"
    z_hooks, z_compiled = hooked_vs_compiled(model, result, x)
    assert z_compiled.dtype == dtype, "the compiled module must compute in the model's dtype"
    err = relative_error(z_hooks, z_compiled)
    assert err <= TOL[dtype], (f"compiled module must equal the hook-intervened original "
                               f"({cls.__name__}, {replacement}, {selection}, {dtype}): relative error {err:.3g}")


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_every_hidden_layer_of_the_fixed_architectures_is_a_site(cls):
    model, calibration, _ = build(cls, torch.float64)
    result = fxa.abstract(model, calibration, keep=0.5, round_to=1)
    producers = {s["producer"] for s in result.report["sites"]}
    expected = {"SequentialMLP": {"net.1", "net.4"}, "HandWritten": {f"fc{i}" for i in range(1, 7)},
                "TwoConsumers": {"fc1"}, "DeepMLP": {f"hidden.{i}" for i in range(5)},
                "NoBias": {"fc1", "fc2"}, "ViewInput": {"fc1", "fc2"}, "SequenceMLP": {"fc1", "fc2"}}[cls.__name__]
    assert producers == expected, f"every hidden Linear of {cls.__name__} must be found as a site, got {producers}"


def test_two_consumer_site_is_folded_into_both_consumers():
    model, calibration, x = build(TwoConsumers, torch.float64)
    result = fxa.abstract(model, calibration, keep=0.25, replacement="affine", round_to=1)
    (site,) = result.report["sites"]
    assert sorted(site["consumers"]) == ["head_a", "head_b"], "the site must list both Linear consumers"
    k = len(site["kept"])
    for name in ("head_a", "head_b"):
        assert result.module.get_submodule(name).in_features == k, f"{name} must read only the {k} kept units"
    z_hooks, z_compiled = hooked_vs_compiled(model, result, x)
    assert relative_error(z_hooks, z_compiled) <= 1e-10, "folding into two consumers must stay exact"


# ----------------------------------------------------------------------------- random MLPs

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky": lambda: nn.LeakyReLU(0.05)}


def random_mlp(d_in, widths, d_out, activation, bias, dtype, seed):
    torch.manual_seed(seed)
    layers, prev = [], d_in
    for w in widths:
        layers += [nn.Linear(prev, w, bias=bias), ACTIVATIONS[activation]()]
        prev = w
    layers.append(nn.Linear(prev, d_out, bias=bias))
    return nn.Sequential(*layers).to(dtype).eval()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d_in=st.integers(2, 12),
    widths=st.lists(st.integers(3, 40), min_size=1, max_size=4),
    d_out=st.integers(2, 8),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    bias=st.booleans(),
    keep=st.floats(0.01, 1.0),
    round_to=st.sampled_from([1, 8]),
    replacement=st.sampled_from(["constant", "affine"]),
    selection=st.sampled_from(["joint", "diagonal"]),
    score=st.sampled_from(["logit-mse", "kl", "ce", "variance", "cwvar", "magnitude", "random"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_random_mlps_compile_exactly(d_in, widths, d_out, activation, bias, keep, round_to, replacement,
                                     selection, score, dtype, seed):
    model = random_mlp(d_in, widths, d_out, activation, bias, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    calibration = [(torch.randn(24, d_in, generator=gen, dtype=dtype), torch.randint(0, d_out, (24,), generator=gen))
                   for _ in range(2)]
    x = torch.randn(30, d_in, generator=gen, dtype=dtype)
    if keep != 1.0 and all(w <= round_to for w in widths):     # no site can lose a unit at this rounding
        with pytest.raises(fxa.errors.ConfigError, match="round_to"):
            fxa.abstract(model, calibration, keep=keep, score=score, replacement=replacement, selection=selection,
                         round_to=round_to)
        return
    result = fxa.abstract(model, calibration, keep=keep, score=score, replacement=replacement,
                          selection=selection, round_to=round_to)
    for site in result.report["sites"]:
        k, d = len(site["kept"]), site["units"]
        assert k + len(site["replaced"]) == d, "kept and replaced units must partition the site"
        assert round_to == 1 or k == d or k % round_to == 0, f"kept width {k} must be a multiple of {round_to} or {d}"
    z_hooks, z_compiled = hooked_vs_compiled(model, result, x)
    err = relative_error(z_hooks, z_compiled)
    assert err <= TOL[dtype], (f"compiled module must equal the hook-intervened original for a random MLP "
                               f"({widths}, {activation}, bias={bias}, {score}, {replacement}, {selection}, "
                               f"{dtype}): relative error {err:.3g}")


# ----------------------------------------------------------------------------- keep = 1, purity, size

def test_keep_one_reproduces_the_original_and_removes_nothing():
    model, calibration, x = build(HandWritten, torch.float32)
    for replacement in ("constant", "affine"):
        result = fxa.abstract(model, calibration, keep=1.0, replacement=replacement)
        assert n_replaced(result.report) == 0, "keep=1.0 must replace no unit"
        assert all(len(s["kept"]) == s["units"] for s in result.report["sites"]), "keep=1.0 must keep every unit"
        assert result.report["parameters"]["after"] == result.report["parameters"]["before"], \
            "keep=1.0 must not change the parameter count"
        with torch.no_grad():
            err = relative_error(model(x), result.module(x))
        assert err <= 1e-6, f"keep=1.0 must reproduce the original model, relative error {err:.3g}"


def test_original_model_is_bitwise_unchanged_by_every_entry_point(tmp_path):
    model, calibration, x = build(SequentialMLP, torch.float32)
    model.train()  # the user's mode must survive too
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxa.abstract(model, calibration, keep=0.5, replacement="affine", round_to=1)
    fxa.iia(model, result, x, swap_p=0.5, trials=200)
    fxa.certificate(model, result, x)
    fxa.to_onnx(result.module, x[:4], str(tmp_path / "m.onnx"))
    with intervene(model, result.report):
        pass
    state = model.state_dict()
    assert state.keys() == snapshot.keys(), "the user's model must keep the same parameters and buffers"
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), f"the user's model must be bitwise unchanged, but {k} changed"
    assert model.training, "the user's model must keep its training mode"
    hooks = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooks, "no hook may be left on the user's model after intervene/iia"


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_compiled_module_is_physically_smaller(replacement):
    model, calibration, _ = build(NoBias, torch.float32)
    before = sum(p.numel() for p in model.parameters())
    result = fxa.abstract(model, calibration, keep=0.5, replacement=replacement, round_to=1)
    after = sum(p.numel() for p in result.module.parameters())
    assert after < before, f"the compiled module must have fewer parameters ({after} vs {before})"
    assert result.report["parameters"] == {"before": before, "after": after}, \
        "report['parameters'] must match the real parameter counts"
    for site in result.report["sites"]:
        producer = result.module.get_submodule(site["producer"])
        assert producer.weight.shape[0] == len(site["kept"]), \
            f"producer {site['producer']} must keep exactly len(kept) = {len(site['kept'])} rows"
        for c in site["consumers"]:
            assert result.module.get_submodule(c).weight.shape[1] == len(site["kept"]), \
                f"consumer {c} must read exactly the {len(site['kept'])} kept units"
    leftovers = [n for n, _ in result.module.named_modules() if "replace" in n]
    assert not leftovers, f"no replacement node may survive the fold: {leftovers}"
