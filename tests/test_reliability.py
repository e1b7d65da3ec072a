"""Bad input and faults: one-line errors with their exit codes, no partial outputs, inputs never touched.

One regression test per class of tools/fuzz.py, plus a fast sample of the fuzzer itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mixq_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST_SET = ROOT / "models" / "digits_test.npz"
sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402


def cli(cwd: Path, *args: str):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def one_line_error(r, code: int, pattern: str) -> None:
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.output


@pytest.fixture
def work(tmp_path: Path) -> Path:
    shutil.copy(DIGITS, tmp_path / "m.onnx")
    return tmp_path


# A. verification and sample problems fail before anything is written.
@pytest.mark.parametrize("arrays,pattern", [
    ({"other": np.zeros((2, 1, 8, 8), np.float32)}, "verification inputs lack"),
    ({"image": np.zeros((2, 1, 5, 8), np.float32)}, "does not run on the verification inputs"),
    ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),
    ({}, "holds no arrays"),
])
def test_bad_verification_inputs_leave_no_output(work, arrays, pattern):
    np.savez(work / "i.npz", **arrays)
    r = cli(work, "m.onnx", "-o", "out.onnx", "--inputs", "i.npz")
    one_line_error(r, 2, pattern)
    assert not (work / "out.onnx").exists() and not list(work.glob(".mixq-*"))


def test_zero_size_and_scalar_weights_stay_float(work):
    m = fuzz.mm_model(np.zeros((64, 0), np.float32))
    fuzz.save(m, work / "z.onnx")
    r = cli(work, "z.onnx", "-o", "out.onnx", "--min-elements", "0")
    one_line_error(r, 3, "nothing to quantize")
    assert not (work / "out.onnx").exists()


# B. an input ONNX Runtime cannot load is a model error.
def test_input_ort_cannot_load_is_a_model_error(work):
    m = onnx.load(str(DIGITS))
    m.opset_import[0].version = 30
    fuzz.save(m, work / "bad.onnx")
    one_line_error(cli(work, "bad.onnx", "-o", "out.onnx"), 3, "ONNX Runtime cannot load the input model")
    assert not (work / "out.onnx").exists()


# C. data that does not match the dims.
@pytest.mark.parametrize("damage,pattern", [("raw", "holds"), ("dims", "holds"), ("dtype", "unknown data type"),
                                            ("segment", "segmented")])
def test_damaged_tensors_are_model_errors(work, damage, pattern):
    m = fuzz.mm_model()
    t = m.graph.initializer[0]
    if damage == "raw":
        t.raw_data = t.raw_data[:100]
    elif damage == "dims":
        t.dims[0] = 10**6
    elif damage == "dtype":
        t.data_type = 999
    else:
        t.segment.begin, t.segment.end = 0, 4
    fuzz.save(m, work / "bad.onnx")
    one_line_error(cli(work, "bad.onnx", "-o", "out.onnx"), 3, pattern)
    assert not (work / "out.onnx").exists()


# D. a killed run's temporary folder is ignored, and --clean-temp removes it (a live run's is kept).
def test_clean_temp_removes_only_dead_runs_leftovers(work):
    dead, live = work / ".mixq-999999999-abc", work / f".mixq-{os.getpid()}-abc"
    dead.mkdir()
    live.mkdir()
    (dead / "out.onnx").write_bytes(b"partial")
    r = cli(work, "m.onnx", "-o", "out.onnx", "--clean-temp", "--no-verify")
    assert r.exit_code == 0, r.output
    assert not dead.exists() and live.exists()


def test_sigterm_during_a_run_leaves_nothing(work):
    proc = subprocess.Popen([sys.executable, "-m", "mixq_onnx.cli", "m.onnx", "-o", "out.onnx", "--target-bits", "4"], cwd=work,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(1.5)
    except subprocess.TimeoutExpired:
        proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    assert not list(work.glob(".mixq-*"))
    if proc.returncode != 0:
        assert not (work / "out.onnx").exists()
    else:
        onnx.checker.check_model(str(work / "out.onnx"), full_check=True)


def test_the_next_run_removes_what_a_killed_run_left_and_keeps_live_runs_files(work):
    """kill -9 cannot be cleaned up after; every later run into the same folder removes dead runs' folders."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = work / f".mixq-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "spilled.data").write_bytes(b"x" * 100)
    live = work / f".mixq-{os.getpid()}-live"  # this process is alive: its folder is not ours to remove
    live.mkdir()
    r = cli(work, "m.onnx", "-o", "out.onnx", "--no-verify")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists()


def test_an_over_long_external_data_location_is_a_clean_refusal(work):
    p = fuzz.with_external(onnx.load(DIGITS), work, name="x.onnx", location="x.onnx.data")
    m = onnx.load(str(p), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "d" * 5000 + ".data"
    fuzz.save(m, p)
    one_line_error(cli(work, "x.onnx", "-o", "out.onnx"), 3, "longer than file systems allow")
    assert not (work / "out.onnx").exists()


# E. special files at the output are refused, not replaced.
def test_fifo_output_and_report_are_refused(work):
    os.mkfifo(work / "out.onnx")
    one_line_error(cli(work, "m.onnx", "-o", "out.onnx"), 4, "not a regular file")
    assert (work / "out.onnx").is_fifo()
    os.mkfifo(work / "r.json")
    one_line_error(cli(work, "m.onnx", "-o", "o2.onnx", "--report", "r.json"), 4, "not a regular file")
    assert (work / "r.json").is_fifo() and not (work / "o2.onnx").exists()


# F. FIFOs as samples are refused at once instead of blocking.
def test_fifo_samples_do_not_hang(work):
    os.mkfifo(work / "c.npz")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["--calib", "c.npz", "--bits", "4", "--method", "gptq"], ["--inputs", "c.npz"]):
        p = subprocess.run([sys.executable, "-m", "mixq_onnx.cli", "m.onnx", "-o", "out.onnx", *args], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "not a regular file" in p.stderr, p.stderr


# G. nothing the run reads is ever written.
def test_outputs_never_overwrite_what_the_run_reads(work):
    onnx.save_model(onnx.load(str(DIGITS)), str(work / "x.onnx"), save_as_external_data=True, location="x.onnx.data", size_threshold=0)
    data = digest(work / "x.onnx.data")
    one_line_error(cli(work, "x.onnx", "-o", "x.onnx.data"), 4, "would overwrite")
    one_line_error(cli(work, "x.onnx", "-o", "out.onnx", "--report", "x.onnx.data"), 4, "would overwrite")
    one_line_error(cli(work, "m.onnx", "-o", "out.onnx", "--report", "out.onnx"), 4, "where this run writes the quantized model")
    np.savez(work / "i.npz", image=np.load(TEST_SET)["image"][:4])
    one_line_error(cli(work, "m.onnx", "-o", "i.npz", "--inputs", "i.npz"), 4, "which this run reads")
    onnx.save_model(onnx.load(str(DIGITS)), str(work / "y.onnx"), save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    one_line_error(cli(work, "y.onnx", "-o", "out.onnx"), 4, "would overwrite")
    assert digest(work / "x.onnx.data") == data
    onnx.checker.check_model(str(work / "x.onnx"))
    onnx.checker.check_model(str(work / "y.onnx"))


# H. check reports malformed QDQ nodes as violations.
def test_check_reports_a_one_input_dequantize(work):
    q = numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(3, 4), "q")
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q"], ["w"], name="dq"),
                           helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [q])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    fuzz.save(m, work / "q.onnx")
    r = CliRunner().invoke(main, ["check", str(work / "q.onnx"), "--target", "tensorrt"])
    assert r.exit_code == 1 and "dq" in r.output and "[malformed]" in r.output, r.output


# I-R: clean errors instead of internal ones.
def test_assorted_inputs_give_clean_errors(work):
    one_line_error(cli(work, "m.onnx", "-o", "x" * 260 + ".onnx"), 4, "too long")
    one_line_error(cli(work, "m.onnx", "-o", "out.onnx", "--seed", "-1"), 2, "--seed")
    os.symlink("b.onnx", work / "a.onnx")
    os.symlink("a.onnx", work / "b.onnx")
    one_line_error(cli(work, "a.onnx", "-o", "out.onnx"), 3, "no such file")
    m = fuzz.mm_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 20000
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "n"
    fuzz.save(m, work / "big.onnx")
    r = cli(work, "big.onnx", "-o", "out.onnx", "--input-shape", "x:20000x1000000")
    one_line_error(r, 2, "--input-shape")
    assert not (work / "out.onnx").exists()


def test_a_sparse_initializer_is_stored_dense_and_the_output_passes_the_full_checker(work):
    """onnx's checker refuses a sparse tensor as an ordinary op's input (ONNX Runtime densifies it at load)."""
    m = fuzz.mm_model()
    g = m.graph
    g.node.append(helper.make_node("MatMul", ["x", "sw"], ["y2"], name="mm2"))
    sp = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sw"),
                                   numpy_helper.from_array(np.array([0, 5], np.int64), "sw_idx"), [64, 8])
    g.sparse_initializer.append(sp)
    g.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 8]))
    fuzz.save(m, work / "sp.onnx")
    r = cli(work, "sp.onnx", "-o", "out.onnx", "--report", "r.json")
    assert r.exit_code == 0, r.output
    import json

    report = json.loads((work / "r.json").read_text())
    assert any("sparse initializer 'sw' [64, 8] stored dense" in n for n in report["notes"])
    out = onnx.load(work / "out.onnx")
    onnx.checker.check_model(out, full_check=True)
    dense = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["sw"]
    assert dense.ravel()[0] == 1.0 and dense.ravel()[5] == 2.0 and np.count_nonzero(dense) == 2


# Silent damage: non-finite and extreme weights.
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_stay_float(work, value):
    w = np.random.default_rng(0).normal(0, 0.1, (64, 48)).astype(np.float32)
    w[3, 5] = value
    fuzz.save(fuzz.mm_model(w), work / "nf.onnx")
    r = cli(work, "nf.onnx", "-o", "out.onnx", "--min-elements", "0", "--no-verify")
    one_line_error(r, 3, "nothing to quantize")


def test_extreme_fp16_weights_stay_finite(work):
    w = np.random.default_rng(0).normal(0, 0.1, (64, 48)).astype(np.float16)
    w[0, :], w[1, :] = 65504, -65504
    fuzz.save(fuzz.mm_model(w, opset=19), work / "h.onnx")
    for bits in ("2", "4", "8"):
        r = cli(work, "h.onnx", "-o", f"out{bits}.onnx", "--bits", bits, "--granularity", "tensor", "--min-elements", "0")
        assert r.exit_code == 0, r.output
        sess = ort.InferenceSession(str(work / f"out{bits}.onnx"), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.full((2, 64), 1e-3, np.float16)})[0]
        assert np.all(np.isfinite(y)), bits


def test_double_default_opset_import_is_accepted(work):
    m = onnx.load(str(DIGITS))
    m.opset_import.append(helper.make_opsetid("", m.opset_import[0].version))
    fuzz.save(m, work / "d.onnx")
    r = cli(work, "d.onnx", "-o", "out.onnx", "--target-bits", "4")
    assert r.exit_code == 0, r.output


@pytest.mark.slow  # 19 s on 2 cores: the fast suite must stay under 2 minutes; CI runs it with the slow tests
def test_fuzz_sample_finds_no_defect():
    """A fast sample of every class of tools/fuzz.py (the full corpus: python tools/fuzz.py)."""
    results = fuzz.run(24, seed=11, workers=2)
    assert {r["class"] for r in results} == {c for c, _, _ in fuzz.CLASSES}
    defects = [f"[{r['class']}] {r['name']}: {r['defects']}" for r in results if r["defects"]]
    assert not defects, defects
