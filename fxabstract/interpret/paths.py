"""Path interventions (Ahmad et al., WACV 2024): the causal explanatory graph of one class found top-down
from the class logit, and the input-space maps built from it (docs/math.md §5).

    >>> g = fxa.explain(model, x, target=3, method="paths")     # hard interventions: W[j, i] := 0
    >>> g.graph["sites"][-1]["causes"]                           # units of the last hidden layer behind class 3
    >>> maps = g.input_maps(x[:8])                               # [8, H, W]: the path-specific maps

The weight layers (Linear, Conv2d) of the model must form a chain, each reading the one before it through
per-unit operations (activations, pooling, a flatten). For the last layer the effect set is the class;
for each input unit i of a layer, the weights from i into the effect set are set to u (0: a hard
intervention; soft: u ~ U(beta, beta + 0.01), drawn once per layer), and the class logit is measured on
the N inputs of the class. i is a cause when the mean intervened logit falls below the observed one by
more than z * sqrt(var_int / N + var_obs / N) (one-sided z-test, z = 1.65); where no unit passes, the
units whose mean relative effect is below -0.001 are taken (with N = 1: a relative effect below 0.05).
The causes become the effect set of the layer below, down to the first layer.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture import capture
from ..data import logits
from ..errors import ConfigError

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
Z_ONE_SIDED = 1.65                    # z-score of a one-sided test at p = 0.05
FALLBACK_RELATIVE = -0.001            # no unit passes the test: mean relative effect below this
SINGLE_SAMPLE_RELATIVE = 0.05         # N = 1: relative effect below this
SOFT_WIDTH = 0.01                     # soft interventions: u ~ U(beta, beta + SOFT_WIDTH)


class Replay(fx.Interpreter):
    """A traced model run once on fixed inputs, every node's value kept, then re-run from a few nodes on:
    only what is downstream of an edited node is computed again (the rest is read from the first run),
    which gives the same values as a whole forward pass at a fraction of its cost for late edits."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor):
        super().__init__(gm, garbage_collect_values=False)
        self.x, self.cache, self.fresh = x, {}, None
        with torch.no_grad():
            self.run(x)

    def run_node(self, n: fx.Node):
        if self.fresh is not None and n not in self.fresh:
            return self.cache[n]
        out = super().run_node(n)
        if self.fresh is None:
            self.cache[n] = out
        return out

    def rerun(self, starts: list[fx.Node]):
        """The model's output with every node downstream of `starts` (included) computed again."""
        fresh, todo = set(), list(starts)
        while todo:
            n = todo.pop()
            if n not in fresh:
                fresh.add(n)
                todo.extend(n.users)
        self.fresh = fresh
        try:
            with torch.no_grad():
                return self.run(self.x)
        finally:
            self.fresh = None


def weight_chain(gm: fx.GraphModule) -> list[str]:
    """The Linear and Conv2d modules of the traced model in forward order, checked to form a chain: each
    reads the one before it (and the first reads the input) through operations that keep the units."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), WEIGHT_LAYERS)]
    if len(nodes) < 2:
        raise ConfigError(f"method='paths' needs at least two Linear or Conv2d layers in a chain; the model has "
                          f"{len(nodes)}; use method='effects'")
    for prev, node in zip([None] + nodes, nodes):
        found = nearest_weight_layers(gm, node.args[0])
        want = {prev.target} if prev is not None else set()
        if found != want:
            raise ConfigError(f"method='paths' needs the weight layers in a chain, but `{node.target}` reads "
                              f"{sorted(found) or 'the input'} instead of {sorted(want) or 'the input'}; "
                              "use method='effects'")
    return [n.target for n in nodes]


def nearest_weight_layers(gm: fx.GraphModule, start) -> set[str]:
    seen, todo, found = set(), [start], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), WEIGHT_LAYERS):
            found.add(n.target)
            continue
        if n.op == "get_attr":
            continue
        todo.extend(a for a in n.all_input_nodes)
    return found


def unit_blocks(layer: nn.Module, units: int) -> int:
    """How many input entries of `layer` belong to each of the `units` units feeding it: 1, or a Linear
    after a flatten of a [C, H, W] map (H * W entries per channel)."""
    fan = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if fan % units:
        raise ConfigError(f"a layer of {fan} inputs reads {units} units, which do not divide it; use method='effects'")
    return fan // units


def _units_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class PathGraph:
    """The traced copy of a model, its weight chain, and the intervention on one layer's weights."""

    def __init__(self, model: nn.Module):
        self.gm = capture(model).eval()
        for p in self.gm.parameters():
            p.requires_grad_(False)
        self.layers = weight_chain(self.gm)
        self.nodes = {n.target: n for n in self.gm.graph.nodes if n.op == "call_module" and n.target in self.layers}

    def module(self, name: str) -> nn.Module:
        return self.gm.get_submodule(name)

    def run(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([logits(self.gm(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])

    def intervened(self, replay: Replay, layer: str, effects: list[int], unit: int, block: int, u: float,
                   target: int) -> torch.Tensor:
        """The class logit on the replay's inputs with W[effects, unit's block] := u in `layer`."""
        weight = self.module(layer).weight
        saved = weight.data.clone()
        try:
            weight.data[torch.as_tensor(effects), unit * block:(unit + 1) * block] = u
            return logits(replay.rerun([self.nodes[layer]]))[:, target]
        finally:
            weight.data.copy_(saved)


def select_causes(intervened: torch.Tensor, observed: torch.Tensor, z: float = Z_ONE_SIDED) -> list[int]:
    """The causes among candidate units: intervened [units, N] and observed [N] class logits."""
    n = observed.numel()
    relative = (intervened / observed - 1).mean(1)
    if n == 1:
        return torch.nonzero(relative < SINGLE_SAMPLE_RELATIVE).flatten().tolist()
    margin = z * torch.sqrt(intervened.var(1) / n + observed.var() / n)
    causes = torch.nonzero(intervened.mean(1) < observed.mean() - margin).flatten().tolist()
    if not causes:
        causes = torch.nonzero(relative < FALLBACK_RELATIVE).flatten().tolist()
    return causes


def class_inputs(z: torch.Tensor, x: torch.Tensor, target: int, labels=None, samples: int | None = None) -> torch.Tensor:
    """The inputs of x whose logits z pick class `target` (and, with labels, are labelled it): the first
    `samples` of them."""
    if not 0 <= target < z.shape[1]:
        raise ConfigError(f"target = {target} is not a class of the model's {z.shape[1]} outputs; pick 0..{z.shape[1] - 1}")
    keep = z.argmax(1) == target
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != keep.shape:
            raise ConfigError(f"labels has shape {tuple(labels.shape)} but the data has {len(x)} inputs; "
                              "pass one label per input")
        keep &= labels.to(keep.device) == target
    xt = x[keep][:samples]
    if len(xt) == 0:
        raise ConfigError(f"the model assigns no input of the data{' labelled so' if labels is not None else ''} to "
                          f"class {target}; pass data that includes it")
    return xt


def explain_paths(model: nn.Module, x: torch.Tensor, target: int, labels=None, samples: int = 100,
                  soft: bool = False, beta: float = 0.0, seed: int = 0, z: float = Z_ONE_SIDED) -> dict:
    """The graph dict of `Explanation` for method='paths' (module docstring)."""
    if samples < 1:
        raise ConfigError(f"samples = {samples}; give at least 1")
    graph = PathGraph(model)
    x = x.to(next(graph.gm.parameters()).device)
    xt = class_inputs(graph.run(x), x, target, labels, samples)
    replay = Replay(graph.gm, xt)
    observed = logits(replay.rerun([]))[:, target]
    gen = torch.Generator().manual_seed(seed)
    effects, sites, edges, stopped = [target], [], [], None
    for k in range(len(graph.layers) - 1, 0, -1):             # top-down; the first layer reads the input
        layer, below = graph.layers[k], graph.layers[k - 1]
        units = _units_out(graph.module(below))
        block = unit_blocks(graph.module(layer), units)
        u = float(torch.empty(1).uniform_(beta, beta + SOFT_WIDTH, generator=gen)) if soft else 0.0
        ys = torch.stack([graph.intervened(replay, layer, effects, i, block, u, target) for i in range(units)])
        causes = select_causes(ys, observed, z)
        rows = graph.module(layer).weight.detach()[effects].reshape(len(effects), units, -1).sum(2)
        sites.append({"name": below, "units": units, "layer": layer, "u": u,
                      "effects": (observed.mean() - ys.mean(1)).tolist(),   # mean drop of the class logit
                      "causes": causes, "top": causes, "effect_set": list(effects)})
        if k < len(graph.layers) - 1:                          # causes -> the effect set (units of `layer`)
            edges += [{"source": [below, i], "target": [layer, j], "effect": float(rows[r, i])}
                      for r, j in enumerate(effects) for i in causes]
        if not causes:
            stopped = layer
            break
        effects = causes
    sites.reverse()
    return {"method": "paths", "target": target, "samples": len(xt), "calibration": len(x), "soft": soft,
            "beta": beta, "stopped_at": stopped, "sites": sites, "edges": edges,
            "observed_mean": float(observed.mean())}


# ------------------------------------------------------------------------------------- input-space maps

def path_input_maps(model: nn.Module, x: torch.Tensor, layer: str, parents: list[int], children: list[int],
                    parent_layer: str | None = None) -> torch.Tensor:
    """The path-specific input-space map of the paper, [B, H, W], for Conv2d `layer`: for each child
    channel c and parent channel p (an output channel of the conv before it, `parent_layer`), the
    parent's pre-activation map convolved ('full') with the kernel W[c, p], a softmax over positions,
    the mean over parents, resized (bilinear) to the input's size, summed over children."""
    gm = capture(model).eval()
    names = weight_chain(gm)
    if layer not in names or not isinstance(gm.get_submodule(layer), nn.Conv2d):
        convs = [n for n in names if isinstance(gm.get_submodule(n), nn.Conv2d)]
        raise ConfigError(f"input maps need a Conv2d layer of the chain read after another conv; got {layer!r}, "
                          f"choose from {convs[1:]}")
    k = names.index(layer)
    parent_layer = parent_layer or (names[k - 1] if k > 0 else None)
    if parent_layer is None or not isinstance(gm.get_submodule(parent_layer), nn.Conv2d):
        raise ConfigError(f"`{layer}` is not read after another Conv2d; input maps need a conv parent layer")
    if not parents or not children:
        raise ConfigError(f"input maps of `{layer}` need at least one parent and one child unit "
                          f"(got {len(parents)} and {len(children)})")
    seen = {}
    handle = gm.get_submodule(parent_layer).register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    try:
        with torch.no_grad():
            gm(x)
    finally:
        handle.remove()
    feats = seen["a"][:, parents]                                          # [B, P, h, w]
    w = gm.get_submodule(layer).weight.detach()[children][:, parents]      # [C, P, kh, kw]
    C, P, kh, kw = w.shape
    kernels = w.flip(-1, -2).permute(1, 0, 2, 3).reshape(P * C, 1, kh, kw)  # true convolution, grouped by parent
    v = F.conv2d(feats, kernels, padding=(kh - 1, kw - 1), groups=P)        # [B, P*C, h', w']
    B, _, h, wd = v.shape
    v = torch.softmax(v.reshape(B, P, C, h * wd), dim=-1).reshape(B, P, C, h, wd).mean(1)     # [B, C, h', w']
    size = tuple(x.shape[-2:])
    return F.interpolate(v, size=size, mode="bilinear", align_corners=False).sum(1)
