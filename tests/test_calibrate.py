"""Calibration: loading and validation, input statistics H, and output-aware sensitivity."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from mixq_onnx import MixQuantRule, QuantConfig, Sensitivity, quantize
from mixq_onnx.runtime.calibrate import collect_input_stats, load_calibration
from mixq_onnx.cli import main
from mixq_onnx.graph.find import find_weights
from tests.helpers import init, make_model, rng, run, vi

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"


def _stats(model, feeds):
    inv = find_weights(model, QuantConfig(min_elements=0))
    stats, skipped = collect_input_stats(model, inv.weights, feeds)
    return inv, stats, skipped


@pytest.mark.parametrize("op,trans_a", [("MatMul", 0), ("Gemm", 0), ("Gemm", 1)])
def test_matmul_and_gemm_second_moment_matches_numpy(op, trans_a):
    r = rng(0)
    w = init("w", r.normal(size=(16, 8)).astype(np.float32))
    xs = [16, 5] if trans_a else [5, 16]
    node = helper.make_node(op, ["x", "w"], ["y"], name="n", **({"transA": trans_a} if op == "Gemm" else {}))
    m = make_model([node], [vi("x", xs)], [vi("y", [5, 8])], [w])
    feeds = [{"x": (r.normal(size=xs) * np.arange(1, 17).reshape((16, 1) if trans_a else (1, 16))).astype(np.float32)} for _ in range(3)]
    _, stats, _ = _stats(m, feeds)
    rows = np.concatenate([f["x"].T if trans_a else f["x"] for f in feeds]).astype(np.float64)
    # Each batch's x^T x is a float32 BLAS product (summed across batches in float64): float32 accuracy, on purpose.
    ref = rows.T @ rows / len(rows)
    np.testing.assert_allclose(stats["w"].mean()[0], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"strides": [2, 2], "dilations": [2, 2], "pads": [0, 1, 2, 1], "group": 2},
        {"auto_pad": "SAME_UPPER", "strides": [2, 1], "group": 4},
        {"group": 8},  # depthwise
    ],
)
def test_conv_statistics_reproduce_the_output_energy_of_any_weight_error(attrs):
    """For a linear op, rows * tr(dW H dW^T) = ||conv(x, dW)||^2: checked against ONNX Runtime's own Conv."""
    r = rng(1)
    g = attrs.get("group", 1)
    w = r.normal(size=(8, 8 // g, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [vi("x", [2, 8, 9, 9])], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])], [init("w", w)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    feeds = [{"x": r.normal(size=(2, 8, 9, 9)).astype(np.float32)} for _ in range(2)]
    _, stats, _ = _stats(m, feeds)
    st = stats["w"]
    dw = r.normal(size=w.shape).astype(np.float32)
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(m)
    perturbed.graph.initializer[0].CopyFrom(init("w", dw))
    energy = sum(float(np.sum(run(perturbed, f)[0].astype(np.float64) ** 2)) for f in feeds)
    d = st.matrices(dw).astype(np.float64)
    predicted = st.rows * float(np.einsum("gok,gkl,gol->", d, st.mean(), d))
    assert predicted == pytest.approx(energy, rel=1e-5)


def _correlated_pair():
    """Three MatMuls with alike weights; one sees a few huge input channels, met by small weights.

    This is the outlier-feature pattern of real networks: weight error alone looks
    ordinary, but the error on the small weights is multiplied by the huge inputs.
    """
    r = rng(2)
    a = r.normal(0, 0.05, (128, 128)).astype(np.float32)
    b = r.normal(0, 0.05, (128, 128)).astype(np.float32)
    b[:4] *= 0.02
    c = r.normal(0, 0.05, (128, 128)).astype(np.float32)
    scale = np.ones(128, np.float32)
    scale[:4] = 30.0
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["ya"], name="plain"),
        helper.make_node("MatMul", ["x", "c"], ["yc"], name="plain2"),
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("MatMul", ["xs", "b"], ["yb"], name="outlier_inputs"),
        helper.make_node("Add", ["ya", "yb"], ["t"]),
        helper.make_node("Add", ["t", "yc"], ["y"]),
    ]
    m = make_model(nodes, [vi("x", ["n", 128])], [vi("y", ["n", 128])], [init("a", a), init("b", b), init("c", c), init("s", scale)])
    feeds = [{"x": r.normal(size=(32, 128)).astype(np.float32)} for _ in range(4)]
    return m, feeds


def test_output_sensitivity_protects_the_layer_whose_inputs_amplify_error():
    m, feeds = _correlated_pair()
    weight = quantize(m, QuantConfig(search=MixQuantRule(qem=1.5), sensitivity=Sensitivity.WEIGHT, min_elements=0), calibration=feeds)
    output = quantize(m, QuantConfig(search=MixQuantRule(qem=1.5), sensitivity=Sensitivity.OUTPUT, min_elements=0), calibration=feeds)
    bits_w = {t.name: t.chosen.bits for t in weight.report.tensors}
    bits_o = {t.name: t.chosen.bits for t in output.report.tensors}
    assert bits_o["b"] == 8 and bits_o["a"] == bits_o["c"] == 4
    assert bits_w["b"] == 4  # weight error alone cannot tell the layers apart
    assert all(t.output_statistics == "collected" for t in output.report.tensors)
    # And at the model output it pays: mixed by output error beats mixed by weight error.
    x = feeds[0]
    ref = run(m, x)[0]
    err_o = np.mean((run(output.model, x)[0] - ref) ** 2)
    err_w = np.mean((run(weight.model, x)[0] - ref) ** 2)
    assert err_o < err_w


def test_digits_with_calibration_end_to_end(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, [str(DIGITS), "-o", str(out), "--qem", "1", "--calib", str(CALIB), "--calib-samples", "64", "--sensitivity", "output",
                                  "--report", str(rep), "--min-elements", "0"])
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(rep.read_text())
    assert all(t["output_statistics"] == "collected" for t in data["tensors"])
    assert all(e["output_error"] is not None for t in data["tensors"] for e in t["errors"])
    assert any("output sensitivity from 48 calibration samples" in n for n in data["notes"])


def test_calibration_folder_of_npy_files(tmp_path):
    d = np.load(CALIB)["image"]
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "image.npy", d[:20])
    feeds = load_calibration(tmp_path / "calib", DIGITS, None)
    assert sum(len(f["image"]) for f in feeds) == 20


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("missing", "calibration data not found"),
        ("empty-folder", "no .npz or .npy files"),
        ("wrong-name", r"lacks model input\(s\) \['image'\]"),
        ("wrong-shape", r"input 'image' has shape \[10, 8, 8\], the model expects"),
        ("wrong-dtype", "input 'image' is float64, the model expects tensor\\(float\\)"),
        ("nan", "contains NaN"),
        ("zero-samples", "--calib-samples must be at least 1"),
        ("samples-without-calib", "--calib-samples needs --calib"),
    ],
)
def test_bad_calibration_input_gets_one_line(tmp_path, case, pattern):
    img = np.load(CALIB)["image"][:10]
    path = tmp_path / "calib.npz"
    extra = []
    if case == "empty-folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "wrong-name":
        np.savez(path, pixels=img)
    elif case == "wrong-shape":
        np.savez(path, image=img[:, 0])
    elif case == "wrong-dtype":
        np.savez(path, image=img.astype(np.float64))
    elif case == "nan":
        bad = img.copy()
        bad[3, 0, 2, 2] = np.nan
        np.savez(path, image=bad)
    elif case in ("zero-samples", "samples-without-calib"):
        np.savez(path, image=img)
        extra = ["--calib-samples", "0"] if case == "zero-samples" else ["--calib-samples", "5"]
    out = tmp_path / "q.onnx"
    args = [str(DIGITS), "-o", str(out), "--qem", "1"] + ([] if case == "samples-without-calib" else ["--calib", str(path)]) + extra
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), r.output
    assert not out.exists()


def test_calibration_folder_with_different_sequence_lengths_needs_no_padding(tmp_path):
    r = rng(11)
    w = init("w", r.normal(size=(16, 8)).astype(np.float32))
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["n", "s", 16])], [vi("y", ["n", "s", 8])], [w])
    xs = [r.normal(size=(3, length, 16)).astype(np.float32) for length in (5, 9, 2)]
    for i, x in enumerate(xs):
        np.savez(tmp_path / f"part{i}.npz", x=x)
    feeds = load_calibration(tmp_path, m.SerializeToString(), samples=7)
    assert [f["x"].shape for f in feeds] == [(3, 5, 16), (3, 9, 16), (1, 2, 16)]
    _, stats, _ = _stats(m, feeds)
    rows = np.concatenate([xs[0].reshape(-1, 16), xs[1].reshape(-1, 16), xs[2][:1].reshape(-1, 16)]).astype(np.float64)
    ref = rows.T @ rows / len(rows)  # float32 products, as in the test above
    np.testing.assert_allclose(stats["w"].mean()[0], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
