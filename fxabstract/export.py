"""Back end: the compiled GraphModule to ONNX, checked against onnxruntime.

    >>> info = to_onnx(result.module, x[:4], "model.onnx")
    >>> info["max_abs_diff"], info["weights"]["fc1.weight"]      # parity, reduced shapes
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from .errors import ExportError
from .report import write_atomic


def to_onnx(module: nn.Module, example_inputs, path: str, opset: int = 18, check_batch: int = 3) -> dict:
    """Export with a dynamic batch axis, write atomically, and compare onnxruntime to torch.

    The parity check runs a batch of `check_batch` samples (a size other than the example's), so the
    dynamic axis is exercised too. Returns the path, the max abs and relative differences, and the
    shapes of the ONNX weights."""
    import onnx
    import onnxruntime as ort

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {folder} does not exist or is not writable; choose another --out")
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                        verbose=False)
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"ONNX export failed: {str(exc).strip().splitlines()[0]}") from None
    model_proto = program.model_proto
    onnx.checker.check_model(model_proto)
    write_atomic(path, model_proto.SerializeToString())

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    check = tuple(torch.cat([a] * (check_batch // len(a) + 1))[:check_batch] for a in args)
    with torch.no_grad():
        expected = module(*check)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    got = session.run(None, {n: a.detach().cpu().numpy() for n, a in zip(names, check)})[0]
    diff = float(np.abs(got - expected.detach().cpu().numpy()).max())
    scale = max(1.0, float(expected.abs().max()))
    weights = {init.name: list(init.dims) for init in model_proto.graph.initializer}
    return {"path": path, "max_abs_diff": diff, "relative_diff": diff / scale, "opset": opset,
            "weights": weights, "bytes": os.path.getsize(path)}
