"""Causal explanatory graphs (docs/math.md §5, Ahmad et al.): per class, a graph over hidden units whose
node effects and edge effects are measured by interventions, not read off gradients.

    >>> g = fxa.explain(model, x_calib, target=3)        # inputs the model assigns to class 3
    >>> g.top_units("relu_1", 5)                          # the five units that support class 3 most
    >>> g.save_json("class3.json"); g.save_dot("class3.dot")   # dot -Tpng class3.dot > class3.png

Units are the channels (dim 1) of each site's value: the features of an MLP layer, the channels of
a convolution's feature map. By default the sites are the outputs of the activation functions.
- node effect of unit j: E_x[ z_t(x) - z_t(x; do(a_j := c*_j)) ] over the inputs of class t, with
  c*_j the optimal constant of docs/math.md §3 for the class logit (curvature h = (dz_t/da_j)^2 over all
  calibration inputs; per position for a feature map, so c*_j is a constant map);
- edge effect i -> j (adjacent sites s, s+1): the path effect through j alone:
  E_x[ z_t(x) - z_t(x; do(a_{s+1,j} := a_{s+1,j}(x; do(a_{s,i} := c*_i)))) ], every other unit of s+1
  at its clean value. Edges are measured between the `top` units of each site (by |node effect|).
The instrumented copy of the model (UnitProbe) is also what benchmarks use for baselines.
"""
from __future__ import annotations

import json

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture import capture
from ..data import logits
from ..errors import ConfigError
from ..output.files import write_atomic
from ..verify import gather
from .paths import Replay, class_inputs, explain_paths, nearest_weight_layers, path_input_maps, weight_chain

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ELU,
                      nn.Softplus, nn.Hardswish, nn.Hardtanh)
ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.softplus, F.hardswish,
                        F.hardtanh, torch.relu, torch.tanh, torch.sigmoid, F.tanh, F.sigmoid}
ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}


class _Edit(nn.Module):
    """Identity on a site's value, except: records it, adds a gradient probe, or sets some units."""

    def __init__(self):
        super().__init__()
        self.units, self.values, self.probe, self.seen, self.record = None, None, None, None, False

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.units is not None:                                   # do(a_units := values)
            a = a.clone()
            a[:, self.units] = self.values.to(a.dtype).expand_as(a[:, self.units])
        if self.probe is not None:                                   # d z / d probe = d z / d a
            a = a + self.probe
        if self.record:
            self.seen = a.detach().clone()
        return a


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ACTIVATION_METHODS


class UnitProbe:
    """An instrumented copy of a model: run it with units of its sites set, recorded or probed."""

    def __init__(self, model: nn.Module, sites=None):
        gm = capture(model)
        nodes = {n.name: n for n in gm.graph.nodes}
        if sites is None:
            sites = [n.name for n in gm.graph.nodes if _is_activation(gm, n)]
        unknown = [s for s in sites if s not in nodes]
        if unknown or not sites:
            acts = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
            raise ConfigError(f"sites {unknown or '[]'} are not nodes of the traced model; choose from {acts}")
        self.sites, self.edits, self.edit_nodes, self.replay = list(sites), {}, {}, None
        for i, name in enumerate(self.sites):
            node = nodes[name]
            edit = _Edit()
            gm.add_submodule(f"fxa_edit_{i}", edit)
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"fxa_edit_{i}", (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            self.edits[name] = edit
            self.edit_nodes[name] = new
        gm.recompile()
        self.gm = gm.eval()
        for p in self.gm.parameters():
            p.requires_grad_(False)

    def prepare(self, x: torch.Tensor) -> None:
        """Run `x` once and keep every node's value: later runs of this very tensor recompute only what is
        downstream of the sites whose units they set (paths.Replay), with the same result."""
        for edit in self.edits.values():
            edit.units = edit.values = None
            edit.record = False
        self.replay = Replay(self.gm, x)

    def run(self, x: torch.Tensor, set_units: dict | None = None, record: bool = False) -> torch.Tensor:
        """Logits [B, o] with set_units = {site: (units, values)} applied; record=True keeps each site's value."""
        for name, edit in self.edits.items():
            edit.units, edit.values = (set_units or {}).get(name, (None, None))
            edit.record = record
        try:
            replay = getattr(self, "replay", None)
            if replay is not None and replay.x is x and not record:
                return logits(replay.rerun([self.edit_nodes[s] for s in (set_units or {})]))
            with torch.no_grad():
                return logits(self.gm(x))
        finally:
            for edit in self.edits.values():
                edit.units = edit.values = None

    def seen(self, site: str) -> torch.Tensor:
        return self.edits[site].seen

    def gradients(self, x: torch.Tensor, target: int) -> tuple[dict, dict]:
        """Per site: values a [B, d, ...] and gradients dz_target/da [B, d, ...]."""
        self.run(x[:1], record=True)
        for edit in self.edits.values():
            edit.probe = torch.zeros((len(x), *edit.seen.shape[1:]), dtype=edit.seen.dtype,
                                     device=edit.seen.device, requires_grad=True)
            edit.record = True
        try:
            logits(self.gm(x))[:, target].sum().backward()
            return ({s: e.seen for s, e in self.edits.items()}, {s: e.probe.grad for s, e in self.edits.items()})
        finally:
            for edit in self.edits.values():
                edit.probe = None


class Explanation:
    """The causal explanatory graph of one class: `graph` is a JSON-serialisable dict; `model` (not
    saved) is what `input_maps` reads."""

    def __init__(self, graph: dict, model: nn.Module | None = None):
        self.graph, self.model = graph, model

    def input_maps(self, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """Path-specific input-space maps [B, H, W] (paths.path_input_maps) of the units this graph
        selected at Conv2d `layer` (default: the last conv read after another conv) and at the conv before
        it: the causes of method='paths', the `top` units of method='effects'."""
        if self.model is None:
            raise ConfigError("this explanation has no model (it was loaded from JSON); run fxa.explain again")
        gm = capture(self.model)
        chain = weight_chain(gm)
        convs = [n for i, n in enumerate(chain) if i and isinstance(gm.get_submodule(n), nn.Conv2d)
                 and isinstance(gm.get_submodule(chain[i - 1]), nn.Conv2d)]
        layer = layer or (convs[-1] if convs else None)
        if layer not in convs:
            raise ConfigError(f"input maps need a Conv2d layer read after another Conv2d; got {layer!r}, "
                              f"choose from {convs}")
        parent = chain[chain.index(layer) - 1]
        units = {}                                          # producer layer -> the selected units
        for s in self.graph["sites"]:
            name = s["name"] if self.graph.get("method") == "paths" else producer_of(gm, s["name"])
            units[name] = s["top"]
        if parent not in units or layer not in units:
            raise ConfigError(f"this explanation has no units at `{parent}` and `{layer}`; explain those sites")
        return path_input_maps(self.model, x, layer, units[parent], units[layer], parent)

    def effects(self, site: str) -> torch.Tensor:
        return torch.tensor(next(s for s in self.graph["sites"] if s["name"] == site)["effects"])

    def top_units(self, site: str, k: int) -> list[int]:
        """The k units of `site` with the largest node effect (the ones that support the class most)."""
        return self.effects(site).argsort(descending=True)[:k].tolist()

    def save_json(self, path: str) -> None:
        write_atomic(path, (json.dumps(self.graph, indent=1) + "\n").encode())

    def save_dot(self, path: str) -> None:
        write_atomic(path, self.to_dot().encode())

    def to_dot(self) -> str:
        """GraphViz: a cluster per site with its top units, path edges between adjacent sites, and the
        last site's units into the class node; blue supports the class, red opposes it."""
        g, t = self.graph, self.graph["target"]
        scale = max([abs(e["effect"]) for e in g["edges"]] + [abs(v) for s in g["sites"] for v in s["effects"]] + [1e-12])
        lines = ["digraph explanation {", "  rankdir=LR; node [shape=ellipse, fontsize=10];",
                 f'  "class {t}" [shape=box, style=bold, label="class {t}\\n{g["samples"]} inputs"];']

        def colour(v):
            return "blue" if v >= 0 else "red"

        for s in g["sites"]:
            lines.append(f'  subgraph "cluster_{s["name"]}" {{ label="{s["name"]} ({s["units"]} units)";')
            for u in s["top"]:
                v = s["effects"][u]
                lines.append(f'    "{s["name"]}:{u}" [label="{u}\\n{v:+.3g}", color={colour(v)}, '
                             f'penwidth={0.5 + 3 * abs(v) / scale:.2f}];')
            lines.append("  }")
        for e in g["edges"]:
            lines.append(f'  "{e["source"][0]}:{e["source"][1]}" -> "{e["target"][0]}:{e["target"][1]}" '
                         f'[color={colour(e["effect"])}, penwidth={0.3 + 3 * abs(e["effect"]) / scale:.2f}];')
        last = g["sites"][-1]
        for u in last["top"]:
            v = last["effects"][u]
            lines.append(f'  "{last["name"]}:{u}" -> "class {t}" [color={colour(v)}, '
                         f'penwidth={0.3 + 3 * abs(v) / scale:.2f}];')
        return "\n".join(lines + ["}"]) + "\n"


def producer_of(gm: fx.GraphModule, site: str) -> str | None:
    """The Linear or Conv2d whose output channels are the units of activation node `site`."""
    node = next(n for n in gm.graph.nodes if n.name == site)
    found = nearest_weight_layers(gm, node.args[0] if node.args else node)
    return next(iter(found)) if len(found) == 1 else None


def optimal_constants(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """c* [d, ...] = E[h a] / E[h] with h = g^2 per unit and position; the mean where h vanishes (docs/math.md §3)."""
    h = g.double().pow(2)
    num, den = (h * a.double()).sum(0), h.sum(0)
    return torch.where(den > 0, num / den.clamp_min(1e-300), a.double().mean(0)).to(a.dtype)


METHODS = ("effects", "paths")
EFFECTS = ("optimal", "mean", "zero")


def explain(model: nn.Module, data, target: int, sites=None, top: int = 8, batch_size: int = 1024, *,
            method: str = "effects", effect: str = "optimal", labels=None, samples: int = 100, soft: bool = False,
            beta: float = 0.0, seed: int = 0) -> Explanation:
    """The causal explanatory graph of class `target` (docs/math.md §5) over `data` (a Tensor of inputs or
    batches); the class inputs are those the model assigns to `target`.

    method: "effects" (node effects by optimal-constant replacement, path effects between the `top` units
      of adjacent `sites`; `effect`: what a unit is set to, "optimal" (the curvature-weighted constant),
      "mean" or "zero") or "paths" (Ahmad et al.'s top-down path interventions on the weights, a z-test
      per unit, over the first `samples` inputs of the class, also `labels`-correct where labels are
      given; `soft` interventions set the weights to U(beta, beta + 0.01) instead of 0; interpret/paths.py)."""
    if method not in METHODS:
        raise ConfigError(f"method = {method!r}; choose from {list(METHODS)}")
    if effect not in EFFECTS:
        raise ConfigError(f"effect = {effect!r}; choose from {list(EFFECTS)}")
    if method == "paths":
        if sites is not None:
            raise ConfigError("method='paths' walks the model's weight layers itself; leave sites=None")
        return Explanation(explain_paths(model, gather(data), target, labels, samples, soft, beta, seed), model)
    probe = UnitProbe(model, sites)
    x = gather(data).to(next(probe.gm.parameters()).device)
    z = torch.cat([probe.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    xt = class_inputs(z, x, target, labels)
    values, grads = {s: [] for s in probe.sites}, {s: [] for s in probe.sites}
    for i in range(0, len(x), batch_size):
        a, g = probe.gradients(x[i:i + batch_size], target)
        for s in probe.sites:
            values[s].append(a[s])
            grads[s].append(g[s])
    if effect == "optimal":
        constants = {s: optimal_constants(torch.cat(values[s]), torch.cat(grads[s])) for s in probe.sites}
    else:                                                       # the plain mean, or zero (a hard intervention)
        constants = {s: torch.cat(values[s]).mean(0) * (effect == "mean") for s in probe.sites}
    probe.prepare(xt)
    base = probe.run(xt)[:, target]                                                 # [B] clean class logit
    out_sites, tops = [], {}
    for s in probe.sites:
        c = constants[s]
        effects = [float((base - probe.run(xt, {s: ([j], c[j:j + 1][None])})[:, target]).mean())  # node effect (§5)
                   for j in range(len(c))]
        tops[s] = torch.tensor(effects).abs().argsort(descending=True)[:top].tolist()
        out_sites.append({"name": s, "units": len(c), "effects": effects, "top": tops[s],
                          "constant_mean": c.reshape(len(c), -1).mean(1).tolist()})
    edges = []
    for s, s_next in zip(probe.sites, probe.sites[1:]):
        for i in tops[s]:
            probe.run(xt, {s: ([i], constants[s][i:i + 1][None])}, record=True)
            moved = probe.seen(s_next)                                             # a_{s+1}(x; do(a_{s,i} := c*_i))
            for j in tops[s_next]:
                z_path = probe.run(xt, {s_next: ([j], moved[:, j:j + 1])})[:, target]
                edges.append({"source": [s, i], "target": [s_next, j],
                              "effect": float((base - z_path).mean())})             # path effect through j (§5)
    return Explanation({"method": "effects", "effect": effect, "target": target, "samples": len(xt), "calibration": len(x),
                        "sites": out_sites, "edges": edges}, model)
