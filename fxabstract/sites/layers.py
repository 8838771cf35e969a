"""Op classes for the site finder (sites.py): which layers produce units, which read them affinely,
which act on each unit separately, which join or flatten them. Layer support is a table
(`PRODUCERS`, `CONSUMERS`, `CHANNEL_OPS`), Torch-Pruning style: a new layer type is one entry here
plus one in `passes/fold.py`.

    >>> is_per_unit(gm, relu_node, conv_node, axis=1, d=16)
    True
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture import VIEWS, ChannelBatchNorm
from .site import Refusal

aten = torch.ops.aten
CONVS = (nn.Conv1d, nn.Conv2d)


def depthwise(m) -> bool:
    """A conv with one input and one output channel per group: a per-channel op, not a producer."""
    return m.groups == m.in_channels == m.out_channels


def _reading_conv(m) -> bool:
    """A conv that can read a site: zero (or no) padding, and a group reads more than one channel (a
    depthwise conv reading a site is per-unit when it is the site's one reader, and keeps every channel
    otherwise)."""
    return m.padding_mode == "zeros" and m.in_channels // m.groups > 1


def groups_of(m) -> int:
    """A conv's groups (channels go the same number from each: `Site.parts`), 1 for other layers."""
    return getattr(m, "groups", 1) if isinstance(m, CONVS) else 1


def dense_weight(m) -> torch.Tensor:
    """A conv's weight as a groups=1 conv's [out, in, *kernel], block diagonal over its groups (float64);
    a Linear's [out, in] (float64). Folds and consumer scores read every layer through this one shape."""
    W = m.weight.detach().double()
    g = groups_of(m)
    if g == 1:
        return W
    out, per = W.shape[0] // g, W.shape[1]
    dense = W.new_zeros(W.shape[0], per * g, *W.shape[2:])
    for j in range(g):
        dense[j * out:(j + 1) * out, j * per:(j + 1) * per] = W[j * out:(j + 1) * out]
    return dense


def regroup(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped weight [out, in / groups, *kernel] of a block-diagonal dense one (`dense_weight`'s
    inverse); the blocks off the diagonal must be zero (a fold that stays within groups)."""
    if groups == 1:
        return dense
    out, per = dense.shape[0] // groups, dense.shape[1] // groups
    blocks = [dense[j * out:(j + 1) * out, j * per:(j + 1) * per] for j in range(groups)]
    rest = dense.clone()
    for j in range(groups):
        rest[j * out:(j + 1) * out, j * per:(j + 1) * per] = 0
    assert not rest.abs().max() > 0, "a fold into a grouped convolution mixed channels of different groups"
    return torch.cat(blocks)


# Layer types whose output features are units (producers) / that read a site affinely (consumers):
# each entry returns the width, or None when this instance cannot serve. Grouped convs serve both ways,
# their channels removed the same number from every group (`Site.parts`); depthwise ones are CHANNEL_OPS.
PRODUCERS = {nn.Linear: lambda m: m.out_features,
             **{c: (lambda m: None if depthwise(m) else m.out_channels) for c in CONVS}}
CONSUMERS = {nn.Linear: lambda m: m.in_features,
             **{c: (lambda m: m.in_channels if _reading_conv(m) else None) for c in CONVS}}
# A residual stream's writers: the producers, and embeddings (unit j is column j of the table).
WRITERS = {**PRODUCERS, nn.Embedding: lambda m: m.embedding_dim}
# Normalisers a residual stream's point may be read by (passes/norms.py compiles them exactly).
NORMS = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def stream_norm(mod, d: int) -> bool:
    """A LayerNorm or RMSNorm over exactly the last d channels."""
    return isinstance(mod, NORMS) and tuple(mod.normalized_shape) == (d,)


# Per-channel layers on the channel axis (dim 1): channel j is deleted with unit j (passes/fold.py).
CHANNEL_OPS = {
    nn.BatchNorm1d: lambda m: m.num_features, nn.BatchNorm2d: lambda m: m.num_features,
    ChannelBatchNorm: lambda m: m.num_features,
    nn.PReLU: lambda m: m.num_parameters if m.num_parameters > 1 else None,
    **{c: (lambda m: m.in_channels if m.groups == m.in_channels == m.out_channels else None) for c in CONVS},
}
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, aten.max_pool1d.default, aten.max_pool2d.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
}

# Per-unit elementwise ops: applied to each feature independently, with no parameters per unit.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Softsign, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanhshrink,
    nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)
IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)  # in eval mode
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.softplus,
    F.softsign, F.hardswish, F.hardsigmoid, F.hardtanh, F.tanhshrink, F.logsigmoid, F.dropout,
    F.alpha_dropout, F.tanh, F.sigmoid, torch.relu, torch.tanh, torch.sigmoid, torch.abs, torch.clamp,
    torch.nn.functional.relu_, torch.sigmoid_, torch.tanh_,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    aten.relu.default, aten.gelu.default, aten.silu.default,
    aten.hardtanh.default, aten.tanh.default, aten.sigmoid.default,
    aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default,
    aten.elu.default, aten.mish.default, aten.dropout.default, aten.clone.default, aten.abs.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.clamp.default, aten.pow.Tensor_Scalar, torch.pow, operator.pow,
    aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,     # casts (Hugging Face's `.to(dtype)`)
} | {getattr(aten, f"{name}_").default for name in (    # torch.export keeps in-place activations (inplace=True)
    "relu", "gelu", "silu", "hardtanh", "tanh", "sigmoid", "hardswish", "hardsigmoid", "leaky_relu", "elu",
    "celu", "selu", "mish", "abs", "clamp") if hasattr(aten, f"{name}_")}
ELEMENTWISE_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "abs", "clamp", "clamp_min", "clamp_max",
    "neg", "add", "sub", "mul", "div", "contiguous", "float", "half", "bfloat16", "double", "to", "type",
}
IDENTITY_FUNCTIONS = {F.dropout, F.alpha_dropout, aten.dropout.default, aten.clone.default}
CAT_FUNCTIONS = {torch.cat, torch.concat, aten.cat.default}
PRODUCT_FUNCTIONS = {operator.mul, torch.mul, aten.mul.Tensor}
FLATTEN_FUNCTIONS = {torch.flatten, aten.flatten.using_ints}


def shape_of(node) -> tuple | None:
    return node.meta.get("fxa_shape") if isinstance(node, fx.Node) else None


# --------------------------------------------------------------------------- op classes

def module_of(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def width_of(table: dict, mod) -> int | None:
    fn = table.get(type(mod))
    return None if fn is None else fn(mod)


def is_metadata(node: fx.Node) -> bool:
    """`x.dtype` or `x.device` (fx): reads no value of x."""
    return node.op == "call_function" and node.target is getattr and node.args[1:] in (("dtype",), ("device",))


def is_elementwise(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """True if `node` applies a per-unit op to `source` and reads no other graph value (a dtype or
    device, `h.to(x.dtype)`, is not a value)."""
    others = [a for a in node.all_input_nodes if a is not source and not is_metadata(a)]
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


def is_per_unit(gm: fx.GraphModule, node: fx.Node, source: fx.Node, axis: int, d: int) -> bool:
    """Elementwise, or (on the channel axis) pooling and per-channel layers of width d."""
    if is_elementwise(gm, node, source):
        return True
    if axis != 1 or [a for a in node.all_input_nodes if a is not source] or node.args[:1] != (source,):
        return False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, POOL_MODULES) or width_of(CHANNEL_OPS, mod) == d
    return node.op == "call_function" and node.target in POOL_FUNCTIONS


def is_cat(node: fx.Node, axis: int) -> bool:
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(shape_of(node) or ())
    return rank > 0 and dim % rank == axis % rank


def _multiplies(node: fx.Node) -> bool:
    """node is `a * b` of two graph values (no keyword arguments)."""
    mul = (node.op == "call_function" and node.target in PRODUCT_FUNCTIONS) or (
        node.op == "call_method" and node.target == "mul")
    return mul and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def is_product(node: fx.Node) -> bool:
    """a * b of two values of the same shape (gated units: a unit is the product of one unit of each)."""
    a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
    return _multiplies(node) and a is not b and shape_of(a) == shape_of(b) == shape_of(node)


def is_batch_size(node: fx.Node) -> bool:
    """x.size(0) / x.shape[0]: reads the batch size only, which removing units does not change."""
    if node.op == "call_method" and node.target == "size":
        return node.args[1:] == (0,) or node.kwargs.get("dim") == 0
    if node.op == "call_function" and node.target in (aten.sym_size.int,):
        return node.args[1] == 0
    return False


def readers_of(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_batch_size(u)]


def is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Flattens every axis after the batch (nn.Flatten(), torch.flatten(x, 1), x.view(B, -1), ...)."""
    rank = len(shape_of(node.args[0]) or ()) if node.args else 0
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim in (-1, rank - 1)
    if node.op == "call_function" and node.target in FLATTEN_FUNCTIONS:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end in (-1, rank - 1)
    if node.op == "call_method" and node.target == "flatten":
        return node.args[1:2] == (1,) and node.args[2:3] in ((), (-1,))
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:] if len(node.args) > 2 else tuple(node.args[1])
        return len(shape) == 2 and isinstance(shape[0], fx.Node) and is_batch_size(shape[0]) and shape[1] == -1
    return False


def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Dropout and Identity, which are identities in eval mode."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), IDENTITY_MODULES)
    return node.op == "call_function" and node.target in IDENTITY_FUNCTIONS and len(node.all_input_nodes) == 1


# --------------------------------------------------------------------------- squeeze-and-excitation

MEAN_FUNCTIONS = {torch.mean, aten.mean.dim}
UNSQUEEZE_FUNCTIONS = {torch.reshape, torch.unsqueeze, operator.getitem, aten.view.default, aten.reshape.default,
                       aten._unsafe_view.default, aten.unsqueeze.default}
UNSQUEEZE_METHODS = {"view", "reshape", "unsqueeze", "__getitem__"}


def gate_of(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, gate) if node is `x * gate` with the gate broadcast over x's positions (an SE block's
    excitation: x [B, C, H, W], gate [B, C, 1, 1]), else None. Unit j of the product is x_j * gate_j."""
    if not _multiplies(node):
        return None
    for x, g in (node.args, node.args[::-1]):
        xs, gs = shape_of(x), shape_of(g)
        if (xs is not None and gs is not None and len(xs) == len(gs) > 2 and xs == shape_of(node) and gs != xs
                and gs[:2] == xs[:2] and all(v == 1 for v in gs[2:])):
            return x, g
    return None


def is_spatial_mean(node: fx.Node, source: fx.Node) -> bool:
    """x.mean((2, 3)) / torch.mean(x, [2, 3], keepdim) / aten.mean.dim: the mean over every axis after
    the channels (a global average pool, per channel)."""
    if not ((node.op == "call_function" and node.target in MEAN_FUNCTIONS)
            or (node.op == "call_method" and node.target == "mean")) or node.args[:1] != (source,):
        return False
    rank = len(shape_of(source) or ())
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    return (rank > 2 and isinstance(dims, (list, tuple)) and all(isinstance(v, int) for v in dims)
            and sorted(v % rank for v in dims) == list(range(2, rank)) and len(node.all_input_nodes) == 1)


def is_unsqueeze(node: fx.Node, source: fx.Node) -> bool:
    """A gate [B, C] (or [B, C, 1]) viewed as [B, C, 1, ...] (view, reshape, unsqueeze, g[:, :, None, None]): the
    units stay on axis 1; the batch size may be read (`g.view(g.size(0), -1, 1, 1)`)."""
    spelled = (node.op == "call_function" and node.target in UNSQUEEZE_FUNCTIONS) or (
        node.op == "call_method" and node.target in UNSQUEEZE_METHODS)
    a, b = shape_of(source), shape_of(node)
    return (spelled and node.args[:1] == (source,) and a is not None and b is not None and len(a) >= 2
            and len(b) > len(a) and b[:2] == a[:2] and all(v == 1 for v in a[2:] + b[2:])
            and all(n is source or is_batch_size(n) for n in node.all_input_nodes))


def view_shape(node: fx.Node) -> list:
    """The target shape of a view/reshape node, as a list (varargs or one list argument)."""
    rest = list(node.args[1:])
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def set_view_shape(node: fx.Node, shape: list) -> None:
    """Give a view/reshape node the target `shape`, spelled as before (varargs or one list), in place."""
    as_list = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    node.args = (node.args[0], shape) if as_list else (node.args[0], *shape)


def resize_unsqueeze(node: fx.Node, width: int) -> None:
    """Write `width` as the channel entry of a view / reshape whose target shape spells it as a constant
    (`g.view(-1, 64, 1, 1)`, aten.view(g, [B, 64, 1, 1])); unsqueeze and indexing need nothing."""
    if node.target in VIEWS and len(shape := view_shape(node)) > 1 and isinstance(shape[1], int):
        shape[1] = width
        set_view_shape(node, shape)


def excitation(x: fx.Node) -> fx.Node | None:
    """The product `x * gate` if x has two readers, that product (x the gated operand) and one other
    (the SE squeeze, checked in excitation.py), else None."""
    for user in readers_of(x):
        pair = gate_of(user)
        if pair is not None and pair[0] is x and sum(1 for r in readers_of(x) if r is not user) == 1:
            return user
    return None


def feeds_gate(node: fx.Node) -> bool:
    """Whether node's value reaches a gate product as its gate, through single readers."""
    while len(readers := readers_of(node)) == 1:
        pair = gate_of(readers[0])
        if pair is not None:
            return pair[1] is node
        node = readers[0]
    return False


def op_name(node: fx.Node) -> str:
    """A node's operation as a bare name: 'view', 'softmax', 'matmul', 'scaled_dot_product_attention'."""
    t = node.target
    if node.op == "call_method":
        return t
    if node.op != "call_function":
        return ""
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[1]
    return "matmul" if t in (operator.matmul, torch.matmul) else getattr(t, "__name__", str(t))


def narrow(t: torch.Tensor) -> torch.Tensor:
    """t without the repeats of a broadcast axis (stride 0): each such axis narrowed to length 1."""
    for a in range(t.dim()):
        if t.stride(a) == 0 and t.shape[a] > 1:
            t = t.narrow(a, 0, 1)
    return t


def size_reads(node: fx.Node) -> list[tuple[int, fx.Node]] | None:
    """[(d, n)] for a read of sizes of node's input alone: n is the node whose value is the size of axis d
    (`x.size(d)`, aten.sym_size.int(x, d); `x.shape[d]` and `x.size()[d]` in fx, n the getitem); None if
    node is none of these (a shape used whole, `x.shape[1:]` or `x.view(x.shape)`, included)."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        return [(node.args[1], node)]
    if node.op == "call_function" and node.target == aten.sym_size.int:
        return [(node.args[1], node)]
    if whole_shape(node) and all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
        return [(u.args[1], u) for u in node.users]
    return None


def whole_shape(node: fx.Node) -> bool:
    """`x.shape` or `x.size()` (fx): every axis' size at once."""
    return (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)) or (
        node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs)


def size_dims(node: fx.Node) -> list[int] | None:
    """[d] of `x.size(d)` / aten.sym_size.int(x, d), the d's of `x.shape[d]` (fx), else None."""
    reads = size_reads(node)
    return None if reads is None else [dim for dim, _ in reads]


def stateless(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A module without parameters or buffers (an activation, a pooling): calling it more than once
    (`self.act(a)`, `self.act(b)`) shares nothing that a fold would slice."""
    mod = gm.get_submodule(node.target)
    return next(mod.parameters(), None) is None and next(mod.buffers(), None) is None


def zero_padded(m: nn.Module) -> bool:
    """A conv whose zero padding makes a constant input channel non-constant at the border."""
    return isinstance(m, CONVS) and (m.padding == "same" or (m.padding != "valid" and any(m.padding)))


def is_position_index(node: fx.Node, source: fx.Node) -> bool:
    """`x[:, 0]` (getitem with constant ints and slices; aten.select / aten.slice in torch.export): picks
    positions on axes before the last and leaves the last axis, the units, whole (a ViT's head reading
    the class token)."""
    rank = len(shape_of(source) or ())
    if node.args[:1] != (source,) or node.kwargs or not rank:
        return False
    if node.op == "call_function" and node.target in (aten.select.int, aten.slice.Tensor):
        return isinstance(node.args[1], int) and node.args[1] % rank != rank - 1 and all(
            isinstance(v, (int, type(None))) for v in node.args[2:])
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    constant = all(isinstance(i, int) or (isinstance(i, slice) and all(
        isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step))) for i in index)
    return constant and (len(index) < rank or (len(index) == rank and index[-1] == slice(None)))


def parameter_of(gm: fx.GraphModule, node: fx.Node) -> nn.Parameter | None:
    """The Parameter a get_attr node reads (a ViT's class token or position embedding), else None."""
    if node.op != "get_attr":
        return None
    try:
        return gm.get_parameter(node.target)
    except AttributeError:
        return None


def writer_of(gm: fx.GraphModule, path: str):
    """The module at `path`, or the Parameter there (a residual stream's Parameter writer)."""
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return gm.get_parameter(path)


def consumer_reads(gm: fx.GraphModule, site: fx.Node, calls: Counter, d: int, axis: int, tied: dict,
                   ignore=frozenset(), positions: bool = False):
    """{consumer: how it reads} if `site` is read only by unshared affine consumers (and the nodes in
    `ignore`: a residual stream's own adds); Refusal if not. With `positions`, a consumer may read the
    features at some positions only (`is_position_index`: a stream normaliser's output, whose readers'
    fold commutes with the index)."""
    readers = [r for r in readers_of(site) if r not in ignore]
    if not readers:
        raise Refusal("its output is never read")
    rank = len(shape_of(site))
    reads = {}
    for user in readers:
        how = "features" if axis == rank - 1 else "channels"
        if positions and how == "features" and is_position_index(user, site):
            if len(readers_of(user)) != 1:
                raise Refusal(f"positions of it are picked (`{user.name}`) and then read by "
                              f"{len(readers_of(user))} nodes")
            user = readers_of(user)[0]
        if user.op != "output" and is_flatten(gm, user) and axis == 1 and rank > 2:
            nxt = readers_of(user)
            while len(nxt) == 1 and is_identity(gm, nxt[0]):
                nxt = readers_of(nxt[0])
            if len(nxt) != 1:
                raise Refusal(f"it is flattened (`{user.name}`) and then read by {len(nxt)} nodes")
            user, how = nxt[0], "flattened"
        if user.op == "output":
            raise Refusal("it is read by the model output (no consumer to fold into)")
        layer = module_of(gm, user)
        width = None if layer is None else width_of(CONSUMERS, layer)
        if width is None and isinstance(layer, CONVS) and layer.padding_mode == "zeros":
            raise Refusal(f"it is read by depthwise convolution `{user.target}` (groups={layer.groups}) as a "
                          "consumer: each of its groups reads one channel, so no channel can go (a depthwise conv "
                          "is followed as a per-channel op only as a value's one reader)")
        if width is None:
            target = getattr(user.target, "__name__", user.target)
            others = f" (one of its {len(readers)} readers: {', '.join(f'`{r.name}`' for r in readers)}; " \
                     "per-unit ops are followed only when they are a value's one reader)" if len(readers) > 1 else ""
            raise Refusal(f"it is read by `{user.name}` ({user.op} {target}), which is not an affine layer "
                          f"fxabstract can fold into{others}")
        if len(user.all_input_nodes) != 1:
            raise Refusal(f"consumer `{user.target}` reads it in an unsupported way")
        if calls[user.target] > 1:
            raise Refusal(f"consumer `{user.target}` is called {calls[user.target]} times (shared weights)")
        if user.target in tied:
            raise Refusal(f"consumer `{user.target}` shares a weight with `{tied[user.target]}` (tied weights)")
        if isinstance(layer, nn.Linear) and how == "channels":
            raise Refusal(f"consumer `{user.target}` is a Linear over an axis that is not the units' axis")
        if isinstance(layer, CONVS) and how != "channels":
            raise Refusal(f"consumer `{user.target}` convolves an axis that is not the units' axis")
        if how == "flattened" and width % d:
            raise Refusal(f"consumer `{user.target}` reads {width} features, not a multiple of the {d} units")
        if how != "flattened" and width != d:
            raise Refusal(f"consumer `{user.target}` reads {width} features, not the {d} units produced")
        reads[user.target] = how
    return reads
