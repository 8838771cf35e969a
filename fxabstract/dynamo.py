"""torch.compile back end: abstract the graph Dynamo captured, then hand the smaller graph on.

    >>> compiled = torch.compile(model, backend=fxa.backend(calibration, keep=0.5))
    >>> compiled(x)                                  # runs the abstraction, compiled by inductor
    >>> compiled_backend.abstractions[0].report      # what was removed (one per analysed graph)

Dynamo hands a back end a GraphModule whose inputs are the frame's arguments *and* the module's
parameters and buffers (lifted as placeholders; layers are calls like `torch._C._nn.linear(x, w, b)`).
`lift` turns that into the graph fxabstract's front end expects: the frame's tensor arguments stay
inputs (in signature order, named as in the signature, so calibration batches bind to them); every
parameter and buffer becomes an attribute at its module path (`fc1.weight`), so `modularize` rebuilds
`fc1` as an nn.Linear and sites get the same names as with `fxa.abstract(model)`. Symbolic sizes of
the inputs (dynamic shapes) become `x.size(i)` calls. The lifted graph then goes through
`fxa.abstract` unchanged, and its result through the real back end (inductor by default).

Graph breaks: a graph that is not a whole frame of the model (Dynamo stopped at a graph break, or
the graph resumes after one) has inputs or outputs that are intermediate values, about which the
calibration data says nothing. Such graphs, and graphs captured in training mode or with nothing to
abstract, are handed to the real back end untouched, with a warning; `passed_through` lists why.
Weights are read at compile time: the abstraction is of the model as it was when first called.
"""
from __future__ import annotations

import inspect
import re
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .abstraction import REPLACEMENTS, SELECTIONS, Abstraction, abstract, choose
from .errors import CalibrationError, ConfigError, FxAbstractWarning, NoSiteError
from .passes.scores import SCORES

RESUME_PREFIX = "torch_dynamo_resume_in_"
TRAINING_ONLY = {F.dropout: 2, F.batch_norm: 5}     # function -> position of its `training` argument


class Backend:
    """A torch.compile back end (see `backend`); `abstractions` and `passed_through` say what it did."""

    def __init__(self, calibration, keep, then_backend, abstract_kwargs: dict):
        self.calibration, self.keep, self.abstract_kwargs = calibration, keep, abstract_kwargs
        self.then = _lookup(then_backend)
        self.abstractions: list[Abstraction] = []    # one per analysed graph, in compile order
        self.passed_through: list[str] = []          # why each other graph went on untouched
        self._cache: dict[tuple, Abstraction] = {}   # (lifted graph code, weights) -> abstraction

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        lifted, inputs, problem = lift(gm, example_inputs)
        if problem is None:
            constants = tuple(id(v) for i, v in enumerate(example_inputs)
                              if isinstance(v, torch.Tensor) and i not in inputs)
            key = (lifted.code, constants)     # the same graph over the same weights: a recompile
            if key not in self._cache:
                try:
                    self._cache[key] = abstract(lifted, self.calibration, keep=self.keep, **self.abstract_kwargs)
                except NoSiteError as exc:
                    problem = str(exc)
                except CalibrationError as exc:
                    if any(isinstance(v, torch.SymInt) for v in example_inputs):
                        raise
                    raise CalibrationError(f"{exc}; Dynamo may have specialised the graph to the batch size of "
                                           "the first call: compile with torch.compile(..., dynamic=True)") from None
                else:
                    result = self._cache[key]
                    if "output" not in self.abstract_kwargs and result.output == 0 and _one_output(lifted):
                        result.output = None          # Dynamo returns (t,) for a model returning t: the model's
                        result.report["output"] = "output"   # output, as iia and certificate run the model
                    self.abstractions.append(result)
        if problem is not None:
            self.passed_through.append(problem)
            warnings.warn(f"fxabstract.backend: graph handed on unabstracted: {problem}", FxAbstractWarning,
                          stacklevel=2)
            return self.then(gm, example_inputs)
        module = self._cache[key].module
        for p in module.parameters():
            p.requires_grad_(False)          # a deployment graph: no autograd through folded weights
        compiled = self.then(module, [example_inputs[i] for i in inputs])
        return lambda *args: compiled(*[args[i] for i in inputs])


def backend(calibration, keep=0.5, *, then_backend="inductor", **abstract_kwargs) -> Backend:
    """A torch.compile back end that compiles each captured graph into its abstraction.

    calibration, keep and abstract_kwargs (score, replacement, selection, round_to, sites, ...) are
    those of `fxa.abstract`; calibration batches hold the compiled model's inputs, and must be
    re-iterable (a list or DataLoader) if the model is compiled more than once. then_backend: the back
    end that compiles the abstraction: a name torch.compile knows ("inductor", "eager", ...) or a
    callable (gm, example_inputs) -> callable."""
    for name, options in (("score", SCORES), ("replacement", REPLACEMENTS), ("selection", SELECTIONS)):
        if name in abstract_kwargs:
            choose(abstract_kwargs[name], options, name)
    unknown = set(abstract_kwargs) - (set(inspect.signature(abstract).parameters) - {"model", "calibration", "keep"})
    if unknown:
        raise ConfigError(f"fxa.backend got unknown options {sorted(unknown)}; it takes fxa.abstract's keyword options")
    return Backend(calibration, keep, then_backend, abstract_kwargs)


def _one_output(gm: fx.GraphModule) -> bool:
    """Whether the graph returns a tuple of one value (Dynamo's form of a frame returning one tensor)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return isinstance(out, (tuple, list)) and len(out) == 1


def _lookup(then_backend):
    if callable(then_backend):
        return then_backend
    try:
        return torch._dynamo.lookup_backend(then_backend)
    except Exception:  # an unknown name raises InvalidBackend
        raise ConfigError(f"unknown then_backend {then_backend!r}; choose one of "
                          f"{torch._dynamo.list_backends(exclude_tags=())} or pass a callable") from None


# --------------------------------------------------------------------------- lifting Dynamo graphs

def _frame_problem(gm: fx.GraphModule) -> str | None:
    """Why `gm` is not a whole frame of the model (None if it is)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None:
        return "the graph carries no Dynamo compile reason (is this back end used outside torch.compile?)"
    if reason.graph_break:
        return f"it ends at a graph break ({reason.reason.strip().splitlines()[0]})"
    if reason.user_stack and reason.user_stack[-1].name.startswith(RESUME_PREFIX):
        return "it resumes after a graph break (its inputs are intermediate values)"
    for node in gm.graph.nodes:
        position = TRAINING_ONLY.get(node.target) if node.op == "call_function" else None
        if position is not None and len(node.args) > position and node.args[position] is True:
            return "it was captured in training mode; call model.eval() before torch.compile"
    return None


def _parameter_path(source) -> str | None:
    """L['self']._modules['fc1']._parameters['weight'] -> 'fc1.weight' (None for other sources)."""
    name = source.name if isinstance(source.name, str) else source.name()
    parts = re.findall(r"\._(modules|parameters|buffers)\['([^']+)'\]", name)
    if not parts or parts[-1][0] == "modules":
        return None
    return ".".join(part for _, part in parts)


def _set_attr(root: nn.Module, path: str, value: torch.Tensor) -> None:
    *owners, leaf = path.split(".")
    mod = root
    for owner in owners:
        if not hasattr(mod, owner):
            mod.add_module(owner, nn.Module())
        mod = getattr(mod, owner)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value)


def _frame_argnames() -> list[str]:
    """The argument names of the frame Dynamo is compiling, in signature order ([] if unknown)."""
    context = torch._guards.TracingContext.try_get()
    codes = context.get_traced_code() if context is not None and hasattr(context, "get_traced_code") else []
    if not codes:
        return []
    code = codes[0]
    return list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])


def _argument(source, argnames: list[str]) -> tuple[tuple, str] | None:
    """(sort key, placeholder name) when `source` is an argument of the frame: a local (`x`), or one
    item of the frame's *args or **kwargs (`L['args'][0]`: Dynamo compiles nn.Sequential and other
    modules called through `Module.__call__` that way); None for anything else."""
    from torch._dynamo.source import DictGetItemSource, GetItemSource, LocalSource   # 1.5 s to import: on use

    def position(name: str) -> int:
        return argnames.index(name) if name in argnames else len(argnames)
    if isinstance(source, LocalSource):
        return (position(source.local_name), 0), source.local_name
    if (isinstance(source, (GetItemSource, DictGetItemSource)) and isinstance(source.base, LocalSource)
            and not getattr(source, "index_is_slice", False) and isinstance(source.index, (int, str))):
        base, index = source.base.local_name, source.index
        name = f"{base}_{index}" if isinstance(index, int) else index
        return (position(base), index if isinstance(index, int) else len(argnames) + position(index)), name
    return None


def lift(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule | None, list[int], str | None]:
    """Dynamo's graph -> (a GraphModule over the frame's tensor arguments, with parameters and buffers
    as attributes; the positions of those arguments among Dynamo's inputs; or a problem)."""
    from torch._dynamo.source import TensorProperty, TensorPropertySource

    problem = _frame_problem(gm)
    if problem is not None:
        return None, [], problem
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = [n.meta.get("grapharg") and n.meta["grapharg"].source for n in placeholders]
    argnames = _frame_argnames()
    named = {i: _argument(s, argnames) for i, s in enumerate(sources)}
    data = [i for i, a in named.items() if a is not None and isinstance(example_inputs[i], torch.Tensor)]
    data.sort(key=lambda i: named[i][0])
    arguments = {sources[i]: placeholders[i] for i in data}
    root, graph, env = nn.Module(), fx.Graph(), {}
    for i in data:
        env[placeholders[i]] = graph.placeholder(named[i][1])
    for i, (node, source) in enumerate(zip(placeholders, sources)):
        if i in data or not node.users:
            continue
        value = example_inputs[i]
        path = _parameter_path(source) if source is not None else None
        if isinstance(value, torch.Tensor) and path is not None:
            _set_attr(root, path, value)
            env[node] = graph.get_attr(path)
        elif (isinstance(source, TensorPropertySource) and source.prop == TensorProperty.SIZE
              and source.base in arguments):      # a dynamic size of an input: x.size(i)
            env[node] = graph.call_method("size", (env[arguments[source.base]], source.idx))
        elif source is not None and (isinstance(value, (bool, int, float)) or
                                     isinstance(value, torch.Tensor) and value.dim() == 0):
            # a module's number attribute (BatchNorm's momentum under dynamic=True): a constant
            env[node] = value.item() if isinstance(value, torch.Tensor) else value
        else:
            return None, [], f"input `{node.name}` ({source.name if source is not None else 'no source'}) is neither an argument, a parameter nor a buffer"
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "item" and isinstance(env.get(node.args[0]), (int, float)):
            env[node] = env[node.args[0]]             # .item() of a number attribute made constant above
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    lifted = fx.GraphModule(root, graph)
    return lifted, data, None


__all__ = ["backend", "Backend", "lift"]
