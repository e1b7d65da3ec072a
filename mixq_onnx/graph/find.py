"""Find every weight tensor worth quantizing, and say why each other constant is left alone.

A weight is a floating-point constant (initializer or ``Constant`` node, in
the main graph or any If/Loop/Scan body) that feeds a weight input of a
Conv, ConvTranspose, Gemm, MatMul, Gather (embedding), LSTM, GRU or RNN,
directly or through Identity, Cast, Transpose or Reshape.  For each weight we
also work out, in the tensor's own axes, its output-channel axis and its
reduction axis, which decide the per-channel and blockwise layouts.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx

from ..config import Activations, QuantConfig
from .scopes import MAIN, GraphScope, iter_scopes, node_label, resolve
from .io import read_tensor

log = logging.getLogger(__name__)

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
OTHER_FLOAT_TYPES = {onnx.TensorProto.DOUBLE} | {
    getattr(onnx.TensorProto, n)
    for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, n)
}

QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm", "QAttention", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "GatherBlockQuantized", "QLinearAdd", "QLinearMul",
}
PASS_THROUGH = {"Identity", "Cast", "Transpose", "Reshape"}
NORM_OPS = {
    "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "RMSNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "LpNormalization",
}
BIAS_SLOTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "LSTM": 3, "GRU": 3, "RNN": 3}


class Source(enum.Enum):
    INITIALIZER = "initializer"
    CONSTANT = "constant"


@dataclass(frozen=True)
class Use:
    """One consumer of a weight: which node, in which graph, at which input."""

    graph: str
    node: str
    op_type: str
    input_index: int


@dataclass(frozen=True)
class WeightSite:
    """A float constant that feeds weight inputs, with the axes its consumers need."""

    name: str
    graph: str
    source: Source
    # The tensor as stored: data is read on demand (see ``array``), so sites cost no memory for the weights.
    tensor: onnx.TensorProto = field(compare=False, repr=False)
    uses: tuple[Use, ...]
    via: tuple[str, ...]
    channel_axis: int | None
    reduction_axis: int | None
    notes: tuple[str, ...] = ()

    @property
    def array(self) -> np.ndarray:
        """The weight's values, read afresh from the model (or its data file) at each call: callers drop it when done."""
        return read_tensor(self.tensor)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type))

    @property
    def dtype(self) -> str:
        return str(self.np_dtype)

    @property
    def names(self) -> tuple[str, ...]:
        """The tensor's name and its consumers' node names, for --keep-float/--force-bits."""
        return (self.name,) + tuple(u.node for u in self.uses)

    @property
    def op_types(self) -> str:
        return "+".join(sorted({u.op_type for u in self.uses}))


@dataclass(frozen=True)
class Skipped:
    """A float constant left as it is, and why."""

    name: str
    graph: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    reason: str


@dataclass(frozen=True)
class Inventory:
    """What ``find_weights`` saw in a model."""

    weights: tuple[WeightSite, ...]
    skipped: tuple[Skipped, ...]
    quant_ops: dict[str, int]


def slot_axes(node: onnx.NodeProto, index: int, rank: int) -> tuple[int | None, int | None] | None:
    """(channel axis, reduction axis) of a weight input, or None if it is not a weight input."""
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Conv" and index == 1 and rank >= 3:
        return 0, 1
    if op == "ConvTranspose" and index == 1 and rank >= 3:
        return 1, 0
    if op == "Gemm" and index in (0, 1) and rank == 2:
        trans = attrs.get("transA" if index == 0 else "transB", 0)
        # A is [M, K] (or [K, M]); B is [K, N] (or [N, K]). The channel is the output side.
        if index == 0:
            return (1, 0) if trans else (0, 1)
        return (0, 1) if trans else (1, 0)
    if op == "MatMul" and index in (0, 1):
        if rank < 2:
            return None, 0
        return (rank - 1, rank - 2) if index == 1 else (rank - 2, rank - 1)
    if op == "Gather" and index == 0 and attrs.get("axis", 0) == 0:
        return 0, (1 if rank >= 2 else None)
    if op in ("LSTM", "GRU", "RNN") and index in (1, 2) and rank == 3:
        return 1, 2
    return None


def _not_a_weight_reason(op: str, index: int, node: str) -> str:
    where = f"input {index} of {op} '{node}'"
    if BIAS_SLOTS.get(op) == index:
        return f"bias ({where}); biases stay float"
    if op in NORM_OPS:
        return f"normalisation parameter ({where})"
    if op in QUANT_OPS:
        return f"already quantized: {where}"
    if op == "Gather" and index == 0:
        return f"Gather on an axis other than 0 is not an embedding lookup ({where})"
    return f"not a weight input: {where}"


def _reshape_target(shape_in: tuple[int, ...], target: np.ndarray, allowzero: int) -> tuple[int, ...] | None:
    out = [int(d) for d in target.tolist()]
    for i, d in enumerate(out):
        if d == 0 and not allowzero:
            if i >= len(shape_in):
                return None
            out[i] = shape_in[i]
    if out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1]))
        if known == 0:
            return None
        out[out.index(-1)] = int(np.prod(shape_in)) // known
    if int(np.prod(out)) != int(np.prod(shape_in)):
        return None
    return tuple(out)


def _reshape_axis(shape_in: tuple[int, ...], shape_out: tuple[int, ...], axis: int | None) -> int | None:
    """The input axis that an output axis of a Reshape is laid over, if the same row-major run."""
    if axis is None:
        return None
    before = int(np.prod(shape_out[:axis]))
    for a in range(len(shape_in)):
        if int(np.prod(shape_in[:a])) == before and shape_in[a] == shape_out[axis]:
            return a
    return None


class _Finder:
    def __init__(self, model: onnx.ModelProto, config: QuantConfig) -> None:
        self.config = config
        self.scopes = list(iter_scopes(model.graph))
        # (defining graph path, tensor name) -> consumers anywhere below it.
        self.uses: dict[tuple[str, str], list[tuple[GraphScope, onnx.NodeProto, int, int]]] = defaultdict(list)
        self.graph_outputs: set[tuple[str, str]] = set()
        self.quant_ops: Counter[str] = Counter()
        for scope in self.scopes:
            for idx, node in enumerate(scope.graph.node):
                if node.op_type in QUANT_OPS:
                    self.quant_ops[node.op_type] += 1
                for j, name in enumerate(node.input):
                    if not name:
                        continue
                    d = resolve(scope, name)
                    if d is not None:
                        self.uses[(d.path, name)].append((scope, node, j, idx))
            for out in scope.graph.output:
                d = resolve(scope, out.name)
                if d is not None:
                    self.graph_outputs.add((d.path, out.name))

    def constant_value(self, scope: GraphScope, name: str) -> np.ndarray | None:
        """The value of a constant tensor visible from ``scope`` (for Reshape shapes)."""
        d = resolve(scope, name)
        if d is None:
            return None
        for init in d.graph.initializer:
            if init.name == name:
                return read_tensor(init)
        for n in d.graph.node:
            if n.op_type == "Constant" and n.output[0] == name:
                for a in n.attribute:
                    if a.name == "value":
                        return read_tensor(a.t)
        return None

    def trace(
        self, scope_path: str, name: str, shape: tuple[int, ...], to_root: dict[int, int | None] | None, via: tuple[str, ...]
    ) -> tuple[list[tuple[Use, int | None, int | None]], str | None, tuple[str, ...]]:
        """Follow ``name`` to its weight consumers.

        ``to_root`` maps this tensor's axes to the original weight's axes.
        Returns the weight uses with their axes in the original frame, or a
        reason why the tensor cannot be treated as a weight.
        """
        if (scope_path, name) in self.graph_outputs:
            return [], f"is a graph output of {scope_path}", via
        found: list[tuple[Use, int | None, int | None]] = []
        users = self.uses.get((scope_path, name), [])
        if not users:
            return [], "has no consumers", via
        for scope, node, j, idx in users:
            label = node_label(node, idx)
            if node.op_type in PASS_THROUGH and j == 0:
                out_shape, mapping, reason = self._pass_through(scope, node, shape)
                if reason:
                    return [], f"reaches its consumer through {node.op_type} '{label}': {reason}", via
                composed = {a: (to_root[m] if (m is not None and to_root is not None) else m) for a, m in mapping.items()}
                sub, why, via2 = self.trace(scope.path, node.output[0], out_shape, composed, via + (node.op_type,))
                if why:
                    return [], why, via2
                found.extend(sub)
                via = via2
                continue
            axes = slot_axes(node, j, len(shape))
            if axes is None:
                return [], _not_a_weight_reason(node.op_type, j, label), via
            root = to_root if to_root is not None else {a: a for a in range(len(shape))}
            ch = root.get(axes[0]) if axes[0] is not None else None
            red = root.get(axes[1]) if axes[1] is not None else None
            found.append((Use(scope.path, label, node.op_type, j), ch, red))
        return found, None, via

    def _pass_through(
        self, scope: GraphScope, node: onnx.NodeProto, shape: tuple[int, ...]
    ) -> tuple[tuple[int, ...], dict[int, int | None], str | None]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ident = {a: a for a in range(len(shape))}
        if node.op_type == "Identity":
            return shape, ident, None
        if node.op_type == "Cast":
            if attrs.get("to") not in FLOAT_TYPES | {onnx.TensorProto.DOUBLE}:
                return shape, {}, "it is cast to a non-float type"
            return shape, ident, None
        if node.op_type == "Transpose":
            perm = list(attrs.get("perm", list(reversed(range(len(shape))))))
            return tuple(shape[p] for p in perm), {a: perm[a] for a in range(len(shape))}, None
        target = self.constant_value(scope, node.input[1]) if len(node.input) > 1 else None
        if target is None:
            return shape, {}, "its target shape is not a constant"
        out = _reshape_target(shape, target, attrs.get("allowzero", 0))
        if out is None:
            return shape, {}, "its target shape could not be worked out"
        return out, {a: _reshape_axis(shape, out, a) for a in range(len(out))}, None

    def run(self) -> Inventory:
        weights: list[WeightSite] = []
        skipped: list[Skipped] = []
        for scope in self.scopes:
            graph_inputs = {i.name for i in scope.graph.input}
            candidates: list[tuple[str, Source, onnx.TensorProto]] = [
                (t.name, Source.INITIALIZER, t) for t in scope.graph.initializer
            ]
            for n in scope.graph.node:
                if n.op_type == "Constant":
                    value = [a for a in n.attribute if a.name == "value"]
                    if value:
                        candidates.append((n.output[0], Source.CONSTANT, value[0].t))
            for name, source, tensor in candidates:
                site = self._classify(scope, name, source, tensor, name in graph_inputs)
                (weights if isinstance(site, WeightSite) else skipped).append(site)
            for sp in scope.graph.sparse_initializer:
                dims = tuple(int(d) for d in sp.dims)
                dtype = onnx.helper.tensor_dtype_to_string(sp.values.data_type).replace("TensorProto.", "").lower()
                skipped.append(Skipped(sp.values.name, scope.path, dims, dtype, int(np.prod(dims)) if dims else 1,
                                       "sparse initializer: kept as it is (its zeros already cost nothing)"))
        log.info("found %d weight tensors, left %d constants alone", len(weights), len(skipped))
        return Inventory(tuple(weights), tuple(skipped), dict(sorted(self.quant_ops.items())))

    def _classify(
        self, scope: GraphScope, name: str, source: Source, tensor: onnx.TensorProto, is_input: bool
    ) -> WeightSite | Skipped:
        shape = tuple(int(d) for d in tensor.dims)
        params = int(np.prod(shape)) if shape else 1
        dtype_name = onnx.helper.tensor_dtype_to_string(tensor.data_type).replace("TensorProto.", "").lower()

        def skip(reason: str) -> Skipped:
            return Skipped(name, scope.path, shape, dtype_name, params, reason)

        if tensor.data_type not in FLOAT_TYPES | OTHER_FLOAT_TYPES:
            return skip("integer or non-float tensor")
        uses, why, via = self.trace(scope.path, name, shape, None, ())
        if why:
            return skip(why)
        if tensor.data_type in OTHER_FLOAT_TYPES:
            return skip(f"unsupported dtype {dtype_name} for a weight; only float32, float16 and bfloat16 are quantized")
        if is_input:
            return skip("initializer is also a graph input, so it can be overridden at run time")
        if not shape:
            return skip("scalar: nothing to gain from quantizing one value")
        if params == 0:
            return skip("zero-size tensor: nothing to quantize")
        pattern = self.config.kept_float((name,) + tuple(u.node for u, _, _ in uses))
        if pattern is not None:
            return skip(f"matches --keep-float {pattern!r}")
        # With activation quantization an integer kernel needs its weight quantized, however small.
        integer = self.config.activations is not Activations.NONE and scope.path == MAIN and all(
            u.op_type in ("Conv", "MatMul", "Gemm") for u, _, _ in uses)
        if (params < self.config.min_elements and not integer
                and self.config.forced_bits((name,) + tuple(u.node for u, _, _ in uses)) is None):
            return skip(f"{params} elements is below --min-elements {self.config.min_elements}")
        channels = {c for _, c, _ in uses}
        reductions = {r for _, _, r in uses}
        notes: list[str] = []
        ch = channels.pop() if len(channels) == 1 else None
        red = reductions.pop() if len(reductions) == 1 else None
        if len(uses) > 1 and (ch is None or red is None):
            notes.append("consumers disagree on the channel or reduction axis; using layouts all of them accept")
        if any(c is None for _, c, _ in uses) and via and "Reshape" in via:
            notes.append("a Reshape hides the channel axis; only per-tensor scales are possible")
        array = read_tensor(tensor)
        finite = np.isfinite(array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array)
        del array
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            log.warning("weight '%s' has %d NaN or infinite values; it stays float", name, bad)
            return skip(f"{bad} NaN or infinite values: a quantization range cannot hold them, so it stays float")
        return WeightSite(
            name, scope.path, source, tensor, tuple(u for u, _, _ in uses), tuple(dict.fromkeys(via)), ch, red, tuple(notes)
        )


def find_weights(model: onnx.ModelProto, config: QuantConfig) -> Inventory:
    """Inventory of the weights to quantize and of every float constant left alone."""
    return _Finder(model, config).run()


def gather_index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For graph inputs used as Gather indices into a constant table: the table's row count.

    Random verification inputs for token ids must stay inside the embedding table.
    """
    inputs = {i.name for i in model.graph.input}
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = tuple(n.attribute[0].t.dims)
    bounds: dict[str, int] = {}
    for scope in iter_scopes(model.graph):
        for n in scope.graph.node:
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in inputs and n.input[0] in consts:
                rows = consts[n.input[0]][0] if consts[n.input[0]] else 1
                bounds[n.input[1]] = min(bounds.get(n.input[1], rows), rows)
    return bounds


def token_input(model: onnx.ModelProto) -> tuple[str, int] | None:
    """A language model's token ids: the one graph input that indexes an embedding table, with the table's rows
    (its vocabulary); None when no input, or more than one, does."""
    bounds = gather_index_bounds(model)
    return next(iter(bounds.items())) if len(bounds) == 1 else None
