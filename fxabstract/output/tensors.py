"""A report on disk: report.json for what a person reads, tensors.safetensors for its bulk numbers.

    >>> write_report(folder, report)      # folder/report.json and folder/tensors.safetensors
    >>> read_report(folder) == report     # the references resolved: the report as it was in memory

In memory a report is plain JSON (lists of numbers: `result.report`, what `fxa.intervene` reads).
An affine replacement's coefficients are most of it (a site of d units keeping k has (d - k) x k
of them), so on disk the bulk goes to a safetensors file beside report.json and the JSON keeps a
reference where each piece was:

- a numeric array, a list of at least `BULK` ints or of at least `BULK` floats (or a rectangular
  nested list of them, one type throughout), becomes `{"$tensor": "<key>"}`: the tensor of that key
  in tensors.safetensors, int64 or float64, so every value comes back exactly;
- a table, a list of records with the same keys whose values are scalars or numeric arrays of one
  shape (a site's "replaced" list: unit, kind, beta, theta), when one of its columns is bulk, becomes
  `{"$records": <rows>, "columns": {<key>: <column>}}`. A column is a list of the rows' values (a
  `$tensor` reference when it is bulk: all thetas of a site are one [rows, k] tensor), or one scalar
  when every row has that same value ("kind": "affine").

A tensor's key is the JSON path of its array, e.g. "sites/0/replaced/theta". Smaller arrays (shapes,
kept units of a small site) stay inline. Both files are written by one call and belong together.
"""
from __future__ import annotations

import json
import os

import numpy as np
import safetensors
import safetensors.numpy

from ..checks import REFERENCES, validate_report
from ..errors import ConfigError
from .files import write_atomic
from .report import dumps

REPORT, TENSORS = "report.json", "tensors.safetensors"
REPORT_FILES = (REPORT, TENSORS)
BULK = 64                         # arrays of fewer numbers stay in the JSON, where they are readable
TENSOR, RECORDS = REFERENCES
INT64 = (-2**63, 2**63 - 1)


def _array(value) -> tuple[tuple, type] | None:
    """(shape, int or float) of a non-empty rectangular list of ints or of floats, nested to any depth;
    None for anything else (mixed types, bools, ragged or empty lists)."""
    if not isinstance(value, list) or not value:
        return None
    if isinstance(value[0], list):
        inner = [_array(v) for v in value]
        if inner[0] is None or any(i != inner[0] for i in inner):
            return None
        return (len(value), *inner[0][0]), inner[0][1]
    types = set(map(type, value))
    if len(types) != 1 or not types <= {int, float}:
        return None
    kind = types.pop()
    if kind is int and not (INT64[0] <= min(value) and max(value) <= INT64[1]):
        return None
    return (len(value),), kind


def _bulk(value) -> bool:
    array = _array(value)
    return array is not None and int(np.prod(array[0])) >= BULK


def _columns(rows) -> dict[str, list] | None:
    """The columns of a table worth storing column-wise (see the module docstring), else None."""
    if not isinstance(rows, list) or len(rows) < 2 or not all(type(r) is dict for r in rows):
        return None
    keys = rows[0].keys()
    if any(r.keys() != keys for r in rows) or any(k in keys for k in REFERENCES):
        return None
    columns = {k: [r[k] for r in rows] for k in keys}
    for column in columns.values():
        if isinstance(column[0], list):
            if _array(column) is None:
                return None
        elif any(isinstance(v, (list, dict)) for v in column):
            return None
    return columns if any(_bulk(c) for c in columns.values()) else None


def _same(column: list) -> bool:
    first = column[0]
    return not isinstance(first, (list, dict)) and all(type(v) is type(first) and v == first for v in column)


class _Splitter:
    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}

    def tensor(self, value: list, path: str) -> dict:
        key, n = path, 1
        while key in self.tensors:         # a dict key with "/" in it could repeat a path
            key, n = f"{path}#{n}", n + 1
        self.tensors[key] = np.array(value, dtype=np.int64 if _array(value)[1] is int else np.float64)
        return {TENSOR: key}

    def encode(self, value, path: str):
        if isinstance(value, dict):
            return {k: self.encode(v, f"{path}/{k}" if path else str(k)) for k, v in value.items()}
        if not isinstance(value, list):
            return value
        if _bulk(value):
            return self.tensor(value, path)
        columns = _columns(value)
        if columns is not None:
            return {RECORDS: len(value), "columns": {
                k: c[0] if _same(c) else self.encode(c, f"{path}/{k}") for k, c in columns.items()}}
        return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]


def split_report(report: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(the JSON to write, with references; the tensors they name) of an in-memory report."""
    splitter = _Splitter()
    return splitter.encode(report, ""), splitter.tensors


def join_report(saved, tensors: dict[str, np.ndarray], where: str = TENSORS):
    """The inverse of `split_report`: the references in `saved` resolved from `tensors`."""
    if isinstance(saved, list):
        return [join_report(v, tensors, where) for v in saved]
    if not isinstance(saved, dict):
        return saved
    if TENSOR in saved:
        key = saved[TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise ConfigError(f"report.json refers to tensor {key!r}, which {where} does not hold; the two files "
                              "come from different saves: copy report.json and tensors.safetensors together")
        return tensors[key].tolist()
    if RECORDS in saved:
        n, columns = saved[RECORDS], saved.get("columns")
        if isinstance(n, bool) or not isinstance(n, int) or not isinstance(columns, dict):
            raise ConfigError("report.json has a malformed $records table; write the report again with fxabstract")
        columns = {k: join_report(c, tensors, where) for k, c in columns.items()}
        if any(isinstance(c, list) and len(c) != n for c in columns.values()):
            raise ConfigError(f"a $records table of report.json has a column whose length is not its {n} rows; "
                              "write the report again with fxabstract")
        return [{k: c[i] if isinstance(c, list) else c for k, c in columns.items()} for i in range(n)]
    return {k: join_report(v, tensors, where) for k, v in saved.items()}


def write_report(folder: str, report: dict) -> tuple[str, ...]:
    """Write report.json (bulk arrays as references) and tensors.safetensors into `folder`, each atomically;
    returns their names (`REPORT_FILES`). For outputs that must land together, write into a
    `files.staged` folder, then move both: `with staged(out, names + REPORT_FILES) as s: write_report(s, r)`."""
    saved, tensors = split_report(report)
    write_atomic(os.path.join(folder, TENSORS),
                 safetensors.numpy.save(tensors, metadata={"format": f"fxabstract report tensors of {REPORT}"}))
    write_atomic(os.path.join(folder, REPORT), dumps(saved))
    return REPORT_FILES


def read_report(folder: str) -> dict:
    """The report in `folder`/report.json with its references resolved from tensors.safetensors, checked
    (`checks.validate_report`). A report.json with every number inline (earlier versions, or a report
    without bulk arrays) needs no tensors file."""
    path = os.path.join(folder, REPORT)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        saved = json.loads(raw)
    except FileNotFoundError:
        raise ConfigError(f"{folder} has no {REPORT}; write it with Abstraction.save(folder)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); write it again with fxabstract") from None
    tensors = {}
    if json.dumps(TENSOR).encode() in raw:      # references: the tensors file must be there
        where = os.path.join(folder, TENSORS)
        try:
            with open(where, "rb") as f:
                tensors = safetensors.numpy.load(f.read())
        except FileNotFoundError:
            raise ConfigError(f"{path} refers to tensors in {where}, which is missing; copy report.json and "
                              f"{TENSORS} together") from None
        except (OSError, safetensors.SafetensorError) as exc:
            raise ConfigError(f"cannot read {where} ({exc}); write the report again with fxabstract") from None
    report = join_report(saved, tensors, TENSORS)
    validate_report(report)
    return report
