"""Rewrite the graph: each chosen weight becomes integers + scale (+ zero point) behind a DequantizeLinear.

The DequantizeLinear output takes the weight's original name, so no
consumer, subgraph reference or value_info entry needs to change; only the
float constant itself is replaced.  Everything else in the model (inputs,
outputs, names, metadata, producer fields, doc strings) is kept as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from .find import Source, WeightSite
from .scopes import MAIN, Namer, all_names, default_opset, iter_scopes, node_label, reads
from .io import Spill, light_copy, read_tensor
from ..numerics.qdq import Grid, QuantizedTensor

log = logging.getLogger(__name__)

# INT2/UINT2 tensors need IR version 13 (runtime facts; onnx.checker enforces it).
INT2_IR_VERSION = 13


@dataclass(frozen=True)
class OpsetChange:
    """Outcome of raising the default-domain opset."""

    model: onnx.ModelProto | None
    original: int
    target: int
    note: str


def raise_opset(model: onnx.ModelProto, target: int) -> OpsetChange:
    """Convert to ``target`` with onnx.version_converter; report instead of raising on failure."""
    original = default_opset(model)
    if original >= target:
        return OpsetChange(model, original, original, "")
    stripped, payloads = _strip_payloads(model)
    try:
        converted = version_converter.convert_version(stripped, target)
        converted.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(converted.opset_import), True))
        _restore_payloads(converted, payloads)
    except Exception as exc:  # the converter raises many unrelated types
        note = f"could not convert opset {original} to {target} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        log.warning(note)
        return OpsetChange(None, original, original, note)
    # The converter drops these; they are the user's and must survive.
    converted.producer_name, converted.producer_version = model.producer_name, model.producer_version
    converted.domain, converted.model_version, converted.doc_string = model.domain, model.model_version, model.doc_string
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    _infer_value_info(converted)
    return OpsetChange(converted, original, target, f"opset raised from {original} to {target}")


_STRIP_BYTES = 4096

# Shape and type survive; the bytes are a marker the converter passes through.
_PLACEHOLDER = b"mixq-placeholder"


def _strip_payloads(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[tuple[str, str], onnx.TensorProto]]:
    """A copy whose large initializers point at a placeholder instead of holding data, and the originals by scope.

    The version converter round-trips the whole model through C++ and only
    needs the graph, so this saves copying every weight twice.
    """
    light = light_copy(model, _STRIP_BYTES, _PLACEHOLDER)
    stripped = {(scope.path, t.name) for scope in iter_scopes(light.graph) for t in scope.graph.initializer
                if t.raw_data == _PLACEHOLDER}
    payloads = {(scope.path, t.name): t for scope in iter_scopes(model.graph) for t in scope.graph.initializer
                if (scope.path, t.name) in stripped}
    return light, payloads


def _restore_payloads(model: onnx.ModelProto, payloads: dict[tuple[str, str], onnx.TensorProto]) -> None:
    restored = 0
    for scope in iter_scopes(model.graph):
        for t in scope.graph.initializer:
            original = payloads.get((scope.path, t.name))
            if original is not None and t.raw_data == _PLACEHOLDER:
                t.CopyFrom(original)
                restored += 1
    if restored != len(payloads):
        raise RuntimeError(f"the converter changed {len(payloads) - restored} initializers it should have kept")


def _infer_value_info(model: onnx.ModelProto) -> None:
    """Replace every graph's value_info with shapes inferred afresh at the new opset.

    Entries carried over from the old opset can contradict what the new
    opset infers (a Reshape output's rank, say), which the full checker
    rejects; value_info is only a hint, so inference is the authority and
    an inference failure just leaves it empty.
    """
    stripped, _ = _strip_payloads(model)
    for scope in iter_scopes(stripped.graph):
        del scope.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped, check_type=False, strict_mode=False)
    except Exception as exc:  # inference raises several types; the model is still valid without hints
        log.info("shape inference after the opset change failed (%s); value_info left empty", str(exc).splitlines()[0][:160])
        inferred = stripped
    fresh = {s.path: list(s.graph.value_info) for s in iter_scopes(inferred.graph)}
    for scope in iter_scopes(model.graph):
        del scope.graph.value_info[:]
        scope.graph.value_info.extend(fresh.get(scope.path, []))


def _stored(site: WeightSite, qt: QuantizedTensor, namer: Namer, zero_point_ops: frozenset[str]
            ) -> list[tuple[str, np.ndarray]]:
    """(name, array) of what a weight is stored as: its integers, scale and, where there is one, zero point.

    A symmetric weight read by an op in ``zero_point_ops`` gets an explicit
    all-zero zero point: ONNX Runtime fuses DQ->Gemm into QGemm only then.
    """
    base = site.name
    out = [(namer(f"{base}_quantized"), qt.values), (namer(f"{base}_scale"), qt.scale)]
    zp = qt.zero_point
    if zp is None and any(u.op_type in zero_point_ops for u in site.uses):
        zp = np.zeros(qt.scale.shape, qt.qtype.dtype)
    if zp is not None:
        out.append((namer(f"{base}_zero_point"), zp))
    return out


def _nodes_for(
    site: WeightSite, qt: QuantizedTensor, namer: Namer, zero_point_ops: frozenset[str] = frozenset()
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Tensors and nodes that recompute weight ``site`` under its original name (see :func:`_stored`)."""
    base = site.name
    tensors = [numpy_helper.from_array(a, name) for name, a in _stored(site, qt, namer, zero_point_ops)]
    attrs: dict[str, int] = {}
    if qt.layout.granularity.value != "tensor":
        attrs["axis"] = qt.axis
    if qt.block_size:
        attrs["block_size"] = qt.block_size
    needs_cast = site.np_dtype != qt.scale.dtype
    dq_out = namer(f"{base}_dequantized") if needs_cast else base
    nodes = [helper.make_node("DequantizeLinear", [t.name for t in tensors], [dq_out], name=namer(f"{base}_DequantizeLinear"), **attrs)]
    if needs_cast:
        to = helper.np_dtype_to_tensor_dtype(site.np_dtype)
        nodes.append(helper.make_node("Cast", [dq_out], [base], name=namer(f"{base}_Cast"), to=to))
    return tensors, nodes


def _gather_readers(graph: onnx.GraphProto, name: str, outer_refs: set[str]) -> list[tuple[int, onnx.NodeProto]]:
    """The Gather (axis 0) nodes that read table ``name``, with their positions, or [] when anything else reads it too."""
    readers = [(i, n) for i, n in enumerate(graph.node) if name in n.input]
    ok = readers and name not in outer_refs and name not in {o.name for o in graph.output} and all(
        n.op_type == "Gather" and n.input[0] == name and name not in n.input[1:]
        and all(a.name != "axis" or helper.get_attribute_value(a) == 0 for a in n.attribute) for _, n in readers)
    return readers if ok else []


def gathers_rows(site: WeightSite, grid: Grid) -> bool:
    """Whether an embedding table's layout lets each looked-up row be dequantized alone.

    Rows can be gathered with their own scales when the scales are per tensor,
    per row, or in blocks along the row. 8-bit tables are gathered as they
    are; 4-bit tables as packed bytes (see :func:`packed_rows`). 2-bit tables
    keep the whole-table DequantizeLinear.
    """
    g = grid
    return len(site.shape) == 2 and g.qtype.bits in (4, 8) and (
        g.layout.granularity.value == "tensor" or (g.axis == 0 and not g.layout.block_size) or (g.axis == 1 and g.layout.block_size > 0))


def packed_rows(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """A 4-bit table as UINT8 bytes [rows, ceil(width / 2)] (first value in the low nibble) and its UINT8 zero point.

    ONNX Gather takes no 4-bit tensors, so the nibbles are stored in a plain
    byte table and unpacked after the lookup with standard bit shifts. Signed
    values are stored offset by 8 with a zero point of 8, so that
    ``(u - zp) * s`` equals ``(q - zp) * s`` of the INT4 tensor exactly.
    """
    q = qt.values.astype(np.int16)
    if qt.qtype.signed:
        u = q + 8
        zp = np.full(qt.scale.shape, 8, np.uint8)
    else:
        u = q
        zp = qt.zero_point.astype(np.int16).astype(np.uint8) if qt.zero_point is not None else np.zeros(qt.scale.shape, np.uint8)
    u = u.astype(np.uint8)
    if u.shape[1] % 2:
        u = np.pad(u, ((0, 0), (0, 1)))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8), zp


def _unpack_nibbles(packed: str, width: int, base: str, namer: Namer) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """Nodes that turn looked-up packed rows [n, ceil(width / 2)] into one UINT8 value per element [n, width]."""
    four = numpy_helper.from_array(np.array(4, np.uint8), namer(f"{base}_four"))
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), namer(f"{base}_pairs"))
    hi, shifted, lo = namer(f"{base}_high"), namer(f"{base}_shifted"), namer(f"{base}_low")
    lo3, hi3, both, flat = namer(f"{base}_low3"), namer(f"{base}_high3"), namer(f"{base}_nibbles"), namer(f"{base}_unpacked")
    axes = numpy_helper.from_array(np.array([2], np.int64), namer(f"{base}_last"))
    nodes = [helper.make_node("BitShift", [packed, four.name], [hi], name=namer(f"{base}_BitShift_high"), direction="RIGHT"),
             helper.make_node("BitShift", [packed, four.name], [shifted], name=namer(f"{base}_BitShift_up"), direction="LEFT"),
             helper.make_node("BitShift", [shifted, four.name], [lo], name=namer(f"{base}_BitShift_low"), direction="RIGHT"),
             helper.make_node("Unsqueeze", [lo, axes.name], [lo3], name=namer(f"{base}_Unsqueeze_low")),
             helper.make_node("Unsqueeze", [hi, axes.name], [hi3], name=namer(f"{base}_Unsqueeze_high")),
             helper.make_node("Concat", [lo3, hi3], [both], name=namer(f"{base}_Concat_nibbles"), axis=2),
             helper.make_node("Reshape", [both, shape.name], [flat], name=namer(f"{base}_Reshape_nibbles"))]
    consts = [four, shape, axes]
    if width % 2:
        starts = numpy_helper.from_array(np.array([0], np.int64), namer(f"{base}_start"))
        ends = numpy_helper.from_array(np.array([width], np.int64), namer(f"{base}_end"))
        one = numpy_helper.from_array(np.array([1], np.int64), namer(f"{base}_axis1"))
        cut = namer(f"{base}_unpacked_width")
        nodes.append(helper.make_node("Slice", [flat, starts.name, ends.name, one.name], [cut], name=namer(f"{base}_Slice_width")))
        consts += [starts, ends, one]
        flat = cut
    return consts, nodes, flat


def _rows_as_lookup(gather: onnx.NodeProto, rows: str, width: str, out_type: int | None, namer: Namer) -> list[onnx.NodeProto]:
    """Nodes that reshape dequantized rows [n, width] to the Gather's output (indices' shape + [width]), cast back
    to the weight's float type when it is not the scales' (``out_type``)."""
    base = gather.output[0]
    shape, ids_shape = namer(f"{base}_shape"), namer(f"{base}_indices_shape")
    final = namer(f"{base}_float") if out_type is not None else base
    nodes = [helper.make_node("Shape", [gather.input[1]], [ids_shape], name=namer(f"{base}_Shape_indices")),
             helper.make_node("Concat", [ids_shape, width], [shape], name=namer(f"{base}_Concat_shape"), axis=0),
             helper.make_node("Reshape", [rows, shape], [final], name=namer(f"{base}_Reshape_rows"))]
    if out_type is not None:
        nodes.append(helper.make_node("Cast", [final], [base], name=namer(f"{base}_Cast"), to=out_type))
    return nodes


def _gathered_rows(gather: onnx.NodeProto, qt: QuantizedTensor, tensors: list[onnx.TensorProto], out_type: int | None,
                   namer: Namer) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Nodes that replace ``gather`` on a quantized table: look up the integer rows and their scales, dequantize those.

    ``tensors`` are the table's integers (packed bytes for 4-bit tables),
    scale and zero point. Indices are flattened so that a per-row scale
    becomes a per-axis scale on axis 0 of the [rows, width] lookup (opset 13
    DequantizeLinear); blocks along the row keep their block size on axis 1.
    Each value is ``(q - zp) * s`` exactly as the whole-table
    DequantizeLinear computes it.
    """
    base = gather.output[0]
    width = qt.values.shape[1]
    consts = [numpy_helper.from_array(np.array([-1], np.int64), namer(f"{base}_flat")),
              numpy_helper.from_array(np.array([width], np.int64), namer(f"{base}_width"))]
    flat, rows = namer(f"{base}_flat_indices"), namer(f"{base}_rows_quantized")
    nodes = [helper.make_node("Reshape", [gather.input[1], consts[0].name], [flat], name=namer(f"{base}_Reshape_indices")),
             helper.make_node("Gather", [tensors[0].name, flat], [rows], name=namer(f"{base}_Gather_rows"), axis=0)]
    if qt.qtype.bits == 4:
        extra, unpack, rows = _unpack_nibbles(rows, width, base, namer)
        consts += extra
        nodes += unpack
    params = [t.name for t in tensors[1:]]
    per_row = qt.layout.granularity.value != "tensor"
    if per_row:
        gathered = []
        for p in params:
            g = namer(f"{p}_rows")
            nodes.append(helper.make_node("Gather", [p, flat], [g], name=namer(f"{p}_Gather_rows"), axis=0))
            gathered.append(g)
        params = gathered
    attrs = {"axis": 1, "block_size": qt.block_size} if qt.block_size else ({"axis": 0} if per_row else {})
    deq = namer(f"{base}_rows")
    nodes.append(helper.make_node("DequantizeLinear", [rows, *params], [deq], name=namer(f"{base}_DequantizeLinear_rows"), **attrs))
    return consts, nodes + _rows_as_lookup(gather, deq, consts[1].name, out_type, namer)


def _tied_readers(graph: onnx.GraphProto, name: str, outer_refs: set[str]
                  ) -> tuple[list[tuple[int, onnx.NodeProto]], list[tuple[int, onnx.NodeProto]]] | None:
    """The Gather (axis 0) and Transpose (2-D swap) nodes that read table ``name``, or None unless those are all its readers.

    This is a tied embedding as exporters write it: the lookup reads the
    table, the output projection reads its transpose.
    """
    readers = [(i, n) for i, n in enumerate(graph.node) if name in reads(n)]
    if name in outer_refs or name in {o.name for o in graph.output}:
        return None
    gathers, transposes = [], []
    for i, n in readers:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Gather" and list(n.input).count(name) == 1 and n.input[0] == name and attrs.get("axis", 0) == 0:
            gathers.append((i, n))
        elif n.op_type == "Transpose" and list(attrs.get("perm", [1, 0])) == [1, 0]:
            transposes.append((i, n))
        else:
            return None
    return (gathers, transposes) if gathers and transposes else None


def _tied_table(site: WeightSite, qt: QuantizedTensor, gathers: list[tuple[int, onnx.NodeProto]],
                transposes: list[tuple[int, onnx.NodeProto]], namer: Namer, zero_point_ops: frozenset[str]
                ) -> tuple[list[onnx.TensorProto], dict[int, list[onnx.NodeProto]]]:
    """A tied table stored once, transposed, so that both its readers run on the integers.

    The table [rows, width] is stored as its transpose [width, rows], with its
    scales (blocks along a row, one per row, or one) transposed alike. The
    Transpose reader becomes a DequantizeLinear of that storage: blocks along
    K of a MatMul weight, which ONNX Runtime fuses into MatMulNBits at load,
    where a DequantizeLinear of the table followed by a Transpose dequantizes
    the whole table on every run. Each Gather looks up columns of the
    integers (a 4-bit table goes through a Cast to 8 bits, which ONNX Runtime
    folds at load) and of the scales, and dequantizes only those. The scales
    reach the lookups through an Unsqueeze: a scale tensor with two readers
    stops the MatMulNBits fusion. Every value is ``(q - zp) * s`` as the
    whole-table DequantizeLinear computes it.
    """
    base = site.name
    stored = [(name, a.T if a.ndim == 2 else a) for name, a in _stored(site, qt, namer, zero_point_ops)]
    arrays = [a for _, a in stored]
    tensors = [numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in stored]
    if qt.block_size:
        attrs: dict[str, int] = {"axis": 0, "block_size": qt.block_size}
    elif qt.layout.granularity.value != "tensor":
        attrs = {"axis": 1}
    else:
        attrs = {}
    out_type = helper.np_dtype_to_tensor_dtype(site.np_dtype) if site.np_dtype != qt.scale.dtype else None
    names = [t.name for t in tensors]
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for i, node in transposes:
        out = node.output[0]
        dq = namer(f"{out}_dequantized") if out_type is not None else out
        replaced[i] = [helper.make_node("DequantizeLinear", names, [dq], name=namer(f"{base}_DequantizeLinear_transposed"), **attrs)]
        if out_type is not None:
            replaced[i].append(helper.make_node("Cast", [dq], [out], name=namer(f"{out}_Cast"), to=out_type))

    # Shared by every lookup; they read only initializers, so they go before the first Gather.
    shared: list[onnx.NodeProto] = []
    eight = onnx.TensorProto.INT8 if qt.qtype.signed else onnx.TensorProto.UINT8
    first = numpy_helper.from_array(np.array([0], np.int64), namer(f"{base}_first_axis"))
    columns = namer(f"{base}_int8" if qt.qtype.bits < 8 else f"{names[0]}_lifted")
    if qt.qtype.bits < 8:
        shared.append(helper.make_node("Cast", [names[0]], [columns], name=namer(f"{base}_Cast_int8"), to=eight))
    else:  # the integers too must reach the lookups through a node of their own, or ORT does not fuse the projection
        shared.append(helper.make_node("Unsqueeze", [names[0], first.name], [columns], name=namer(f"{names[0]}_Unsqueeze")))
    flat_shape = numpy_helper.from_array(np.array([-1], np.int64), namer(f"{base}_flat"))
    width = numpy_helper.from_array(np.array([qt.values.shape[1]], np.int64), namer(f"{base}_width"))
    tensors += [first, flat_shape, width]
    params: list[tuple[str, int]] = []  # (lifted name to look up in, its axis of rows); axis -1: a per-tensor scalar
    for k, p in enumerate(names[1:], start=1):
        if k == 2 and qt.qtype.bits < 8:
            cast = namer(f"{p}_int8")
            shared.append(helper.make_node("Cast", [p], [cast], name=namer(f"{p}_Cast_int8"), to=eight))
            p = cast
        lifted = namer(f"{p}_lifted")
        shared.append(helper.make_node("Unsqueeze", [p, first.name], [lifted], name=namer(f"{p}_Unsqueeze")))
        params.append((lifted, arrays[k].ndim if attrs else -1))
    for n, (i, gather) in enumerate(gathers):
        out = gather.output[0]
        flat, rows, cols = namer(f"{out}_flat_indices"), namer(f"{out}_columns_quantized"), namer(f"{out}_columns")
        nodes = (shared if n == 0 else []) + [
            helper.make_node("Reshape", [gather.input[1], flat_shape.name], [flat], name=namer(f"{out}_Reshape_indices"))]
        if qt.qtype.bits < 8:
            nodes.append(helper.make_node("Gather", [columns, flat], [rows], name=namer(f"{out}_Gather_columns"), axis=1))
        else:
            lifted = namer(f"{out}_columns_lifted")
            nodes += [helper.make_node("Gather", [columns, flat], [lifted], name=namer(f"{out}_Gather_columns"), axis=2),
                      helper.make_node("Squeeze", [lifted, first.name], [rows], name=namer(f"{out}_Squeeze_columns"))]
        looked: list[str] = []
        for p, axis in params:
            g, sq = namer(f"{p}_columns"), namer(f"{p}_columns_squeezed")
            if axis >= 0:
                nodes.append(helper.make_node("Gather", [p, flat], [g], name=namer(f"{p}_Gather_columns"), axis=axis))
            nodes.append(helper.make_node("Squeeze", [g if axis >= 0 else p, first.name], [sq], name=namer(f"{p}_Squeeze")))
            looked.append(sq)
        flat_rows = namer(f"{out}_rows")
        nodes += [helper.make_node("DequantizeLinear", [rows, *looked], [cols], name=namer(f"{out}_DequantizeLinear_columns"), **attrs),
                  helper.make_node("Transpose", [cols], [flat_rows], name=namer(f"{out}_Transpose_rows"), perm=[1, 0])]
        replaced[i] = nodes + _rows_as_lookup(gather, flat_rows, width.name, out_type, namer)
    return tensors, replaced


def apply_plan(
    model: onnx.ModelProto, weights: Sequence[tuple[WeightSite, Grid]], tensors: Sequence[QuantizedTensor], uses_int2: bool,
    zero_point_ops: frozenset[str] = frozenset(), gather_rows: bool = False, spill: Spill | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with every weight (on its grid) replaced by DequantizeLinear of its integers in ``tensors``.

    With ``gather_rows``, an embedding table read only by Gather nodes is
    looked up as integers and only the gathered rows are dequantized (see
    :func:`_gathered_rows`), instead of dequantizing the whole table per run.
    ``tensors`` is read once per weight, in graph order; with ``spill``,
    each new initializer's data goes to the scratch file as soon as it is
    made, so a lazy ``tensors`` keeps one quantized weight in memory at a time.
    """
    out = copy.deepcopy(model)
    if uses_int2:
        out.ir_version = max(out.ir_version, INT2_IR_VERSION)
    namer = Namer(all_names(out))
    scopes = {s.path: s.graph for s in iter_scopes(out.graph)}
    if len(weights) != len(tensors):
        raise ValueError(f"{len(weights)} weights but {len(tensors)} quantized tensors")
    by_graph: dict[str, list[int]] = {}
    for i, (site, _) in enumerate(weights):
        by_graph.setdefault(site.graph, []).append(i)
    # Subgraphs first: rebuilding a parent's node list copies its subgraphs,
    # so edits made through older references would be lost.
    for path in reversed(list(scopes)):
        ds = by_graph.get(path)
        if not ds:
            continue
        graph = scopes[path]
        # Each weight's DequantizeLinear goes right before the first node that reads the weight: runtimes that keep
        # the node order (ONNX Runtime does) then dequantize each weight when it is needed, not every weight up front.
        before: dict[str, list[onnx.NodeProto]] = {}
        inits = {t.name: i for i, t in enumerate(graph.initializer)}
        replaced_inits: dict[int, list[onnx.TensorProto]] = {}
        replaced_consts: dict[str, list[onnx.NodeProto]] = {}
        replaced_nodes: dict[int, list[onnx.NodeProto]] = {}
        # Only tables whose every use is a Gather are candidates; the graph is scanned once for them.
        tables = {weights[i][0].name for i in ds if gather_rows and gathers_rows(*weights[i])
                  and all(u.op_type == "Gather" for u in weights[i][0].uses)}
        tied_candidates = {weights[i][0].name for i in ds if gather_rows and weights[i][0].source is Source.INITIALIZER
                           and gathers_rows(*weights[i]) and weights[i][0].via == ("Transpose",)}
        outer = _outer_references(graph) if tables or tied_candidates else set()
        for k in ds:
            site, qt = weights[k][0], tensors[k]
            tied = _tied_readers(graph, site.name, outer) if site.name in tied_candidates else None
            if tied is not None:
                made, replaced = _tied_table(site, qt, *tied, namer, zero_point_ops)
                replaced_nodes.update(replaced)
                del qt
                replaced_inits[inits[site.name]] = [spill.take(t) for t in made] if spill is not None else made
                continue
            made, nodes = _nodes_for(site, qt, namer, zero_point_ops)
            gathers = _gather_readers(graph, site.name, outer) if site.name in tables else []
            if gathers and qt.qtype.bits == 4:
                packed, zp = packed_rows(qt)
                made = [numpy_helper.from_array(packed, made[0].name), made[1],
                           numpy_helper.from_array(zp, made[2].name if len(made) > 2 else namer(f"{site.name}_zero_point"))]
            if gathers:
                out_type = helper.np_dtype_to_tensor_dtype(site.np_dtype) if site.np_dtype != qt.scale.dtype else None
                for i, g in gathers:
                    extra, nodes = _gathered_rows(g, qt, made, out_type, namer)
                    made = made + extra
                    replaced_nodes[i] = nodes
                nodes = []
            del qt  # with a lazy ``tensors`` this frees the integers before the next weight is rounded
            if site.source is Source.INITIALIZER:
                if spill is not None:
                    made = [spill.take(t) for t in made]
                replaced_inits[inits[site.name]] = made
                before[site.name] = nodes
            else:
                consts = [helper.make_node("Constant", [], [t.name], name=namer(f"{t.name}_Constant"), value=t) for t in made]
                replaced_consts[site.name] = consts + nodes
        if replaced_inits:
            new_inits: list[onnx.TensorProto] = []
            for i, t in enumerate(graph.initializer):
                new_inits.extend(replaced_inits.get(i, [t]))
            del graph.initializer[:]
            graph.initializer.extend(new_inits)
        first_reader: dict[str, int] = {}
        for i, n in enumerate(graph.node):
            for r in reads(n):
                if r in before:
                    first_reader.setdefault(r, i)
        # Weights no node reads (graph outputs only) are dequantized first.
        new_nodes = [m for name, ns in before.items() if name not in first_reader for m in ns]
        due: dict[int, list[onnx.NodeProto]] = {}
        for name, ns in before.items():
            if name in first_reader:
                due.setdefault(first_reader[name], []).extend(ns)
        for i, n in enumerate(graph.node):
            new_nodes.extend(due.get(i, []))
            if i in replaced_nodes:
                new_nodes.extend(replaced_nodes[i])
            elif n.op_type == "Constant" and n.output and n.output[0] in replaced_consts:
                new_nodes.extend(replaced_consts[n.output[0]])
            else:
                new_nodes.append(n)
        del graph.node[:]
        graph.node.extend(new_nodes)
    log.info("rewrote %d weights", len(weights))
    return out


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names that subgraphs of ``graph``'s nodes read from it (a table they read must stay whole)."""
    return {r for n in graph.node for r in reads(n) if r not in n.input}


@dataclass(frozen=True)
class BiasCorrection:
    """The model with corrected biases, and per weight what was done (or why not)."""

    model: onnx.ModelProto
    outcome: dict[str, str]


@dataclass(frozen=True)
class _BiasSlot:
    """Where a consumer's bias lives: ``reader`` reads ``tensor`` (None: add one at input 2), scaled by ``factor``."""

    reader: onnx.NodeProto
    tensor: onnx.TensorProto | None
    factor: float


def correct_biases(model: onnx.ModelProto, sites: tuple[WeightSite, ...], shifts: dict[str, np.ndarray]) -> BiasCorrection:
    """A copy of ``model`` whose biases absorb each quantized weight's mean output shift.

    ``shifts[name]`` is E[(Wq - W) x] per output channel on the calibration
    data; each consumer's bias becomes ``b - shift`` (times alpha/beta for
    Gemm). Conv and Gemm without a bias get one; a MatMul's bias is the
    constant of the ``Add`` that alone reads its output. A bias also read
    by other nodes is copied under a new name so they are not affected.
    """
    out = copy.deepcopy(model)
    graph = out.graph
    namer = Namer(all_names(out))
    nodes = {node_label(n, i): n for i, n in enumerate(graph.node)}
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for scope in iter_scopes(graph):
        for n in scope.graph.node:
            for name in set(n.input):
                readers.setdefault(name, []).append(n)
    readers.update({o.name: readers.get(o.name, []) + [onnx.NodeProto()] for o in graph.output})
    outcome: dict[str, str] = {}
    for site in sites:
        shift = shifts.get(site.name)
        if shift is None:
            continue
        done = []
        for use in site.uses:
            node = nodes.get(use.node)
            slot = _bias_slot(node, inits, readers, shift.size) if node is not None and site.graph == MAIN else "not in the main graph"
            if isinstance(slot, str):
                done.append(f"{use.node}: {slot}")
                continue
            delta = -slot.factor * shift
            if slot.tensor is None:
                bias = numpy_helper.from_array(delta.astype(site.np_dtype), namer(f"{use.node}_bias"))
                graph.initializer.append(bias)
                del slot.reader.input[2:]
                slot.reader.input.append(bias.name)
            else:
                old = read_tensor(slot.tensor)
                new = (old.astype(np.float64) + delta.reshape(old.shape)).astype(old.dtype)
                if len(readers.get(slot.tensor.name, [])) > 1:
                    fresh = numpy_helper.from_array(new, namer(f"{slot.tensor.name}_corrected"))
                    graph.initializer.append(fresh)
                    slot.reader.input[list(slot.reader.input).index(slot.tensor.name)] = fresh.name
                else:
                    slot.tensor.CopyFrom(numpy_helper.from_array(new, slot.tensor.name))
        outcome[site.name] = "; ".join(done) if done else "corrected"
    log.info("bias correction applied to %d weights", sum(v == "corrected" for v in outcome.values()))
    return BiasCorrection(out, outcome)


def _bias_slot(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], readers: dict[str, list[onnx.NodeProto]], channels: int
) -> _BiasSlot | str:
    """Where ``node``'s bias is, or why its bias cannot be corrected."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    reader, name, factor = node, node.input[2] if len(node.input) > 2 else "", 1.0
    if node.op_type == "Gemm":
        if not attrs.get("beta", 1.0):
            return "Gemm with beta 0 ignores its bias"
        factor = float(attrs.get("alpha", 1.0)) / float(attrs.get("beta", 1.0))
    elif node.op_type == "MatMul":
        after = readers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add":
            return "no bias: the MatMul output does not go to a single Add"
        reader = after[0]
        name = next((i for i in reader.input if i != node.output[0]), "")
    elif node.op_type != "Conv":
        return f"no bias input on {node.op_type}"
    if not name:
        return "no bias: the MatMul output does not go to a single Add" if node.op_type == "MatMul" else _BiasSlot(reader, None, factor)
    t = inits.get(name)
    if t is None or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return f"bias '{name}' is not a float initializer"
    if int(np.prod(t.dims)) != channels or (t.dims and t.dims[-1] != channels):
        return f"bias '{name}' has shape {list(t.dims)}, not one value per output channel ({channels})"
    return _BiasSlot(reader, t, factor)


@dataclass(frozen=True)
class ActivationQDQ:
    """A QuantizeLinear/DequantizeLinear pair for one activation tensor; ``share`` reuses another's parameters."""

    tensor: str
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    share: str = ""


def insert_activation_qdq(model: onnx.ModelProto, pairs: list[ActivationQDQ]) -> onnx.ModelProto:
    """A copy of ``model`` where each tensor's main-graph readers see DequantizeLinear(QuantizeLinear(tensor)).

    The tensor itself, and a graph output of that name, stay as they were;
    the pair goes right after the tensor's producer (at the top for graph
    inputs), so the node list stays topologically sorted.
    """
    out = copy.deepcopy(model)
    graph = out.graph
    namer = Namer(all_names(out))
    params: dict[str, tuple[str, str]] = {}
    for p in sorted(pairs, key=lambda p: bool(p.share)):
        if p.share:
            params[p.tensor] = params[p.share]
            continue
        s = numpy_helper.from_array(p.scale, namer(f"{p.tensor}_act_scale"))
        z = numpy_helper.from_array(p.zero_point, namer(f"{p.tensor}_act_zero_point"))
        graph.initializer.extend([s, z])
        params[p.tensor] = (s.name, z.name)
    renamed: dict[str, str] = {}
    made: dict[str, list[onnx.NodeProto]] = {}
    graph_outputs = {o.name for o in graph.output}
    produced_as: dict[str, str] = {}
    for p in pairs:
        s, z = params[p.tensor]
        q, dq = namer(f"{p.tensor}_quantized"), namer(f"{p.tensor}_dequantized")
        source = p.tensor
        if p.tensor in graph_outputs:
            # The producer writes a new name and the DequantizeLinear writes the output's own name.
            source, dq = namer(f"{p.tensor}_float"), p.tensor
            produced_as[p.tensor] = source
        made[source] = [
            helper.make_node("QuantizeLinear", [source, s, z], [q], name=namer(f"{p.tensor}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q, s, z], [dq], name=namer(f"{p.tensor}_DequantizeLinear")),
        ]
        if dq != p.tensor:
            renamed[p.tensor] = dq
    inputs = {i.name for i in graph.input}
    new_nodes = [n for t in made if t in inputs for n in made[t]]
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name in renamed:
                n.input[k] = renamed[name]
        for k, name in enumerate(n.output):
            if name in produced_as:
                n.output[k] = produced_as[name]
        new_nodes.append(n)
        for o in n.output:
            new_nodes.extend(made.get(o, []))
    # Pairs on initializer-free constants produced by nothing (none expected) would be lost; say so loudly.
    placed = sum(len(v) for v in made.values())
    if len(new_nodes) - len(graph.node) != placed:
        raise RuntimeError("an activation Q/DQ pair had no producer to follow")
    del graph.node[:]
    graph.node.extend(new_nodes)
    log.info("inserted %d activation Q/DQ pairs", len(pairs))
    return out
