"""Back end: the compiled GraphModule to ONNX, checked by `onnx.checker` and against onnxruntime.

    >>> info = to_onnx(result.module, x[:4], "model.onnx")
    >>> info["max_abs_diff"], info["weights"]["fc1.weight"]      # parity, reduced shapes
    >>> to_onnx(module, x, "big.onnx", exporter="torchscript", opset=13, dynamic_batch=False)

Two exporters: "dynamo" (torch.export, the default) and "torchscript" (the legacy tracer); when the
chosen one fails, the other is tried (`fallback=True`) and the result says which one ran and why.
Weights larger than `external_threshold` bytes (ONNX's protobuf limit is 2 GB) go to a side file
`<path>.data`, written atomically with the model.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ExportError
from .report import write_atomic

EXPORTERS = ("dynamo", "torchscript")
TWO_GB = 2**31


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
            errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    tried = "; ".join(f"{n}: {e}" for n, e in zip(order, errors))
    raise ExportError(f"ONNX export failed ({tried}); try another exporter= or opset=")


def _save(proto, path: str, external: bool) -> str | None:
    """Write the model atomically; with external data, the weights go to <path>.data beside it."""
    import onnx

    if not external:
        write_atomic(path, proto.SerializeToString())
        return None
    folder, name = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(dir=folder, prefix=".fxabstract-")
    try:
        onnx.save_model(proto, os.path.join(tmp, name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=name + ".data", size_threshold=0)
        os.replace(os.path.join(tmp, name + ".data"), path + ".data")
        os.replace(os.path.join(tmp, name), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path + ".data"


def to_onnx(module: nn.Module, example_inputs, path: str, opset: int = 18, check_batch: int = 3, *,
            dynamic_batch: bool = True, exporter: str = "dynamo", fallback: bool = True,
            external_threshold: int = TWO_GB) -> dict:
    """Export, write atomically, run `onnx.checker`, and compare onnxruntime to torch.

    dynamic_batch: the batch axis of every input and the output is dynamic; the parity check then runs
      a batch of `check_batch` samples (a size other than the example's), so the axis is exercised.
    exporter: "dynamo" or "torchscript"; fallback: try the other one if it fails.
    external_threshold: weights of more bytes than this are stored in <path>.data (default 2 GB).
    Returns the path, the parity (max abs and relative differences), the exporter that ran, the
    opset, the external data file (or None) and the shapes of the ONNX weights."""
    import onnx
    import onnxruntime as ort

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not isinstance(opset, int) or not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"opset = {opset!r} is out of range; give an int in 7..{onnx.defs.onnx_opset_version()}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {folder} does not exist or is not writable; choose another --out")
    proto, used, fallback_reason = _export(module, args, opset, dynamic_batch, exporter, fallback)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    external = _save(proto, path, weight_bytes > external_threshold)
    try:
        onnx.checker.check_model(path)        # by path: works with external data and past 2 GB
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    size = check_batch if dynamic_batch else len(args[0])
    check = tuple(torch.cat([a] * (size // len(a) + 1))[:size] for a in args)
    with torch.no_grad():
        expected = module(*check)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    got = session.run(None, {n: a.detach().cpu().numpy() for n, a in zip(names, check)})[0]
    diff = float(np.abs(got - expected.detach().cpu().numpy()).max())
    scale = max(1.0, float(expected.abs().max()))
    written = onnx.load(path, load_external_data=False)
    weights = {init.name: list(init.dims) for init in written.graph.initializer}
    opsets = {o.domain: o.version for o in written.opset_import}
    return {"path": path, "max_abs_diff": diff, "relative_diff": diff / scale, "exporter": used,
            "fallback": fallback_reason, "opset": opsets.get("", opsets.get("ai.onnx", opset)),
            "dynamic_batch": dynamic_batch, "external_data": external, "weights": weights,
            "bytes": os.path.getsize(path) + (os.path.getsize(external) if external else 0)}
