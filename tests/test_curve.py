"""The accuracy-size curve: one point per budget from the same measurements, sizes rising as distances fall."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mixq_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny_transformer.onnx"
CALIB = ROOT / "models" / "tiny_transformer_calib.npz"


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, [str(TINY), "-o", str(out), "--no-verify", "--report", str(out) + ".json",
                                    "--calib", str(CALIB), *args])
    assert res.exit_code == 0, res.output
    return json.loads(Path(str(out) + ".json").read_text()), res.output


def test_the_curve_predicts_each_budget_and_its_point_matches_a_run_at_that_budget(tmp_path):
    report, text = _run(tmp_path, "--target-bits", "4.5")
    curve = report["curve"]
    assert [p["target_bits"] for p in curve][:2] == [4.0, 4.5] and curve[-1]["target_bits"] == 8.0
    sizes = [p["bytes"] for p in curve]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all(p["bytes"] <= p["limit_bytes"] for p in curve)
    predicted = [p["predicted"] for p in curve]
    assert predicted == sorted(predicted, reverse=True) and predicted[-1] < predicted[0] / 20
    # The run's own budget: its point is the plan it measured, and the prediction is close to the measurement.
    own = next(p for p in curve if p["target_bits"] == 4.5)
    assert own["measured"] is not None and own["measured"] == report["search"]["measured"][0]["distance"]
    assert 0.5 < own["predicted"] / own["measured"] < 2
    assert "accuracy-size curve" in text
    # Asking for another point of the curve returns the plan the curve showed there.
    other, _ = _run(tmp_path, "--target-bits", "6")
    point = next(p for p in curve if p["target_bits"] == 6.0)
    assert other["search"]["used_bytes"] == point["bytes"]


def test_uniform_runs_have_no_curve_and_plan_only_shows_it(tmp_path):
    report, _ = _run(tmp_path, "--bits", "8")
    assert report["curve"] == []
    res = CliRunner().invoke(main, [str(TINY), "--plan", "--target-bits", "5", "--calib", str(CALIB)])
    assert res.exit_code == 0 and "accuracy-size curve" in res.output and "predicted end-to-end distance" in res.output
