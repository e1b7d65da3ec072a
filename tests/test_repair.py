"""graph/repair.py: models ONNX Runtime runs whose rewrite the full checker would refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mixq_onnx import QuantConfig, Uniform, quantize
from mixq_onnx.graph.repair import densify_sparse_initializers, drop_contradicted_shapes
from mixq_onnx.graph.rewrite import raise_opset

from mixq_onnx.cli import main

from .helpers import rng, run

MODELS = Path(__file__).resolve().parents[1] / "models"


def crnn_with_a_wrong_output_shape() -> onnx.ModelProto:
    """A recurrent text recognizer as old exporters write it (opset 12): Conv, a bidirectional LSTM over the width,
    a Gemm-like MatMul per step; the output declares ``[1, seqlen]`` although its Reshape computes ``[T, 1, C]``."""
    r = rng(5)
    h, c, classes = 16, 8, 11
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["f"], pads=[1, 1, 1, 1]),  # [1, 8, 4, T]
        helper.make_node("Relu", ["f"], ["fr"]),
        helper.make_node("ReduceMean", ["fr"], ["fm"], axes=[2], keepdims=0),  # [1, 8, T]
        helper.make_node("Transpose", ["fm"], ["seq"], perm=[2, 0, 1]),  # [T, 1, 8]
        helper.make_node("LSTM", ["seq", "W", "R", "B"], ["hs"], hidden_size=h, direction="bidirectional"),  # [T, 2, 1, H]
        helper.make_node("Transpose", ["hs"], ["ht"], perm=[0, 2, 1, 3]),  # [T, 1, 2, H]
        helper.make_node("Shape", ["ht"], ["hshape"]),
        helper.make_node("Slice", ["hshape", "zero", "two", "zero"], ["tn"]),  # [T, 1]
        helper.make_node("Concat", ["tn", "minus1"], ["target"], axis=0),  # [T, 1, -1]
        helper.make_node("Reshape", ["ht", "target"], ["hr"]),  # [T, 1, 2H]
        helper.make_node("MatMul", ["hr", "wo"], ["logits"]),  # [T, 1, C]
    ]
    inits = [
        numpy_helper.from_array(r.normal(0, 0.3, (c, 1, 3, 3)).astype(np.float32), "wc"),
        numpy_helper.from_array(r.normal(0, 0.3, (2, 4 * h, c)).astype(np.float32), "W"),
        numpy_helper.from_array(r.normal(0, 0.3, (2, 4 * h, h)).astype(np.float32), "R"),
        numpy_helper.from_array(np.zeros((2, 8 * h), np.float32), "B"),
        numpy_helper.from_array(r.normal(0, 0.3, (2 * h, classes)).astype(np.float32), "wo"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    g = helper.make_graph(nodes, "crnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, "width"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seqlen"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 7
    onnx.checker.check_model(m, full_check=True)  # the old opset's checker accepts it
    return m


def test_a_contradicted_output_shape_is_replaced_and_the_model_quantizes_at_4_bits():
    m = crnn_with_a_wrong_output_shape()
    # Opset 12's inference cannot follow the Reshape; opset 21's can, and then refuses the declaration.
    converted = raise_opset(m, 21).model
    fixed = drop_contradicted_shapes(converted)
    assert fixed.changed and "'logits' declares shape [1, 'seqlen']" in fixed.notes[0]
    assert len(fixed.model.graph.output[0].type.tensor_type.shape.dim) == 3
    assert len(converted.graph.output[0].type.tensor_type.shape.dim) == 2  # the pass's input is not modified
    result = quantize(m, QuantConfig(search=Uniform(4), min_elements=0))
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.opset_import[0].version >= 21
    assert any("declares shape" in n for n in result.report.notes)
    x = {"x": rng(6).normal(size=(1, 1, 4, 12)).astype(np.float32)}
    ref, got = run(m, x)[0], run(result.model, x)[0]
    assert ref.shape == got.shape == (12, 1, 11)
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.75


def test_consistent_shapes_are_left_alone():
    m = raise_opset(crnn_with_a_wrong_output_shape(), 21).model
    dims = m.graph.output[0].type.tensor_type.shape
    dims.ClearField("dim")
    dims.dim.add().dim_param = "steps"
    dims.dim.add().dim_value = 1
    dims.dim.add().dim_value = 11
    assert not drop_contradicted_shapes(m).changed


def test_sparse_initializers_become_dense_ones_with_the_same_values():
    vals = numpy_helper.from_array(np.array([1.5, -2.0, 3.0], np.float32), "s")
    coo = numpy_helper.from_array(np.array([[0, 1], [1, 0], [1, 3]], np.int64), "s_idx")
    g = helper.make_graph([helper.make_node("Add", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          sparse_initializer=[helper.make_sparse_tensor(vals, coo, [2, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    out = densify_sparse_initializers(m)
    assert out.changed and not out.model.graph.sparse_initializer and m.graph.sparse_initializer
    dense = numpy_helper.to_array(out.model.graph.initializer[0])
    np.testing.assert_array_equal(dense, [[0, 1.5, 0, 0], [-2.0, 0, 0, 3.0]])
    onnx.checker.check_model(out.model, full_check=True)
    x = {"x": np.ones((2, 4), np.float32)}
    np.testing.assert_array_equal(run(m, x)[0], run(out.model, x)[0])


def test_a_tied_table_the_exporter_stored_twice_is_stored_once(tmp_path):
    """The TorchScript decoder export holds the embedding table and, constant-folded, its transpose for the output
    MatMul: the copy becomes a Transpose of the table (bit-equal logits), and the quantized file holds one table."""
    import onnxruntime as ort

    from mixq_onnx.graph.repair import tie_transposed_tables
    from tests.test_decoder import CACHED, TEST, cache_feed

    model = onnx.load(str(CACHED))
    fixed = tie_transposed_tables(model)
    assert fixed.changed and len(fixed.notes) == 1 and "core.embed.weight" in fixed.notes[0]
    assert len(fixed.model.graph.initializer) == len(model.graph.initializer) - 1
    onnx.checker.check_model(fixed.model, full_check=True)
    feed = cache_feed(TEST[:4])
    before, after = (ort.InferenceSession(m.SerializeToString()).run(["logits"], feed)[0] for m in (model, fixed.model))
    assert np.array_equal(before, after)
    # Nothing to tie elsewhere: one shared table (dynamo), no table (CNN), a table and an unrelated head (encoder).
    for name in ("tiny_decoder.onnx", "digits_cnn.onnx", "tiny_transformer.onnx"):
        assert not tie_transposed_tables(onnx.load(str(MODELS / name))).changed
    out = tmp_path / "kv.onnx"
    res = CliRunner().invoke(main, [str(CACHED), "-o", str(out), "--bits", "4", "--no-verify", "-q", "--report", str(out) + ".json"])
    assert res.exit_code == 0, res.output
    q = onnx.load(str(out))
    # One table, stored transposed for the output projection (see test_fusion's tied-table test).
    assert sorted(tuple(t.dims) for t in q.graph.initializer if 256 in tuple(t.dims) and len(t.dims) == 2) == [(64, 256)]
    report = json.loads(Path(str(out) + ".json").read_text())
    assert any("stored twice" in n for n in report["notes"])
    table = next(t for t in report["tensors"] if t["name"] == "core.embed.weight")
    assert table["op_types"] == "Gather+MatMul" and table["via"] == ["Transpose"]
