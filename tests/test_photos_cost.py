"""Real photos as crops (fxabstract.zoo.photos) and MAC counting / MAC budgets (fxabstract.cost)."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract import zoo
from fxabstract.zoo import photos
from fxabstract.cost import module_macs, unit_macs
from fxabstract.passes.budget import allocate_macs
from fxabstract.errors import ConfigError, DependencyError


def test_crops_are_seeded_normalised_and_sized():
    a = photos.crops(["astronaut", "china"], n=6, size=32, seed=0)
    b = photos.crops(["astronaut", "china"], n=6, size=32, seed=0)
    c = photos.crops(["astronaut", "china"], n=6, size=32, seed=1)
    assert a.shape == (6, 3, 32, 32), "n crops of size x size, RGB"
    assert torch.equal(a, b), "the same seed must give the same crops"
    assert not torch.equal(a, c), "another seed must give other crops"
    raw = a * torch.tensor(photos.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(photos.IMAGENET_MEAN).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5, "un-normalised crops must be images in [0, 1]"


def test_every_listed_photo_loads_without_download():
    for name in photos.PHOTOS:
        image = photos.photo(name)
        assert image.shape[0] == 3 and min(image.shape[1:]) >= 256, f"{name}: an RGB photo, got {tuple(image.shape)}"


def test_unknown_photo_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown photo"):
        photos.crops(["lena"], n=1)


def test_missing_scikit_image_says_how_to_install(monkeypatch):
    photos.photo.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(DependencyError, match="pip install scikit-image"):
        photos.photo("coffee")
    photos.photo.cache_clear()


def test_module_macs_counts_linear_conv_and_depthwise():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    macs = module_macs(model, torch.randn(5, 3, 6, 6))
    assert macs == {"0": 8 * 36 * 3 * 9, "2": 8 * 36 * 1 * 9, "5": 4 * 8}, f"MACs per sample per layer: {macs}"


def test_unit_macs_is_what_removing_the_unit_saves():
    """Removing k units of a site lowers the compiled module's MACs by exactly the sum of their unit MACs."""
    torch.manual_seed(0)
    model = zoo.MobileNetV2(10, width_mult=0.25, last_channel=64).eval()
    x = torch.randn(4, 3, 32, 32)
    analysis = fxa.analyse(model, [x], sites=r"features\.2\.conv\.0\.0", curvature="hutchinson", probes=1,
                           matrices=False)
    site = analysis.sites[0]
    before = sum(module_macs(analysis.gm, x[:1]).values())
    result = analysis.compile({site.name: site.n_units - 3}, "constant", "diagonal", round_to=1)
    after = sum(module_macs(result.module, x[:1]).values())
    per_unit = unit_macs(site, module_macs(analysis.gm, x[:1]))
    removed = [r["unit"] for r in result.report["sites"][0]["replaced"]]
    assert before - after == pytest.approx(float(per_unit[removed].sum())), "unit MACs must match the compiled saving"


def test_allocate_macs_meets_the_target_cheapest_risk_per_mac_first():
    torch.manual_seed(0)
    model = zoo.MobileNetV2(10, width_mult=0.25, last_channel=64).eval()
    x = torch.randn(4, 3, 32, 32)
    analysis = fxa.analyse(model, [x], sites=r"features\.(2|16)\.conv\.0\.0", curvature="hutchinson", probes=1,
                           matrices=False)
    macs = module_macs(analysis.gm, x[:1])
    cv = analysis.risk_curves("constant", "diagonal")
    early, late = analysis.sites
    for s, slope in ((early, 1.0), (late, 1.0)):  # equal risk per unit: the MACs per unit decide
        cv[s.name].curve = slope * torch.arange(s.n_units, dtype=torch.float64)
    cost = {s.name: float(unit_macs(s, macs)[0]) for s in analysis.sites}
    assert cost[early.name] > cost[late.name], "an early high-resolution block costs more MACs per channel"
    target = 2.5 * cost[early.name]
    keep = allocate_macs(analysis.sites, cv, macs, target)
    saved = sum(cost[s.name] * (s.n_units - keep[s.name]) for s in analysis.sites)
    assert saved >= target, f"the allocation must save at least the target MACs ({saved} < {target})"
    assert keep[early.name] == early.n_units - 3 and keep[late.name] == late.n_units, \
        f"equal risk per unit: the cheapest risk per MAC is the early block, got {keep}"


@pytest.fixture(scope="module")
def small_mobilenet():
    """A width-0.25 MobileNetV2, its analysis over the expansion sites (which share no layer) and MAC counts."""
    torch.manual_seed(0)
    model = zoo.MobileNetV2(10, width_mult=0.25, last_channel=64).eval()
    zoo.kaiming_init(model)
    x = torch.randn(16, 3, 32, 32)
    analysis = fxa.analyse(model, x.split(8), sites=r"features\.\d+\.conv\.0\.0", curvature="hutchinson", probes=2)
    macs = module_macs(analysis.gm, x[:1])
    return model, x, analysis, macs


def _saved(result) -> int:
    return result.report["macs"]["before"] - result.report["macs"]["after"]


def test_mac_budget_is_one_global_allocation_of_the_sites_macs(small_mobilenet):
    model, x, analysis, macs = small_mobilenet
    site_macs = sum(float(unit_macs(s, macs).sum()) for s in analysis.sites)
    result = analysis.compile(0.7, "constant", "diagonal", round_to=1, allocation="predicted", budget="macs")
    assert result.report["budget"] == "macs" and result.report["macs"]["before"] == sum(macs.values())
    assert result.report["macs"]["after"] == sum(module_macs(result.module, x[:1]).values()), \
        "the report's MACs after are the compiled module's"
    assert _saved(result) >= 0.3 * site_macs * (1 - 1e-9), "at most 70% of the sites' MACs may stay"
    expected = allocate_macs(analysis.sites, analysis.risk_curves("constant", "diagonal"), macs,
                             0.3 * site_macs * (1 - 1e-9))
    assert {s["name"]: len(s["kept"]) for s in result.report["sites"]} == expected, \
        "budget='macs' is cost.allocate_macs for that target"
    fractions = {s["name"]: len(s["kept"]) / s["units"] for s in result.report["sites"]}
    assert max(fractions.values()) - min(fractions.values()) > 0.1, \
        f"a global budget in output units keeps unequal fractions per site: {fractions}"
    assert "MACs per sample" in result.summary(), "the summary gives the MACs before and after"


def test_mac_budget_compiles_exactly_against_the_report_hooks(small_mobilenet):
    from fxabstract.verify import intervene, relative_error
    model, x, analysis, _ = small_mobilenet
    result = analysis.compile(0.6, "affine", "joint", round_to=1, allocation="predicted", budget="macs")
    with torch.no_grad(), intervene(model, result.report):
        z_hooks = model(x)
    with torch.no_grad():
        z_dense, z_compiled = model(x), result.module(x)
    assert relative_error(z_dense, z_compiled) > 1e-3, "the compile must change the outputs"
    assert relative_error(z_hooks, z_compiled) < 1e-5, "compiled == original with the report's interventions"


def test_mac_budget_of_a_per_site_score_saves_the_fraction_at_every_site(small_mobilenet):
    _, x, analysis, macs = small_mobilenet
    variance = fxa.Analysis(analysis.gm, analysis.sites, analysis.ineligible, analysis.stats, "variance", 0)
    result = variance.compile(0.75, "constant", round_to=1, budget="macs")
    for s, entry in zip(variance.sites, result.report["sites"]):
        per_unit, removed = unit_macs(s, macs), len(entry["replaced"])
        total = float(per_unit.sum())
        assert per_unit[:removed].sum() >= 0.25 * total * (1 - 1e-9), f"{s.name} saves a quarter of its MACs"
        assert per_unit[:removed - 1].sum() < 0.25 * total, f"{s.name}: the fewest removals that do"


def _shared_layer_models():
    """Stacks where one site's consumer is the next site's producer: an MLP's middle layers, a VGG-style
    conv stack (zero padding: spatial bias maps), an MLP of odd widths."""
    torch.manual_seed(0)
    return [
        (nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)),
         torch.randn(256, 6)),
        (nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)),
         torch.randn(128, 3, 6, 6)),
        (nn.Sequential(nn.Linear(5, 23), nn.GELU(), nn.Linear(23, 17), nn.ReLU(), nn.Linear(17, 11), nn.ReLU(),
                       nn.Linear(11, 4)), torch.randn(256, 5)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_removal_macs_is_what_the_compiled_module_saves_when_sites_share_layers(case):
    """A layer between two sites keeps (1 - rho)(1 - kappa) of its MACs: cost.removal_macs must equal the
    MACs measured on compiled modules, for removals at every site at once (the sum of unit MACs does not)."""
    from fxabstract.cost import removal_macs, site_macs
    model, x = _shared_layer_models()[case]
    analysis = fxa.analyse(model, x.split(64), curvature="hutchinson", probes=2)
    macs = module_macs(analysis.gm, x[:1])
    curves = analysis.risk_curves("constant", "diagonal")
    gen = torch.Generator().manual_seed(case)
    overcounted = False
    for _ in range(6):
        keep = {s.name: int(torch.randint(1, s.n_units + 1, (), generator=gen)) for s in analysis.sites}
        result = analysis.compile(keep, "constant", "diagonal", round_to=1)
        removed = {e["name"]: [r["unit"] for r in e["replaced"]] for e in result.report["sites"]}
        measured = sum(macs.values()) - sum(module_macs(result.module, x[:1]).values())
        assert removal_macs(analysis.sites, removed, macs) == pytest.approx(measured, rel=1e-9), keep
        additive = sum(float(unit_macs(s, macs)[removed[s.name]].sum()) for s in analysis.sites)
        overcounted |= additive > measured * (1 + 1e-6)
    assert overcounted, "the sites share a layer: the sum of unit MACs overcounts it"
    layers = {n for s in analysis.sites for n in [p.module for p in s.pieces] + s.consumers}
    assert site_macs(analysis.sites, macs) == pytest.approx(sum(macs[n] for n in layers)), \
        "the sites' MACs count each layer they touch once"


@pytest.mark.parametrize("score", ["logit-mse", "variance"])
def test_mac_budget_is_met_when_sites_share_a_layer(score):
    """fc2 is fc1-site's consumer and fc2-site's producer: the budget counts it once and is met, without
    a warning, by the global allocation (logit-mse) and by the per-site rule (variance)."""
    from fxabstract.cost import site_macs
    model, x = _shared_layer_models()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxa.errors.FxAbstractWarning)
        result = fxa.abstract(model, x.split(64), keep=0.4, score=score, round_to=1, budget="macs",
                              allocation="predicted")
    assert result.report["macs"] == {"before": 6 * 32 + 32 * 16 + 16 * 3,
                                     "after": sum(module_macs(result.module, x[:1]).values())}, \
        "the report gives the MACs measured on the compiled module"
    analysis = fxa.analyse(model, x.split(64), score=score, curvature="hutchinson", probes=2)
    total = site_macs(analysis.sites, module_macs(analysis.gm, x[:1]))
    assert total == 6 * 32 + 32 * 16 + 16 * 3, "the sites' MACs: fc1, fc2 and fc3, each once"
    assert _saved(result) >= 0.6 * total * (1 - 1e-9), "at most 40% of the sites' MACs stay"
    kept = {s["name"]: len(s["kept"]) for s in result.report["sites"]}
    assert kept["0"] * 6 + kept["0"] * kept["2"] + kept["2"] * 3 <= 0.4 * total + 1e-9


def test_mac_budget_warns_when_the_allowed_removals_cannot_meet_it():
    model, x = _shared_layer_models()[0]
    with pytest.warns(fxa.errors.FxAbstractWarning, match="MAC budget is missed.*raise keep or lower round_to"):
        result = fxa.abstract(model, x.split(64), keep=0.05, round_to=8, budget="macs", allocation="predicted")
    assert all(len(s["kept"]) >= 8 for s in result.report["sites"])


@pytest.mark.parametrize("keep", [3, True, 1.5, 0.0, {"fc": 2}])
def test_mac_budget_needs_a_fraction_and_says_so_before_any_analysis(keep):
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(ConfigError, match="budget='macs' takes keep as a fraction"):
        fxa.abstract(model, [], keep=keep, budget="macs")      # empty data: the check comes first
    with pytest.raises(ConfigError, match="unknown budget 'flops'"):
        fxa.abstract(model, [], keep=0.5, budget="flops")


def test_removal_macs_deletes_a_key_value_row_only_with_all_its_query_heads():
    """Grouped-query attention: a k/v head's rows go only when every query head reading it is removed,
    so removal_macs must count exactly what the compiled module saves, whichever query heads go."""
    from fxabstract.zoo import transformers as zt
    from fxabstract.cost import removal_macs
    from fxabstract.sites import SharedPiece
    torch.manual_seed(0)
    model, x = zt.Llama(dim=32, depth=1, heads=4, kv_heads=2).eval(), torch.randint(0, 50, (8, 12))
    analysis = fxa.analyse(model, x.split(4), curvature="hutchinson", probes=2, sites=r"blocks\..*")  # not the stream
    assert any(isinstance(p, SharedPiece) for s in analysis.sites for p in s.pieces), "a GQA head site"
    macs = module_macs(analysis.gm, x[:1])
    gen = torch.Generator().manual_seed(0)
    partial = False
    for _ in range(8):
        keep = {s.name: s.n_units if s.group == 1 else s.group * int(torch.randint(1, s.n_units // s.group + 1, (),
                                                                                      generator=gen))
                for s in analysis.sites}
        result = analysis.compile(keep, "constant", "diagonal", round_to=1)
        removed = {e["name"]: [r["unit"] for r in e["replaced"]] for e in result.report["sites"]}
        measured = sum(macs.values()) - sum(module_macs(result.module, x[:1]).values())
        assert removal_macs(analysis.sites, removed, macs) == pytest.approx(measured, rel=1e-9), keep
        additive = sum(float(unit_macs(s, macs)[removed[s.name]].sum()) for s in analysis.sites)
        partial |= additive > measured * (1 + 1e-9)   # a kv head kept for one of its query heads
    assert partial, "some draw removes a query head whose kv head another query head still reads"
