"""Our QuantizeLinear/DequantizeLinear against onnx.reference, bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from mixq_onnx.config import PER_CHANNEL, PER_TENSOR, Layout
from mixq_onnx.numerics.qdq import (
    QTYPES,
    GroupRange,
    dequantize_linear,
    logical_range,
    params_from_range,
    quantize_linear,
    quantize_weight,
    storage_bytes,
)


def _reference(op: str, inputs: list[np.ndarray], axis: int, block_size: int, opset: int, out_dtype) -> np.ndarray:
    names = ["x", "s", "z"][: len(inputs)]
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype)), None)],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip(inputs, names)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, {})[0]


LAYOUTS = [
    (PER_TENSOR, 0),
    (PER_CHANNEL, 0),
    (PER_CHANNEL, 1),
    (Layout.parse("block32"), 1),
    (Layout.parse("block32"), 0),
]


@pytest.mark.parametrize("qname", list(QTYPES))
@pytest.mark.parametrize("layout,axis", LAYOUTS, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("with_zp", [True, False])
@pytest.mark.parametrize("wdtype", [np.float32, np.float16])
def test_quantize_dequantize_match_reference(qname, layout, axis, with_zp, wdtype):
    qtype = QTYPES[qname]
    rng = np.random.default_rng(7)
    # 70 rows: blocks of 32 leave a remainder block; heavy tails exercise saturation.
    w = (rng.standard_t(3, size=(70, 40)) * 0.05).astype(wdtype)
    bits = qtype.bits
    symmetric = qtype.signed and not with_zp
    gr = GroupRange.of(w, layout, axis)
    scale, zp = params_from_range(gr, bits, symmetric, qtype, np.dtype(wdtype))
    if with_zp and zp is None:
        zp = np.zeros(scale.shape, dtype=qtype.dtype)
    # Push some values past the range so saturation is tested too.
    x = (w * wdtype(1.3)).astype(wdtype)
    opset = 25 if qtype.bits == 2 else 21
    ins = [x, scale] + ([zp] if with_zp else [])
    ours_q = quantize_linear(x, scale, zp if with_zp else None, qtype, axis, layout.block_size)
    if with_zp:
        ref_q = _reference("QuantizeLinear", ins, axis, layout.block_size, opset, qtype.dtype)
    else:
        # Without a zero point QuantizeLinear needs output_dtype to pick the type.
        node_ins = ins
        ref_q = _reference_with_output_dtype(node_ins, axis, layout.block_size, opset, qtype)
    assert ours_q.dtype == ref_q.dtype
    np.testing.assert_array_equal(ours_q.astype(np.int32), ref_q.astype(np.int32))

    dq_ins = [ref_q, scale] + ([zp] if with_zp else [])
    ref_y = _reference("DequantizeLinear", dq_ins, axis, layout.block_size, opset, wdtype)
    ours_y = dequantize_linear(ref_q, scale, zp if with_zp else None, axis, layout.block_size)
    assert ours_y.dtype == ref_y.dtype
    assert ours_y.tobytes() == ref_y.tobytes()


def _reference_with_output_dtype(ins, axis, block_size, opset, qtype):
    names = ["x", "s"]
    attrs = {"axis": axis, "output_dtype": helper.np_dtype_to_tensor_dtype(qtype.dtype)}
    if block_size:
        attrs["block_size"] = block_size
    node = helper.make_node("QuantizeLinear", names, ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [], [helper.make_tensor_value_info("y", attrs["output_dtype"], None)],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip(ins, names)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, {})[0]


@pytest.mark.parametrize("bits,symmetric", list(itertools.product(range(2, 9), [False, True])))
def test_weight_values_stay_in_logical_range_and_error_shrinks(bits, symmetric):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(16, 300)).astype(np.float32)
    qname = ("int" if symmetric else "uint") + ("4" if bits <= 4 else "8")
    qt = quantize_weight(w, bits, symmetric, PER_CHANNEL, 0, QTYPES[qname], np.dtype(np.float32))
    lo, hi = logical_range(bits, symmetric)
    v = qt.values.astype(np.int32)
    assert v.min() >= lo and v.max() <= hi
    err = np.mean((qt.dequantize() - w) ** 2)
    # Rounding error of min-max quantization is at most half a step per element.
    step = qt.scale.astype(np.float64).max()
    assert err <= (step / 2) ** 2 + 1e-12
    if bits < 8:
        finer = quantize_weight(w, bits + 1, symmetric, PER_CHANNEL, 0, QTYPES[qname.replace("4", "8")], np.dtype(np.float32))
        assert np.mean((finer.dequantize() - w) ** 2) < err


def test_zero_tensor_and_constant_rows_are_exact():
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.25
    qt = quantize_weight(w, 4, False, PER_CHANNEL, 0, QTYPES["uint4"], np.dtype(np.float32))
    np.testing.assert_array_equal(qt.dequantize(), w)
    assert np.all(qt.scale > 0)


@pytest.mark.parametrize("layout,axis", LAYOUTS, ids=lambda v: getattr(v, "name", str(v)))
def test_storage_bytes_matches_packed_onnx_tensor(layout, axis):
    w = np.random.default_rng(0).normal(size=(70, 40)).astype(np.float32)
    qt = quantize_weight(w, 4, False, layout, axis, QTYPES["uint4"], np.dtype(np.float32))
    onnx_bytes = sum(
        len(numpy_helper.from_array(a, "t").raw_data) for a in (qt.values, qt.scale, qt.zero_point)
    )
    assert qt.nbytes == onnx_bytes == storage_bytes(w.shape, layout, axis, QTYPES["uint4"], False, 4)


def test_fake_quantize_in_place_gives_the_same_floats_in_the_callers_array():
    """A swap for a big weight (a 671 MB tied table) rounds in the array it read, not in a second one."""
    from mixq_onnx.numerics.qdq import Grid, QTYPES
    from mixq_onnx.config import Layout

    w = np.random.default_rng(5).normal(size=(96, 64)).astype(np.float32)
    for layout, axis, qtype, symmetric in ((Layout.parse("block32"), 1, QTYPES["uint4"], False),
                                           (Layout.parse("channel"), 0, QTYPES["int8"], True)):
        grid = Grid(4 if qtype.bits == 4 else 8, symmetric, layout, axis, qtype, np.dtype(np.float32))
        expected = grid.fake_quantize(w.copy(), grid.range_of(w))
        mine = w.copy()
        got = grid.fake_quantize(mine, grid.range_of(mine), in_place=True)
        assert np.array_equal(got, expected) and np.shares_memory(got, mine)
    frozen = w.copy()
    frozen.flags.writeable = False  # a read-only array (an inline tensor's buffer) is left alone
    grid = Grid(8, True, Layout.parse("channel"), 0, QTYPES["int8"], np.dtype(np.float32))
    assert np.array_equal(grid.fake_quantize(frozen, grid.range_of(frozen), in_place=True), grid.fake_quantize(w, grid.range_of(w)))
    assert np.array_equal(frozen, w)
