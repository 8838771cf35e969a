"""Back end: the compiled GraphModule to ONNX, checked against onnxruntime.

    >>> info = to_onnx(result.module, x[:4], "model.onnx")
    >>> info["max_abs_diff"], info["weights"]["fc1.weight"]      # parity, reduced shapes
"""
from __future__ import annotations

import copy
import os
import re
import warnings

import numpy as np
import torch
from torch import nn

from .errors import ExportError, OutputError
from .report import check_new, write_atomic


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


def to_onnx(module: nn.Module, example_inputs, path: str, opset: int = 18, check_batch: int = 3,
            force: bool = False) -> dict:
    """Export with a dynamic batch axis, compare onnxruntime to torch, then write atomically.

    The parity check runs a batch of `check_batch` samples (a size other than the example's), so the
    dynamic axis is exercised too. Nothing is written if export or onnxruntime fails, and an existing
    file is an OutputError unless force=True. Returns the path, the max abs and relative differences,
    and the shapes of the ONNX weights. An eval-mode copy is exported (ONNX is for deployment), so
    the module itself, in whatever mode, is never run or modified."""
    import onnx
    import onnxruntime as ort

    module = copy.deepcopy(module).eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) and a.dim() > 0 and len(a) > 0 for a in args):
        raise ExportError("example_inputs must be a non-empty Tensor (or a tuple of them) with a batch axis; "
                          "pass a few samples, e.g. x[:4]")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {folder} does not exist or is not writable; "
                          "choose another path")
    check_new([path], force)
    try:
        with torch.no_grad():
            module(*args)
    except Exception as exc:  # whatever the module raises on inputs it cannot take
        raise ExportError(f"the module cannot run on example_inputs (shape {list(args[0].shape)}, {args[0].dtype}): "
                          f"{_first_line(exc)}; pass inputs of the shape and dtype it takes") from None
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                        verbose=False)
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"ONNX export failed: {_first_line(exc)}") from None
    model_proto = program.model_proto
    _strip_stack_traces(model_proto)
    onnx.checker.check_model(model_proto)
    data = model_proto.SerializeToString()

    check = tuple(torch.cat([a] * (check_batch // len(a) + 1))[:check_batch] for a in args)
    with torch.no_grad():
        expected = module(*check)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, {n: a.detach().cpu().numpy() for n, a in zip(names, check)})[0]
    except Exception as exc:  # onnxruntime raises its own types (NotImplemented for missing kernels)
        bf16 = any(p.dtype == torch.bfloat16 for p in module.parameters())
        fix = ("onnxruntime has no bfloat16 kernels: export a float32 copy, copy.deepcopy(module).float(), "
               "with float32 inputs" if bf16 else "check that onnxruntime supports every op of the module")
        raise ExportError(f"onnxruntime cannot run the exported model ({_first_line(exc)}); nothing written; "
                          f"{fix}") from None
    write_atomic(path, data)
    diff = float(np.abs(got - expected.detach().cpu().numpy()).max())
    scale = max(1.0, float(expected.abs().max()))
    weights = {init.name: list(init.dims) for init in model_proto.graph.initializer}
    return {"path": path, "max_abs_diff": diff, "relative_diff": diff / scale, "opset": opset,
            "weights": weights, "bytes": os.path.getsize(path)}
