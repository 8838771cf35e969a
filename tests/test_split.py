"""Values split along the unit axis (issue 3: "concat and split map indices correctly").

Two shapes users bring, under both front ends (fx symbolic_trace and torch.export):
- consumer-side split: a producer's output split into pieces, each piece through per-unit ops to its
  own consumers. Each piece is a site; its units are the producer rows it carries, and the split
  takes the sizes left after the fold;
- gated units (GLU): `a, g = fc1(x).chunk(2)`, `fc2(a * act(g))`, or two Linears multiplied
  (SwiGLU): one site whose unit j is producer rows {j, m + j} (or row j of both Linears).
At keep 50% the compiled module equals the original with the report's interventions applied by hooks
(docs/math.md §1), and ONNX parity holds. What the finder cannot follow stays ineligible, with a reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxabstract as fxa
from fxabstract import zoo
from fxabstract.abstraction import capture_sites
from fxabstract.cost import module_macs, unit_macs
from fxabstract.zoo import transformers as zt
from fxabstract.zoo import randomize_batch_norm

from test_architectures import TOL, _check_exact

FORMS = ["split", "split_int", "chunk", "tensor_split", "slices"]


class Untraceable(nn.Module):
    """Wraps a model with a branch on the input's shape: fx cannot trace it, torch.export can."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] > 0:
            return self.inner(x)
        return x


def _front(model: nn.Module, front_end: str) -> tuple[nn.Module, str]:
    """The model (wrapped so that fx cannot trace it, for "export") in eval mode, and its module prefix."""
    return (Untraceable(model) if front_end == "export" else model).eval(), "inner." if front_end == "export" else ""


def _pieces(h: torch.Tensor, form: str, dim: int):
    """h (24 units on dim) split into the pieces SIZES[form] lists."""
    if form == "split":
        return h.split([8, 16], dim=dim)
    if form == "split_int":
        return torch.split(h, 10, dim)
    if form == "chunk":
        return torch.chunk(h, 3, dim=dim)
    if form == "tensor_split":
        return torch.tensor_split(h, [5, 12], dim=dim)
    return (h[:, :8], h[:, 8:]) if dim == 1 else (h[..., :8], h[..., 8:])


SIZES = {"split": [8, 16], "split_int": [10, 10, 4], "chunk": [8, 8, 8], "tensor_split": [5, 7, 12],
         "slices": [8, 16]}


class SplitForms(nn.Module):
    """producer (24 units) -> split -> per piece: activation -> its own consumer -> summed."""

    def __init__(self, form: str, kind: str):
        super().__init__()
        self.form, self.dim = form, 1 if kind == "conv" else -1
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if kind == "conv" else nn.Linear
        self.producer = nn.Conv2d(3, 24, 3, padding=1) if kind == "conv" else nn.Linear(6, 24)
        self.consumers = nn.ModuleList(layer(s, 5) for s in SIZES[form])
        self.acts = nn.ModuleList(nn.Tanh() for _ in SIZES[form])

    def forward(self, x):
        pieces = _pieces(self.producer(x), self.form, self.dim)
        y = sum(c(a(pieces[i])) for i, (a, c) in enumerate(zip(self.acts, self.consumers)))
        return y.flatten(1)


def _inputs(kind: str, n: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4) if kind == "conv" else torch.randn(n, 6)


def _compile(model, x, replacement="affine", **kw):
    kw.setdefault("keep", 0.5)
    return fxa.abstract(model, x.split(16), round_to=1, replacement=replacement, allocation="predicted", **kw)


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("form", FORMS)
def test_each_split_form_gives_one_site_per_piece_and_folds_exactly(form, kind, front_end, replacement):
    torch.manual_seed(0)
    model, prefix = _front(SplitForms(form, kind), front_end)
    x = _inputs(kind)
    result = _compile(model, x, replacement)
    sites = result.report["sites"]
    sizes = SIZES[form]
    assert [s["units"] for s in sites] == sizes, f"one site per piece of sizes {sizes}: {result.report}"
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    assert [s["producers"] for s in sites] == [
        [{"module": prefix + "producer", "units": [0, n], "rows": [a, a + n]}] for a, n in zip(starts, sizes)], \
        "each piece's units are the producer rows it carries"
    kept = sum(len(s["kept"]) for s in sites)
    assert kept == round(0.5 * sum(sizes)), f"keep 50% of {sum(sizes)} units, kept {kept}"
    assert 0 < min(len(s["kept"]) for s in sites), "every piece keeps a unit"
    assert result.module.get_submodule(prefix + "producer").weight.shape[0] == kept, "the producer keeps the kept rows"
    err = _check_exact(model, result, x)
    assert err <= TOL, f"{form}/{kind}/{front_end}/{replacement}: compiled vs hooks relative error {err:.2e}"
    assert _check_exact(model, result, x[:5]) <= TOL, "another batch size"


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_split_conv_net_with_unequal_pieces_compiles_exactly(replacement, front_end, tmp_path):
    """zoo.SplitConvNet: a stem split 24/40 into a ReLU -> conv branch and a BatchNorm -> depthwise ->
    ReLU -> conv branch, and a head Linear sliced into a gated half (a * sigmoid(g))."""
    torch.manual_seed(0)
    model, p = _front(randomize_batch_norm(zoo.SplitConvNet()), front_end)
    x = torch.randn(48, 3, 8, 8)
    result = _compile(model, x, replacement)
    by_name = {s["name"]: s for s in result.report["sites"]}
    assert sorted(by_name) == [p + "conv_a.stream.0", p + "fc1", p + "stem.piece0", p + "stem.piece1"], sorted(by_name)
    assert [q["module"] for q in by_name[p + "conv_a.stream.0"]["producers"]] == [p + "conv_a", p + "conv_b"], \
        "the branches' sum is a stream that both convs write"
    b = by_name[p + "stem.piece1"]
    assert [c["module"] for c in b["channel_ops"]] == [p + "bn_b", p + "dw_b"], "piece 1's BN and depthwise"
    assert by_name[p + "fc1"]["producers"] == [{"module": p + "fc1", "units": [0, 32], "rows": [0, 32]},
                                               {"module": p + "fc1", "units": [0, 32], "rows": [32, 64]}]
    kept_a, kept_b = (len(by_name[p + f"stem.piece{k}"]["kept"]) for k in (0, 1))
    m = result.module.get_submodule
    assert m(p + "stem").out_channels == kept_a + kept_b, "the stem keeps both pieces' kept rows"
    assert m(p + "dw_b").groups == m(p + "bn_b").num_features == kept_b, "piece 1's channel ops shrink with it"
    conv_a = m(p + "conv_a").conv                         # zero-padded: constants fold into a bias map
    assert conv_a.in_channels == kept_a and m(p + "conv_b").in_channels == kept_b, "each consumer reads its piece"
    assert _check_exact(model, result, x) <= TOL, f"SplitConvNet ({front_end}, {replacement}): compiled vs hooks"
    if replacement == "affine":
        info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "m.onnx"))
        assert info["relative_diff"] <= 1e-4, f"ONNX parity {info['relative_diff']:.2e}"


@pytest.mark.parametrize("replacement", ["constant", "affine"])
@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_gated_ffn_units_pair_rows_of_the_fused_producer(replacement, front_end, tmp_path):
    """zt.GatedFFN: block 0 is fc1 (32 -> 128) chunked into a, g and fc2(a * silu(g)); block 1 is
    SwiGLU's fc2(up(x) * silu(gate(x))). Unit j of the first is fc1 rows {j, 64 + j}."""
    torch.manual_seed(0)
    model, p = _front(zt.GatedFFN(), front_end)
    x = torch.randn(48, 6, 16)
    result = _compile(model, x, replacement)
    fused, two = result.report["sites"]
    assert fused["name"] == p + "ffns.0.fc1" and fused["units"] == 64 and fused["consumers"] == [p + "ffns.0.fc2"]
    assert two["name"] == p + "ffns.1.up" and [q["module"] for q in two["producers"]] == [p + "ffns.1.up",
                                                                                          p + "ffns.1.gate"]
    kept = len(fused["kept"])
    fc1 = result.module.get_submodule(p + "ffns.0.fc1")
    rows = torch.tensor(fused["kept"])
    dense = model.get_submodule(p + "ffns.0.fc1").weight
    assert torch.equal(fc1.weight, torch.cat([dense[rows], dense[64 + rows]])), \
        "fc1 keeps rows j and 64 + j of every kept unit j, in the order chunk reads them"
    assert result.module.get_submodule(p + "ffns.0.fc2").in_features == kept
    assert result.module.get_submodule(p + "ffns.1.gate").out_features == len(two["kept"])
    assert _check_exact(model, result, x) <= TOL, f"GatedFFN ({front_end}, {replacement}): compiled vs hooks"
    if replacement == "affine":
        info = fxa.to_onnx(result.module, x[:4], str(tmp_path / "m.onnx"))
        assert info["relative_diff"] <= 1e-4, f"ONNX parity {info['relative_diff']:.2e}"


def test_functional_glu_of_a_conv_is_one_site_of_channel_pairs():
    """Conformer's convolution module: pw1 (dim -> 2 dim) -> F.glu(dim=1) -> depthwise -> BN -> SiLU -> pw2."""
    torch.manual_seed(0)
    model = randomize_batch_norm(zt.Conformer())
    x = torch.randn(32, 12, 16)
    result = _compile(model, x, sites=r"blocks\.\d\.pw1")
    site = result.report["sites"][0]
    assert site["units"] == 32 and [q["rows"] for q in site["producers"]] == [[0, 32], [32, 64]], site["producers"]
    assert [c["module"] for c in site["channel_ops"]] == ["blocks.0.dw", "blocks.0.bn"]
    assert _check_exact(model, result, x) <= TOL, "GLU conv site: compiled vs hooks"


def test_a_piece_spanning_two_concatenated_producers():
    """cat([c1 (16), c2 (16)]) split 8 / 24: piece 1 carries rows 8..16 of c1 and all of c2."""
    class CatSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 3, padding=1)
            self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(24, 4, 3, padding=1)

        def forward(self, x):
            h = F.relu(torch.cat([self.c1(x), self.c2(x)], 1))
            a, b = h.split([8, 24], 1)
            return (self.a(a) + self.b(b)).flatten(1)

    torch.manual_seed(0)
    model, x = CatSplit().eval(), torch.randn(48, 3, 4, 4)
    result = _compile(model, x, replacement="constant")
    piece1 = result.report["sites"][1]
    assert piece1["producers"] == [{"module": "c1", "units": [0, 8], "rows": [8, 16]},
                                   {"module": "c2", "units": [8, 24]}], piece1["producers"]
    assert _check_exact(model, result, x) <= TOL, "cat then split: compiled vs hooks"


class NestedSplit(nn.Module):
    """conv -> BN -> ReLU (32 channels, one BN before the split) -> split 16 / 16; the first half
    chunked again into two pieces with their own consumers, the second pooled, flattened, into a Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.a1, self.a2, self.fc = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.Linear(16 * 4, 4)

    def forward(self, x):
        a, b = F.relu(self.bn(self.conv(x))).split([16, 16], 1)
        a1, a2 = a.chunk(2, 1)
        y = self.a1(a1) + self.a2(torch.sigmoid(a2))
        return y.flatten(1).sum(1, keepdim=True) + self.fc(F.max_pool2d(b, 2).flatten(1))


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_nested_splits_share_the_batch_norm_before_them(front_end):
    torch.manual_seed(0)
    model, p = _front(randomize_batch_norm(NestedSplit()), front_end)
    x = torch.randn(48, 3, 4, 4)
    result = _compile(model, x, replacement="affine")
    sites = result.report["sites"]
    assert [s["name"] for s in sites] == [p + f"conv.piece{k}" for k in range(3)]
    assert [s["channel_ops"] for s in sites] == [[{"module": p + "bn", "units": [0, n], "rows": [a, a + n]}]
                                                 for a, n in ((0, 8), (8, 8), (16, 16))], "BN rows per piece"
    assert sites[2]["reads"] == {p + "fc": "flattened"}, "the last piece is pooled and flattened into fc"
    assert result.module.get_submodule(p + "bn").num_features == sum(len(s["kept"]) for s in sites)
    assert _check_exact(model, result, x) <= TOL, f"nested splits ({front_end}): compiled vs hooks"


def test_a_piece_is_never_emptied():
    """Each piece is a site, and a site keeps at least one unit: the smallest budget keeps one unit
    per piece (the split sizes become 1, 1, 1) and still folds exactly; asking for zero is refused."""
    torch.manual_seed(0)
    model, x = SplitForms("tensor_split", "conv").eval(), _inputs("conv")
    result = _compile(model, x, keep=3)
    assert [len(s["kept"]) for s in result.report["sites"]] == [1, 1, 1]
    assert result.module.producer.out_channels == 3
    assert _check_exact(model, result, x) <= TOL, "one unit per piece: compiled vs hooks"
    with pytest.raises(fxa.errors.ConfigError, match="must be an int in 1..5"):
        _compile(model, x, keep={"producer.piece0": 0})


class BadSplit(nn.Module):
    """A split the finder must refuse: `how` says what reads piece 1 (or how the value is sliced)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.producer, self.head, self.other = nn.Linear(6, 16), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.producer(x)
        if self.how == "step":
            return self.head(h[:, ::2])
        if self.how == "overlap":
            return self.head(h[:, :8]) + self.other(h[:, 4:12])
        a, b = h.split([8, 8], dim=1)
        if self.how == "output":
            return self.head(F.relu(a)), b
        return self.head(F.relu(a) + b)                           # "residual": piece 1 read by an add


@pytest.mark.parametrize("how, reason", [
    ("output", "its split piece `getitem_1`: it is read by the model output"),
    ("residual", "its split piece `getitem_1`: it is read by `add`"),
    ("step", "the slice `getitem` has a step (2)"),
    ("overlap", "the slices `getitem` and `getitem_1` overlap"),
])
def test_splits_that_cannot_be_followed_are_ineligible_with_the_node_named(how, reason):
    _, sites, ineligible = capture_sites(BadSplit(how).eval(), torch.randn(16, 6))
    assert "producer" not in {q.module for s in sites for q in s.pieces}, "no piece of a refused split is a site"
    got = ineligible["producer"]
    assert got.startswith(reason), f"expected the reason to start with {reason!r}, got {got!r}"


def test_a_product_of_channels_and_features_is_not_a_gated_site():
    """Conv1d channels (axis 1) times Linear features (axis 2) of the same shape: unit j of one is not
    unit j of the other, so the product is refused rather than folded wrong."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.linear, self.out = nn.Conv1d(8, 8, 1), nn.Linear(8, 8), nn.Conv1d(8, 3, 1)

        def forward(self, x):                                    # [B, 8, 8]
            return self.out(self.conv(x) * self.linear(x)).flatten(1)

    _, sites, ineligible = capture_sites(Mixed().eval(), torch.randn(4, 8, 8))
    assert not sites, [s.name for s in sites]
    assert "another axis at `mul`" in ineligible["conv"] and ineligible["linear"] == ineligible["conv"], ineligible



class SharedAct(nn.Module):
    """One ReLU module called on both pieces of a split and again after a residual add, as
    torchvision's BasicBlock calls `self.relu` twice."""

    def __init__(self):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.a, self.b, self.head = nn.Conv2d(6, 8, 1), nn.Conv2d(10, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        a, b = self.stem(x).split([6, 10], 1)
        y = self.relu(self.a(self.relu(a)) + self.b(self.relu(b)))
        return self.head(y.mean((2, 3)))


def test_a_parameter_free_module_called_on_every_piece_is_followed():
    torch.manual_seed(0)
    model, x = SharedAct().eval(), torch.randn(48, 3, 4, 4)
    result = _compile(model, x)
    assert [s["name"] for s in result.report["sites"]] == ["stem.piece0", "stem.piece1"], result.report["ineligible"]
    assert _check_exact(model, result, x) <= TOL, "shared activation module: compiled vs hooks"


def test_magnitude_and_macs_of_a_piece_count_the_rows_it_carries():
    """The magnitude score of piece 1 is the norm of the stem's rows 24..64; removing one of its units
    saves 1/64 of the stem's MACs (one row of 64), not 1/40."""
    torch.manual_seed(0)
    model, x = zoo.SplitConvNet().eval(), torch.randn(48, 3, 8, 8)
    analysis = fxa.analyse(model, x.split(16), score="magnitude")
    site = analysis.sites[1]
    assert site.name == "stem.piece1"
    scores = analysis.risk_curves("constant", "diagonal")[site.name].scores
    rows = model.stem.weight.detach().double().flatten(1)[24:].norm(dim=1)
    assert torch.allclose(scores, rows), "magnitude: the norms of the stem rows piece 1 carries"
    macs = module_macs(model, x[:1])
    per_unit = unit_macs(site, macs)
    expected = macs["stem"] / 64 + macs["dw_b"] / 40 + macs["conv_b"] / 40      # BatchNorm: no MACs counted
    assert torch.allclose(per_unit, torch.full((40,), expected, dtype=torch.float64)), (per_unit[0], expected)
