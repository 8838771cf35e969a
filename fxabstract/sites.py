"""Find sites: graph values whose units can be replaced and folded away (THEORY §1).

A site is the output of a *producer* (a layer whose output features are the units), followed by a
chain of per-unit elementwise ops (activations, dropout), read only by affine *consumers*. Removing
unit j deletes producer row j and consumer column j; the chain acts on each unit separately, so it
needs no change.

    >>> gm = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> sites, ineligible = find_sites(gm)
    >>> sites[0].name, sites[0].node, sites[0].consumers, sites[0].n_units
    ('0', '_1', ['2'], 8)

Layer support is a table (`PRODUCERS`, `CONSUMERS`), Torch-Pruning style: a new layer type is one
entry there plus one in `passes/fold.py`.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# Layer types whose output features are units (producers) / that read a site affinely (consumers).
# Each entry returns (units produced, units read).
PRODUCERS = {nn.Linear: lambda m: m.out_features}
CONSUMERS = {nn.Linear: lambda m: m.in_features}

# Per-unit elementwise ops: applied to each feature independently, with no parameters per unit.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Softsign, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanhshrink,
    nn.LogSigmoid, nn.Dropout, nn.AlphaDropout, nn.Identity,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.softplus,
    F.softsign, F.hardswish, F.hardsigmoid, F.hardtanh, F.tanhshrink, F.logsigmoid, F.dropout,
    F.alpha_dropout, F.tanh, F.sigmoid, torch.relu, torch.tanh, torch.sigmoid, torch.abs, torch.clamp,
    torch.nn.functional.relu_, torch.sigmoid_, torch.tanh_,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
}
ELEMENTWISE_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "abs", "clamp", "clamp_min", "clamp_max",
    "neg", "add", "sub", "mul", "div", "contiguous",
}


@dataclass
class Site:
    """One site: the value read by `consumers`, produced by `producer` through `chain`."""

    name: str                 # stable name: the producer's module path
    producer: str             # module path of the producing layer
    node: str                 # graph node whose value is the site (the producer's or the chain's last)
    chain: list[str]          # graph nodes of the per-unit elementwise ops between producer and site
    consumers: list[str]      # module paths of the affine layers that read the site
    n_units: int


def is_elementwise(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """True if `node` applies a per-unit op to `source` and reads no other graph value."""
    others = [a for a in node.all_input_nodes if a is not source]
    if others or not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return False


def _layer(gm: fx.GraphModule, node: fx.Node, table: dict):
    """The module a call_module node runs, if its type is in `table`."""
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    return mod if type(mod) in table else None


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], dict[str, str]]:
    """Every eligible site in graph order, and the reason each other producer is not one."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    tied = tied_modules(gm)
    sites: list[Site] = []
    ineligible: dict[str, str] = {}
    for node in gm.graph.nodes:
        producer = _layer(gm, node, PRODUCERS)
        if producer is None:
            continue
        name = node.target
        if calls[name] > 1:
            ineligible[name] = f"module is called {calls[name]} times (shared weights cannot be sliced for one call)"
            continue
        if name in tied:
            ineligible[name] = f"it shares a weight with `{tied[name]}` (tied weights cannot be sliced for one layer)"
            continue
        site, chain = node, []
        while len(site.users) == 1:
            (user,) = site.users
            if not is_elementwise(gm, user, site):
                break
            chain.append(user.name)
            site = user
        reason = _consumer_problem(gm, site, calls, tied, PRODUCERS[type(producer)](producer))
        if reason:
            ineligible[name] = reason
            continue
        consumers = [u.target for u in site.users]
        sites.append(Site(name, name, site.name, chain, consumers, PRODUCERS[type(producer)](producer)))
    return sites, ineligible


def tied_modules(gm: fx.GraphModule) -> dict[str, str]:
    """{module path: another module path} for modules that share a parameter object (tied weights)."""
    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    for path, module in gm.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            first = owners.setdefault(id(p), path)
            if first != path:
                tied.setdefault(path, first)
                tied.setdefault(first, path)
    return tied


def _consumer_problem(gm: fx.GraphModule, site: fx.Node, calls: Counter, tied: dict, d: int) -> str | None:
    """Why `site` is not read only by unshared affine consumers of width d (None if it is)."""
    if not site.users:
        return "its output is never read"
    for user in site.users:
        if user.op == "output":
            return "it is read by the model output (no consumer to fold into)"
        layer = _layer(gm, user, CONSUMERS)
        if layer is None:
            return f"it is read by `{user.name}` ({user.op} {getattr(user.target, '__name__', user.target)}), which is not an affine layer fxabstract can fold into"
        if user.args[0] is not site or len(user.all_input_nodes) != 1:
            return f"consumer `{user.target}` reads it in an unsupported way"
        if calls[user.target] > 1:
            return f"consumer `{user.target}` is called {calls[user.target]} times (shared weights)"
        if user.target in tied:
            return f"consumer `{user.target}` shares a weight with `{tied[user.target]}` (tied weights)"
        if CONSUMERS[type(layer)](layer) != d:
            return f"consumer `{user.target}` reads {CONSUMERS[type(layer)](layer)} features, not the {d} units produced"
    return None
