"""Front end: a user's nn.Module -> torch.fx.GraphModule, on a copy, in eval mode.

    >>> gm = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'call_module', 'output']

The user's model is never touched: we trace a deep copy, switched to eval mode (dropout off,
BatchNorm on running statistics), because the abstraction is of the deployed function.

Two front ends, one graph shape. `torch.fx.symbolic_trace` first; when it fails (data-dependent
control flow, Hugging Face models) and an example batch is at hand, `torch.export`. Both graphs then
go through `modularize`, which turns function-level layers whose parameters are attributes
(`F.linear(x, self.w)`, `aten.linear`, `aten.conv2d`, `aten.batch_norm`) into `call_module` nodes
of the matching nn layer holding the same tensors, so one set of passes serves both front ends.
`linearize_addmm` does the same for Hugging Face's Conv1D (GPT-2): view -> addmm -> view over a
weight stored [in, out] becomes an nn.Linear holding the transposed weight.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import operator
import os
import traceback
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import CaptureError

_TORCH_DIR = os.path.dirname(os.path.dirname(nn.__file__))
aten = torch.ops.aten


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's line that stopped tracing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.basename(os.path.dirname(f.filename)) != "fxabstract"]
    if not frames:
        return "inside torch"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def capture(model: nn.Module, example: tuple[tuple, dict] | None = None) -> fx.GraphModule:
    """Trace an eval-mode deep copy of `model`: symbolic_trace, else torch.export on `example`
    ((args, kwargs) of one batch, batch axis dynamic)."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
    model_copy = copy_module(model).eval()
    exported = False
    try:
        gm = fx.symbolic_trace(model_copy)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... for untraceable code
        fx_error = f"torch.fx could not trace {type(model).__name__} at {_user_frame(exc)}: {_first_line(exc)}"
        if example is None:
            raise CaptureError(f"{fx_error}; pass calibration data so that fxabstract can try torch.export, "
                               "or make that line free of data-dependent Python control flow") from None
        with _quiet():
            gm, exported = _export(model_copy, example, fx_error), True
    for node in gm.graph.nodes:  # `from __future__ import annotations` leaves types as strings,
        if isinstance(node.type, str):  # which GraphModule cannot pickle
            node.type = None
    linearize_addmm(gm)
    modularize(gm)
    drop_whole_slices(gm)
    drop_identities(gm)
    drop_metadata_asserts(gm)
    if not exported:  # torch.export's module is already in eval form and refuses .eval()
        gm.eval()
    return gm


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of `module`, without the pytree deprecation warning that copying a torch.export
    module raises (TreeSpec, torch 2.13): fxabstract's own copies print nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*(treespec|TreeSpec|LeafSpec).*")
        return copy.deepcopy(module)


@contextlib.contextmanager
def _quiet():
    """While torch.export runs: a failure prints its partial graph to stderr and symbolic_shapes logs
    warnings; fxabstract reports the failure in one line (CaptureError) instead."""
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def export_dims(forward, args: tuple, kwargs: dict) -> dict:
    """torch.export's dynamic_shapes for inputs (args, kwargs) of `forward`: axis 0 of every tensor is the
    batch axis (one Dim shared by all), and axis 1 of an integer tensor of two or more axes (token ids, an
    attention mask: [B, T]) is left for export to make dynamic where the model allows it, so a module
    exported on one sequence length runs on any. Keyed by forward's parameter names."""
    batch = torch.export.Dim("batch", min=1)

    def spec(v):
        if not isinstance(v, torch.Tensor) or not v.dim():
            return None
        sequence = v.dim() >= 2 and not (v.is_floating_point() or v.is_complex())
        return {0: batch, **({1: torch.export.Dim.AUTO} if sequence else {})}

    bound = inspect.signature(forward).bind(*args, **kwargs).arguments
    return {k: torch.utils._pytree.tree_map(spec, v) for k, v in bound.items()}


def _export(model: nn.Module, example: tuple[tuple, dict], fx_error: str) -> fx.GraphModule:
    """torch.export front end, batch axis dynamic where the batch allows it, and the sequence axis of
    integer inputs (token ids, attention masks: [B, T]) dynamic where the model allows it, so that the
    compiled module runs on any length the original runs on. The example is cloned first: a view as
    example input leaves guards on its base's size in the program."""
    args, kwargs = torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, example)
    try:
        try:
            dynamic = export_dims(model.forward, args, kwargs)
            program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception:  # a model that specialises the batch size: export it static
            program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:
        raise CaptureError(f"{fx_error}; torch.export failed too at {_user_frame(exc)}: {_first_line(exc)}; "
                           "make that line traceable (no data-dependent Python control flow)") from None
    return program.module()


def drop_whole_slices(gm: fx.GraphModule) -> None:
    """Remove torch.export's no-op slices (`x[:, a:b]` is exported as x[0:2**63-1] on the batch axis,
    then a slice on axis 1), so that a slice of the units reads the value itself; in place."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.slice.Tensor and not node.kwargs \
                and tuple(node.args[2:]) in ((), (0, 2**63 - 1), (0, 2**63 - 1, 1), (None, None), (None, None, 1)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def drop_identities(gm: fx.GraphModule) -> None:
    """Remove calls of nn.Identity modules (a ResNet's `maxpool = nn.Identity()`), as Dynamo inlines them,
    so that a site's value and chain are the same whichever front end captured the model; in place."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity \
                and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """Remove torch.export's `_assert_tensor_metadata` checks (they return nothing and compute nothing),
    so that a value they check keeps its one real reader (GPT-2's softmax -> to); in place."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


# --------------------------------------------------------------------------- modularize

class ChannelBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over dim 1 of an input of any rank (what aten.batch_norm computes)."""

    def _check_input_dim(self, input):
        pass


def _attr(gm: fx.GraphModule, node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _linear(gm, node):
    x, w, b = (list(node.args) + [None])[:3]
    if _attr(gm, w) is None or (b is not None and _attr(gm, b) is None):
        return None
    W = _tensor(gm, w.target)
    m = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    return m, {"weight": w, "bias": b}, x


def _conv(gm, node, dims):
    a = list(node.args) + [None] * 7
    x, w, b, stride, padding, dilation, groups = a[:7]
    if _attr(gm, w) is None or (b is not None and _attr(gm, b) is None) or isinstance(padding, str):
        return None
    W = _tensor(gm, w.target)
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    m = cls(W.shape[1] * (groups or 1), W.shape[0], tuple(W.shape[2:]), stride=tuple(stride or [1] * dims),
            padding=tuple(padding or [0] * dims), dilation=tuple(dilation or [1] * dims), groups=groups or 1,
            bias=b is not None)
    return m, {"weight": w, "bias": b}, x


def _batch_norm(gm, node):
    """aten.batch_norm / torch.batch_norm: (input, weight, bias, running_mean, running_var, training, ...)."""
    x, w, b, rm, rv, training, _momentum, eps = node.args[:8]
    return _batch_norm_layer(gm, x, w, b, rm, rv, training, eps)


def _functional_batch_norm(gm, node):
    """F.batch_norm: (input, running_mean, running_var, weight, bias, training, momentum, eps), by keyword
    too (Dynamo's graphs)."""
    bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return _batch_norm_layer(gm, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                             a["training"], a["eps"])


def _batch_norm_layer(gm, x, w, b, rm, rv, training, eps):
    if training or any(_attr(gm, v) is None for v in (rm, rv)) or any(
            v is not None and _attr(gm, v) is None for v in (w, b)):
        return None
    m = ChannelBatchNorm(_tensor(gm, rm.target).shape[0], eps=eps, affine=w is not None).eval()  # running stats
    return m, {"weight": w, "bias": b, "running_mean": rm, "running_var": rv}, x


def _layer_norm(gm, node, rms: bool = False):
    """aten.layer_norm / F.layer_norm: (input, normalized_shape, weight, bias, eps); aten.rms_norm /
    F.rms_norm: (input, normalized_shape, weight, eps). Only with a weight parameter (it names the layer)."""
    if rms:
        x, shape, w, eps = (list(node.args) + [None] * 4)[:4]
        b = None
    else:
        x, shape, w, b, eps = (list(node.args) + [None, None, 1e-5])[:5]
    if _attr(gm, w) is None or (b is not None and _attr(gm, b) is None) or not isinstance(eps, (float, type(None))):
        return None
    shape = tuple(shape)
    if rms:
        return nn.RMSNorm(shape, eps=eps), {"weight": w}, x
    m = nn.LayerNorm(shape, eps=1e-5 if eps is None else eps, bias=b is not None)
    return m, {"weight": w, "bias": b}, x


def _embedding(gm, node, functional: bool):
    """aten.embedding: (weight, indices, padding_idx=-1, ...); F.embedding: (input, weight, padding_idx, ...)."""
    a = list(node.args) + [None] * 3
    ids, w, pad = (a[0], a[1], a[2]) if functional else (a[1], a[0], a[2])
    if _attr(gm, w) is None or not isinstance(pad, (int, type(None))) or len(node.args) > 3:
        return None
    W = _tensor(gm, w.target)
    m = nn.Embedding(W.shape[0], W.shape[1], padding_idx=None if pad is None or pad < 0 else pad)
    return m, {"weight": w}, ids


def _tensor(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


FUNCTIONAL_LAYERS = {
    F.linear: _linear, aten.linear.default: _linear,
    F.conv1d: lambda gm, n: _conv(gm, n, 1), aten.conv1d.default: lambda gm, n: _conv(gm, n, 1),
    F.conv2d: lambda gm, n: _conv(gm, n, 2), aten.conv2d.default: lambda gm, n: _conv(gm, n, 2),
    aten.batch_norm.default: _batch_norm, torch.batch_norm: _batch_norm, F.batch_norm: _functional_batch_norm,
    aten.layer_norm.default: _layer_norm, F.layer_norm: _layer_norm,
    aten.rms_norm.default: lambda gm, n: _layer_norm(gm, n, rms=True),
    F.rms_norm: lambda gm, n: _layer_norm(gm, n, rms=True),
    aten.embedding.default: lambda gm, n: _embedding(gm, n, False), F.embedding: lambda gm, n: _embedding(gm, n, True),
}
BY_KEYWORD = {F.batch_norm}     # handlers that bind keyword arguments; the others read positions only


def _module_path(gm: fx.GraphModule, attrs: dict[str, fx.Node]) -> str:
    """Where the new layer lives: the module that owns the weight, when it owns nothing else (so hooks
    on the user's model find the same path), else a fresh name beside it."""
    weight = attrs.get("weight") or attrs["running_mean"]
    owner, _, _ = weight.target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    used = {n.target.rpartition(".")[2] for n in attrs.values() if n is not None}
    own = {k for k, _ in mod.named_parameters(recurse=False)} | {k for k, _ in mod.named_buffers(recurse=False)}
    own.discard("num_batches_tracked")
    if owner and own <= used and not list(mod.children()):
        return owner
    base = (owner + "." if owner else "") + "fxabstract_" + weight.target.rpartition(".")[2]
    path, i = base, 0
    while _exists(gm, path):
        i += 1
        path = f"{base}_{i}"
    return path


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite function-level layers over attribute parameters as call_module nodes, in place."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FUNCTIONAL_LAYERS or (
                node.kwargs and node.target not in BY_KEYWORD):
            continue
        found = FUNCTIONAL_LAYERS[node.target](gm, node)
        if found is None:
            continue
        layer, attrs, x = found
        if any(v is not None and len(v.users) != 1 for v in attrs.values()):
            continue  # a parameter read elsewhere too (tied weights): leave it functional
        with torch.no_grad():
            for name, v in attrs.items():
                if v is not None:
                    t = _tensor(gm, v.target)
                    setattr(layer, name, t if isinstance(t, nn.Parameter) or name.startswith("running")
                            else nn.Parameter(t, requires_grad=False))
        _install(gm, _module_path(gm, attrs), layer, x, node)
        gm.graph.erase_node(node)
        for v in attrs.values():
            if v is not None and not v.users:
                gm.graph.erase_node(v)
    gm.graph.lint()
    gm.recompile()
    return gm


# A written-out RMSNorm, as Llama-family code has it:
#     y = x * rsqrt(mean(x^2, -1, keepdim=True) + eps);  y = y.to(dtype);  out = weight * y
# (each op as fx or torch.export spells it). `modularize_rms_norms` makes it an nn.RMSNorm call, so that
# a residual stream read by it is read by a normaliser fxabstract compiles (passes/norms.py).
_RSQRT = {torch.rsqrt, aten.rsqrt.default, "rsqrt"}
_POW = {torch.pow, operator.pow, aten.pow.Tensor_Scalar, "pow"}
_MEAN = {torch.mean, aten.mean.dim, "mean"}
_ADD = {operator.add, torch.add, aten.add.Tensor, "add"}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor, "mul"}
_CAST = {aten.to.dtype, aten._to_copy.default, "to"}


def _is(node, ops) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in ops


def _other(node: fx.Node, one) -> object:
    """The argument of a two-argument op that is not `one` (None if neither or both are)."""
    if len(node.args) != 2:
        return None
    a, b = node.args
    return b if a is one and b is not one else a if b is one and a is not one else None


def _rms_norm_at(gm: fx.GraphModule, rsqrt: fx.Node):
    """(x, eps, weight get_attr, the final mul, the pattern's nodes) of the RMSNorm around `rsqrt`, or None."""
    add = rsqrt.args[0] if len(rsqrt.args) == 1 and not rsqrt.kwargs else None
    if not _is(add, _ADD) or add.kwargs or len(add.users) != 1:
        return None
    mean = next((a for a in add.args if _is(a, _MEAN)), None)
    eps = _other(add, mean) if mean is not None else None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or len(mean.users) != 1:
        return None
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if dims not in (-1, [-1], (-1,)) or keep is not True or set(mean.kwargs) - {"dim", "keepdim"}:
        return None
    sq = mean.args[0]
    if not _is(sq, _POW) or sq.kwargs or len(sq.args) != 2 or sq.args[1] != 2 or len(sq.users) != 1:
        return None
    x = sq.args[0]
    if len(rsqrt.users) != 1:
        return None
    mul = next(iter(rsqrt.users))
    if not _is(mul, _MUL) or mul.kwargs or _other(mul, rsqrt) is not x:
        return None
    nodes, y = [sq, mean, add, rsqrt, mul], mul
    casts = []
    while len(y.users) == 1 and _is(next(iter(y.users)), _CAST):
        y = next(iter(y.users))
        casts.append(y)
    if len(y.users) != 1:
        return None
    out = next(iter(y.users))
    w = _other(out, y) if _is(out, _MUL) and not out.kwargs else None
    if _attr(gm, w) is None or len(w.users) != 1:
        return None
    W = _tensor(gm, w.target)
    if W.dim() != 1:
        return None
    if any(_dtype(n) != W.dtype for n in [x, out] + nodes + casts):   # no float32 upcast in between
        return None
    return x, float(eps), w, out, nodes + casts


def _dtype(node: fx.Node):
    """The dtype a node's value had when traced (torch.export's fake value, else the recorded one)."""
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else node.meta.get("fxa_dtype")


def modularize_rms_norms(gm: fx.GraphModule) -> int:
    """Rewrite every written-out RMSNorm with a weight parameter as an nn.RMSNorm call, in place;
    returns how many. Only where every value of the pattern has the weight's dtype (the dtypes traced on
    a batch: run it after `sites.annotate_shapes`), so nn.RMSNorm computes the same to float rounding."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or not _is(node, _RSQRT):
            continue
        found = _rms_norm_at(gm, node)
        if found is None:
            continue
        x, eps, w, out, nodes = found
        while (_is(x, _CAST) and isinstance(x.args[0], fx.Node) and _dtype(x.args[0]) == _dtype(x)
               and set(x.users) <= set(nodes)):
            nodes.append(x)                  # a cast to the dtype it already has (`x.to(torch.float32)`)
            x = x.args[0]
        W = _tensor(gm, w.target)
        layer = nn.RMSNorm(W.shape[0], eps=eps, device=W.device, dtype=W.dtype)
        layer.weight = W if isinstance(W, nn.Parameter) else nn.Parameter(W, requires_grad=False)
        _install(gm, _module_path(gm, {"weight": w}), layer, x, out)
        gm.graph.erase_node(out)
        dead = nodes + [w] + [a for c in nodes for a in c.all_input_nodes if a not in nodes and a is not x]
        while any(not n.users for n in dead):  # the pattern, and what only it read (`x.dtype` of a cast back)
            n = next(n for n in dead if not n.users)
            dead.remove(n)
            gm.graph.erase_node(n)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return done


def _install(gm: fx.GraphModule, path: str, layer: nn.Module, x: fx.Node, node: fx.Node) -> fx.Node:
    """Put `layer` at module `path` and a call of it on `x` in place of `node` (its readers and metadata)."""
    owner, _, name = path.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, layer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    return new


# --------------------------------------------------------------------------- Conv1D (GPT-2)

# the flattening views, as fx (method / function) and torch.export (aten) spell them; ops.py reads these too
VIEWS = {"view", "reshape", torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _shape(node) -> tuple[str, ...] | None:
    """A node's traced shape as strings (symbolic sizes compare by name, without guards), or None:
    torch.export's fake value, else the shape `sites.annotate_shapes` recorded."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(str(d) for d in val.shape)
    shape = node.meta.get("fxa_shape") if isinstance(node, fx.Node) else None
    return None if shape is None else tuple(str(d) for d in shape)


def _erase_unused(gm: fx.GraphModule, nodes) -> None:
    """Erase `nodes` and then their inputs that are left unread (the size arithmetic of a removed view)."""
    todo = [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        node = todo.pop()
        if not node.users and node.op in ("call_function", "call_method", "get_attr"):
            todo += node.all_input_nodes
            gm.graph.erase_node(node)


def _is_view(node) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in VIEWS


def linearize_addmm(gm: fx.GraphModule) -> int:
    """Rewrite Hugging Face's Conv1D, `view(x, [-1, in]) -> addmm(bias, ., weight) -> view(., [..., out])`
    with the weight stored [in, out], as one call of an nn.Linear holding weight^T and the same bias, at
    the owner's module path (its input is x, as for the user's Conv1D, so hooks see the same value); in
    place; returns how many it rewrote. Needs traced shapes to prove that the views only flatten:
    torch.export's graphs carry them, torch.fx's get them from `annotate_shapes` (a second call)."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, torch.addmm) or node.kwargs \
                or len(node.args) != 3 or len(node.users) != 1:
            continue
        b, flat, w = node.args
        out = next(iter(node.users))
        if _attr(gm, b) is None or _attr(gm, w) is None or len(b.users) != 1 or len(w.users) != 1 \
                or not _is_view(flat) or len(flat.users) != 1 or not _is_view(out):
            continue
        x, W, B = flat.args[0], _tensor(gm, w.target), _tensor(gm, b.target)
        xs, os_ = _shape(x), _shape(out)
        if W.dim() != 2 or tuple(B.shape) != (W.shape[1],) or xs is None or os_ is None \
                or xs[:-1] != os_[:-1] or xs[-1] != str(W.shape[0]) or os_[-1] != str(W.shape[1]):
            continue
        layer = nn.Linear(W.shape[0], W.shape[1])
        layer.weight = nn.Parameter(W.detach().t().contiguous(), requires_grad=False)  # Conv1D: x @ W + b
        layer.bias = B if isinstance(B, nn.Parameter) else nn.Parameter(B, requires_grad=False)
        _install(gm, _module_path(gm, {"weight": w, "bias": b}), layer, x, out)
        _erase_unused(gm, [out])
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    return rewritten
