"""runtime/awq.py (--awq): exact in float, lowers the weight-only 4-bit error where activations have salient channels,
folds 1/s into an RMSNorm's gain, reports each activation, and composes with the searches on the trained decoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import helper, numpy_helper

from mixq_onnx import quantize
from mixq_onnx.cli import main
from mixq_onnx.config import Layout, QuantConfig, Uniform
from mixq_onnx.numerics.qdq import QTYPES, Grid
from mixq_onnx.runtime.awq import awq_factors, awq_model
from tests.helpers import run

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "models" / "tiny_decoder.onnx"


def test_awq_factors_have_a_geometric_mean_of_one_and_alpha_zero_is_no_scaling():
    m = np.array([4.0, 1.0, 0.25, 0.0])
    s = awq_factors(m, 0.5)
    assert np.isclose(np.exp(np.mean(np.log(s[:3]))), 1.0) and np.allclose(s[:3] / s[1], [2.0, 1.0, 0.5]) and s[3] == 1.0
    assert np.array_equal(awq_factors(m, 0.0), np.ones(4, np.float32))


def _salient_model() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """x * gamma (an RMSNorm's gain) -> two MatMuls that read it; 4 of 256 input channels carry 20x larger values."""
    r = np.random.default_rng(0)
    gamma = r.uniform(0.5, 1.5, 256).astype(np.float32)
    inits = [numpy_helper.from_array(gamma, "gamma")]
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["h"], name="norm_gain")]
    for name in ("w1", "w2"):
        inits.append(numpy_helper.from_array(r.normal(0, 0.05, (256, 128)).astype(np.float32), name))
        nodes.append(helper.make_node("MatMul", ["h", name], [f"y_{name}"], name=f"mm_{name}"))
    graph = helper.make_graph(nodes, "salient", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 256])],
                              [helper.make_tensor_value_info(f"y_{n}", onnx.TensorProto.FLOAT, ["n", 128]) for n in ("w1", "w2")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    loud = np.ones(256, np.float32)
    loud[[3, 77, 150, 201]] = 20.0

    def feed(seed: int, n: int) -> dict[str, np.ndarray]:
        return {"x": (np.random.default_rng(seed).normal(size=(n, 256)) * loud).astype(np.float32)}

    return model, [feed(k, 64) for k in range(4)], feed(99, 256)


def test_awq_is_exact_in_float_folds_into_the_gain_and_lowers_the_4bit_error():
    model, calib, test = _salient_model()
    grid = Grid(4, False, Layout.parse("block32"), 0, QTYPES["uint4"], np.dtype(np.float32))
    result = awq_model(model, calib, grid)
    (chosen,) = result.groups
    assert chosen.alpha is not None and chosen.alpha > 0 and chosen.error_smoothed < chosen.error_plain
    assert chosen.group.fold == (("gamma", "vector"),)  # no Mul inserted: the gain absorbs 1/s
    assert [n.op_type for n in result.model.graph.node] == ["Mul", "MatMul", "MatMul"]
    ref = run(model, test)
    for a, b in zip(ref, run(result.model, test)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    # Quantized 4-bit block 32 in ONNX Runtime, with and without: the output error on held-out inputs falls.
    config = QuantConfig(search=Uniform(4), layouts=(Layout.parse("block32"),), min_elements=0)
    plain = quantize(model, config, calibration=calib).model
    scaled = quantize(model, QuantConfig(search=Uniform(4), layouts=(Layout.parse("block32"),), min_elements=0, awq=True),
                      calibration=calib)
    err = [sum(float(np.sum((q - f) ** 2)) for q, f in zip(run(m, test), ref)) for m in (plain, scaled.model)]
    assert err[1] < 0.8 * err[0]
    assert scaled.report.awq["scaled"][0]["tensor"] == "h" and "folded" in scaled.report.awq["scaled"][0]["how"]


def test_awq_needs_calibration_and_excludes_smoothing(tmp_path):
    res = CliRunner().invoke(main, [str(DECODER), "-o", str(tmp_path / "q.onnx"), "--bits", "4", "--awq"])
    assert res.exit_code != 0 and "--awq" in res.output and "--calib" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "q.onnx").exists()
    res = CliRunner().invoke(main, [str(DECODER), "-o", str(tmp_path / "q.onnx"), "--awq", "--smooth", "--activations",
                                    "uint8", "--calib", str(ROOT / "models" / "tiny_decoder_calib.npz")])
    assert res.exit_code != 0 and "use one of them" in res.output


def test_awq_composes_with_a_calibrated_search_on_the_trained_decoder(tmp_path):
    from tests.test_decoder import perplexity

    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, [str(DECODER), "-o", str(out), "--target-bits", "4.5", "--awq", "--method", "gptq",
                                    "--calib", str(ROOT / "models" / "tiny_decoder_calib.npz"), "-q",
                                    "--report", str(out) + ".json"])
    assert res.exit_code == 0, res.output
    report = json.loads(Path(str(out) + ".json").read_text())
    assert len(report["awq"]["scaled"]) >= 8 and report["config"]["awq"] is True
    assert any("Mul (a normalisation's gain)" in a["how"] for a in report["awq"]["scaled"])
    assert perplexity(out) < perplexity(DECODER) * 1.05
