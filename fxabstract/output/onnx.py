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
import io
import os
import re
import warnings

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ExportError, OutputError
from .files import check_new, staged, write_atomic

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


def _export_dynamo(module, args, opset, dynamic_batch):
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in args) if dynamic_batch else None
    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset, verbose=False)
    return program.model_proto


def _export_torchscript(module, args, opset, dynamic_batch):
    import onnx

    names = [f"input_{i}" for i in range(len(args))]
    axes = {n: {0: "batch"} for n in names + ["output"]} if dynamic_batch else None
    buf = io.BytesIO()
    torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=names,
                      output_names=["output"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


EXPORT = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _export(module, args, opset, dynamic_batch, exporter, fallback):
    """(ModelProto, the exporter that produced it, why the first choice failed or None)."""
    order = [exporter] + ([e for e in EXPORTERS if e != exporter] if fallback else [])
    errors = []
    for name in order:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                proto = EXPORT[name](module, args, opset, dynamic_batch)
            return proto, name, (f"{exporter}: {errors[0]}" if errors else None)
        except Exception as exc:  # the exporters raise many types
            errors.append(_first_line(exc))
    tried = "; ".join(f"{n}: {e}" for n, e in zip(order, errors))
    raise ExportError(f"ONNX export failed ({tried}); try another exporter= or opset=")


def _save(proto, path: str, external: bool) -> None:
    """Write the model; with external data, every weight goes to <path>.data beside it."""
    import onnx

    if external:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=0)
    else:
        write_atomic(path, proto.SerializeToString())


def to_onnx(module: nn.Module, example_inputs, path: str, opset: int = 18, check_batch: int = 3,
            force: bool = False, *, dynamic_batch: bool = True, exporter: str = "dynamo", fallback: bool = True,
            external_threshold: int = TWO_GB) -> dict:
    """Export, run `onnx.checker`, compare onnxruntime to torch, then move the files into place.

    dynamic_batch: the batch axis of every input and the output is dynamic; the parity check then runs
      a batch of `check_batch` samples (a size other than the example's), so the axis is exercised.
    exporter: "dynamo" or "torchscript"; fallback: try the other one if it fails.
    external_threshold: weights of more bytes than this are stored in <path>.data (default 2 GB).
    Nothing is written if export, the checker or onnxruntime fails, and an existing file is an
    OutputError unless force=True. An eval-mode copy is exported (ONNX is for deployment), so the
    module itself is never run or modified. Returns the path, the parity (max abs and relative
    differences), the exporter that ran, the opset, the external data file (or None) and the shapes
    of the ONNX weights."""
    import onnx
    import onnxruntime as ort

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"opset = {opset!r} is out of range; give an int in 7..{onnx.defs.onnx_opset_version()}")
    module = copy.deepcopy(module).eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) and a.dim() > 0 and len(a) > 0 for a in args):
        raise ExportError("example_inputs must be a non-empty Tensor (or a tuple of them) with a batch axis; "
                          "pass a few samples, e.g. x[:4]")
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {folder} does not exist or is not writable; "
                          "choose another path")
    external = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > external_threshold
    names = (name, name + ".data") if external else (name,)
    check_new([os.path.join(folder, n) for n in names], force)
    try:
        with torch.no_grad():
            module(*args)
    except Exception as exc:  # whatever the module raises on inputs it cannot take
        raise ExportError(f"the module cannot run on example_inputs (shape {list(args[0].shape)}, {args[0].dtype}): "
                          f"{_first_line(exc)}; pass inputs of the shape and dtype it takes") from None
    proto, used, fallback_reason = _export(module, args, opset, dynamic_batch, exporter, fallback)
    _strip_stack_traces(proto)

    size = check_batch if dynamic_batch else len(args[0])
    check = tuple(torch.cat([a] * (size // len(a) + 1))[:size] for a in args)
    with torch.no_grad():
        expected = module(*check)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    with staged(folder, names) as staging:   # checked in the staging folder, then moved into place
        staged_path = os.path.join(staging, name)
        _save(proto, staged_path, external)
        try:
            onnx.checker.check_model(staged_path)   # by path: works with external data and past 2 GB
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported ONNX model fails onnx.checker: {_first_line(exc)}") from None
        try:
            session = ort.InferenceSession(staged_path, providers=["CPUExecutionProvider"])
            inputs = [i.name for i in session.get_inputs()]
            got = session.run(None, {n: a.detach().cpu().numpy() for n, a in zip(inputs, check)})[0]
        except Exception as exc:  # onnxruntime raises its own types (NotImplemented for missing kernels)
            bf16 = any(p.dtype == torch.bfloat16 for p in module.parameters())
            fix = ("onnxruntime has no bfloat16 kernels: export a float32 copy, copy.deepcopy(module).float(), "
                   "with float32 inputs" if bf16 else "check that onnxruntime supports every op of the module")
            raise ExportError(f"onnxruntime cannot run the exported model ({_first_line(exc)}); nothing written; "
                              f"{fix}") from None
        written = onnx.load(staged_path, load_external_data=False)
        size_bytes = sum(os.path.getsize(os.path.join(staging, n)) for n in names)
    diff = float(np.abs(got - expected.detach().cpu().numpy()).max())
    scale = max(1.0, float(expected.abs().max()))
    weights = {init.name: list(init.dims) for init in written.graph.initializer}
    opsets = {o.domain: o.version for o in written.opset_import}
    return {"path": path, "max_abs_diff": diff, "relative_diff": diff / scale, "exporter": used,
            "fallback": fallback_reason, "opset": opsets.get("", opsets.get("ai.onnx", opset)),
            "dynamic_batch": dynamic_batch, "external_data": path + ".data" if external else None,
            "weights": weights, "bytes": size_bytes}
