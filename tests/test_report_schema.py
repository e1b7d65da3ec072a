"""The report is typed data: its JSON Schema is generated from the dataclasses, committed, and real reports match it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

from mixq_onnx import Budget, QuantConfig, quantize_file
from mixq_onnx.pipeline import CalibrationOptions, VerifyOptions
from mixq_onnx.report import json_schema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_committed_schema_is_the_generated_one():
    from gen_report_schema import OUT, render

    assert OUT.read_text() == render(), "docs/report.schema.json is stale: run python tools/gen_report_schema.py"


@pytest.mark.parametrize("calibrated", [False, True])
def test_real_reports_match_the_schema(tmp_path, calibrated):
    """A budget search with verification (and, calibrated, output statistics and gptq) on the shipped CNN."""
    config = QuantConfig(search=Budget(target_bits=4.0), e2e_samples=8)
    calib = CalibrationOptions(ROOT / "models" / "digits_calib.npz", 32) if calibrated else None
    result = quantize_file(ROOT / "models" / "digits_cnn.onnx", tmp_path / "q.onnx", config,
                           VerifyOptions(inputs=ROOT / "models" / "digits_test.npz"), calibration=calib)
    report = json.loads(result.report.to_json())
    jsonschema.validate(report, json_schema())
    assert report["tensors"] and report["verification"]["runs"]
    # A report that breaks the schema is refused: the schema is not vacuous.
    report["tensors"][0]["chosen"]["bits"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, json_schema())
