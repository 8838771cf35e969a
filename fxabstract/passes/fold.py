"""Fold every `Replacement` into its consumers and delete the replaced units from the producers and
the per-channel layers between: the graph physically shrinks and computes exactly what the dense
intervened graph computed (docs/math.md §1, exact transformation).

    bias folding    b' = b + W[:, P] beta                       (scalar, per consumer output)
    weight folding  W' = W[:, K] + W[:, P] theta                (1x1 mixing of the input channels)
    grouped convs   the same on the block-diagonal groups=1 weight; every group keeps as many channels
                    and theta stays within groups (`Site.parts`), so the result is grouped again
    zero padding    a constant channel is zero at the padded border, so beta folds into a spatial
                    bias map conv(beta, W[:, P]) for the traced input size (`BiasMapConv`), exactly
    producers       rows K only; per-channel layers (BatchNorm, depthwise conv, PReLU) channels K;
                    a split of the producer's output takes the sizes of its pieces that are left
    SE branches     the squeeze's own Replacement folds into fc1 like any other (its site has no
                    producers: the rows go with the main site); a gate view [B, d, 1, 1] takes d kept

Layer support is a table, one entry per type: how to keep only some outputs (or channels), how to
fold a replacement into its inputs. Arithmetic is float64, cast back to the layer's dtype.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture import ChannelBatchNorm, copy_module
from ..sites import PATTERNS, dense_weight, regroup
from ..sites.layers import writer_of
from . import norms
from .plan import Replacement


class BiasMapConv(nn.Module):
    """conv(x) + bias_map: the exact fold of constants into a zero-padded convolution; the map
    [out, *spatial] is for the input size the model was calibrated on."""

    def __init__(self, conv: nn.Module, bias_map: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias_map


def _new_like(m: nn.Module, **changes) -> nn.Module:
    """A layer of m's type and hyper-parameters with some changed, parameters uninitialised."""
    if isinstance(m, nn.Linear):
        args = dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        args = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode)
    else:
        raise AssertionError(f"no constructor for {type(m).__name__}")
    args.update(changes)
    return type(m)(**args, device=m.weight.device, dtype=m.weight.dtype)


def _assign(new: nn.Module, **tensors) -> nn.Module:
    with torch.no_grad():
        for name, t in tensors.items():
            if t is not None:
                getattr(new, name).copy_(t)
    return new


# --------------------------------------------------------------------------- keep outputs / channels

def _keep_rows(m, K):
    if isinstance(m, BiasMapConv):
        return BiasMapConv(_keep_rows(m.conv, K), m.bias_map[K].clone())
    key = "out_features" if isinstance(m, nn.Linear) else "out_channels"
    new = _new_like(m, **{key: len(K)})
    return _assign(new, weight=m.weight[K], bias=None if m.bias is None else m.bias[K])


def _keep_columns(m: nn.Embedding, K):
    """An embedding table's columns K (a residual stream's channels)."""
    new = nn.Embedding(m.num_embeddings, len(K), padding_idx=m.padding_idx, max_norm=m.max_norm,
                       norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                       device=m.weight.device, dtype=m.weight.dtype)
    return _assign(new, weight=m.weight[:, K])


def _keep_depthwise(m, K):
    new = _new_like(m, in_channels=len(K), out_channels=len(K), groups=len(K))
    return _assign(new, weight=m.weight[K], bias=None if m.bias is None else m.bias[K])


def _keep_batch_norm(m, K):
    new = type(m)(len(K), eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, device=m.running_mean.device,
                  dtype=m.running_mean.dtype)
    with torch.no_grad():
        new.running_mean.copy_(m.running_mean[K])
        new.running_var.copy_(m.running_var[K])
        if m.affine:
            new.weight.copy_(m.weight[K])
            new.bias.copy_(m.bias[K])
    return new.eval()


def _keep_prelu(m, K):
    new = nn.PReLU(len(K), device=m.weight.device, dtype=m.weight.dtype)
    return _assign(new, weight=m.weight[K])


def _keep_last(p: nn.Parameter, K):
    """A Parameter's slice K along its last axis (a residual stream's class token or position embedding)."""
    return nn.Parameter(p.detach()[..., K].clone(), requires_grad=p.requires_grad)


KEEP_OUTPUTS = {nn.Linear: _keep_rows, nn.Conv1d: _keep_rows, nn.Conv2d: _keep_rows, BiasMapConv: _keep_rows,
                nn.Embedding: _keep_columns, nn.Parameter: _keep_last}
KEEP_CHANNELS = {nn.BatchNorm1d: _keep_batch_norm, nn.BatchNorm2d: _keep_batch_norm,
                 ChannelBatchNorm: _keep_batch_norm, nn.PReLU: _keep_prelu,
                 nn.Conv1d: _keep_depthwise, nn.Conv2d: _keep_depthwise}


# --------------------------------------------------------------------------- fold inputs

def _fold_linear(m: nn.Linear, r: Replacement) -> nn.Module:
    """Features: W' = W_K + W_P theta, b' = b + W_P beta. Flattened: the same per block position."""
    d = r.site.n_units
    W = m.weight.detach().double().reshape(m.out_features, d, -1)             # [o, d, block]
    WP, theta, beta = W[:, r.removed], r.theta.double(), r.beta.double()
    W_new = W[:, r.kept] + torch.einsum("opb,pk->okb", WP, theta)              # W' = W_K + W_P theta
    b_new = torch.einsum("opb,p->o", WP, beta)                                 # b' = b + W_P beta
    if m.bias is not None:
        b_new = b_new + m.bias.detach().double()
    new = _new_like(m, in_features=len(r.kept) * W.shape[2], bias=True)
    return _assign(new, weight=W_new.reshape(m.out_features, -1), bias=b_new)


def _fold_conv(m: nn.Module, r: Replacement) -> nn.Module:
    """Weight folding per kernel tap; beta into the bias, or a bias map under zero padding."""
    if isinstance(m, BiasMapConv):
        inner = _fold_conv(m.conv, r)
        if isinstance(inner, BiasMapConv):
            return BiasMapConv(inner.conv, inner.bias_map + m.bias_map)
        return BiasMapConv(inner, m.bias_map)
    W = dense_weight(m)                                                        # [o, d, *kernel], groups=1
    WP, theta, beta = W[:, r.removed], r.theta.double(), r.beta.double()
    W_new = W[:, r.kept] + torch.einsum("op...,pk->ok...", WP, theta)          # W' = W_K + W_P theta
    bias = torch.zeros(m.out_channels, dtype=torch.float64, device=W.device) if m.bias is None \
        else m.bias.detach().double()
    new = _new_like(m, in_channels=len(r.kept), bias=True)
    W_new = regroup(W_new, m.groups)          # as many kept per group, theta within groups: stays grouped
    padded = m.padding == "same" or (m.padding != "valid" and any(m.padding))
    if not padded:
        return _assign(new, weight=W_new, bias=bias + WP.flatten(2).sum(2) @ beta)  # b' = b + W_P beta
    spatial = r.site.shape[1:]                                                 # the traced input size
    filled = beta.reshape(1, -1, *([1] * len(spatial))).expand(1, len(beta), *spatial)
    conv = F.conv1d if W.dim() == 3 else F.conv2d
    bias_map = conv(filled, WP, None, m.stride, m.padding, m.dilation)[0]      # conv(beta, W_P): [o, *out]
    new = _assign(new, weight=W_new, bias=bias)
    return BiasMapConv(new, (bias_map.to(m.weight.dtype)))


FOLD_INPUTS = {nn.Linear: _fold_linear, nn.Conv1d: _fold_conv, nn.Conv2d: _fold_conv, BiasMapConv: _fold_conv}


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def fold(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm with every Replacement folded away.

    Rows (channels) are deleted once per layer after every site is folded: the pieces of a split
    value are several sites that delete rows of one producer. Each pattern of the site table then
    rewrites the graph for the kept units (`sites.patterns`: head counts, split sizes, gate views)."""
    gm = copy_module(gm)
    deleted: dict[str, set[int]] = {}         # producer or per-channel layer -> its rows to delete
    rows: dict[str, tuple[dict, int]] = {}    # the same layer -> (its table, its rows in all)
    folded = []                               # (site, kept units) of every replacement folded
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Replacement):
            continue
        r = gm.get_submodule(node.target)
        site = r.site
        for consumer in site.reads:
            layer = gm.get_submodule(consumer)
            if consumer in site.norms:        # a stream's LayerNorm: its readers take the features it returns
                for reader in site.norms[consumer]:
                    _set_module(gm, reader, norms.fold_reader(gm.get_submodule(reader), layer, r))
                _set_module(gm, consumer, norms.StreamNorm.of(layer, r))
                continue
            _set_module(gm, consumer, FOLD_INPUTS[type(layer)](layer, r))
        removed = r.removed.tolist()
        for table, pieces in ((KEEP_OUTPUTS, site.pieces), (KEEP_CHANNELS, site.channel_ops)):
            for piece in pieces:
                deleted.setdefault(piece.module, set()).update(piece.rows_of(removed))
                rows[piece.module] = (table, piece.total)
        folded.append((site, r.kept.tolist()))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    for pattern in PATTERNS:                  # heads, splits, SE gate views: the graph takes the kept sizes
        pattern.rewrite(gm, folded)
    for path, drop in deleted.items():
        if not drop:
            continue
        table, total = rows[path]
        layer = writer_of(gm, path)
        keep = torch.tensor([i for i in range(total) if i not in drop], dtype=torch.long)
        _set_module(gm, path, table[type(layer)](layer, keep))
    gm.graph.lint()
    gm.recompile()
    return gm
