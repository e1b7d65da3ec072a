"""Shared test helpers: build small models in code, run them in ONNX Runtime, compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from mixq_onnx import QuantConfig, Uniform, quantize
from mixq_onnx.graph.io import ort_model

LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def make_model(nodes, inputs, outputs, inits=(), opset: int = 13, ir: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name: str, shape, elem=onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, exact_nbits: bool = True):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if exact_nbits:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    with ort_model(model) as src:  # weights left on disk by load_model reach ORT as a file
        sess = ort.InferenceSession(src if isinstance(src, bytes) else str(src), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    noise = np.sum((np.asarray(out, np.float64) - ref) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def quantize_and_compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], config: QuantConfig | None = None):
    """Quantize, check, run at both optimisation levels; return (result, worst SQNR in dB)."""
    config = config or QuantConfig(search=Uniform(8), min_elements=0)
    before = model.SerializeToString()
    result = quantize(model, config)
    assert model.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(result.model, full_check=True)
    ref = run(model, feeds)
    worst = float("inf")
    for level in LEVELS:
        outs = run(result.model, feeds, level)
        for r, o in zip(ref, outs):
            assert r.shape == o.shape and r.dtype == o.dtype
            worst = min(worst, sqnr_db(r, o))
    return result, worst


def count_ops(model: onnx.ModelProto, op: str) -> int:
    from mixq_onnx.graph.scopes import iter_scopes

    return sum(1 for s in iter_scopes(model.graph) for n in s.graph.node if n.op_type == op)
