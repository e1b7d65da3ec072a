"""Activation quantization, targets and `mixq-onnx check`, run in ONNX Runtime on the digits CNN and built models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from mixq_onnx import quantize
from mixq_onnx.numerics.ranges import RangeHistogram
from mixq_onnx.graph.check import check_model
from mixq_onnx.cli import main
from mixq_onnx.config import Activations, CalibMethod, Granularity, Layout, QuantConfig, Scheme, Target, Uniform
from mixq_onnx.errors import ConfigError
from mixq_onnx.numerics.qdq import QTYPES
from tests.helpers import init, make_model, rng, run, vi

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = np.load(ROOT / "models" / "digits_test.npz")


def _fused_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def _digits(target: Target, acts: Activations, **kw) -> onnx.ModelProto:
    calib = [{"image": np.load(CALIB)["image"][i : i + 32]} for i in range(0, 256, 32)]
    return quantize(onnx.load(str(DIGITS)), QuantConfig(target=target, activations=acts, **kw), calibration=calib).model


@pytest.mark.parametrize("acts", [Activations.UINT8, Activations.INT8])
def test_ort_cpu_activations_fuse_into_integer_kernels_and_keep_accuracy(acts, tmp_path):
    q = _digits(Target.ORT_CPU, acts)
    assert check_model(q, Target.ORT_CPU) == []
    ops = _fused_ops(q, tmp_path)
    # Both convolutions and both dense layers run as integer kernels in ONNX Runtime's optimised graph.
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0, ops
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] == 1 and ops["QGemm"] == 1, ops
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        logits = run(q, {"image": TEST["image"]}, level)[0]
        assert (logits.argmax(1) == TEST["label"]).mean() >= 0.975
    # ort-cpu with activations stores int8 symmetric weights: uint8 weights with zero points take a slow path.
    weights = [t for t in q.graph.initializer if t.name.endswith("weight_quantized")]
    assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)


def test_tensorrt_output_follows_its_rules_and_runs(tmp_path):
    q = _digits(Target.TENSORRT, Activations.INT8)
    assert check_model(q, Target.TENSORRT) == []
    zps = [numpy_helper.to_array(t) for t in q.graph.initializer if "zero_point" in t.name]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    logits = run(q, {"image": TEST["image"]})[0]
    assert (logits.argmax(1) == TEST["label"]).mean() >= 0.975


def test_tensorrt_puts_int4_only_on_blockwise_gemm_weights():
    m = onnx.load(str(DIGITS))
    cfg = QuantConfig(search=Uniform(4), target=Target.TENSORRT, layouts=(Layout(Granularity.BLOCK, 32),), min_elements=0)
    result = quantize(m, cfg)
    chosen = {t.name: (t.chosen.container, t.chosen.granularity) for t in result.report.tensors}
    assert chosen["fc1.weight"] == ("int4", "block32")
    assert chosen["conv2.weight"][0] == "int8"  # TensorRT has no INT4 convolution
    assert check_model(result.model, Target.TENSORRT) == []


def test_ort_cuda_is_weight_only_with_sub_byte_weights_on_matmul_only():
    result = quantize(onnx.load(str(DIGITS)), QuantConfig(search=Uniform(4), target=Target.ORT_CUDA, min_elements=0))
    containers = {t.name: t.chosen.container for t in result.report.tensors}
    assert containers["conv2.weight"] == "uint8" and containers["fc1.weight"] == "uint4"
    assert check_model(result.model, Target.ORT_CUDA) == []
    with pytest.raises(ConfigError, match="CUDA EP has no integer Conv"):
        QuantConfig(target=Target.ORT_CUDA, activations=Activations.INT8)
    with pytest.raises(ConfigError, match="needs --scheme symmetric"):
        QuantConfig(target=Target.TENSORRT, scheme=Scheme.ASYMMETRIC)


def test_check_lists_each_violation_with_its_node(tmp_path):
    q = _digits(Target.ORT_CPU, Activations.UINT8)
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    res = CliRunner().invoke(main, ["check", str(path), "--target", "tensorrt"])
    assert res.exit_code == 1
    assert "image_QuantizeLinear: UINT8 Q/DQ is rejected by TensorRT" in res.output
    assert "violation(s) of the tensorrt rules" in res.output
    ok = CliRunner().invoke(main, ["check", str(path), "--target", "ort-cpu"])
    assert ok.exit_code == 0 and "follows the ort-cpu rules" in ok.output
    missing = CliRunner().invoke(main, ["check", str(tmp_path / "nope.onnx"), "--target", "ort-cpu"])
    assert missing.exit_code == 3 and "Traceback" not in missing.output


def test_check_flags_a_conv_without_output_quantization():
    r = rng(1)
    wq = init("wq", r.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8))
    ws = init("ws", np.full(4, 0.01, np.float32))
    xs, xz = init("xs", np.array(0.02, np.float32)), init("xz", np.array(0, np.uint8))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="wdq", axis=0),
             helper.make_node("Conv", ["xd", "w"], ["y"], name="conv")]
    m = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 6, 6])], [wq, ws, xs, xz])
    found = check_model(m, Target.ORT_CPU)
    assert [v.node for v in found] == ["conv"] and "does not fuse" in found[0].message


def test_activation_range_rules_on_known_distributions():
    x = np.maximum(rng(2).normal(size=200_000), 0).astype(np.float32)
    x[:10] = 50.0  # a few outliers
    h = RangeHistogram()
    h.observe(x)
    h.accumulate(x)
    ranges = {m: h.choose(m, QTYPES["uint8"], False) for m in CalibMethod}
    assert ranges[CalibMethod.MINMAX] == (0.0, 50.0)
    for m in (CalibMethod.PERCENTILE, CalibMethod.ENTROPY):
        lo, hi = ranges[m]
        assert lo == 0.0 and 2.0 < hi < 20.0, (m, hi)  # the outliers are clipped, the bulk (max ~5) is kept

    def error(r: tuple[float, float]) -> float:
        s = (r[1] - r[0]) / 255
        return float(np.sum((x - np.clip(np.rint(x / s), 0, 255) * s) ** 2))

    # mse keeps the 10 outliers (clipping them costs more than it saves) but never does worse than min-max.
    assert error(ranges[CalibMethod.MSE]) <= error(ranges[CalibMethod.MINMAX]) * 1.001


@pytest.mark.parametrize("method", list(CalibMethod))
def test_every_calibration_method_runs_end_to_end(method, tmp_path):
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, [str(DIGITS), "-o", str(out), "--target", "ort-cpu", "--activations", "uint8",
                                    "--calib-method", method.value, "--calib", str(CALIB), "--calib-samples", "64",
                                    "--inputs", str(ROOT / "models" / "digits_test.npz"), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["activations"]["calib_method"] == method.value and len(report["activations"]["tensors"]) >= 6
    assert "ran on: CPUExecutionProvider" in res.output
    agreement = report["verification"]["runs"][1]["outputs"][0]["top1_agreement"]
    assert agreement >= 0.97


def test_a_graph_output_after_an_integer_op_keeps_its_name():
    r = rng(3)
    w = init("w", r.normal(size=(8, 3, 3, 3)).astype(np.float32))
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8, 6, 6])], [w])
    x = r.normal(size=(1, 3, 8, 8)).astype(np.float32)
    q = quantize(m, QuantConfig(target=Target.ORT_CPU, activations=Activations.UINT8), calibration=[{"x": x}]).model
    assert [o.name for o in q.graph.output] == ["y"]
    ref, got = run(m, {"x": x})[0], run(q, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_activations_need_calibration(tmp_path):
    res = CliRunner().invoke(main, [str(DIGITS), "-o", str(tmp_path / "q.onnx"), "--activations", "uint8"])
    assert res.exit_code == 2 and "--activations uint8 need calibration data" in res.output
