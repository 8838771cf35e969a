"""Saving and loading an abstraction without pickling code: torch.export's `.pt2` plus the report.

    >>> result.save("out/")        # out/module.pt2, report.json, tensors.safetensors (and module.pt)
    >>> loaded = fxa.load("out/")  # Abstraction: a runnable module and the report (`read`)
    >>> loaded.module(x), loaded.report["sites"][0]["kept"], loaded.report["files"]

`module.pt2` is a torch.export archive: the graph as JSON and the weights as tensors, so loading it
runs no pickled code (unlike `torch.load` of a pickled GraphModule). The batch axis is exported
dynamic where the module allows it. The report is report.json plus its coefficients in
tensors.safetensors (output/tensors.py). `module.pt`, the pickled GraphModule, is written for callers
of earlier versions where the module pickles (a module captured through torch.export does not); load
it only from a source you trust. The saved report's "files" lists the files written.
"""
from __future__ import annotations

import io
import os

import torch
import torch.fx as fx

from ..capture import export_dims
from ..data import Inputs
from ..errors import ConfigError, ExportError, OutputError
from .files import check_new, quiet, staged, write_atomic
from .tensors import REPORT, REPORT_FILES, read_report, write_report

PROGRAM, PICKLED = "module.pt2", "module.pt"
SAVED = (PROGRAM, PICKLED, *REPORT_FILES)   # every file save may write


def export_program(module: fx.GraphModule, example: Inputs) -> torch.export.ExportedProgram:
    """torch.export the module on `example`, its batch axis (and the sequence axis of token inputs)
    dynamic where the module allows it (`capture.export_dims`)."""
    args, kwargs = example.args, example.kwargs
    try:
        try:
            return torch.export.export(module, args, kwargs, dynamic_shapes=export_dims(module.forward, args, kwargs),
                                       strict=False)
        except Exception:  # a module that specialises the batch size: export it static
            return torch.export.export(module, args, kwargs, strict=False)
    except Exception as exc:  # torch.export raises many types
        raise ExportError(f"torch.export could not export the compiled module "
                          f"({str(exc).strip().splitlines()[0]}); save() cannot write {PROGRAM}") from None


def pickled(module: torch.nn.Module) -> bytes | None:
    """The module pickled by torch.save, or None where it does not pickle (a module captured through
    torch.export holds local functions)."""
    buf = io.BytesIO()
    try:
        torch.save(module, buf)
    except Exception:  # pickle raises AttributeError, PicklingError, TypeError, ... for what it cannot store
        return None
    return buf.getvalue()


def save(module: fx.GraphModule, report: dict, example: Inputs | None, folder: str, force: bool = False) -> list[str]:
    """Write module.pt2, report.json, tensors.safetensors and, where the module pickles, module.pt into
    folder: all of them or none. The saved report's "files" names them; they are returned. An existing
    file there is an OutputError unless force=True (a module.pt of an earlier save is then removed when
    this module does not pickle)."""
    if example is None:
        raise ConfigError("save() needs example inputs to export the module: pass save(folder, example_inputs=x)")
    check_new([os.path.join(folder, name) for name in SAVED], force)
    program = io.BytesIO()
    with quiet():
        torch.export.save(export_program(module, example), program)
        pickle = pickled(module)
    names = sorted([PROGRAM, *REPORT_FILES] + ([PICKLED] if pickle is not None else []))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {folder}: {exc.strerror}; choose another folder") from None
    with staged(folder, tuple(names)) as staging:
        write_atomic(os.path.join(staging, PROGRAM), program.getvalue())
        if pickle is not None:
            write_atomic(os.path.join(staging, PICKLED), pickle)
        write_report(staging, {**report, "files": names})
    stale = os.path.join(folder, PICKLED)
    if pickle is None and os.path.exists(stale):      # force=True over an earlier save: not this module's
        try:
            os.remove(stale)
        except OSError as exc:
            raise OutputError(f"cannot remove {stale} of an earlier save: {exc.strerror}; remove it") from None
    return names


def read(folder: str) -> tuple[torch.nn.Module, dict]:
    """(module, report) saved in folder: the module from module.pt2 (no pickled code), the report from
    report.json and tensors.safetensors, checked against the report schema; `fxa.load` wraps them in an
    Abstraction."""
    missing = [name for name in (PROGRAM, REPORT) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ConfigError(f"{folder} has no {' or '.join(missing)}; write it with Abstraction.save(folder)")
    report = read_report(folder)
    with quiet():
        try:
            return torch.export.load(os.path.join(folder, PROGRAM)).module(), report
        except Exception as exc:  # torch.export.load raises many types on a damaged archive
            text = str(exc).strip()
            raise ConfigError(f"cannot read {os.path.join(folder, PROGRAM)} "
                              f"({text.splitlines()[0] if text else type(exc).__name__}); "
                              "save the abstraction again") from None
