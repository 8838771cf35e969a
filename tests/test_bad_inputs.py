"""Issue 5, the bad-input table: every case of benchmarks/bad_inputs.py, through the API and the CLI
(in-process here; the benchmark also runs the CLI in subprocesses), ends as expected: a one-line
fxabstract error (exit status 2) or the documented policy, never a traceback or a partial file."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bad_inputs", os.path.join(ROOT, "benchmarks", "bad_inputs.py"))
bad_inputs = importlib.util.module_from_spec(spec)
sys.modules["bad_inputs"] = bad_inputs          # dataclasses look their module up there
spec.loader.exec_module(bad_inputs)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return bad_inputs.run_all(tmp_path_factory.mktemp("bad-inputs"), in_process=True)


def test_the_table_covers_at_least_25_cases_through_both_front_ends(rows):
    assert len(rows) >= 25, f"the issue asks for at least 25 cases, there are {len(rows)}"
    both = [case for case, api, cli in rows if api and cli]
    assert len(both) >= 15, f"most mistakes must be tried through both the API and the CLI ({len(both)})"


@pytest.mark.parametrize("index", range(len(bad_inputs.CASES)), ids=[c.name for c in bad_inputs.CASES])
def test_each_case_ends_as_expected_without_traceback_or_partial_file(rows, index):
    case, api, cli = rows[index]
    for front, outcome in (("API", api), ("CLI", cli)):
        if outcome is None:
            continue
        assert not outcome.traceback, f"{front}: {case.name!r} must not end in a traceback: {outcome.sees}"
        assert not outcome.partial, f"{front}: {case.name!r} must leave no partial file: {outcome.partial}"
        assert not outcome.noise, f"{front}: {case.name!r} must print nothing but its own lines: {outcome.noise}"
        assert outcome.kind == case.expect, f"{front}: {case.name!r} must end as {case.expect}: {outcome.sees}"
        assert "\n" not in outcome.sees and outcome.sees, f"{front}: one line, naming the problem: {outcome.sees!r}"
    if cli is not None:
        assert cli.status == (2 if case.expect == "error" else 0), f"CLI exit status for {case.name!r}: {cli.status}"
        if case.expect == "error":
            assert cli.sees.startswith("fxabstract: error: "), f"the CLI says `fxabstract: error: ...`: {cli.sees}"
