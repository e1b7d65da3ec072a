"""Data-aware rounding (mse, gptq, adaround) and bias correction, checked by running the models in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from mixq_onnx import Method, QuantConfig, Uniform, quantize
from mixq_onnx.runtime.calibrate import collect_input_stats
from mixq_onnx.cli import main
from mixq_onnx.config import Granularity, Layout
from mixq_onnx.graph.find import find_weights
from mixq_onnx.numerics.statistics import InputStats
from mixq_onnx.numerics.qdq import Grid, container_for
from mixq_onnx.numerics.rounding import round_weight
from tests.helpers import init, make_model, rng, run, vi
from tests.test_ops import rnn_model

K, N = 96, 64
# One fixed mixing of the features, so calibration and held-out inputs share their correlations.
MIX = rng(99).normal(size=(K, K)) * 0.4 + np.eye(K)


def _correlated(r: np.random.Generator, rows: int) -> np.ndarray:
    """Inputs with strongly correlated features and a non-zero mean: where rounding to nearest is far from optimal."""
    return (r.normal(size=(rows, K)) @ MIX + 0.3).astype(np.float32)


def _matmul_model() -> onnx.ModelProto:
    r = rng(1)
    w = init("w", (r.normal(size=(K, N)) * 0.1).astype(np.float32))
    b = init("b", (r.normal(size=N) * 0.1).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"), helper.make_node("Add", ["mm", "b"], ["y"], name="add")]
    return make_model(nodes, [vi("x", ["n", K])], [vi("y", ["n", N])], [w, b])


def _output_error(model: onnx.ModelProto, q: onnx.ModelProto, x: np.ndarray) -> float:
    ref, out = run(model, {"x": x})[0], run(q, {"x": x})[0]
    return float(np.sum((out - ref) ** 2) / np.sum((ref - ref.mean(0)) ** 2))


@pytest.mark.parametrize("method", [Method.GPTQ, Method.ADAROUND])
def test_data_aware_rounding_beats_round_to_nearest_at_3_bits(method):
    model = _matmul_model()
    r = rng(2)
    calib = [{"x": _correlated(r, 64)} for _ in range(8)]
    held_out = _correlated(r, 512)
    errors = {}
    for m in (Method.RTN, Method.MSE, method):
        result = quantize(model, QuantConfig(search=Uniform(3), min_elements=0, method=m), calibration=calib)
        errors[m] = _output_error(model, result.model, held_out)
        assert result.report.tensors[0].rounding.method == m.value
    # The output error on unseen inputs, measured in ONNX Runtime, drops well below round-to-nearest's.
    assert errors[method] < 0.7 * errors[Method.RTN], errors
    assert errors[method] < errors[Method.MSE], errors


def test_mse_clipping_lowers_weight_error_without_data():
    w = rng(3).standard_t(3, size=(64, 256)).astype(np.float32)  # heavy tails: min-max wastes levels
    lay, q = Layout(Granularity.CHANNEL), container_for(3, False, False)
    grid = Grid(3, False, lay, 0, q, np.dtype(np.float32))
    rtn = round_weight(w, grid, Method.RTN).tensor
    mse = round_weight(w, grid, Method.MSE).tensor
    err = lambda t: float(np.mean((t.dequantize() - w) ** 2))
    assert err(mse) < 0.8 * err(rtn)
    assert mse.values.dtype == rtn.values.dtype and mse.scale.shape == rtn.scale.shape


@pytest.mark.parametrize("method", [Method.GPTQ, Method.ADAROUND])
def test_methods_keep_every_integer_in_range_on_any_layout(method):
    r = rng(4)
    x = _correlated(r, 400).astype(np.float64)
    st = InputStats(np.zeros((1, K, K)), "MatMul", False)
    st.add(x[None])
    w = (r.normal(size=(K, N)) * 0.1).astype(np.float32)
    for bits, sym, lay, axis in [(3, False, Layout(Granularity.CHANNEL), 1), (4, True, Layout(Granularity.BLOCK, 32), 0),
                                 (2, False, Layout(Granularity.TENSOR), 0)]:
        q = container_for(bits, sym, False)
        grid = Grid(bits, sym, lay, axis, q, np.dtype(np.float32))
        rounded = round_weight(w, grid, method, st)
        v = rounded.tensor.values.astype(np.int32)
        lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
        assert v.min() >= lo and v.max() <= hi
        base = round_weight(w, grid, Method.MSE, st).tensor
        # Same grid as mse; never a worse output error on the calibration statistics.
        np.testing.assert_array_equal(rounded.tensor.scale, base.scale)
        assert st.output_error(rounded.tensor.dequantize() - w, w) <= st.output_error(base.dequantize() - w, w)


def _bias_models():
    r = rng(5)
    conv_w = init("cw", r.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32))
    conv = make_model([helper.make_node("Conv", ["x", "cw"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                      [vi("x", ["n", 8, 10, 10])], [vi("y", ["n", 16, 10, 10])], [conv_w])
    gw = init("gw", r.normal(0, 0.3, (N, K)).astype(np.float32))
    gc = init("gc", r.normal(0, 0.1, (N,)).astype(np.float32))
    gemm = make_model([helper.make_node("Gemm", ["x", "gw", "gc"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)],
                      [vi("x", ["n", K])], [vi("y", ["n", N])], [gw, gc])
    return {"conv": (conv, lambda n: (r.normal(size=(n, 8, 10, 10)) + 0.5).astype(np.float32)),
            "gemm": (gemm, lambda n: (r.normal(size=(n, K)) + 1.0).astype(np.float32)),
            "matmul+add": (_matmul_model(), lambda n: (r.normal(size=(n, K)) + 1.0).astype(np.float32))}


@pytest.mark.parametrize("case", ["conv", "gemm", "matmul+add"])
def test_bias_correction_removes_the_mean_output_shift(case):
    model, sample = _bias_models()[case]
    calib = [{"x": sample(64)} for _ in range(4)]
    x = sample(256)  # held out
    ref = run(model, {"x": x})[0]
    shift = {}
    for bc in (False, True):
        result = quantize(model, QuantConfig(search=Uniform(2), min_elements=0, bias_correction=bc), calibration=calib)
        onnx.checker.check_model(result.model, full_check=True)
        out = run(result.model, {"x": x})[0]
        axes = (0, 2, 3) if out.ndim == 4 else (0,)
        shift[bc] = float(np.abs((out - ref).mean(axis=axes)).mean())
        if bc:
            assert result.report.tensors[0].rounding.bias_correction == "corrected"
    assert shift[True] < 0.3 * shift[False], shift


def test_bias_correction_copies_a_shared_bias_and_reports_what_it_cannot_correct():
    r = rng(6)
    w1 = init("w1", r.normal(size=(K, N)).astype(np.float32))
    w2 = init("w2", r.normal(size=(K, N)).astype(np.float32))
    b = init("b", np.zeros(N, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), helper.make_node("Add", ["m1", "b"], ["y1"], name="a1"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2"), helper.make_node("Add", ["y2", "b"], ["y3"], name="a2")]
    model = make_model(nodes, [vi("x", ["n", K])], [vi("y1", ["n", N]), vi("y2", ["n", N]), vi("y3", ["n", N])], [w1, w2, b])
    calib = [{"x": _correlated(r, 64)}]
    result = quantize(model, QuantConfig(search=Uniform(2), min_elements=0, bias_correction=True), calibration=calib)
    outcome = {t.name: t.rounding.bias_correction for t in result.report.tensors}
    assert outcome["w1"] == "corrected"
    assert "does not go to a single Add" in outcome["w2"]  # y2 is a graph output as well
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert not inits["b"].any(), "the shared bias itself must stay as it was"
    assert any(n.startswith("b_corrected") for n in inits)


def test_recurrent_input_weight_statistics_match_numpy():
    model, feeds = rnn_model("LSTM")
    inv = find_weights(model, QuantConfig(min_elements=0))
    stats, skipped = collect_input_stats(model, inv.weights, [feeds, feeds])
    x = feeds["x"].reshape(-1, feeds["x"].shape[-1]).astype(np.float64)
    ref = x.T @ x / len(x)  # float32 products summed in float64: float32 accuracy relative to the matrix
    np.testing.assert_allclose(stats["W"].mean()[0], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert "R" in skipped and "R" not in stats


def test_search_with_method_measures_the_method_error():
    model = _matmul_model()
    r = rng(7)
    calib = [{"x": _correlated(r, 64)} for _ in range(4)]
    cheap = quantize(model, QuantConfig(search=Uniform(3), min_elements=0, method=Method.GPTQ), calibration=calib)
    costly = quantize(model, QuantConfig(search=Uniform(3), min_elements=0, method=Method.GPTQ, search_with_method=True), calibration=calib)
    e_cheap = cheap.report.tensors[0].chosen.output_error
    e_costly = costly.report.tensors[0].chosen.output_error
    assert e_costly < 0.7 * e_cheap  # GPTQ's own error, not round-to-nearest's
    assert costly.model.SerializeToString() == cheap.model.SerializeToString()


def test_adaround_output_is_deterministic():
    model = _matmul_model()
    calib = [{"x": _correlated(rng(8), 64)}]
    cfg = QuantConfig(search=Uniform(3), min_elements=0, method=Method.ADAROUND, bias_correction=True)
    assert quantize(model, cfg, calibration=calib).model.SerializeToString() == quantize(model, cfg, calibration=calib).model.SerializeToString()


@pytest.mark.parametrize("args,pattern", [
    (["--method", "gptq"], "--method gptq need calibration data; pass --calib"),
    (["--bias-correction"], "--bias-correction need calibration data"),
    (["--search-with-method"], "--search-with-method needs a --method other than rtn"),
])
def test_cli_rejects_data_aware_options_without_what_they_need(tmp_path, args, pattern):
    from tests.test_calibrate import DIGITS

    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, [str(DIGITS), "-o", str(out), *args])
    assert res.exit_code == 2
    assert pattern in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_digits_gptq_with_bias_correction_from_the_cli(tmp_path):
    from tests.test_calibrate import CALIB, DIGITS

    test = np.load(DIGITS.parent / "digits_test.npz")
    outs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.onnx"
        res = CliRunner().invoke(main, [str(DIGITS), "-o", str(out), "--bits", "3", "--method", method, "--bias-correction",
                                        "--calib", str(CALIB), "--min-elements", "0", "-q", "--no-verify"])
        assert res.exit_code == 0, res.output
        outs[method] = run(onnx.load(str(out)), {"image": test["image"]})[0]
    ref = run(onnx.load(str(DIGITS)), {"image": test["image"]})[0]
    err = {k: float(np.sum((v - ref) ** 2)) for k, v in outs.items()}
    assert err["gptq"] < 0.7 * err["rtn"], err
    assert (outs["gptq"].argmax(1) == test["label"]).mean() >= 0.97


def test_hqq_lowers_the_error_of_trained_weights_without_data_on_every_grid():
    """hqq on the trained decoder's weights: integers in range, integer zero points, and less weight error than
    min-max round-to-nearest on every grid (by less than ORT's fractional zero point would give: see docs/search.md)."""
    from pathlib import Path

    model = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "tiny_decoder.onnx"))
    ws = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2][:6]
    for bits, sym, lay, axis in [(4, False, Layout(Granularity.BLOCK, 32), 0), (4, True, Layout(Granularity.CHANNEL), 1),
                                 (3, False, Layout(Granularity.CHANNEL), 1), (2, False, Layout(Granularity.TENSOR), 0)]:
        grid = Grid(bits, sym, lay, axis, container_for(bits, sym, False), np.dtype(np.float32))
        rtn_err = hqq_err = 0.0
        for w in ws:
            rounded = round_weight(w, grid, Method.HQQ)
            t = rounded.tensor
            assert rounded.method is Method.HQQ and t.values.dtype == grid.qtype.dtype
            lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
            v = t.values.astype(np.int32)
            assert v.min() >= lo and v.max() <= hi
            assert (t.zero_point is None) == sym and t.scale.shape == grid.quantize(w).scale.shape
            rtn_err += float(np.mean((grid.quantize(w).dequantize() - w) ** 2))
            hqq_err += float(np.mean((t.dequantize() - w) ** 2))
        assert hqq_err < rtn_err, (bits, sym, lay)
    w = ws[0]
    a, b = round_weight(w, grid, Method.HQQ).tensor, round_weight(w, grid, Method.HQQ).tensor
    np.testing.assert_array_equal(a.values, b.values)  # deterministic
