"""Graph structures: Constant nodes, If/Loop bodies, shared weights, dtypes, chains, external data."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixq_onnx import ModelError, QuantConfig, Uniform, quantize, quantize_file
from mixq_onnx.graph.io import load_model
from tests.helpers import count_ops, init, make_model, quantize_and_compare, rng, run, vi

F = TensorProto.FLOAT
CFG8 = QuantConfig(search=Uniform(8), min_elements=0)


def _w(shape, seed=0, dtype=np.float32):
    return rng(seed).normal(0, 0.1, shape).astype(dtype)


def test_constant_node_weight():
    const = helper.make_node("Constant", [], ["w"], name="wconst", value=numpy_helper.from_array(_w((64, 32)), "w"))
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    m = make_model([const, mm], [vi("x", [4, 64])], [vi("y", [4, 32])])
    result, s = quantize_and_compare(m, {"x": _w((4, 64), 1)}, CFG8)
    assert s > 30
    assert result.report.tensors[0].source == "constant"
    assert count_ops(result.model, "DequantizeLinear") == 1
    assert not any(n.op_type == "Constant" and n.output[0] == "w" for n in result.model.graph.node)


def _if_model():
    then_w = helper.make_node("Constant", [], ["tw"], value=numpy_helper.from_array(_w((64, 32), 2), "tw"))
    then_mm = helper.make_node("MatMul", ["x", "tw"], ["ty"], name="then_mm")
    then_g = helper.make_graph([then_w, then_mm], "then", [], [vi("ty", [4, 32])])
    # The else branch uses a main-graph initializer from the outer scope.
    else_mm = helper.make_node("MatMul", ["x", "outer_w"], ["ey"], name="else_mm")
    else_g = helper.make_graph([else_mm], "else", [], [vi("ey", [4, 32])])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    return make_model([node], [vi("cond", [], TensorProto.BOOL), vi("x", [4, 64])], [vi("y", [4, 32])], [init("outer_w", _w((64, 32), 3))])


@pytest.mark.parametrize("cond", [True, False])
def test_if_bodies_and_outer_scope_weights(cond):
    m = _if_model()
    result, s = quantize_and_compare(m, {"cond": np.array(cond), "x": _w((4, 64), 1)}, CFG8)
    assert s > 30
    names = {(t.name, t.graph) for t in result.report.tensors}
    assert names == {("tw", "main/branch:then_branch"), ("outer_w", "main")}
    assert count_ops(result.model, "DequantizeLinear") == 2


def test_loop_body_weight():
    body_w = helper.make_node("Constant", [], ["lw"], value=numpy_helper.from_array(_w((32, 32), 4), "lw"))
    mm = helper.make_node("MatMul", ["h_in", "lw"], ["h_mm"], name="loop_mm")
    tanh = helper.make_node("Tanh", ["h_mm"], ["h_out"])
    ident = helper.make_node("Identity", ["cond_in"], ["cond_out"])
    body = helper.make_graph(
        [body_w, mm, tanh, ident], "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("h_in", [2, 32])],
        [vi("cond_out", [], TensorProto.BOOL), vi("h_out", [2, 32])],
    )
    loop = helper.make_node("Loop", ["n", "c", "h0"], ["h"], name="loop", body=body)
    m = make_model(
        [loop], [vi("h0", [2, 32])], [vi("h", [2, 32])],
        [init("n", np.array(3, np.int64)), init("c", np.array(True))],
    )
    result, s = quantize_and_compare(m, {"h0": _w((2, 32), 5) * 10}, CFG8)
    assert s > 30 and result.report.tensors[0].graph == "main/loop:body"


def test_shared_weight_is_quantized_once():
    w = init("w", _w((64, 64)))
    n1 = helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1")
    n2 = helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")
    m = make_model([n1, n2], [vi("x", [2, 64])], [vi("y", [2, 64])], [w])
    result, s = quantize_and_compare(m, {"x": _w((2, 64), 1)}, CFG8)
    assert s > 30 and count_ops(result.model, "DequantizeLinear") == 1
    assert result.report.tensors[0].consumers == ["mm1", "mm2"]
    assert result.report.tensors[0].chosen.granularity == "channel"


def test_shared_weight_with_disagreeing_axes_falls_back_to_a_common_layout():
    w = init("w", _w((64, 64)))
    n1 = helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1")  # channel axis 1
    n2 = helper.make_node("Gemm", ["a", "w"], ["y"], name="gemm", transB=1)  # channel axis 0
    m = make_model([n1, n2], [vi("x", [2, 64])], [vi("y", [2, 64])], [w])
    result, s = quantize_and_compare(m, {"x": _w((2, 64), 1)}, CFG8)
    assert result.report.tensors[0].chosen.granularity == "tensor"
    assert result.report.tensors[0].notes and s > 25


@pytest.mark.parametrize("opset,scale_type,casts", [(21, TensorProto.FLOAT16, 0), (13, TensorProto.FLOAT, 1)])
def test_fp16_model(opset, scale_type, casts):
    """fp16 scales where DequantizeLinear allows them (opset 19+), else fp32 scales and a Cast."""
    w = init("w", _w((64, 32), dtype=np.float16))
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    m = make_model([mm], [vi("x", [4, 64], TensorProto.FLOAT16)], [vi("y", [4, 32], TensorProto.FLOAT16)], [w], opset=opset)
    result, s = quantize_and_compare(m, {"x": _w((4, 64), 1, np.float16)}, CFG8)
    assert s > 25 and result.model.opset_import[0].version == opset
    scale = [t for t in result.model.graph.initializer if t.name == "w_scale"][0]
    assert scale.data_type == scale_type and count_ops(result.model, "Cast") == casts


def test_bf16_weight_through_cast():
    w = init("w", _w((64, 32)).astype(ml_dtypes.bfloat16))
    cast = helper.make_node("Cast", ["w"], ["w32"], name="cast", to=F)
    mm = helper.make_node("MatMul", ["x", "w32"], ["y"], name="mm")
    m = make_model([cast, mm], [vi("x", [4, 64])], [vi("y", [4, 32])], [w])
    result, s = quantize_and_compare(m, {"x": _w((4, 64), 1)}, CFG8)
    assert s > 25 and result.report.tensors[0].via == ["Cast"]
    assert count_ops(result.model, "Cast") == 2  # ours (f32 -> bf16) and the model's


def test_transpose_chain_maps_the_channel_axis():
    w = init("wt", _w((32, 64)))  # stored [N, K], transposed to [K, N] for MatMul
    tr = helper.make_node("Transpose", ["wt"], ["w"], name="tr", perm=[1, 0])
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    m = make_model([tr, mm], [vi("x", [4, 64])], [vi("y", [4, 32])], [w])
    result, s = quantize_and_compare(m, {"x": _w((4, 64), 1)}, CFG8)
    t = result.report.tensors[0]
    assert (t.channel_axis, t.reduction_axis) == (0, 1) and t.via == ["Transpose"] and s > 30


def test_reshape_chain_keeps_leading_axis():
    w = init("wflat", _w((32, 16 * 9)))
    shape = init("shape", np.array([32, 16, 3, 3], np.int64))
    rs = helper.make_node("Reshape", ["wflat", "shape"], ["w"], name="rs")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    m = make_model([rs, conv], [vi("x", [1, 16, 6, 6])], [vi("y", [1, 32, 6, 6])], [w, shape])
    result, s = quantize_and_compare(m, {"x": _w((1, 16, 6, 6), 1)}, CFG8)
    t = result.report.tensors[0]
    assert t.channel_axis == 0 and t.chosen.granularity == "channel" and s > 30


def test_weight_that_is_also_a_graph_input_or_output_stays_float():
    w = init("w", _w((64, 32)))
    w2 = init("w2", _w((64, 32), 2))
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    mm2 = helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2")
    m = make_model([mm, mm2], [vi("x", [4, 64]), vi("w", [64, 32])], [vi("y", [4, 32]), vi("y2", [4, 32]), vi("w2", [64, 32])], [w, w2])
    with pytest.raises(ModelError, match="nothing to quantize"):
        quantize(m, CFG8)
    inv_reasons = {s.name: s.reason for s in __import__("mixq_onnx.graph.find", fromlist=["x"]).find_weights(m, CFG8).skipped}
    assert "graph input" in inv_reasons["w"] and "graph output" in inv_reasons["w2"]


def test_already_quantized_model_is_refused_clearly():
    m, feeds = __import__("tests.test_ops", fromlist=["x"]).conv_model()
    once = quantize(m, CFG8).model
    with pytest.raises(ModelError, match="already quantized.*DequantizeLinear"):
        quantize(once, CFG8)


def test_partly_quantized_model_keeps_its_quantized_part():
    m, feeds = __import__("tests.test_ops", fromlist=["x"]).conv_model()
    once = quantize(m, CFG8).model
    # Add a float MatMul after the already-quantized conv.
    g = once.graph
    g.initializer.append(init("w2", _w((8, 8), 3)))
    g.node.append(helper.make_node("MatMul", ["y", "w2"], ["z"], name="mm2"))
    del g.output[:]
    g.output.append(vi("z", [1, 32, 8, 8]))
    result = quantize(once, CFG8)
    assert [t.name for t in result.report.tensors] == ["w2"]
    assert any("already contains quantization ops" in n for n in result.report.notes)
    onnx.checker.check_model(result.model, full_check=True)


def test_names_metadata_and_value_info_are_kept():
    m, feeds = __import__("tests.test_ops", fromlist=["x"]).conv_model()
    m.producer_name, m.producer_version, m.doc_string = "exporter", "9.9", "doc"
    m.graph.doc_string = "graph doc"
    onnx.helper.set_model_props(m, {"author": "someone"})
    m.graph.value_info.append(vi("w", [32, 64, 3, 3]))
    q = quantize(m, QuantConfig(min_elements=0)).model
    assert (q.producer_name, q.producer_version, q.doc_string, q.graph.doc_string) == ("exporter", "9.9", "doc", "graph doc")
    assert {p.key: p.value for p in q.metadata_props} == {"author": "someone"}
    assert [i.name for i in q.graph.input] == ["x"] and [o.name for o in q.graph.output] == ["y"]
    assert any(v.name == "w" for v in q.graph.value_info)
    assert q.graph.node[-1].name == "conv"


def test_name_collisions_are_avoided():
    w = init("w", _w((64, 32)))
    taken = init("w_scale", _w((32,), 2))
    mm = helper.make_node("MatMul", ["x", "w"], ["a"], name="mm")
    add = helper.make_node("Add", ["a", "w_scale"], ["y"], name="add")
    m = make_model([mm, add], [vi("x", [4, 64])], [vi("y", [4, 32])], [w, taken])
    result, s = quantize_and_compare(m, {"x": _w((4, 64), 1)}, CFG8)
    dq = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"][0]
    assert dq.input[1] == "w_scale_1" and s > 30


def test_external_data_roundtrip(tmp_path):
    m, feeds = __import__("tests.test_ops", fromlist=["x"]).conv_model()
    ref = run(m, feeds)[0]
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(m, str(src), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    out = tmp_path / "out.onnx"
    result = quantize_file(src, out, QuantConfig(search=Uniform(8), min_elements=0))
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    assert (tmp_path / "out.onnx.data").is_file()
    loaded = load_model(out)
    assert loaded.had_external_data
    got = run(loaded.model, feeds)[0]
    assert np.allclose(ref, got, atol=0.05 * np.abs(ref).max())
    assert result.report.verification is not None


@pytest.mark.parametrize("location", ["../evil.data", "/etc/passwd", "link.data"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    m, _ = __import__("tests.test_ops", fromlist=["x"]).conv_model()
    src = tmp_path / "model.onnx"
    onnx.save_model(m, str(src), save_as_external_data=True, location="real.data", size_threshold=0)
    (tmp_path / "link.data").symlink_to(tmp_path / "real.data")
    raw = onnx.load(str(src), load_external_data=False)
    for t in raw.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    src.write_bytes(raw.SerializeToString())
    with pytest.raises(ModelError, match="outside|absolute|symbolic"):
        load_model(src)


def _mm_model(opset: int):
    w = init("w", _w((64, 48)))
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([mm], [vi("x", [4, 64])], [vi("y", [4, 48])], [w], opset=opset), {"x": _w((4, 64), 1)}


@pytest.mark.parametrize("opset,granularity", [(13, "channel"), (11, "tensor")])
def test_failed_opset_conversion_falls_back_to_int8(monkeypatch, opset, granularity):
    import mixq_onnx.graph.rewrite as rw

    def broken(model, target):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(rw.version_converter, "convert_version", broken)
    m, feeds = _mm_model(opset)
    # 4 bits would need opset 21 (INT4); with the converter broken they must fall back to an 8-bit container.
    result, s = quantize_and_compare(m, feeds, QuantConfig(search=Uniform(4), min_elements=0))
    assert result.model.opset_import[0].version == opset
    t = result.report.tensors[0].chosen
    assert t.container == "uint8" and t.granularity == granularity
    assert any("could not convert" in n for n in result.report.notes)
    assert any(f"fell back to what opset {opset} supports" in n for n in result.report.notes)
    assert result.report.tensors[0].chosen.bits == 4 and s > 10


def test_int2_output_runs_at_opset_25():
    m, feeds = _mm_model(13)
    result, s = quantize_and_compare(m, feeds, QuantConfig(search=Uniform(2), allow_int2=True, min_elements=0))
    assert result.model.opset_import[0].version == 25 and result.model.ir_version >= 13
    assert result.report.tensors[0].chosen.container == "uint2"
    q = [t for t in result.model.graph.initializer if t.name == "w_quantized"][0]
    assert q.data_type == TensorProto.UINT2 and len(q.raw_data) == 64 * 48 // 4
    assert s > 3


def test_scan_body_weight():
    body_w = helper.make_node("Constant", [], ["sw"], value=numpy_helper.from_array(_w((32, 32), 6), "sw"))
    mm = helper.make_node("MatMul", ["x_t", "sw"], ["y_t"], name="scan_mm")
    add = helper.make_node("Add", ["s_in", "y_t"], ["s_out"])
    body = helper.make_graph(
        [body_w, mm, add], "body", [vi("s_in", [1, 32]), vi("x_t", [1, 32])], [vi("s_out", [1, 32]), vi("y_t", [1, 32])]
    )
    scan = helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1)
    m = make_model([scan], [vi("s0", [1, 32]), vi("xs", [5, 1, 32])], [vi("s", [1, 32]), vi("ys", [5, 1, 32])])
    result, s = quantize_and_compare(m, {"s0": _w((1, 32), 7), "xs": _w((5, 1, 32), 8) * 10}, CFG8)
    assert s > 30 and result.report.tensors[0].graph == "main/scan:body"
    assert count_ops(result.model, "DequantizeLinear") == 1


def test_opset_is_raised_only_when_needed():
    m, feeds = _mm_model(13)
    result, _ = quantize_and_compare(m, feeds, QuantConfig(search=Uniform(8), min_elements=0))
    assert result.model.opset_import[0].version == 13 and result.report.opset["note"] == ""
    result, _ = quantize_and_compare(m, feeds, QuantConfig(search=Uniform(4), min_elements=0))
    assert result.model.opset_import[0].version == 21
