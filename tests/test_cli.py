"""The command line, through click's CliRunner: defaults, reports, plans, determinism and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

from mixq_onnx.cli import main
from tests.helpers import init, make_model, vi

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST_SET = ROOT / "models" / "digits_test.npz"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def accuracy(model_path: Path) -> float:
    data = np.load(TEST_SET)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return float(np.mean(np.argmax(sess.run(None, {"image": data["image"]})[0], 1) == data["label"]))


def test_default_run_on_the_digits_model(tmp_path):
    out = tmp_path / "q.onnx"
    before = DIGITS.read_bytes()
    r = invoke(DIGITS, "-o", out, "--inputs", TEST_SET)
    assert r.exit_code == 0, r.output
    assert DIGITS.read_bytes() == before
    assert "top-1 agreement" in r.output and "conv2.weight" in r.output
    assert out.stat().st_size < DIGITS.stat().st_size / 3
    # Real data: the quantized model keeps the float model's test accuracy within 1 point.
    assert accuracy(out) >= accuracy(DIGITS) - 0.01
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mixq-")]


def test_report_json_schema(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = invoke(DIGITS, "-o", out, "--report", rep, "--min-elements", "0", "--qem", "2", "-q")
    assert r.exit_code == 0 and r.output == ""
    data = json.loads(rep.read_text())
    assert data["schema"] == "mixq-onnx/report/v1"
    assert {"input", "output", "config", "opset", "search", "tensors", "skipped", "totals", "verification", "notes"} <= set(data)
    names = {t["name"] for t in data["tensors"]}
    assert names == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    t = data["tensors"][0]
    assert {"name", "op_types", "shape", "params", "errors", "chosen", "reason"} <= set(t)
    # Storage-aware: only the widest width of each container is measured (2 and 3 bits cost INT4's bytes).
    assert {e["bits"] for e in t["errors"]} == {4, 8}
    assert all(e["e2e"] is not None for e in t["errors"])
    assert data["end_to_end"]["samples"] == 32 and data["end_to_end"]["outputs"]
    assert {"bits", "container", "bytes", "granularity"} <= set(t["chosen"])
    assert all(s["reason"] for s in data["skipped"])
    assert data["totals"]["quantized_bytes"] < data["totals"]["float_bytes"]
    runs = data["verification"]["runs"]
    assert len(runs) == 2 and all(o["cosine"] > 0.9 for run in runs for o in run["outputs"])


def test_plan_writes_nothing(tmp_path):
    out = tmp_path / "q.onnx"
    r = invoke(DIGITS, "--plan", "-o", out)
    assert r.exit_code == 0 and "plan only" in r.output
    assert not out.exists()
    r = invoke(DIGITS, "--plan", "--target-bits", "6")
    assert r.exit_code == 0 and "search: budget" in r.output


def test_same_input_same_bytes(tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"q{k}.onnx"
        assert invoke(DIGITS, "-o", out, "--no-verify", "--target-bits", "5", "--granularity", "channel", "--granularity", "block32").exit_code == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "args",
    [
        ["--bits", "8"],
        ["--bits", "4", "--granularity", "block32", "--scheme", "symmetric"],
        ["--qem", "1.5", "--literal-bits"],
        ["--qem-ref-bits", "8"],
        ["--target-bits", "6", "--weighting", "sqrt"],
        ["--max-size", "30KB", "--int2", "--min-elements", "0"],
        ["--force-bits", "fc1*=8", "--keep-float", "conv2*"],
    ],
)
def test_options_reach_the_library(tmp_path, args):
    out = tmp_path / "q.onnx"
    r = invoke(DIGITS, "-o", out, "--inputs", TEST_SET, *args)
    assert r.exit_code == 0, r.output
    assert accuracy(out) >= 0.9


def _float64_model(path: Path) -> None:
    w = init("w", np.ones((64, 64), np.float64))
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 64], onnx.TensorProto.DOUBLE)],
                   [vi("y", [1, 64], onnx.TensorProto.DOUBLE)], [w])
    onnx.save(m, str(path))


def _bias_only_model(path: Path) -> None:
    b = init("b", np.ones((64,), np.float32))
    m = make_model([helper.make_node("Add", ["x", "b"], ["y"])], [vi("x", [1, 64])], [vi("y", [1, 64])], [b])
    onnx.save(m, str(path))


@pytest.mark.parametrize(
    "case,extra,pattern,code",
    [
        ("missing", [], "no such file", 3),
        ("not-onnx", [], "not a readable ONNX model|not an ONNX model", 3),
        ("truncated", [], "not a readable ONNX model|not an ONNX model", 3),
        ("empty", [], "not an ONNX model", 3),
        ("nothing", [], "nothing to quantize", 3),
        ("float64", [], "nothing to quantize.*unsupported dtype double", 3),
        ("same-path", [], "would overwrite the input model", 4),
        ("no-folder", [], "does not exist", 4),
        ("parent-is-file", [], "does not exist|cannot write|not writable", 4),
        ("ok", ["--bits", "9"], "bit-width must be an integer from 2 to 8", 2),
        ("ok", ["--bits", "1"], "bit-width must be an integer from 2 to 8", 2),
        ("ok", ["--qem", "0"], "--qem must be greater than 0", 2),
        ("ok", ["--qem", "-1"], "--qem must be greater than 0", 2),
        ("ok", ["--target-bits", "3"], "is below 4: 3-bit values are stored in 4-bit containers", 2),
        ("ok", ["--target-bits", "1.5", "--int2"], "is below 2, the narrowest container", 2),
        ("ok", ["--target-bits", "4", "--candidate-bits", "8"], "below the smallest candidate width", 2),
        ("ok", ["--target-bits", "4", "--force-bits", "*=8"], "cannot be met: the smallest plan that fits takes", 2),
        ("ok", ["--max-size", "1KB"], "cannot be met: the smallest file that can be written takes about", 2),
        ("ok", ["--bits", "4", "--qem", "2"], "give only one", 2),
        ("ok", ["--target-bits", "4", "--qem-ref-bits", "8"], "give only one", 2),
        ("ok", ["--granularity", "rows"], "unknown granularity", 2),
        ("ok", ["--granularity", "channel", "--granularity", "block32"], "need a search", 2),
        ("ok", ["--force-bits", "fc1"], "PATTERN=N", 2),
        ("ok", ["--input-shape", "image:1xfoo"], "--input-shape expects", 2),
        ("no-output", [], "missing -o/--output", 2),
    ],
)
def test_bad_input_gets_one_line_and_no_output(tmp_path, case, extra, pattern, code):
    src = tmp_path / "model.onnx"
    out = tmp_path / "out.onnx"
    if case in ("ok", "same-path", "no-folder", "parent-is-file", "no-output"):
        shutil.copy(DIGITS, src)
    elif case == "not-onnx":
        src.write_text("hello, this is not a model\n")
    elif case == "truncated":
        src.write_bytes(DIGITS.read_bytes()[:5000])
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "nothing":
        _bias_only_model(src)
    elif case == "float64":
        _float64_model(src)
    if case == "same-path":
        out = src
    elif case == "no-folder":
        out = tmp_path / "missing" / "out.onnx"
    elif case == "parent-is-file":
        out = src / "out.onnx"
    before = src.read_bytes() if src.exists() else None
    args = [src] + ([] if case == "no-output" else ["-o", out]) + extra
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    import re

    assert re.search(pattern, lines[0]), lines[0]
    if case != "same-path":
        assert not out.exists()
    if before is not None:
        assert src.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mixq-")]


def test_help_documents_every_option():
    r = invoke("--help")
    assert r.exit_code == 0
    for opt in ["--bits", "--qem", "--qem-ref-bits", "--target-bits", "--max-size", "--weighting", "--scheme",
                "--granularity", "--candidate-bits", "--literal-bits", "--int2", "--metric", "--min-elements",
                "--keep-float", "--force-bits", "--plan", "--report", "--no-verify", "--input-shape", "--inputs",
                "--verify-samples", "--seed", "--quiet", "--verbose"]:
        assert opt in r.output


def test_the_cli_reference_in_docs_lists_exactly_the_current_options():
    """docs/cli.md is generated from --help (tools/gen_cli_docs.py); its options must be the commands' options."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", text, flags=re.M))
    current = {o for cmd in main.commands.values() for p in cmd.params for o in p.opts if o.startswith("--")} | {"--help"}
    assert documented == current, "docs/cli.md is out of date: run python tools/gen_cli_docs.py"
