"""No float islands between integer ops on ONNX Runtime CPU: data movement, explicit Pad nodes, presets, `check` warnings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from mixq_onnx import quantize
from mixq_onnx.graph.check import check_model, fusion_findings
from mixq_onnx.cli import main
from mixq_onnx.config import Activations, CalibMethod, QuantConfig, Target, Uniform
from mixq_onnx.runtime.fusion import ort_fusion, ort_optimized
from mixq_onnx.targets import MOVE_OPS, rules_for
from tests.helpers import run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = np.load(ROOT / "models" / "digits_calib.npz")["image"]
TEST = np.load(ROOT / "models" / "digits_test.npz")


def explicit_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network as an exporter that writes padding as Pad nodes gives it (TF 'SAME', ZeroPad2d, old exporters)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for n in m.graph.node:
        pads = next((a for a in n.attribute if a.name == "pads"), None)
        if n.op_type == "Conv" and pads is not None and any(pads.ints):
            k = len(pads.ints) // 2
            full = [0, 0, *pads.ints[:k], 0, 0, *pads.ints[k:]]
            name = f"{n.name or n.output[0]}_pads"
            m.graph.initializer.append(numpy_helper.from_array(np.array(full, np.int64), name))
            m.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), name + "_value"))
            nodes.append(helper.make_node("Pad", [n.input[0], name, name + "_value"], [name + "_out"], mode="constant"))
            n.input[0] = name + "_out"
            n.attribute.remove(pads)
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


def _calib() -> list[dict[str, np.ndarray]]:
    return [{"image": CALIB[i : i + 32]} for i in range(0, 256, 32)]


def _accuracy(model: onnx.ModelProto) -> float:
    logits = run(model, {"image": TEST["image"]})[0]
    return float(np.mean(logits.argmax(1) == TEST["label"]))


def _write(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_explicit_pad_nodes_leave_no_float_island_and_every_conv_fuses(tmp_path):
    float_model = explicit_pads(onnx.load(str(DIGITS)))
    assert Counter(n.op_type for n in float_model.graph.node)["Pad"] == 2
    config = QuantConfig(search=Uniform(8), target=Target.ORT_CPU, activations=Activations.UINT8, min_elements=0,
                         calib_method=CalibMethod.PERCENTILE)
    q = quantize(float_model, config, calibration=_calib()).model
    fusion = ort_fusion(_write(q, tmp_path / "q.onnx"))
    assert fusion.findings == ()
    assert fusion.fused["QLinearConv"] == 2 and "Pad" not in fusion.ops and "Conv" not in fusion.ops
    # Padding with the zero point is padding with 0.0: the explicit-Pad model is as accurate as the original export.
    original = quantize(onnx.load(str(DIGITS)), config, calibration=_calib()).model
    assert _accuracy(q) >= _accuracy(float_model) - 0.02
    assert abs(_accuracy(q) - _accuracy(original)) <= 0.01


def test_tensorrt_keeps_the_pair_after_the_pad(tmp_path):
    """TensorRT wants Q/DQ right at the Conv input; only ORT folds a Pad into the integer Conv."""
    assert not rules_for(Target.TENSORRT).quantize_before_pad
    config = QuantConfig(search=Uniform(8), target=Target.TENSORRT, activations=Activations.INT8, min_elements=0)
    q = quantize(explicit_pads(onnx.load(str(DIGITS))), config, calibration=_calib()).model
    producer = {o: n for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.op_type == "Conv":
            assert producer[n.input[0]].op_type == "DequantizeLinear"


def _island_model(op: str) -> onnx.ModelProto:
    """x -> Q -> DQ -> op -> Q -> DQ with one scale: ORT removes the pair when the op can move integers."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    extra = {
        "Reshape": ([i64("a", [1, -1])], ["a"], {}), "Flatten": ([], [], {}), "Transpose": ([], [], {"perm": [0, 2, 3, 1]}),
        "Squeeze": ([i64("a", [0])], ["a"], {}), "Unsqueeze": ([i64("a", [0])], ["a"], {}), "MaxPool": ([], [], {"kernel_shape": [2, 2]}),
        "GlobalMaxPool": ([], [], {}), "Slice": ([i64("a", [1]), i64("b", [5]), i64("c", [1])], ["a", "b", "c"], {}),
        "Expand": ([i64("a", [2, 8, 16, 16])], ["a"], {}), "Tile": ([i64("a", [1, 1, 2, 1])], ["a"], {}),
        "DepthToSpace": ([], [], {"blocksize": 2}), "Gather": ([i64("a", [0, 2])], ["a"], {"axis": 1}),
        "Resize": ([numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "a")], ["", "a"], {}),
    }[op]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"), *extra[0]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node(op, ["xd", *extra[1]], ["y"], **extra[2]), helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("op", sorted(MOVE_OPS))
def test_onnx_runtime_moves_integers_through_every_data_movement_op_we_quantize_around(op, tmp_path):
    """Re-measures the runtime fact the placement relies on (targets.MOVE_OPS)."""
    optimized = ort_optimized(_write(_island_model(op), tmp_path / "m.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    assert ops == ["QuantizeLinear", op, "DequantizeLinear"], ops
    assert fusion_findings(optimized) == []


def test_a_pad_between_dequantize_and_quantize_is_reported_as_a_float_island(tmp_path):
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p")
    m = _island_model("Flatten")
    m.graph.initializer.append(pads)
    n = m.graph.node[2]
    n.op_type, n.input[:] = "Pad", ["xd", "p"]
    findings = fusion_findings(ort_optimized(_write(m, tmp_path / "m.onnx")))
    assert [f.rule for f in findings] == ["ort-float-island"] and "Pad" in findings[0].message


@pytest.mark.parametrize("target,expected", [(Target.ORT_CPU, Activations.UINT8), (Target.TENSORRT, Activations.INT8),
                                             (Target.GENERIC, Activations.NONE), (Target.ORT_CUDA, Activations.NONE)])
def test_activations_auto_is_the_targets_fastest(target, expected):
    assert QuantConfig(target=target, activations=Activations.AUTO).activations is expected


def test_int8_activations_on_ort_cpu_warn_and_check_names_the_unfused_nodes(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=CALIB[:64])
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, [str(DIGITS), "-o", str(out), "--target", "ort-cpu", "--activations", "int8", "--calib", str(calib)])
    assert res.exit_code == 0, res.output
    assert "--activations int8 on --target ort-cpu" in res.output and "use --activations uint8 or auto" in res.output
    u8 = tmp_path / "u8.onnx"
    res = CliRunner().invoke(main, [str(DIGITS), "-o", str(u8), "--target", "ort-cpu", "--activations", "auto", "--calib", str(calib)])
    assert res.exit_code == 0 and "int8 on" not in res.output
    assert "ONNX Runtime CPU fuses: " in res.output and "QLinearConv 2" in res.output
    checked = CliRunner().invoke(main, ["check", str(u8), "--target", "ort-cpu"])
    assert checked.exit_code == 0 and "warning" not in checked.output and "0 node(s) compute in float" in checked.output


TINY = ROOT / "models" / "tiny_transformer.onnx"
TINY_TEST = np.load(ROOT / "models" / "tiny_transformer_test.npz")


def _tables(model: onnx.ModelProto) -> dict[str, str]:
    """For each quantized embedding table: 'rows' if Gather reads its integers, 'whole' if a DequantizeLinear does."""
    readers = {i: n.op_type for n in model.graph.node for i in n.input[:1]}
    return {t.name: {"Gather": "rows", "DequantizeLinear": "whole"}[readers[t.name]] for t in model.graph.initializer
            if t.name in ("tok.weight_quantized", "pos.weight_quantized")}


def test_embedding_rows_are_dequantized_after_the_lookup_bit_for_bit(monkeypatch):
    import dataclasses

    from mixq_onnx import targets

    feeds = {"input_ids": TINY_TEST["input_ids"][:64]}
    config = QuantConfig(search=Uniform(8), min_elements=0)
    rows = quantize(onnx.load(str(TINY)), config).model
    monkeypatch.setitem(targets.RULES, Target.GENERIC, dataclasses.replace(targets.RULES[Target.GENERIC], gather_rows=False))
    whole = quantize(onnx.load(str(TINY)), config).model
    assert set(_tables(rows).values()) == {"rows"} and set(_tables(whole).values()) == {"whole"}
    assert len(_tables(rows)) == 2
    # Same integers, scales and zero points, same (q - zp) * s per looked-up value: identical outputs.
    assert np.array_equal(run(rows, feeds)[0], run(whole, feeds)[0])
    reference = run(onnx.load(str(TINY)), feeds)[0]
    assert np.mean(run(rows, feeds)[0].argmax(1) == reference.argmax(1)) >= 0.98


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block32"])
def test_every_row_layout_is_looked_up_before_dequantizing(granularity):
    from mixq_onnx.config import Layout

    config = QuantConfig(search=Uniform(8), min_elements=0, layouts=(Layout.parse(granularity),))
    q = quantize(onnx.load(str(TINY)), config).model
    assert set(_tables(q).values()) == {"rows"}
    feeds = {"input_ids": TINY_TEST["input_ids"][:32]}
    ref, out = run(onnx.load(str(TINY)), feeds)[0], run(q, feeds)[0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("granularity,scheme", [("channel", "asymmetric"), ("channel", "symmetric"), ("block32", "asymmetric"),
                                                ("tensor", "symmetric")])
def test_4bit_tables_are_looked_up_packed_and_match_the_whole_table_bit_for_bit(granularity, scheme, monkeypatch):
    import dataclasses

    from mixq_onnx import targets
    from mixq_onnx.config import Layout, Scheme

    feeds = {"input_ids": TINY_TEST["input_ids"][:64]}
    config = QuantConfig(search=Uniform(4), min_elements=0, layouts=(Layout.parse(granularity),), scheme=Scheme(scheme))
    rows = quantize(onnx.load(str(TINY)), config).model
    table = next(t for t in rows.graph.initializer if t.name == "tok.weight_quantized")
    assert table.data_type == onnx.TensorProto.UINT8 and list(table.dims) == [512, 32]  # two 4-bit values per byte
    monkeypatch.setitem(targets.RULES, Target.GENERIC, dataclasses.replace(targets.RULES[Target.GENERIC], gather_rows=False))
    whole = quantize(onnx.load(str(TINY)), config).model
    assert set(_tables(rows).values()) == {"rows"} and set(_tables(whole).values()) == {"whole"}
    assert np.array_equal(run(rows, feeds)[0], run(whole, feeds)[0])


def test_an_odd_width_4bit_table_unpacks_to_its_width():
    table = np.random.default_rng(3).normal(size=(40, 33)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["emb"])], "odd",
                              [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, ["n", 33])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    q = quantize(model, QuantConfig(search=Uniform(4), min_elements=0)).model
    assert any(n.op_type == "BitShift" for n in q.graph.node)
    ids = np.array([0, 5, 39, 5], np.int64)
    out = run(q, {"ids": ids})[0]
    assert out.shape == (4, 33) and np.corrcoef(out.ravel(), table[ids].ravel())[0, 1] > 0.99


def test_ort_cpu_looks_up_4bit_tables_and_refuses_2bit_ones():
    cpu = quantize(onnx.load(str(TINY)), QuantConfig(search=Uniform(4), target=Target.ORT_CPU, min_elements=0))
    bits = {t["name"]: t["chosen"]["bits"] for t in cpu.report.to_dict()["tensors"]}
    assert set(bits.values()) == {4} and set(_tables(cpu.model).values()) == {"rows"}
    assert check_model(cpu.model, Target.ORT_CPU) == []
    two = quantize(onnx.load(str(TINY)), QuantConfig(search=Uniform(2), target=Target.ORT_CPU, min_elements=0, allow_int2=True))
    bits = {t["name"]: t["chosen"]["bits"] for t in two.report.to_dict()["tensors"]}
    assert bits.pop("tok.weight") > 2 and bits.pop("pos.weight") > 2 and set(bits.values()) == {2}
    assert any("cannot take 2 bits under --target ort-cpu" in n for n in two.report.notes)


@pytest.mark.parametrize(("bits", "layout", "scheme"), [(8, "channel", "symmetric"), (4, "block32", "symmetric"),
                                                     (4, "block32", "asymmetric"), (8, "tensor", "asymmetric")])
def test_a_tied_table_is_stored_once_transposed_for_matmulnbits_and_looked_up_by_columns(tmp_path, bits, layout, scheme):
    """Tied input/output embeddings: the output projection reads the table through a Transpose. The table is stored
    transposed, so ORT fuses the projection into MatMulNBits instead of dequantizing the whole table every run, and
    the lookup dequantizes only the columns it gathers; every value equals the whole-table DequantizeLinear's."""
    from mixq_onnx.config import Layout
    from mixq_onnx.kinds import Scheme

    table = np.random.default_rng(0).normal(size=(96, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"]),
             helper.make_node("Transpose", ["table"], ["table_t"]),
             helper.make_node("MatMul", ["emb", "table_t"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 5, 96]),
                               helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, [2, 5, 64])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    config = QuantConfig(search=Uniform(bits), min_elements=0, layouts=(Layout.parse(layout),), scheme=Scheme(scheme))
    result = quantize(model, config)
    q = result.model
    assert [tuple(t.dims) for t in q.graph.initializer if t.name == "table_quantized"] == [(64, 96)]
    assert not any(t.name == "table" for t in q.graph.initializer)
    # Each value is the whole-table DequantizeLinear's: the lookup against the report's own dequantized table.
    ids = np.array([[1, 2, 3, 4, 95], [60, 61, 62, 63, 0]], np.int64)
    logits, emb = run(q, {"ids": ids})
    whole = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "table_quantized")).astype(np.float64)
    dq = run(_whole_table(q), {})[0]
    assert np.array_equal(emb, dq.T[ids]) and np.allclose(logits, emb @ dq, rtol=1e-5, atol=1e-5)
    assert whole.shape == dq.shape
    assert np.corrcoef(run(model, {"ids": ids})[0].ravel(), logits.ravel())[0, 1] > 0.99
    # ORT runs the projection on the integers (MatMulNBits; with one scale, the looked-up integers move past their
    # per-tensor DequantizeLinear into MatMulIntegerToFloat), and no DequantizeLinear of the whole table is left.
    optimized = ort_optimized(_write(q, tmp_path / "q.onnx"))
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["MatMulNBits"] + ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == "table_quantized" for n in optimized.graph.node)


def _whole_table(q: onnx.ModelProto) -> onnx.ModelProto:
    """A model that outputs the DequantizeLinear of the stored (transposed) table, as the rewrite wrote it."""
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "table_quantized")
    inits = [t for t in q.graph.initializer if t.name in dq.input]
    graph = helper.make_graph([dq], "whole", [], [helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=list(q.opset_import), ir_version=q.ir_version)


def test_ort_cuda_keeps_block_scales_where_they_fuse_into_matmulnbits():
    """Measured on an H100 (onnxruntime-gpu 1.31): a block-wise DequantizeLinear fails unless it fuses into MatMulNBits."""
    from mixq_onnx.config import Budget, Layout

    result = quantize(onnx.load(str(TINY)), QuantConfig(search=Budget(target_bits=6), target=Target.ORT_CUDA, min_elements=0))
    chosen = {t["name"]: t["chosen"] for t in result.report.to_dict()["tensors"]}
    assert not chosen["tok.weight"]["granularity"].startswith("block") and chosen["tok.weight"]["bits"] == 8
    assert check_model(result.model, Target.ORT_CUDA) == []
    # Uniform 4-bit block32: the MatMuls get it (MatMulNBits), the tables cannot and stay float, saying why.
    config = QuantConfig(search=Uniform(4), target=Target.ORT_CUDA, min_elements=0, layouts=(Layout.parse("block32"),))
    result = quantize(onnx.load(str(TINY)), config)
    skipped = {s["name"]: s["reason"] for s in result.report.to_dict()["skipped"]}
    assert "no block-wise form" in skipped["tok.weight"]
    assert check_model(result.model, Target.ORT_CUDA) == []
    blocked = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    readers = {i: n.op_type for n in result.model.graph.node for i in n.input}
    assert len(blocked) == 13 and all(readers[n.output[0]] in ("MatMul", "Gemm") for n in blocked)  # 12 MatMuls + the Gemm


def test_transformer_matmuls_keep_float_outputs_where_ort_fuses_them_and_get_them_back_where_it_does_not(tmp_path):
    calib = [{"input_ids": np.load(ROOT / "models" / "tiny_transformer_calib.npz")["input_ids"][:64]}]
    config = QuantConfig(search=Uniform(8), target=Target.ORT_CPU, activations=Activations.AUTO, min_elements=0)
    result = quantize(onnx.load(str(TINY)), config, calibration=calib)
    fusion = ort_fusion(_write(result.model, tmp_path / "q.onnx"))
    assert fusion.fused.get("MatMulIntegerToFloat") == 12 and "QLinearMatMul" not in fusion.fused and fusion.findings == ()
    left = [f for f in result.report.activations["float_nodes"] if "MatMulIntegerToFloat" in f["reason"]]
    assert len(left) == 12
    feeds = {"input_ids": TINY_TEST["input_ids"][:200]}
    ref = run(onnx.load(str(TINY)), feeds)[0]
    assert np.mean(run(result.model, feeds)[0].argmax(1) == ref.argmax(1)) >= 0.99
    # The digits CNN's 2-D MatMul + bias becomes a float Gemm in ORT unless its output is quantized: the pipeline asks
    # ORT, sees that, and quantizes that output so it fuses as QLinearMatMul.
    digits = quantize(onnx.load(str(DIGITS)), config, calibration=_calib())
    fused = ort_fusion(_write(digits.model, tmp_path / "d.onnx"))
    assert fused.fused.get("QLinearMatMul") == 1 and fused.findings == ()


def test_check_prints_float_islands_as_warnings_and_keeps_the_exit_code(tmp_path):
    m = _island_model("Flatten")
    m.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p"))
    n = m.graph.node[2]
    n.op_type, n.input[:] = "Pad", ["xd", "p"]
    path = _write(m, tmp_path / "island.onnx")
    res = CliRunner().invoke(main, ["check", str(path), "--target", "ort-cpu"])
    assert res.exit_code == 0, res.output
    assert "warning: " in res.output and "[ort-float-island]" in res.output and "1 node(s) compute in float" in res.output


def test_a_split_between_integer_convs_moves_integers(tmp_path):
    """Split has several outputs; each keeps the input's scale, so ORT splits the integers (no float island)."""
    r = np.random.default_rng(5)

    def conv(name, cin, cout):
        return numpy_helper.from_array(r.normal(0, 0.2, (cout, cin, 3, 3)).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Split", ["r0", "sizes"], ["a", "b"], axis=1),
             helper.make_node("Conv", ["a", "wa"], ["ca"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "wb"], ["cb"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["ca", "cb"], ["y"])]
    inits = [conv("w0", 8, 16), conv("wa", 8, 8), conv("wb", 8, 8), numpy_helper.from_array(np.array([8, 8], np.int64), "sizes")]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calib = [{"x": r.normal(size=(1, 8, 12, 12)).astype(np.float32)} for _ in range(8)]
    config = QuantConfig(search=Uniform(8), target=Target.ORT_CPU, activations=Activations.UINT8, min_elements=0)
    q = quantize(model, config, calibration=calib).model
    optimized = ort_optimized(_write(q, tmp_path / "q.onnx"))
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["QLinearConv"] == 3 and ops["Split"] == 1 and fusion_findings(optimized) == [], ops
    producer = {o: n for n in optimized.graph.node for o in n.output}
    split = next(n for n in optimized.graph.node if n.op_type == "Split")
    assert producer[split.input[0]].op_type == "QLinearConv"  # the Split reads integers
    feeds = {"x": r.normal(size=(1, 8, 12, 12)).astype(np.float32)}
    ref, out = run(model, feeds)[0], run(q, feeds)[0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.99
