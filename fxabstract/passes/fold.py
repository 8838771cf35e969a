"""Fold every `Replacement` into its consumers and delete the replaced units from the producer:
the graph physically shrinks and computes exactly what the dense intervened graph computed.

    bias folding    b' = b + W[:, P] beta                       (THEORY §1, exact transformation)
    weight folding  W' = W[:, K] + W[:, P] theta
    producer        rows K only; the elementwise chain in between is per unit and needs no change

Layer support is a table, one entry per type: how to keep only some outputs, how to fold a
replacement into its inputs. Arithmetic is float64, cast back to the layer's dtype.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..sites import PRODUCERS, is_elementwise
from .replace import Replacement


def _linear_keep_outputs(m: nn.Linear, K: torch.Tensor) -> nn.Linear:
    new = nn.Linear(m.in_features, len(K), bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight[K])
        if m.bias is not None:
            new.bias.copy_(m.bias[K])
    return new


def _linear_fold_inputs(m: nn.Linear, r: Replacement) -> nn.Linear:
    W = m.weight.detach().double()                                   # [o, d]
    WP = W[:, r.removed]
    W_new = W[:, r.kept] + WP @ r.theta.double()                      # W' = W_K + W_P theta
    b_new = WP @ r.beta.double()                                      # b' = b + W_P beta
    if m.bias is not None:
        b_new = b_new + m.bias.detach().double()
    new = nn.Linear(len(r.kept), m.out_features, bias=True, device=W.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(W_new)
        new.bias.copy_(b_new)
    return new


KEEP_OUTPUTS = {nn.Linear: _linear_keep_outputs}
FOLD_INPUTS = {nn.Linear: _linear_fold_inputs}


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def producer_of(gm: fx.GraphModule, site: fx.Node) -> fx.Node:
    """Walk back from a site through its per-unit elementwise chain to the producing layer."""
    node = site
    while not (node.op == "call_module" and type(gm.get_submodule(node.target)) in PRODUCERS):
        source = node.args[0]
        assert is_elementwise(gm, node, source), f"{node.name} is not a per-unit op between producer and site"
        node = source
    return node


def fold(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm with every Replacement folded away."""
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Replacement):
            continue
        r = gm.get_submodule(node.target)
        site = node.args[0]
        for user in node.users:
            consumer = gm.get_submodule(user.target)
            _set_module(gm, user.target, FOLD_INPUTS[type(consumer)](consumer, r))
        producer = producer_of(gm, site)
        layer = gm.get_submodule(producer.target)
        _set_module(gm, producer.target, KEEP_OUTPUTS[type(layer)](layer, r.kept))
        node.replace_all_uses_with(site)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm
