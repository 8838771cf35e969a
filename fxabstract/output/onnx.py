"""Back end: the compiled GraphModule to ONNX, checked by `onnx.checker` and against onnxruntime.

    >>> info = to_onnx(result.module, x[:4], "model.onnx")
    >>> info["max_abs_diff"], info["weights"]["fc1.weight"]      # parity, reduced shapes
    >>> to_onnx(module, x, "m.onnx", exporter="torchscript", opset=13, dynamic_batch=False)

Two exporters: "dynamo" (torch.export, the default) and "torchscript" (the legacy tracer); when the
chosen one fails, the other is tried (`fallback=True`) and the result says which one ran and why.
Weights larger than `external_threshold` bytes (ONNX's protobuf limit is 2 GB) go to a side file
`<path>.data`. The files are written into a staging folder, checked there (onnx.checker, onnxruntime
parity) and only then moved into place: a failed export leaves nothing behind.
"""
from __future__ import annotations

import copy
import inspect
import io
import math
import os
import re

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ExportError, OutputError
from .files import check_new, quiet, staged, write_atomic

EXPORTERS = ("dynamo", "torchscript")
TWO_GB = 2**31


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _strip_stack_traces(model_proto) -> None:
    """Drop the exporter's per-node Python stack traces: they name install paths, so the same module
    would give different bytes on different machines (reproducibility), and they hold no semantics."""
    graphs = [model_proto.graph] + list(model_proto.functions)
    for graph in graphs:
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _export_dynamo(module, args, kwargs, names, opset, dynamic_batch):
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({k: _batch_spec(v, batch) for k, v in _bound(module, args, kwargs).items()} if dynamic_batch
               else None)
    program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                input_names=names[0], output_names=names[1], verbose=False)
    return program.model_proto


def _export_torchscript(module, args, kwargs, names, opset, dynamic_batch):
    import onnx

    axes = {n: {0: "batch"} for n in names[0] + names[1]} if dynamic_batch else None
    buf = io.BytesIO()
    torch.onnx.export(module, args, buf, kwargs=kwargs, dynamo=False, opset_version=opset, input_names=names[0],
                      output_names=names[1], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


EXPORT = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _export(module, args, kwargs, names, opset, dynamic_batch, exporter, fallback):
    """(ModelProto, the exporter that produced it, why the first choice failed or None)."""
    order = [exporter] + ([e for e in EXPORTERS if e != exporter] if fallback else [])
    errors = []
    for name in order:
        try:
            proto = EXPORT[name](module, args, kwargs, names, opset, dynamic_batch)
            return proto, name, (f"{exporter}: {errors[0]}" if errors else None)
        except Exception as exc:  # the exporters raise many types
            errors.append(_first_line(exc))
    tried = "; ".join(f"{n}: {e}" for n, e in zip(order, errors))
    raise ExportError(f"ONNX export failed ({tried}); try another exporter= or opset=")


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The inputs by the names of the module's forward parameters, in their order (a *args parameter
    holds a tuple, a **kwargs one a dict)."""
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"example_inputs do not fit {type(module).__name__}.forward ({exc}); pass its "
                          "inputs as a Tensor, a tuple of positional tensors or a dict of keyword tensors") from None


def _batch_spec(value, batch):
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_spec(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _batch_spec(v, batch) for k, v in value.items()}
    return {0: batch}


def _flat(value, name: str) -> list[tuple[str, object]]:
    """(name, leaf) pairs of a nested input or output: a dict's keys, a sequence's indices joined by "_"."""
    if isinstance(value, torch.Tensor) or value is None:
        return [(name, value)]
    if isinstance(value, dict) or hasattr(value, "keys") and hasattr(value, "__getitem__"):   # ModelOutput too
        return [pair for k in value.keys() for pair in _flat(value[k], f"{name}_{k}" if name else str(k))]
    if isinstance(value, (tuple, list)):
        return [pair for i, v in enumerate(value) for pair in _flat(v, f"{name or 'output'}_{i}")]
    return [(name, value)]


def _inputs(module: nn.Module, example_inputs) -> tuple[tuple, dict, list[str]]:
    """(positional, keyword, the ONNX input names: the forward's parameter names) from example_inputs:
    a Tensor, a tuple (or list) of positional tensors, or a dict of keyword tensors."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    bound = _bound(module, args, kwargs)
    named = [pair for k, v in bound.items() for pair in _flat(v, k)]
    if not named or not all(isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) > 0 for _, t in named):
        raise ExportError("example_inputs must be tensors with a batch axis (a Tensor, a tuple of positional "
                          "tensors or a dict of keyword tensors); pass a few samples, e.g. x[:4]")
    if len({len(t) for _, t in named}) > 1:
        raise ExportError(f"example_inputs have different batch sizes ({_describe(named)}); give every input the "
                          "same first axis")
    kwargs = {k: bound[k] for k in bound if k in kwargs}   # in the forward's order: the exporters' input order
    return args, kwargs, [name for name, _ in named]


def _outputs(out) -> list[tuple[str, torch.Tensor]]:
    """The output tensors with their ONNX names: "output" for a Tensor, `output_0`, ... for a tuple or
    list, the keys of a dict (or ModelOutput); nested ones joined by "_". None entries are dropped, as
    the exporters drop them."""
    named = [(name or "output", v) for name, v in _flat(out, "") if v is not None]
    bad = [name for name, v in named if not isinstance(v, torch.Tensor)]
    if not named or bad:
        raise ExportError(f"the module returns {type(out).__name__}{f' with non-tensors at {bad}' if bad else ''}; "
                          "ONNX outputs are tensors: return a Tensor, a tuple or a dict of tensors")
    return named


def _describe(named) -> str:
    return ", ".join(f"{name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in named
                     if isinstance(t, torch.Tensor))


def _repeat(value, size: int):
    """Each tensor's batch axis repeated or cut to `size` samples (the parity check's batch)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value] * (size // len(value) + 1))[:size]
    if isinstance(value, dict):
        return {k: _repeat(v, size) for k, v in value.items()}
    return type(value)(_repeat(v, size) for v in value)


def _parity(expected: list[tuple[str, torch.Tensor]], got: list, tolerance: float) -> dict[str, dict]:
    """Per output: max |onnxruntime - torch| and that relative to max(1, max |torch|). ExportError when an
    output is not finite, has another shape, or differs by more than the tolerance."""
    parity = {}
    for (name, e), g in zip(expected, got):
        e = e.detach().cpu().numpy()
        g = np.asarray(g)
        if not np.isfinite(e).all():
            raise ExportError(f"the module's output {name!r} is NaN or inf on example_inputs, so parity cannot be "
                              "checked; nothing written; pass inputs on which the module computes finite outputs")
        if not np.isfinite(g).all():
            raise ExportError(f"onnxruntime computes NaN or inf at output {name!r} where torch is finite; nothing "
                              "written; try another exporter= or opset=")
        if g.shape != e.shape:
            raise ExportError(f"onnxruntime's output {name!r} has shape {list(g.shape)}, torch's {list(e.shape)}; "
                              "nothing written; try another exporter= or opset=")
        e, g = e.astype(np.float64), g.astype(np.float64)
        diff = float(np.abs(g - e).max()) if e.size else 0.0
        relative = diff / max(1.0, float(np.abs(e).max()) if e.size else 0.0)
        parity[name] = {"max_abs_diff": diff, "relative_diff": relative}
        if relative > tolerance:
            raise ExportError(f"onnxruntime differs from torch at output {name!r} by {diff:.3g} (relative "
                              f"{relative:.3g} > tolerance {tolerance:g}); nothing written; try another exporter= "
                              "or opset=, or pass a larger tolerance= if that difference is acceptable")
    return parity


def _save(proto, path: str, external: bool) -> None:
    """Write the model; with external data, every weight goes to <path>.data beside it."""
    import onnx

    if external:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=0)
    else:
        write_atomic(path, proto.SerializeToString())


def default_tolerance(module: nn.Module) -> float:
    """The parity tolerance for `module`: 1e-4, or 10 ulps of its lowest-precision floating dtype."""
    dtypes = {p.dtype for p in (*module.parameters(), *module.buffers()) if p.is_floating_point()}
    return max([1e-4] + [10 * torch.finfo(d).eps for d in dtypes])


def to_onnx(module: nn.Module, example_inputs, path: str, opset: int = 18, check_batch: int = 3,
            force: bool = False, *, dynamic_batch: bool = True, exporter: str = "dynamo", fallback: bool = True,
            external_threshold: int = TWO_GB, tolerance: float | None = None) -> dict:
    """Export, run `onnx.checker`, compare onnxruntime to torch, then move the files into place.

    module: an nn.Module (a compiled `result.module`, or any model), or an `Abstraction` (its module).
    example_inputs: a Tensor, a tuple of positional tensors, or a dict of keyword tensors, each with a
      batch axis. The ONNX inputs are named after the forward's parameters (`input` for an
      nn.Sequential, `input_ids`, ...), the outputs after the module's output: `output` for a Tensor,
      `output_0`, `output_1`, ... for a tuple or list, the keys of a dict (nested: joined by "_").
    dynamic_batch: the batch axis of every input and output is dynamic; the parity check then runs
      a batch of `check_batch` samples (a size other than the example's), so the axis is exercised.
    exporter: "dynamo" or "torchscript"; fallback: try the other one if it fails.
    external_threshold: weights of more bytes than this are stored in <path>.data (default 2 GB).
    tolerance: the largest relative difference max|onnxruntime - torch| / max(1, max|torch|) allowed
      at any output; None (the default) is 1e-4 for float32 and float64 modules (float32 rounding
      through a deep network) and 10 ulps of the module's dtype for float16 and bfloat16 (about 1e-2
      and 8e-2); more is an ExportError that names the difference.
    Nothing is written if export, the checker or onnxruntime fails, if any output differs by more than
    the tolerance or is NaN or inf, and an existing file is an OutputError unless force=True. An
    eval-mode copy is exported (ONNX is for deployment), so the module itself is never run or modified.
    Returns the path, the parity (max abs and relative differences over all outputs, and per output),
    the input and output names, the exporter that ran, the opset, the external data file (or None) and
    the shapes of the ONNX weights."""
    import onnx

    if not isinstance(module, nn.Module) and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module          # an Abstraction: export its compiled module
    if not isinstance(module, nn.Module):
        raise ConfigError(f"to_onnx exports an nn.Module or an Abstraction, got {type(module).__name__}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"opset = {opset!r} is out of range; give an int in 7..{onnx.defs.onnx_opset_version()}")
    if tolerance is None:
        tolerance = default_tolerance(module)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ConfigError(f"tolerance = {tolerance!r} must be a finite number >= 0 (the largest relative difference "
                          "between onnxruntime and torch), e.g. 1e-4")
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {folder} does not exist or is not writable; "
                          "choose another path")
    with quiet():
        return _to_onnx(module, example_inputs, path, opset, check_batch, force, dynamic_batch, exporter, fallback,
                        external_threshold, float(tolerance))


def _to_onnx(module, example_inputs, path, opset, check_batch, force, dynamic_batch, exporter, fallback,
             external_threshold, tolerance) -> dict:
    import onnx
    import onnxruntime as ort

    folder, name = os.path.split(os.path.abspath(path))
    module = copy.deepcopy(module).eval()
    args, kwargs, input_names = _inputs(module, example_inputs)
    external = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > external_threshold
    names = (name, name + ".data") if external else (name,)
    check_new([os.path.join(folder, n) for n in names], force)
    try:
        with torch.no_grad():
            out = module(*args, **kwargs)
    except Exception as exc:  # whatever the module raises on inputs it cannot take
        given = _describe([(f"input {n}", t) for n, t in zip(input_names, [*args, *kwargs.values()])])
        raise ExportError(f"the module cannot run on example_inputs ({given}): {_first_line(exc)}; pass inputs of "
                          "the shape and dtype it takes") from None
    output_names = [n for n, _ in _outputs(out)]
    for n, t in _outputs(out):
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise ExportError(f"the module's output {n!r} is NaN or inf on example_inputs, so parity cannot be "
                              "checked; nothing written; pass inputs on which the module computes finite outputs")
    if len(set(output_names)) < len(output_names):
        output_names = [f"output_{i}" for i in range(len(output_names))]   # keys that join to the same name
    proto, used, fallback_reason = _export(module, args, kwargs, (input_names, output_names), opset, dynamic_batch,
                                           exporter, fallback)
    _strip_stack_traces(proto)

    size = check_batch if dynamic_batch else len(_flat(args[0] if args else next(iter(kwargs.values())), "")[0][1])
    check_args, check_kwargs = _repeat(args, size), _repeat(kwargs, size)
    try:
        with torch.no_grad():
            expected = _outputs(module(*check_args, **check_kwargs))
    except ExportError:
        raise
    except Exception as exc:  # the first axis is not a batch axis the module takes at other sizes
        raise ExportError(f"the module cannot run on a batch of {size} (example_inputs repeated along their first "
                          f"axis): {_first_line(exc)}; the first axis of every input must be the batch axis, or pass "
                          "dynamic_batch=False") from None
    feeds = dict(zip(input_names, [t for v in (*check_args, *check_kwargs.values()) for _, t in _flat(v, "")]))
    with staged(folder, names) as staging:   # checked in the staging folder, then moved into place
        staged_path = os.path.join(staging, name)
        _save(proto, staged_path, external)
        try:
            onnx.checker.check_model(staged_path)   # by path: works with external data and past 2 GB
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported ONNX model fails onnx.checker: {_first_line(exc)}") from None
        try:
            session = ort.InferenceSession(staged_path, providers=["CPUExecutionProvider"])
            wanted = [i.name for i in session.get_inputs()]
            unknown = [n for n in wanted if n not in feeds]
            if unknown:
                raise ExportError(f"the exported model has inputs {unknown} the module's forward does not name "
                                  f"({input_names}); nothing written; try another exporter=")
            got = session.run(None, {n: feeds[n].detach().cpu().numpy() for n in wanted})
        except ExportError:
            raise
        except Exception as exc:  # onnxruntime raises its own types (NotImplemented for missing kernels)
            bf16 = any(p.dtype == torch.bfloat16 for p in module.parameters())
            fix = ("onnxruntime has no bfloat16 kernels: export a float32 copy, copy.deepcopy(module).float(), "
                   "with float32 inputs" if bf16 else "check that onnxruntime supports every op of the module")
            raise ExportError(f"onnxruntime cannot run the exported model ({_first_line(exc)}); nothing written; "
                              f"{fix}") from None
        if len(got) != len(expected):
            raise ExportError(f"the exported model has {len(got)} outputs, the module {len(expected)} "
                              f"({', '.join(output_names)}); nothing written; try another exporter=")
        named = [(o.name, t) for o, (_, t) in zip(session.get_outputs(), expected)]   # the file's output names
        parity = _parity(named, got, tolerance)     # an ExportError here leaves nothing behind
        written = onnx.load(staged_path, load_external_data=False)
        size_bytes = sum(os.path.getsize(os.path.join(staging, n)) for n in names)
    weights = {init.name: list(init.dims) for init in written.graph.initializer}
    opsets = {o.domain: o.version for o in written.opset_import}
    return {"path": path, "max_abs_diff": max(p["max_abs_diff"] for p in parity.values()),
            "relative_diff": max(p["relative_diff"] for p in parity.values()), "tolerance": tolerance,
            "outputs": parity, "inputs": [i.name for i in written.graph.input],
            "exporter": used, "fallback": fallback_reason, "opset": opsets.get("", opsets.get("ai.onnx", opset)),
            "dynamic_batch": dynamic_batch, "external_data": path + ".data" if external else None,
            "weights": weights, "bytes": size_bytes}
