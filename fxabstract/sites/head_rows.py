"""Which rows of which projection each attention head reads: q, k and v are followed back from the
attention kernel through index ops (views, transposes, permutes, unbind, split/chunk, select,
scalar scaling) to the Linear(s) that produce them, and the producer's row indices are carried
forward along the same ops (docs/math.md §1: a removed unit's producer rows are deleted; here a head's
rows are deleted from q, k and v).

One evaluator serves every layout users write, in fx or aten spelling:

    q, k, v = Linear x3 -> view [B, T, h, dh] -> transpose(1, 2)                (three projections)
    qkv = Linear(d, 3d) -> reshape [B, T, 3, h, dh] -> permute(2, 0, 3, 1, 4); q, k, v = qkv.unbind(0)
    q, k, v = Linear(d, 3d).split(d, dim=-1)  (or .chunk(3, -1)) -> view -> transpose
    q, k -> rotary / q-k norm over head_dim (head_ops.py: per-head ops, row indices unchanged)
    k, v -> repeat_kv (unsqueeze/None index, expand, reshape) or repeat_interleave   (GQA: gqa.py)

The row indices are `arange(out_features)` broadcast to the traced shape (a stride-0 view: no copy),
so the value at q[b, j, t, i] is the producer row that q[b, j, t, i] is; a head is laid out well when
that does not depend on b and t. A view's *head axis* is the one axis whose slabs are whole heads:
fold rewrites its size there (`heads * units per head`).

    >>> chains, reason = trace_back(gm, [q_in, k_in, v_in])   # {input: (Linear node, [index ops])}, None
"""
from __future__ import annotations


import torch
import torch.fx as fx
from torch import nn

from .head_ops import region
from .layers import shape_of, is_batch_size, narrow, op_name, size_dims
from .site import Refusal
from .splits import split_call, constant_sizes, split_intervals, traced_sizes

aten = torch.ops.aten
RESHAPES = {"view", "reshape", "_unsafe_view"}
INDEX_OPS = RESHAPES | {"transpose", "permute", "contiguous", "clone", "unbind", "getitem", "select",
                        "split", "chunk", "split_with_sizes", "tensor_split", "to", "type", "float",
                        "expand", "unsqueeze", "slice", "repeat_interleave", "type_as"}   # + repeat_kv (GQA)
SCALINGS = {"mul", "div", "truediv"}          # by a Python number: each row keeps its index
IDENTITY_MODULES = (nn.Identity, nn.Dropout)


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear)


def _passes_rows(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that moves values without mixing them: each output element is one input element."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), IDENTITY_MODULES) and len(node.all_input_nodes) == 1
    name = op_name(node)
    if name in SCALINGS:                         # by a number, or a scalar computed from sizes (no tensor shape)
        if len(node.args) != 2 or node.kwargs:
            return False
        x = chain_input(node)
        other = node.args[1] if x is node.args[0] else node.args[0]
        return isinstance(x, fx.Node) and shape_of(x) is not None and (
            isinstance(other, (int, float)) or (isinstance(other, fx.Node) and shape_of(other) is None))
    if name == "getitem":                        # x[0], or x[:, :, None] (a new axis)
        index = node.args[1]
        return isinstance(index, int) or isinstance(index, tuple) and all(
            i is None or i is Ellipsis or i == slice(None, None, None) for i in index)
    if split_call(node) is not None:            # sizes computed from shapes: read off every traced piece
        return constant_sizes(node) or traced_sizes(node) is not None
    if name == "dropout":
        return len(node.all_input_nodes) == 1
    if name == "slice":                          # a whole axis only: a part would need its bounds rewritten
        x, size = node.args[0], shape_of(node)
        return isinstance(x, fx.Node) and shape_of(x) is not None and size is not None and shape_of(x) == size
    if name == "repeat_interleave":              # by a number of repeats
        return len(node.args) >= 2 and isinstance(node.args[1], int)
    return name in INDEX_OPS and node.args[:1] != () and isinstance(node.args[0], fx.Node)


def chain_input(node: fx.Node):
    """The tensor an index op or scaling reads: its first argument (the second in `scale * q`)."""
    a = node.args[0]
    if op_name(node) == "mul" and len(node.args) == 2 and isinstance(node.args[1], fx.Node) and (
            not isinstance(a, fx.Node) or shape_of(a) is None):
        return node.args[1]
    return a


def trace_back(gm: fx.GraphModule, starts: list[fx.Node]):
    """({start: (Linear node, nodes from the Linear's reader to start)} for the starts that reach a
    Linear, and None or the reason naming the node where following stopped)."""
    out, reason = {}, None
    for start in starts:
        node, chain = start, []
        while isinstance(node, fx.Node) and not is_linear(gm, node) and (
                _passes_rows(gm, node) or region(gm, node) is not None):
            chain.append(node)
            node = source(gm, node)
        if isinstance(node, fx.Node) and is_linear(gm, node):
            out[start] = (node, chain[::-1])
        elif reason is None:
            name = getattr(node, "name", node)
            reason = (f"`{name}` ({op_name(node) or node.op}) between a projection and the attention is not a view, "
                      "transpose, permute, unbind, split or scaling that fxabstract can follow")
    return out, reason


def source(gm: fx.GraphModule, node: fx.Node):
    """The value a chain node reads: chain_input, or the source of a per-head op (rotary, q/k norm)."""
    if _passes_rows(gm, node):
        return chain_input(node)
    return region(gm, node).source


def apply_op(node: fx.Node, x):
    """node's op on x (a tensor or a tuple of tensors of row indices)."""
    name = op_name(node)
    args = node.args[1:]
    if name in RESHAPES:
        return x.reshape(shape_of(node))
    if name == "transpose":
        return x.transpose(*args)
    if name == "permute":
        return x.permute(*(args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args))
    if name == "unbind":
        return x.unbind(args[0] if args else node.kwargs.get("dim", 0))
    if name == "select":
        return x.select(*args)
    if name == "getitem":
        return x[args[0]]
    if name == "expand":
        return x.expand(shape_of(node))
    if name == "unsqueeze":
        return x.unsqueeze(args[0])
    if name == "slice":
        dim, rest = args[0] if args else 0, list(args[1:]) + [None] * (3 - len(args[1:]))
        return x[(slice(None),) * (dim % x.dim()) + (slice(*rest),)]
    if name == "repeat_interleave":
        return x.repeat_interleave(args[0], dim=args[1] if len(args) > 1 else node.kwargs.get("dim"))
    if split_call(node) is not None:
        dim = split_call(node)[2]
        return x.split([hi - lo for lo, hi in split_intervals(node, x.shape[dim])], dim)
    return x          # contiguous, clone, casts, dropout, identity, scaling; rotary and q/k norm (head_ops.py)


def evaluate(gm: fx.GraphModule, chains: dict) -> dict[fx.Node, torch.Tensor]:
    """Row indices of every node on the chains: {node: tensor (or tuple) of producer row indices}."""
    env = {}
    for linear, chain in chains.values():
        if linear not in env:
            env[linear] = torch.arange(gm.get_submodule(linear.target).out_features).expand(shape_of(linear))
        for node in chain:
            if node not in env:
                env[node] = apply_op(node, env[source(gm, node)])
    return env


def head_axis(t: torch.Tensor, heads: list[torch.Tensor]) -> tuple[int, int] | None:
    """(axis, positions per head on it) if every head's rows fill whole slabs along one axis of t
    (the h of [B, T, 3, h, dh], the h * dh of [B, T, h * dh]), else None."""
    t = narrow(t)
    found = set()
    for rows in heads:
        mine = torch.isin(t, rows)                                           # [t.shape] bool
        axes = []
        for a in range(t.dim()):
            slab = mine.movedim(a, 0).reshape(t.shape[a], -1).any(1)         # [n_a]: positions head j fills
            if slab.any() and torch.equal(mine, slab.view([-1 if b == a else 1 for b in range(t.dim())])
                                          .expand_as(mine)):
                axes.append((a, int(slab.sum())))
        if len(axes) != 1:
            return None
        found.add(axes[0])
    return found.pop() if len(found) == 1 else None


def check_stray_readers(heads_of: dict[fx.Node, list[torch.Tensor]], readers: set[fx.Node], env: dict) -> None:
    """Refusal if a value on the chains (heads_of: node -> the rows of each head of its producer) is read by
    something else than the chains and `readers` (the attention), or None: the other readers allowed
    are size reads of an axis that does not carry heads (`k.size(-1)`), batch-size reads and dead nodes."""
    for node, heads in heads_of.items():
        for user in node.users:
            if user in heads_of or user in readers or is_batch_size(user) or not user.users:
                continue
            dims = size_dims(user)
            if dims is not None and isinstance(env[node], torch.Tensor):
                axis = head_axis(env[node], heads)
                if axis is not None and all(d % env[node].dim() != axis[0] for d in dims):
                    continue
            raise Refusal(f"`{node.name}` on the way from a projection to the attention is also read by "
                          f"`{user.name}` ({op_name(user) or user.op}), which depends on the head count")
