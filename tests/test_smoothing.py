"""SmoothQuant (--smooth): exact in float, lowers W8A8 error on a trained transformer, folds where it can, reports the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from mixq_onnx import quantize
from mixq_onnx.graph.check import check_model
from mixq_onnx.cli import main
from mixq_onnx.config import Activations, CalibMethod, QuantConfig, Smooth, Target, Uniform
from mixq_onnx.errors import ConfigError
from mixq_onnx.numerics.qdq import QTYPES
from mixq_onnx.runtime.smoothing import ActivationGrid, GroupScales, apply_smoothing, smooth_model, smoothing_factors, smoothing_groups
from tests.helpers import run, sqnr_db

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny_transformer.onnx"
TEST = {"input_ids": np.load(ROOT / "models" / "tiny_transformer_test.npz")["input_ids"][:200]}
CALIB = [{"input_ids": a} for a in np.split(np.load(ROOT / "models" / "tiny_transformer_calib.npz")["input_ids"][:128], 4)]
GRID = ActivationGrid(QTYPES["uint8"], False, CalibMethod.MINMAX)


def test_smoothing_factors_follow_the_formula_and_stay_finite():
    ax, aw = np.array([4.0, 1.0, 0.0, 100.0]), np.array([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(ax, aw, 0.5)
    assert np.allclose(s[:2], [2.0, 0.5]) and s[2] == 1.0 and s[3] == 1.0


def test_smoothing_changes_no_float_output():
    model = onnx.load(str(TINY))
    groups, _ = smoothing_groups(model)
    assert len(groups) == 9  # per layer: the Q/K/V input, O input, FFN1 input, FFN2 input; and the classifier's input
    rng = np.random.default_rng(0)
    chosen = [GroupScales(g, 0.5, rng.uniform(0.2, 5.0, _width(model, g)).astype(np.float32), 0, 0) for g in groups]
    smoothed = apply_smoothing(model, chosen)
    ref, out = run(model, TEST)[0], run(smoothed, TEST)[0]
    assert np.allclose(ref, out, rtol=1e-4, atol=1e-4)
    assert sum(n.op_type == "Mul" for n in smoothed.graph.node) > sum(n.op_type == "Mul" for n in model.graph.node)


def _width(model: onnx.ModelProto, group) -> int:
    w = next(t for t in model.graph.initializer if t.name == group.readers[0].weight)
    return w.dims[1] if group.readers[0].transposed else w.dims[0]


def _w8a8(smooth: Smooth | None, target: Target = Target.GENERIC) -> onnx.ModelProto:
    config = QuantConfig(search=Uniform(8), target=target, activations=Activations.UINT8, min_elements=0, smooth=smooth)
    return quantize(onnx.load(str(TINY)), config, calibration=CALIB)


def test_searched_smoothing_lowers_the_w8a8_error_on_held_out_inputs():
    ref = run(onnx.load(str(TINY)), TEST)[0]
    # generic: Q/DQ on MatMul inputs and outputs (the classic QDQ layout).
    plain = sqnr_db(ref, run(_w8a8(None).model, TEST)[0])
    result = _w8a8(Smooth(None))
    smoothed = sqnr_db(ref, run(result.model, TEST)[0])
    assert smoothed > plain + 3.0, (plain, smoothed)
    # ort-cpu: MatMul outputs stay float (MatMulIntegerToFloat), so only the inputs' grid is left for smoothing to fix.
    plain_cpu = sqnr_db(ref, run(_w8a8(None, Target.ORT_CPU).model, TEST)[0])
    smoothed_cpu = sqnr_db(ref, run(_w8a8(Smooth(None), Target.ORT_CPU).model, TEST)[0])
    assert smoothed_cpu > plain_cpu + 1.0 and plain_cpu > plain, (plain_cpu, smoothed_cpu)
    info = result.report.activations["smoothing"]
    assert info["applied"] and all(a["error_smoothed"] < a["error_unsmoothed"] for a in info["applied"])
    assert all(a["alpha"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) for a in info["applied"])
    assert all(r["reason"] for r in info["not_applied"])


@pytest.mark.parametrize("target", [Target.ORT_CPU, Target.TENSORRT, Target.GENERIC])
def test_smoothed_models_follow_each_targets_rules(target):
    acts = Activations.UINT8 if target is Target.GENERIC else Activations.AUTO
    config = QuantConfig(search=Uniform(8), target=target, activations=acts, min_elements=0, smooth=Smooth(0.5))
    q = quantize(onnx.load(str(TINY)), config, calibration=CALIB).model
    assert check_model(q, target) == []
    ref = run(onnx.load(str(TINY)), TEST)[0]
    assert np.mean(run(q, TEST)[0].argmax(1) == ref.argmax(1)) >= 0.97


def _pre_norm_block() -> onnx.ModelProto:
    """x -> LayerNorm (with two outlier channels, as in trained LLMs) -> MatMul: the LN output feeds only the MatMul."""
    rng = np.random.default_rng(1)
    gamma = np.ones(32, np.float32)
    gamma[[3, 17]] = 40.0
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.2, (32, 48)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "pre_norm", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 48])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_exclusive_layernorm_absorbs_the_factors_and_no_mul_is_added():
    model = _pre_norm_block()
    feeds = [{"x": np.random.default_rng(k).normal(size=(64, 32)).astype(np.float32)} for k in range(4)]
    result = smooth_model(model, feeds, None, GRID, QTYPES["int8"])
    (g,) = result.groups
    assert g.group.fold_op == "LayerNormalization" and g.alpha is not None and g.error_smoothed < 0.5 * g.error_plain
    assert [n.op_type for n in result.model.graph.node] == ["LayerNormalization", "MatMul"]
    x = np.random.default_rng(9).normal(size=(16, 32)).astype(np.float32)
    assert np.allclose(run(model, {"x": x})[0], run(result.model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    config = QuantConfig(search=Uniform(8), target=Target.ORT_CPU, activations=Activations.UINT8, min_elements=0)
    ref = run(model, {"x": x})[0]
    plain = sqnr_db(ref, run(quantize(model, config, calibration=feeds).model, {"x": x})[0])
    smooth = QuantConfig(search=Uniform(8), target=Target.ORT_CPU, activations=Activations.UINT8, min_elements=0, smooth=Smooth(None))
    assert sqnr_db(ref, run(quantize(model, smooth, calibration=feeds).model, {"x": x})[0]) > plain + 3.0


def test_smooth_needs_activations_and_a_valid_alpha(tmp_path):
    with pytest.raises(ConfigError, match="--smooth migrates"):
        QuantConfig(smooth=Smooth(None))
    with pytest.raises(ConfigError, match="from 0 to 1"):
        Smooth(1.5)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=CALIB[0]["input_ids"])
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, [str(TINY), "-o", str(out), "--target", "ort-cpu", "--activations", "auto", "--smooth",
                                    "--calib", str(calib), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert out.exists()
    res = CliRunner().invoke(main, [str(TINY), "-o", str(tmp_path / "x.onnx"), "--smooth", "strong"])
    assert res.exit_code == 2 and "--smooth takes an alpha" in res.output and "Traceback" not in res.output


def test_a_linear_producer_with_its_bias_absorbs_the_factors():
    """x -> MatMul(W1) -> Add(b1) -> MatMul(W2): 1/s goes into W1's columns and b1, so no Mul is added."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(0, 0.3, (16, 24)).astype(np.float32)
    w1[:, [2, 9]] *= 30.0  # two outlier channels in the hidden activation
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.1, 24).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (24, 8)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": rng.normal(size=(64, 16)).astype(np.float32)} for _ in range(4)]
    result = smooth_model(model, feeds, 0.5, GRID, QTYPES["int8"])
    folded = [g for g in result.groups if g.group.tensor == "h"]
    assert folded and folded[0].group.fold_op == "MatMul + bias Add"
    # The graph input x has no producer to fold into: it gets the one Mul; h is read as it is.
    assert [n.op_type for n in result.model.graph.node] == ["Mul", "MatMul", "Add", "MatMul"]
    assert result.model.graph.node[-1].input[0] == "h"
    x = rng.normal(size=(32, 16)).astype(np.float32)
    assert np.allclose(run(model, {"x": x})[0], run(result.model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    assert any(a["how"] == "folded into MatMul + bias Add" for a in result.describe()["applied"])


def test_smoothed_w8a8_output_is_byte_identical_across_runs():
    config = QuantConfig(search=Uniform(8), target=Target.ORT_CPU, activations=Activations.AUTO, min_elements=0, smooth=Smooth(None))
    first = quantize(onnx.load(str(TINY)), config, calibration=CALIB).model.SerializeToString()
    assert quantize(onnx.load(str(TINY)), config, calibration=CALIB).model.SerializeToString() == first
