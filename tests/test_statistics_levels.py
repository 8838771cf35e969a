"""Which d x d statistics an analysis gathers: `matrices="joint"` keeps only the curvature sums that
joint selection with constant replacement reads (H0, H1, H2), so the default `abstract` call does three
d x d updates per site and batch instead of seven, with the same result."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.errors import ConfigError
from fxabstract.zoo import cifar_resnet


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5)).eval()


def data(n: int = 192) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return list((torch.randn(n, 12) + 0.3).split(64))


def test_joint_statistics_hold_the_curvature_sums_and_nothing_else():
    analysis = fxa.analyse(mlp(), data(), matrices="joint")
    for s in analysis.sites:
        k, m = analysis.stats.curvature[s.name], analysis.stats.moments[s.name]
        assert k.matrices == "joint" and k.H0.shape == (s.n_units, s.n_units)
        assert k.swaa is None and k.Hp is None and k.Sbb is None, "no affine sums"
        assert not m.full, "plain second moments per unit only"


def test_joint_statistics_select_exactly_what_all_of_them_select():
    model = mlp()
    full = fxa.analyse(model, data(), matrices=True)
    joint = fxa.analyse(model, data(), matrices="joint")
    for s in full.sites:
        a, b = full.stats.curvature[s.name], joint.stats.curvature[s.name]
        for key in ("sh", "sha", "sha2", "H0", "H1", "H2"):
            assert torch.equal(getattr(a, key), getattr(b, key)), f"{s.name}.{key}"
    for keep in (0.3, 0.6):
        r_full = full.compile(keep, "constant", "joint", round_to=1, allocation="predicted")
        r_joint = joint.compile(keep, "constant", "joint", round_to=1, allocation="predicted")
        assert r_full.report["sites"] == r_joint.report["sites"], "the same kept units and constants"
        a, b = r_full.module.state_dict(), r_joint.module.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_abstract_call_gathers_only_the_joint_statistics(monkeypatch):
    import fxabstract.abstraction as abstraction
    levels, calibrate = [], abstraction.calibrate

    def recording(*args, **kwargs):
        stats = calibrate(*args, **kwargs)
        levels.append(stats.curvature["0"].matrices)
        return stats
    monkeypatch.setattr(abstraction, "calibrate", recording)
    model = mlp()
    default = fxa.abstract(model, data(), keep=0.5, round_to=1)
    reference = fxa.analyse(model, data(), matrices=True).compile(0.5, round_to=1)
    assert levels == ["joint", True]
    assert default.report["sites"] == reference.report["sites"]
    fxa.abstract(model, data(), keep=0.5, replacement="affine", round_to=1)
    fxa.abstract(model, data(), keep=0.5, selection="diagonal", round_to=1)
    assert levels[2:] == [True, False]


def test_an_affine_compile_of_joint_statistics_is_refused_with_the_fix():
    analysis = fxa.analyse(mlp(), data(), matrices="joint")
    with pytest.raises(ConfigError, match=r"matrices=True.*only the joint ones"):
        analysis.compile(0.5, replacement="affine")
    with pytest.raises(ConfigError, match="local selection"):
        analysis.compile(0.5, selection="local")
    with pytest.raises(ConfigError, match=r"matrices = 'yes'.*\"joint\""):
        fxa.analyse(mlp(), data(), matrices="yes")


def test_one_position_reuses_the_summed_curvature_for_the_per_position_one():
    """At a vector site the per-position curvature sum is the summed one (Hp = H0, bitwise); at a conv
    site it is not, and both still enter the affine risk."""
    vec = fxa.analyse(mlp(), data(), matrices=True)
    for s in vec.sites:
        k = vec.stats.curvature[s.name]
        assert torch.equal(k.Hp, k.H0)
    torch.manual_seed(0)
    conv = fxa.analyse(cifar_resnet().eval(), list(torch.randn(16, 3, 16, 16).split(8)), matrices=True,
                       sites=r"layer1\.0\.conv1")
    k = conv.stats.curvature["layer1.0.conv1"]
    assert not torch.allclose(k.Hp, k.H0), "a conv site: several positions per sample"


@pytest.mark.parametrize("n, probes", [(2048, 1), (1536, 1), (1258, 2), (192, 8), (40, 16)])
def test_the_default_probe_count_aims_at_1536_probes_over_the_calibration_set(n, probes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 40)).eval()
    x = torch.randn(n, 12)
    analysis = fxa.analyse(model, list(x.split(256)), matrices=False)
    assert analysis.stats.probes == probes and analysis.stats.method == "hutchinson", (n, analysis.stats.probes)


def test_exact_curvature_where_it_costs_no_more_than_the_probes_and_a_generator_gets_four():
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    x = torch.randn(400, 12)                                      # 4 probes by default
    four = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    five = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 5)).eval()
    assert fxa.analyse(four, list(x.split(100)), matrices=False).stats.method == "exact", "4 outputs, 4 probes"
    stats = fxa.analyse(five, list(x.split(100)), matrices=False).stats
    assert (stats.method, stats.probes) == ("hutchinson", 4), "5 outputs, 4 probes"
    wide = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 40)).eval()
    loader = DataLoader(TensorDataset(torch.randn(1600, 12), torch.randint(0, 40, (1600,))), batch_size=200)
    stats = fxa.analyse(wide, (b for b, _ in loader), matrices=False).stats
    assert (stats.method, stats.probes) == ("hutchinson", 4), "a generator's size is not known: 4 probes"
    report = fxa.abstract(wide, loader, keep=0.5, round_to=1).report
    assert report["curvature"]["method"] == "hutchinson" and report["curvature"]["probes"] == 1, report["curvature"]


def test_a_dataloader_over_one_tensor_is_calibration_data():
    """TensorDataset(x) yields [x] batches: the one element is the inputs (no targets)."""
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    model = mlp()
    loaded = fxa.abstract(model, DataLoader(TensorDataset(x), batch_size=64), keep=0.5, round_to=1)
    plain = fxa.abstract(model, list(x.split(64)), keep=0.5, round_to=1)
    assert loaded.report["sites"] == plain.report["sites"]
    with pytest.raises(fxa.errors.CalibrationError, match="pair"):
        fxa.abstract(model, [(x, x, x)], keep=0.5)


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 96), nn.GELU(), nn.Linear(96, 24), nn.Tanh(), nn.Linear(24, 5)).eval()


@pytest.mark.parametrize("replacement", ["constant", "affine"])
def test_sites_whose_matrices_do_not_fit_get_diagonal_statistics_and_say_so(replacement):
    """A 96-unit and a 24-unit site; a budget that holds only the smaller one's d x d sums: the wide site
    keeps O(d) statistics, is selected diagonally with a constant replacement, and the report says why.
    The compiled module still equals the hooked original."""
    model = wide_mlp()
    sums = 8 if replacement == "affine" else 3
    budget = sums * 8 * 24 ** 2 + 100                       # 24^2 fits, 96^2 does not
    with pytest.warns(fxa.errors.FxAbstractWarning, match=r"1 site\(s\) \(0\).*matrix_memory"):
        result = fxa.abstract(model, data(), keep=0.5, replacement=replacement, round_to=1, matrix_memory=budget)
    wide, narrow = result.report["sites"]
    assert wide["statistics"].startswith("diagonal: its d x d statistics (96 units)"), wide
    assert "statistics" not in narrow
    assert {r["kind"] for r in wide["replaced"]} == {"constant"}, "a constant replacement"
    assert {r["kind"] for r in narrow["replaced"]} == {replacement}, "the site that fits keeps the setting's"
    x = torch.randn(16, 12)
    with torch.no_grad(), fxa.intervene(model, result.report):
        hooked = model(x)
    assert torch.allclose(hooked, result.module(x), atol=1e-5)


def test_a_budget_that_fits_everything_changes_nothing():
    model = wide_mlp()
    default = fxa.abstract(model, data(), keep=0.5, round_to=1)
    roomy = fxa.abstract(model, data(), keep=0.5, round_to=1, matrix_memory=2**30)
    assert default.report["sites"] == roomy.report["sites"]
    with pytest.raises(ConfigError, match="matrix_memory"):
        fxa.abstract(model, data(), keep=0.5, matrix_memory=-1)


def test_a_residual_stream_falls_back_to_diagonal_statistics_as_a_whole():
    torch.manual_seed(0)
    model = cifar_resnet().eval()
    x = torch.randn(32, 3, 16, 16)
    sites = fxa.analyse(model, [x[:8]], matrices=False).sites
    total = sum(3 * 8 * s.n_units ** 2 for s in sites)
    with pytest.warns(fxa.errors.FxAbstractWarning, match="do not fit"):
        result = fxa.abstract(model, list(x.split(8)), keep=0.5, round_to=1, matrix_memory=total // 2)
    diagonal = {e["name"] for e in result.report["sites"] if "statistics" in e}
    assert diagonal, "half the budget: some sites fall back"
    for stream in {e["stream"] for e in result.report["sites"] if e.get("stream")}:
        points = {e["name"] for e in result.report["sites"] if e.get("stream") == stream}
        assert points <= diagonal or not points & diagonal, f"{stream}: all its points or none"
    with torch.no_grad(), fxa.intervene(model, result.report):
        hooked = model(x[:5])
    assert float((hooked - result.module(x[:5])).abs().max()) <= 1e-4
