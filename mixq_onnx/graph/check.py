"""``mixq-onnx check``: validate a QDQ model against a target's rules, statically (graph layer).

Every QuantizeLinear and DequantizeLinear in the main graph is read with its
dtype, zero point, scale, axis and block size, and with the ops that read its
output; each broken rule becomes a :class:`Violation` naming the node.
Which weight options a target allows is decided by the same table the
search obeys (:meth:`mixq_onnx.targets.TargetRules.option_problem`, rule
``target-rule``): each weight DequantizeLinear is read back as an option
(width, granularity, axis) and judged by it. The rules here are those a
written graph can break beyond its options: dtypes, zero points, opsets,
block placement for MatMulNBits, fusion patterns (see docs/targets.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..kinds import Granularity, Target
from ..numerics.qdq import QTYPES
from ..targets import rules_for
from .io import read_tensor
from .scopes import default_opset, node_label

# ONNX Runtime 1.32 has no DequantizeLinear kernel for opset 28 or for FLOAT4E2M1 (shared/runtime-facts.md).
ORT_MAX_DQ_OPSET = 27
TRT_TYPES = {"INT8", "INT4", "FLOAT8E4M3FN"}
# The quantization dtypes come from the one table (numerics.qdq.QTYPES), by their ONNX names.
SUB_BYTE = {q.name.upper() for q in QTYPES.values() if q.bits < 8}
# The width a weight container stands for when it is read back as an option (activation-only 16-bit types excluded).
CONTAINER_BITS = {q.name.upper(): q.bits for q in QTYPES.values() if q.bits <= 8}


@dataclass(frozen=True)
class _Use:
    op_type: str


@dataclass(frozen=True)
class _WrittenWeight:
    """A weight DequantizeLinear read back as the facts the target rules judge (see targets.WeightFacts)."""

    uses: tuple[_Use, ...]
    shape: tuple[int, ...]
    channel_axis: int | None
    via: tuple[str, ...] = ()


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message} [{self.rule}]"


@dataclass(frozen=True)
class _QNode:
    """One Q or DQ node as the rules see it."""

    node: onnx.NodeProto
    label: str
    dtype: str  # the integer type's name, e.g. INT8
    zero_point: np.ndarray | None
    scale: np.ndarray | None  # None when not a constant
    axis: int | None  # set when the scale has more than one element
    block_size: int
    data_is_const: bool
    shape: tuple[int, ...]  # of the data input when it is a constant
    readers: list[tuple[onnx.NodeProto, int]]


def _consts(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = n.attribute[0].t
    return out


def _malformed(n: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> str:
    """Why a QuantizeLinear/DequantizeLinear node cannot be read, or ''."""
    if len(n.input) < 2 or not n.input[0] or not n.input[1]:
        return f"{n.op_type} needs an input and a scale; it has inputs {list(n.input)}"
    if len(n.output) < 1 or not n.output[0]:
        return f"{n.op_type} has no output"
    for role, name in (("scale", n.input[1]), ("zero point", n.input[2] if len(n.input) > 2 else "")):
        t = consts.get(name) if name else None
        if t is not None and t.data_type not in helper.get_all_tensor_dtypes():
            return f"its {role} '{name}' has unknown data type {t.data_type}"
    return ""


def _qnodes(model: onnx.ModelProto, malformed: list[Violation] | None = None) -> list[_QNode]:
    g = model.graph
    consts = _consts(g)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n, k))
    out = []
    for idx, n in enumerate(g.node):
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        problem = _malformed(n, consts)
        if problem:
            if malformed is not None:
                malformed.append(Violation(node_label(n, idx), "malformed", problem))
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        zp_t = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        sc_t = consts.get(n.input[1])
        if n.op_type == "DequantizeLinear":
            data = consts.get(n.input[0])
            dtype_id = data.data_type if data is not None else (zp_t.data_type if zp_t is not None else onnx.TensorProto.UINT8)
        else:
            dtype_id = zp_t.data_type if zp_t is not None else attrs.get("output_dtype") or onnx.TensorProto.UINT8
        scale = read_tensor(sc_t).astype(np.float64) if sc_t is not None else None
        out.append(_QNode(
            n, node_label(n, idx), onnx.TensorProto.DataType.Name(dtype_id),
            read_tensor(zp_t).astype(np.int64) if zp_t is not None else None,
            scale, int(attrs.get("axis", 1)) if scale is not None and scale.size > 1 else None,
            int(attrs.get("block_size", 0)), n.input[0] in consts,
            tuple(consts[n.input[0]].dims) if n.input[0] in consts else (), readers.get(n.output[0], []),
        ))
    return out


def _weight_axis(reader: onnx.NodeProto, slot: int, rank: int) -> int | None:
    """The output-channel axis of a weight input, as TensorRT wants per-channel scales on it."""
    attrs = {a.name: helper.get_attribute_value(a) for a in reader.attribute}
    if reader.op_type == "Conv" and slot == 1:
        return 0
    if reader.op_type == "MatMul" and slot == 1:
        return rank - 1
    if reader.op_type == "Gemm" and slot == 1:
        return 0 if attrs.get("transB", 0) else 1
    return None


def check_model(model: onnx.ModelProto, target: Target) -> list[Violation]:
    """Every way ``model`` breaks ``target``'s rules; empty when it follows them."""
    found: list[Violation] = []
    opset = default_opset(model)
    qnodes = _qnodes(model, found)
    produced_by_dq = {q.node.output[0] for q in qnodes if q.node.op_type == "DequantizeLinear" and not q.data_is_const}
    activation_q = [q for q in qnodes if q.node.op_type == "QuantizeLinear"]

    def bad(q: _QNode, rule: str, message: str) -> None:
        found.append(Violation(q.label, rule, message))

    rules = rules_for(target)
    for q in qnodes:
        problem = _option_problem(q, rules, bool(activation_q))
        if problem:
            bad(q, "target-rule", problem)
        if q.scale is not None and (not np.all(np.isfinite(q.scale)) or np.any(q.scale <= 0)):
            bad(q, "positive-scale", "scales must be finite and greater than 0")
        if q.scale is None and target is Target.TENSORRT:
            bad(q, "constant-scale", "TensorRT needs constant scales")
        if target is not Target.TENSORRT:
            if q.node.op_type == "DequantizeLinear" and opset > ORT_MAX_DQ_OPSET:
                bad(q, "dq-opset", f"ONNX Runtime has no DequantizeLinear kernel at opset {opset}; use opset 27 or lower")
            if q.dtype.startswith("FLOAT4"):
                bad(q, "dq-dtype", f"ONNX Runtime has no DequantizeLinear kernel for {q.dtype}")
        if target is Target.TENSORRT:
            _tensorrt(q, bad)
        elif target is Target.ORT_CUDA:
            if q.node.op_type == "QuantizeLinear":
                bad(q, "cuda-activations", "the CUDA EP runs activation Q/DQ unfused (no integer Conv/MatMul kernels); quantize weights only")
            elif q.dtype in ("INT2", "UINT2"):
                bad(q, "cuda-int2", "INT2 weights have no CUDA kernel")
        elif target is Target.ORT_CPU:
            _ort_cpu(q, produced_by_dq, bool(activation_q), bad)
    if target is Target.ORT_CPU and activation_q:
        weight_dq = {q.node.output[0] for q in qnodes if q.node.op_type == "DequantizeLinear" and q.data_is_const}
        _ort_cpu_unfused(model, produced_by_dq, weight_dq, found)
    return found


def _option_problem(q: _QNode, rules, activations: bool) -> str:
    """What the target's rules table says of a weight DequantizeLinear, read back as an option ('' if allowed)."""
    bits = CONTAINER_BITS.get(q.dtype)
    if q.node.op_type != "DequantizeLinear" or not q.data_is_const or not q.readers or bits is None:
        return ""
    rank = len(q.shape)
    axis = q.axis % rank if q.axis is not None and rank else 0
    granularity = Granularity.BLOCK if q.block_size else Granularity.CHANNEL if q.axis is not None else Granularity.TENSOR
    r, slot = q.readers[0]
    facts = _WrittenWeight(tuple(_Use(x.op_type) for x, _ in q.readers), q.shape, _weight_axis(r, slot, rank))
    return rules.option_problem(facts, bits, granularity, axis, activations)


def _tensorrt(q: _QNode, bad) -> None:
    if q.dtype not in TRT_TYPES:
        bad(q, "trt-dtype", f"{q.dtype} Q/DQ is rejected by TensorRT; use INT8 (or INT4 weight-only)")
    if q.zero_point is not None and np.any(q.zero_point != 0):
        bad(q, "trt-symmetric", "TensorRT quantization is symmetric: zero points must be 0")
    if q.axis is not None and not q.data_is_const:
        bad(q, "trt-per-channel-activation", "per-channel scales apply to weights only")


def _ort_cpu(q: _QNode, produced_by_dq: set[str], has_activations: bool, bad) -> None:
    if q.node.op_type != "DequantizeLinear" or not q.data_is_const:
        return
    for r, slot in q.readers:
        # 2-bit tables are refused by the rules table (target-rule); a 4-bit one is allowed there only because the
        # rewrite looks up its packed rows, so a 4-bit DequantizeLinear feeding Gather is a graph we would not write.
        if r.op_type == "Gather" and q.dtype in ("INT4", "UINT4"):
            bad(q, "ort-gather-sub-byte", f"a {q.dtype} table is dequantized whole on every run (Gather takes no 4-bit tensors); "
                                          "look up packed rows (as mixq-onnx writes them) or use 8 bits")
        if r.op_type == "MatMul" and q.dtype in SUB_BYTE and q.block_size and q.axis == len(q.shape) - 1:
            bad(q, "ort-nbits-axis", "blocks along N are not fused into MatMulNBits; block along K (axis 0 of [K,N])")
        if r.op_type in ("MatMul", "Gemm") and q.block_size and not 16 <= q.block_size <= 256:
            bad(q, "ort-nbits-block", f"block size {q.block_size} is outside MatMulNBits' 16..256")
        if has_activations and r.op_type == "Conv" and slot == 1 and any(i in produced_by_dq for i in r.input[:1]):
            if q.dtype != "INT8":
                bad(q, "ort-qlinearconv-weight",
                    f"{q.dtype} Conv weights with quantized activations run slowly or unfused; use INT8 symmetric")


def _ort_cpu_unfused(model: onnx.ModelProto, produced_by_dq: set[str], weight_dq: set[str], found: list[Violation]) -> None:
    """A Conv whose inputs are all dequantized must end in a QuantizeLinear (through Relu/Clip) to fuse."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for idx, n in enumerate(model.graph.node):
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[0] not in produced_by_dq or n.input[1] not in weight_dq:
            continue
        out = n.output[0]
        while len(readers.get(out, [])) == 1 and readers[out][0].op_type in ("Relu", "Clip"):
            out = readers[out][0].output[0]
        if not readers.get(out) or any(r.op_type != "QuantizeLinear" for r in readers[out]):
            found.append(Violation(node_label(n, idx), "ort-qlinearconv-output",
                                   "quantized Conv without a QuantizeLinear after it does not fuse into QLinearConv"))


# Ops that ONNX Runtime's QDQ handling runs on integers on the CPU (QLinear kernels or Q/DQ dropped around data
# movement), so a DequantizeLinear -> op -> QuantizeLinear left around one of them in ORT's optimised graph is a
# float island that costs two conversions per run. Measured on ORT 1.32 (tests/test_fusion.py re-measures them).
INTEGER_PATH_OPS = frozenset({
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "MaxPool", "Reshape", "Flatten",
    "Transpose", "Squeeze", "Unsqueeze", "Slice", "Expand", "Tile", "DepthToSpace", "Gather", "Resize", "Pad", "Sigmoid",
    "Softmax", "LeakyRelu", "Split",
})
# Ops whose presence in ORT's optimised graph means that a QDQ group was fused into an integer kernel.
FUSED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
                       "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearSoftmax", "QLinearLeakyRelu", "MatMulNBits",
                       "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "GatherBlockQuantized"})


def fusion_findings(optimized: onnx.ModelProto) -> list[Violation]:
    """Where ONNX Runtime's optimised graph of a QDQ model still computes in float between integer ops.

    ``optimized`` is the graph ORT wrote after its QDQ fusions (see
    :func:`mixq_onnx.runtime.fusion.ort_optimized`). Two patterns are reported: a
    DequantizeLinear -> op -> QuantizeLinear round trip around an op that has an
    integer path (a float island), and a Conv, MatMul or Gemm whose activation
    input is still dequantized (it did not become an integer kernel).
    """
    g = optimized.graph
    consts = set(_consts(g))
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def from_activation_dq(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear" and p.input[0] not in consts

    found = []
    for idx, n in enumerate(g.node):
        if n.op_type not in INTEGER_PATH_OPS:
            continue
        label = node_label(n, idx)
        dq_in = [i for i in n.input if i and from_activation_dq(i)]
        if not dq_in:
            continue
        if n.op_type in ("Add", "Mul", "Concat") and not all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                                             for i in n.input if i):
            continue  # a float operand (e.g. a bias) gives the op no integer kernel in ORT: not an island we could remove
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            found.append(Violation(label, "ort-unfused", f"{n.op_type} reads dequantized activations but ONNX Runtime did not fuse "
                                   "it into an integer kernel (check the activation type and the weight's type and scheme)"))
        elif any(r.op_type == "QuantizeLinear" for o in n.output for r in readers.get(o, [])):
            found.append(Violation(label, "ort-float-island", f"DequantizeLinear -> {n.op_type} -> QuantizeLinear stays in float in "
                                   "ONNX Runtime's optimised graph (two conversions per run)"))
    return found


__all__ = ["FUSED_OPS", "INTEGER_PATH_OPS", "Violation", "check_model", "fusion_findings"]

