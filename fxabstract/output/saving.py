"""Saving and loading an abstraction without pickling code: torch.export's `.pt2` plus the report.

    >>> result.save("out/")                  # out/module.pt2, out/report.json (and out/module.pt)
    >>> loaded = fxa.load("out/")            # Abstraction: a runnable module and the report (`read`)
    >>> loaded.module(x), loaded.report["sites"][0]["kept"]

`module.pt2` is a torch.export archive: the graph as JSON and the weights as tensors, so loading it
runs no pickled code (unlike `torch.load` of a pickled GraphModule). The batch axis is exported
dynamic where the module allows it. `module.pt` (the pickled GraphModule) is still written for
callers of earlier versions; load it only from a source you trust.
"""
from __future__ import annotations

import io
import json
import os

import torch
import torch.fx as fx

from ..errors import ConfigError, ExportError, OutputError
from .files import check_new, staged, write_atomic
from .report import dumps

PROGRAM, REPORT, PICKLED = "module.pt2", "report.json", "module.pt"
SAVED = (PROGRAM, PICKLED, REPORT)


def export_program(module: fx.GraphModule, example: tuple) -> torch.export.ExportedProgram:
    """torch.export the module on `example` (positional inputs), batch axis dynamic when it can be."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() else None for a in example)
    try:
        try:
            return torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
        except Exception:  # a module that specialises the batch size: export it static
            return torch.export.export(module, example, strict=False)
    except Exception as exc:  # torch.export raises many types
        raise ExportError(f"torch.export could not export the compiled module "
                          f"({str(exc).strip().splitlines()[0]}); save() cannot write {PROGRAM}") from None


def save(module: fx.GraphModule, report: dict, example: tuple | None, folder: str, force: bool = False) -> None:
    """Write module.pt2, module.pt and report.json into folder: all three or none. An existing file
    there is an OutputError unless force=True."""
    if example is None:
        raise ConfigError("save() needs example inputs to export the module: pass save(folder, example_inputs=x)")
    check_new([os.path.join(folder, name) for name in SAVED], force)
    program = io.BytesIO()
    torch.export.save(export_program(module, tuple(example)), program)
    pickled = io.BytesIO()
    torch.save(module, pickled)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {folder}: {exc.strerror}; choose another folder") from None
    with staged(folder, SAVED) as staging:
        write_atomic(os.path.join(staging, PROGRAM), program.getvalue())
        write_atomic(os.path.join(staging, PICKLED), pickled.getvalue())
        write_atomic(os.path.join(staging, REPORT), dumps(report))


def read(folder: str) -> tuple[torch.nn.Module, dict]:
    """(module, report) saved in folder: the module from module.pt2 (no pickled code), the report from
    report.json; `fxa.load` wraps them in an Abstraction."""
    missing = [name for name in (PROGRAM, REPORT) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ConfigError(f"{folder} has no {' or '.join(missing)}; write it with Abstraction.save(folder)")
    program = torch.export.load(os.path.join(folder, PROGRAM))
    with open(os.path.join(folder, REPORT)) as f:
        report = json.load(f)
    return program.module(), report
