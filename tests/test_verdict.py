"""The verdict on real data: where verification samples come from, what decides good/degraded/broken, --require,
and the messages a user reads at the end of a run (pipeline.quantize_file and the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from mixq_onnx import cli
from mixq_onnx.cli import main

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, DIGITS_TEST, DIGITS_CALIB = MODELS / "digits_cnn.onnx", MODELS / "digits_test.npz", MODELS / "digits_calib.npz"
TINY, TINY_CALIB = MODELS / "tiny_transformer.onnx", MODELS / "tiny_transformer_calib.npz"


def _run(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def _last(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_default_8bit_on_held_out_test_images_is_good_and_the_verdict_is_the_last_line(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = _run([DIGITS, "-o", out, "--inputs", DIGITS_TEST, "--report", rep])
    assert r.exit_code == 0, r.output
    assert _last(r.stdout).startswith("verdict: good (logits: top-1 agreement")
    v = json.loads(rep.read_text())["verification"]
    assert v["source"] == "inputs" and v["samples"] == 360 and v["verdict"]["level"] == "good"
    assert v["runs"][0]["outputs"][0]["kind"] == "classes" and v["thresholds"]["top1"] == [0.99, 0.9]


def test_a_broken_model_is_called_broken_and_require_writes_nothing(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    args = [DIGITS, "-o", out, "--bits", "2", "--int2", "--min-elements", "0", "--inputs", DIGITS_TEST]
    r = _run(args + ["--report", rep])
    assert r.exit_code == 0, r.output
    assert _last(r.stdout).startswith("verdict: broken")
    assert "warning: the quantized model is broken" in r.stderr
    out.unlink()
    rep.unlink()
    r = _run(args + ["--report", rep, "--require", "degraded"])
    assert r.exit_code == 6, r.output
    assert not out.exists() and not rep.exists() and not list(tmp_path.iterdir())
    assert "verdict: broken" in r.stdout and "below --require degraded" in r.stderr


def test_generated_inputs_give_unverified_and_say_how_to_pass_real_data(tmp_path):
    out = tmp_path / "q.onnx"
    r = _run([DIGITS, "-o", out])
    assert r.exit_code == 0, r.output
    assert _last(r.stdout).startswith("verdict: unverified (generated inputs cannot tell")
    assert "pass real samples with --inputs" in r.stderr
    r = _run([DIGITS, "-o", tmp_path / "q2.onnx", "--require", "degraded"])
    assert r.exit_code == 6 and not (tmp_path / "q2.onnx").exists()
    assert "pass real data with --inputs or --calib" in r.stderr


def test_a_quarter_of_calib_is_held_out_and_the_search_does_not_see_it(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = _run([DIGITS, "-o", out, "--calib", DIGITS_CALIB, "--target-bits", "4", "--report", rep])
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    assert data["verification"]["source"] == "held-out calibration" and data["verification"]["samples"] == 64
    # The search measured on the 192 others (its first 32, --e2e-samples), never on the held-out ones.
    assert data["end_to_end"]["source"] == "calibration samples" and data["end_to_end"]["samples"] == 32
    assert data["verification"]["verdict"]["level"] in ("good", "degraded", "broken")
    # --holdout 0 uses all of it for calibration and verifies on generated inputs.
    r = _run([DIGITS, "-o", tmp_path / "q2.onnx", "--calib", DIGITS_CALIB, "--holdout", "0", "--report", tmp_path / "r2.json"])
    assert json.loads((tmp_path / "r2.json").read_text())["verification"]["source"] == "generated"


def test_data_loader_scripts_feed_calibration_and_verification(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        f"def load_data():\n    d = np.load({str(DIGITS_CALIB)!r})\n"
        "    for i in range(0, 64, 16):\n        yield {'image': d['image'][i:i + 16]}\n"
        f"def test_data():\n    yield {{'image': np.load({str(DIGITS_TEST)!r})['image'][:40]}}\n")
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = _run([DIGITS, "-o", out, "--data-loader-script", script, "--inputs", f"{script}:test_data", "--method", "gptq",
              "--bits", "4", "--report", rep])
    assert r.exit_code == 0, r.output
    v = json.loads(rep.read_text())["verification"]
    assert v["source"] == "inputs" and v["samples"] == 40
    bad = _run([DIGITS, "-o", tmp_path / "x.onnx", "--inputs", f"{script}:nothing"])
    assert bad.exit_code == 2 and "defines no function 'nothing'" in bad.stderr and not (tmp_path / "x.onnx").exists()


def test_out_of_range_token_ids_are_refused_naming_the_file_and_input(tmp_path):
    bad = tmp_path / "v.npz"
    np.savez(bad, input_ids=np.full((16, 32), 100000, np.int64))
    r = _run([TINY, "-o", tmp_path / "q.onnx", "--calib", bad, "--target-bits", "4"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "v.npz" in lines[0] and "'input_ids' holds index 100000" in lines[0]
    assert not (tmp_path / "q.onnx").exists()


def test_version_and_report_over_the_output_message(tmp_path):
    r = _run(["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("mixq-onnx ")
    q = tmp_path / "q.onnx"
    r = _run([DIGITS, "-o", q, "--report", q])
    assert r.exit_code == 4 and "where this run writes the quantized model" in r.stderr and "reads" not in r.stderr


def test_progress_lines_off_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(cli._Progress, "EVERY_S", 0.0)
    r = _run([DIGITS, "-o", tmp_path / "q.onnx", "--inputs", DIGITS_TEST, "--target-bits", "4"])
    assert r.exit_code == 0, r.output
    assert "measuring error: 2/2" in r.stderr and "elapsed" in r.stderr
    assert "verification: float model" in r.stderr


def _dequantized(model: onnx.ModelProto, weight: str) -> np.ndarray:
    """The float values the written model computes for ``weight``'s DequantizeLinear, by onnx's reference."""
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(weight))
    g = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                          [inits[i] for i in node.input if i])
    m = helper.make_model(g, opset_imports=model.opset_import)
    return ReferenceEvaluator(m).run(None, {})[0]


def test_the_table_shows_the_error_of_the_written_weights_not_round_to_nearest(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = _run([DIGITS, "-o", out, "--bits", "4", "--method", "gptq", "--calib", DIGITS_CALIB, "--report", rep])
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(DIGITS).graph.initializer}
    written = onnx.load(out)
    for t in data["tensors"]:
        w = floats[t["name"]]
        nmse = float(np.mean((_dequantized(written, t["name"]) - w) ** 2) / np.mean(w ** 2))
        assert t["chosen"]["nmse"] == pytest.approx(nmse, rel=1e-3)
        rtn = next(e for e in t["errors"] if e["bits"] == 4 and e["granularity"] == t["chosen"]["granularity"])
        assert rtn["nmse"] != pytest.approx(nmse, rel=1e-3)  # gptq's integers are not round-to-nearest's


def test_activations_and_smoothing_say_what_they_did(tmp_path):
    r = _run([TINY, "-o", tmp_path / "q.onnx", "--target", "ort-cpu", "--activations", "auto", "--smooth",
              "--calib", TINY_CALIB])
    assert r.exit_code == 0, r.output
    assert "--activations auto on --target ort-cpu: uint8" in r.stderr
    act = next(x for x in r.stdout.splitlines() if x.startswith("activations: "))
    assert "tensors quantized to uint8" in act and "left in float (" in act
    smooth = next(x for x in r.stdout.splitlines() if x.startswith("smoothing: "))
    assert "MatMul/Gemm inputs smoothed (alpha" in smooth
    r = _run([DIGITS, "-o", tmp_path / "g.onnx", "--activations", "auto"])
    assert r.exit_code == 0 and "--activations auto on --target generic: none (weight-only" in r.stderr


def test_thresholds_and_output_kinds_can_be_set(tmp_path):
    base = [DIGITS, "-o", tmp_path / "q.onnx", "--bits", "4", "--inputs", DIGITS_TEST, "--report", tmp_path / "r.json"]
    r = _run(base + ["--threshold", "top1=1.0:0.9999"])  # 4 bits changes a few of 360 predictions
    assert r.exit_code == 0, r.output
    v = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert v["thresholds"]["top1"] == [1.0, 0.9999]
    assert v["runs"][0]["outputs"][0]["top1_agreement"] < 0.9999 and v["verdict"]["level"] == "broken"
    r = _run(base + ["--output-kind", "logits=values"])
    out = json.loads((tmp_path / "r.json").read_text())["verification"]["runs"][0]["outputs"][0]
    assert out["kind"] == "values" and out["metric"] == "sqnr"
    bad = _run(base + ["--output-kind", "nope=values"])
    assert bad.exit_code == 2 and "not outputs of the model" in bad.stderr
    bad = _run(base + ["--threshold", "top1=high"])
    assert bad.exit_code == 2 and "METRIC=GOOD:BROKEN" in bad.stderr


def test_without_calib_the_search_measures_on_inputs_and_says_the_verdict_reuses_them(tmp_path):
    rep = tmp_path / "r.json"
    r = _run([DIGITS, "-o", tmp_path / "q.onnx", "--target-bits", "4", "--inputs", DIGITS_TEST, "--report", rep])
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    assert data["end_to_end"]["source"] == f"--inputs {DIGITS_TEST}"
    assert any("verification then reuses" in n for n in data["notes"])
    assert not any("ranks plans on generated inputs" in n for n in data["notes"])
