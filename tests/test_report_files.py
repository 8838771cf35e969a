"""The report on disk and its checks: report.json keeps the structure, tensors.safetensors the
coefficients (so report.json stays small), the loaded report is the one compiled, and a report that
is not an fxabstract report of a known version is one ConfigError naming what is wrong."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import fxabstract as fxa
from fxabstract.checks import REPORT_SCHEMA, REPORT_VERSION, validate_report
from fxabstract.errors import ConfigError
from fxabstract.output.files import staged
from fxabstract.output.report import dumps
from fxabstract.output.tensors import REPORT_FILES, read_report, split_report, write_report


@pytest.fixture(scope="module")
def wide():
    """The issue's 2 x 1024 MLP, affine, keep 0.5: 2 x 512 x 512 theta coefficients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    result = fxa.abstract(model, list(torch.randn(2048, 64).split(512)), keep=0.5, replacement="affine",
                          allocation="predicted")
    return model, result


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return model, fxa.abstract(model, [torch.randn(128, 8)], keep=0.5, replacement="affine", round_to=1)


def test_report_json_of_a_2x1024_mlp_is_under_a_megabyte_and_loads_back_exactly(wide, tmp_path):
    model, result = wide
    coefficients = sum(len(r["theta"]) for s in result.report["sites"] for r in s["replaced"])
    assert coefficients >= 2 * 400 * 400, f"the test needs the issue's bulk ({coefficients} coefficients)"
    inline = len(dumps(result.report))
    result.save(str(tmp_path))
    size = (tmp_path / "report.json").stat().st_size
    assert inline > 5_000_000 and size < 1_000_000, f"report.json: {size} bytes (all inline: {inline})"
    loaded = fxa.load(str(tmp_path)).report
    for site, back in zip(result.report["sites"], loaded["sites"]):
        assert back["kept"] == site["kept"] and back["scores"] == site["scores"]
        assert back["replaced"] == site["replaced"], "theta and beta must come back exactly (float64)"
    assert {k: v for k, v in loaded.items() if k != "files"} == json.loads(json.dumps(result.report))


def test_the_saved_json_references_the_tensors_and_keeps_small_arrays_inline(small, tmp_path):
    _, result = small
    saved, tensors = split_report(result.report)
    site = saved["sites"][0]
    assert site["shape"] == result.report["sites"][0]["shape"], "a shape is a small array: it stays readable"
    table = site["replaced"]
    assert table["$records"] == len(result.report["sites"][0]["replaced"]) and table["columns"]["kind"] == "affine"
    theta = table["columns"]["theta"]["$tensor"]
    assert tensors[theta].shape == (table["$records"], len(site["kept"])) and tensors[theta].dtype.name == "float64"
    write_report(str(tmp_path), result.report)
    assert sorted(os.listdir(tmp_path)) == sorted(REPORT_FILES)
    assert read_report(str(tmp_path)) == json.loads(json.dumps(result.report))


def test_the_cli_can_write_its_report_with_the_side_file_all_or_nothing(small, tmp_path):
    _, result = small
    report = {**result.report, "evaluation": {"sweep": [{"kept": k, "agreement": 0.5} for k in range(100)]}}
    with staged(str(tmp_path), REPORT_FILES) as staging:
        write_report(staging, report)
    assert read_report(str(tmp_path)) == json.loads(json.dumps(report))
    (tmp_path / "x").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with staged(str(tmp_path / "x"), REPORT_FILES) as staging:
            write_report(staging, report)
            raise KeyboardInterrupt                     # Ctrl-C after both files are staged
    assert os.listdir(tmp_path / "x") == [], "an interrupted write leaves no report"


def test_a_report_json_with_every_number_inline_still_loads(small, tmp_path):
    model, result = small
    result.save(str(tmp_path))
    (tmp_path / "report.json").write_bytes(dumps(result.report))   # as earlier versions wrote it
    (tmp_path / "tensors.safetensors").unlink()
    assert fxa.load(str(tmp_path)).report == json.loads(json.dumps(result.report))


def test_a_report_json_without_its_tensors_says_so(small, tmp_path):
    _, result = small
    result.save(str(tmp_path))
    (tmp_path / "tensors.safetensors").unlink()
    with pytest.raises(ConfigError, match="tensors.safetensors.*missing"):
        fxa.load(str(tmp_path))


def test_intervene_on_the_saved_json_itself_says_how_to_read_it(small, tmp_path):
    model, result = small
    result.save(str(tmp_path))
    raw = json.loads((tmp_path / "report.json").read_text())
    with pytest.raises(ConfigError, match=r"reference into tensors.safetensors.*fxa.load"):
        with fxa.intervene(model, raw):
            pass


# ----------------------------------------------------------------------------- the schema

def test_new_reports_carry_the_version_and_follow_the_schema(small):
    _, result = small
    assert result.report["version"] == REPORT_VERSION == 1
    assert REPORT_SCHEMA["properties"]["version"]["enum"] == [1]
    validate_report(result.report)
    validate_report({k: v for k, v in result.report.items() if k != "version"})   # reports from before versions


def edit(report: dict, change) -> dict:
    report = copy.deepcopy(report)
    change(report)
    return report


def first_affine(report: dict) -> dict:
    return report["sites"][0]["replaced"][1]


BAD = {
    "wrong kind": (lambda r: first_affine(r).update(kind="linear"), r"replaced\[1\]\.kind is a string \('linear'\), "
                                                                    r"not 'constant' or 'affine'"),
    "NaN beta": (lambda r: first_affine(r).update(beta=float("nan")), r"replaced\[1\]\.beta is NaN, not a finite"),
    "inf theta": (lambda r: first_affine(r)["theta"].__setitem__(2, float("inf")),
                  r"replaced\[1\]\.theta\[2\] is inf .*not a finite number"),
    "theta short": (lambda r: first_affine(r)["theta"].pop(), r"with \d+ theta coefficients for \d+ kept units"),
    "string beta": (lambda r: first_affine(r).update(beta="0.25"), r"beta is a string \('0.25'\), not a finite number"),
    "no theta": (lambda r: first_affine(r).pop("theta"), r"replaced\[1\] has no 'theta'"),
    "unknown version": (lambda r: r.update(version=7), r"version is 7, but this fxabstract reads report version 1; "
                                                       r"upgrade fxabstract"),
    "no sites": (lambda r: r.update(sites=[]), r"sites is empty"),
    "float units": (lambda r: r["sites"][0].update(units=32.0), r"units is 32.0, not of type integer"),
    "edited kept": (lambda r: r["sites"][0].update(kept=r["sites"][0]["kept"][1:]), r"into kept and replaced"),
    "NaN score": (lambda r: r["sites"][0]["scores"].__setitem__(0, float("nan")), r"scores\[0\] is NaN"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_report_is_one_config_error_naming_it(small, tmp_path, name):
    model, result = small
    change, message = BAD[name]
    report = edit(result.report, change)
    with pytest.raises(ConfigError, match=message) as raised:
        with fxa.intervene(model, report):
            pass
    text = str(raised.value)
    assert "\n" not in text and ("pass an unedited report" in text or "upgrade" in text), f"the fix is named: {text}"
    result.save(str(tmp_path))
    (tmp_path / "report.json").write_bytes(dumps(report))       # the same report, as a file on disk
    with pytest.raises(ConfigError, match=message):
        fxa.load(str(tmp_path))


def test_the_schema_file_ships_with_the_package():
    import importlib.resources

    text = importlib.resources.files("fxabstract").joinpath("report.schema.json").read_text()
    assert json.loads(text) == REPORT_SCHEMA
    pyproject = (os.path.dirname(os.path.dirname(__file__)) + "/pyproject.toml")
    with open(pyproject) as f:
        assert "report.schema.json" in f.read(), "package data must install the schema with `pip install .`"
