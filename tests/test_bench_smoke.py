"""The benchmark script must not rot: run it on the digits case alone (no torch needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 40 s: the whole benchmark on digits, with plots
def test_bench_runs_on_digits(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--cases", "digits", "--repeats", "1", "--latency-runs", "3",
           "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "RESULTS.md").read_text()
    for row in ("fp32", "uniform 8 (default)", "MixQuant qem 1", "budget at the uniform-INT4 size", "ORT static QDQ, W int8 A uint8"):
        assert f"| {row} " in text
    assert (tmp_path / "plots" / "digits.png").stat().st_size > 5000
    results = json.loads((tmp_path / "results.json").read_text())["digits"]
    assert results["fp32"]["test accuracy"] > 0.95
    # The default keeps the float model's accuracy on the held-out split.
    assert results["uniform 8 (default)"]["test accuracy"] >= results["fp32"]["test accuracy"] - 0.01


def test_deployment_bench_runs_on_digits(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "bench_deploy.py"), "--cases", "digits", "--runs", "3",
           "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    (tmp_path / "RESULTS.md").write_text("<!-- deployment:start -->\n<!-- deployment:end -->\n")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "results-deployment.json").read_text())["digits"]
    preset = data["W8A8 ort-cpu preset (--activations auto = uint8), gptq, percentile"]
    assert preset["fused"]["QLinearConv"] == 2 and preset["float_between_integer_ops"] == 0
    assert preset["scores"]["top-1 agreement"] >= 0.98
    assert "peer: ORT quantize_static QDQ (W int8 per-channel, A uint8)" in data
