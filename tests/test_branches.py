"""Branches a code review found untested: old opsets, the >2 GB path, checker fallback, rule checks, forced widths."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper

from mixq_onnx import Budget, QuantConfig, quantize
from mixq_onnx.graph.check import check_model
from mixq_onnx.config import ForceBits, Target
from mixq_onnx.errors import ModelError
from mixq_onnx.pipeline import VerifyOptions, quantize_file
from tests.helpers import init, make_model, rng, run, vi
from tests.test_search import two_layer_model

ROOT = Path(__file__).resolve().parents[1]


def _mlp(opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    r = rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [init("w1", r.normal(0, 0.1, (64, 128)).astype(np.float32)), init("w2", r.normal(0, 0.1, (128, 32)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [4, 64])], [vi("y", [4, 32])], inits, opset=opset, ir=4 if opset < 9 else 7)
    return model, {"x": r.normal(size=(4, 64)).astype(np.float32)}


@pytest.mark.parametrize("opset", [7, 9])
def test_models_below_opset_10_are_converted_and_keep_their_metadata(opset):
    model, feeds = _mlp(opset)
    model.producer_name, model.doc_string = "old-exporter", "kept"
    helper.set_model_props(model, {"source": "test"})
    q = quantize(model, QuantConfig(min_elements=0))
    assert q.report.opset["original"] == opset and q.report.opset["output"] >= 13
    assert "opset raised" in q.report.opset["note"]
    assert (q.model.producer_name, q.model.doc_string) == ("old-exporter", "kept")
    assert {p.key: p.value for p in q.model.metadata_props} == {"source": "test"}
    ref, out = run(model, feeds)[0], run(q.model, feeds)[0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.999


def test_an_opset_below_10_that_cannot_be_converted_fails_with_one_clear_error(monkeypatch):
    import mixq_onnx.graph.rewrite as rewrite

    def refuse(model, target):
        raise RuntimeError("no adapter for this op")

    monkeypatch.setattr(rewrite.version_converter, "convert_version", refuse)
    model, _ = _mlp(9)
    with pytest.raises(ModelError, match="opset 9 has no DequantizeLinear.*convert the model to opset 13"):
        quantize(model, QuantConfig(min_elements=0))


def test_the_full_checker_falls_back_to_the_structural_check_for_inputs_it_already_rejects():
    """A stale value_info entry makes onnx's full check fail on the input; what we changed is judged structurally."""
    model, feeds = _mlp(13)
    model.graph.value_info.append(vi("h", [4, 999]))  # contradicts the MatMul: the full check rejects the input
    with pytest.raises(Exception):
        onnx.checker.check_model(model, full_check=True)
    q = quantize(model, QuantConfig(min_elements=0)).model
    onnx.checker.check_model(q)
    assert run(q, feeds)[0].shape == (4, 32)


def test_over_2gb_models_are_written_with_external_data_and_checked_on_disk(tmp_path, monkeypatch):
    """The >2 GB path, with the threshold lowered so that a small model takes it."""
    import mixq_onnx.graph.io as io
    import mixq_onnx.pipeline as pipeline

    monkeypatch.setattr(io, "EXTERNAL_THRESHOLD", 10_000)
    monkeypatch.setattr(pipeline, "EXTERNAL_THRESHOLD", 10_000)
    out = tmp_path / "q.onnx"
    result = quantize_file(ROOT / "models" / "digits_cnn.onnx", out, QuantConfig(), VerifyOptions(samples=2))
    assert (tmp_path / "q.onnx.data").stat().st_size > 10_000
    assert out.stat().st_size < 10_000  # the graph only; the weights are in the data file
    assert result.report.verification is not None and result.report.verification.runs
    onnx.checker.check_model(str(out), full_check=True)


def _dq_model(values: np.ndarray, scale: np.ndarray, consumer: str, axis: int, block: int, zero_point: np.ndarray | None = None):
    k, n = values.shape[:2]
    inits = [init("wq", values), init("ws", scale)] + ([init("wz", zero_point)] if zero_point is not None else [])
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    dq = helper.make_node("DequantizeLinear", ["wq", "ws"] + (["wz"] if zero_point is not None else []), ["w"], name="wdq", **attrs)
    if consumer == "MatMul":
        node, x, y = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), vi("x", [2, k]), vi("y", [2, n])
    else:
        node, x, y = helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), vi("x", [1, n, 4, 4]), vi("y", [1, k, 4, 3])
    return make_model([dq, node], [x], [y], inits, opset=21, ir=10)


def test_check_flags_matmulnbits_blocks_along_n_and_block_sizes_it_cannot_fuse():
    q = np.zeros((64, 32), ml_dtypes.int4)
    along_n = _dq_model(q, np.full((64, 1), 0.1, np.float32), "MatMul", axis=1, block=32)
    assert [v.rule for v in check_model(along_n, Target.ORT_CPU)] == ["ort-nbits-axis"]
    small = _dq_model(q, np.full((8, 32), 0.1, np.float32), "MatMul", axis=0, block=8)
    assert [v.rule for v in check_model(small, Target.ORT_CPU)] == ["ort-nbits-block"]
    fine = _dq_model(q, np.full((2, 32), 0.1, np.float32), "MatMul", axis=0, block=32)
    assert check_model(fine, Target.ORT_CPU) == []


def _messages(model, target: Target, rule: str) -> list[str]:
    return [v.message for v in check_model(model, target) if v.rule == rule]


def test_check_flags_tensorrt_int4_and_zero_point_rules():
    """INT4 width rules come from the same table the search obeys (target-rule); zero points and dtypes from check."""
    conv = _dq_model(np.zeros((8, 4, 1, 2), ml_dtypes.int4), np.full((8, 4, 1, 1), 0.1, np.float32), "Conv", axis=3, block=2)
    assert any("Conv weights need 8 bits" in m for m in _messages(conv, Target.TENSORRT, "target-rule"))
    odd = _dq_model(np.zeros((64, 33), ml_dtypes.int4), np.full((2, 33), 0.1, np.float32), "MatMul", axis=0, block=32)
    assert any("even last dimension" in m for m in _messages(odd, Target.TENSORRT, "target-rule"))
    even = _dq_model(np.zeros((64, 32), ml_dtypes.int4), np.full((2, 32), 0.1, np.float32), "MatMul", axis=0, block=32)
    assert check_model(even, Target.TENSORRT) == []
    shifted = _dq_model(np.zeros((64, 32), np.uint8), np.full(32, 0.1, np.float32), "MatMul", axis=1, block=0,
                        zero_point=np.full(32, 3, np.uint8))
    rules = {v.rule for v in check_model(shifted, Target.TENSORRT)}
    assert {"trt-dtype", "trt-symmetric"} <= rules


def test_a_budget_counts_forced_widths_and_keeps_them():
    m, _ = two_layer_model()
    config = QuantConfig(search=Budget(target_bits=5), min_elements=0, force_bits=(ForceBits.parse("heavy=8"),))
    result = quantize(m, config)
    chosen = {t["name"]: t["chosen"] for t in result.report.to_dict()["tensors"]}
    assert chosen["heavy"]["bits"] == 8
    assert result.report.totals.quantized_bytes <= result.report.search["limit_bytes"]
    assert sum(c["bytes"] for c in chosen.values()) == result.report.totals.quantized_bytes
