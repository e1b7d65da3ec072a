"""Passes that make a valid-enough input model pass onnx's full checker once it is rewritten.

Exporters write models that ONNX Runtime runs but that the full checker
rejects after a rewrite: output shapes that contradict what their producer
computes (the checker of the old opset could not see it; the new opset's
inference can), and sparse initializers read by ordinary ops. Each pass
returns a :class:`RepairResult`: the model (a new one only if it changed)
and what it changed, as notes that name the tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .find import FLOAT_TYPES
from .io import light_copy, read_tensor
from .scopes import Namer, all_names, iter_scopes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairResult:
    """A pass's outcome: the model (``changed``: a modified copy) and one note per change."""

    model: onnx.ModelProto
    changed: bool
    notes: tuple[str, ...]


def _dims(t: onnx.TypeProto) -> list[int | str] | None:
    """A tensor type's shape as ints and names (``?`` for unknown), or None when it declares none."""
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.tensor_type.shape.dim]


def _contradicts(declared: list[int | str], inferred: list[int | str]) -> bool:
    if len(declared) != len(inferred):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(declared, inferred))


def drop_contradicted_shapes(model: onnx.ModelProto) -> RepairResult:
    """Replace main-graph output shapes (and drop value_info) that shape inference contradicts, with a warning each.

    Declared shapes are hints; where the model's own computation gives
    another rank or size (a Reshape to ``[T, 1, C]`` declared ``[1, T]``,
    say), the declaration is wrong and would make the full checker refuse
    the model. Inference runs with the declarations removed, so it reports
    what the producers compute, with data propagation for shape arithmetic.
    """
    light = light_copy(model)  # inference needs only the small shape constants
    declared = {o.name: _dims(o.type) for o in light.graph.output}
    declared.update({v.name: _dims(v.type) for v in light.graph.value_info})
    for o in light.graph.output:
        o.type.tensor_type.ClearField("shape")
    del light.graph.value_info[:]
    try:
        inferred_model = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference raises several types; nothing can be judged then
        log.info("shape inference failed while checking declared shapes (%s)", str(exc).splitlines()[0][:160])
        return RepairResult(model, False, ())
    inferred = {v.name: _dims(v.type) for v in (*inferred_model.graph.value_info, *inferred_model.graph.output)}
    wrong = {n: (d, inferred[n]) for n, d in declared.items()
             if d is not None and inferred.get(n) is not None and _contradicts(d, inferred[n])}  # type: ignore[arg-type]
    if not wrong:
        return RepairResult(model, False, ())
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes = []
    for name, (d, i) in sorted(wrong.items()):
        shown = [x if isinstance(x, int) or not x.startswith("unk__") else "?" for x in i]
        note = (f"tensor '{name}' declares shape {d} but its producer computes {shown}; the wrong declaration was replaced "
                "by the computed one (ONNX Runtime ignores it too)")
        log.warning(note)
        notes.append(note)
    for o in out.graph.output:
        if o.name in wrong:
            # Outputs must declare a shape field: the computed rank, with the sizes inference knows.
            shape = o.type.tensor_type.shape
            shape.ClearField("dim")
            for d in wrong[o.name][1]:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif not d.startswith("unk__") and d != "?":
                    dim.dim_param = d
    kept = [v for v in out.graph.value_info if v.name not in wrong]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return RepairResult(out, True, tuple(notes))


def _dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    """A sparse tensor as the dense tensor it stands for (zeros elsewhere), under the same name."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.ndim == 2:  # coordinates: [NNZ, rank]
        dense[tuple(indices.T)] = values
    else:  # linear positions
        dense.reshape(-1)[indices] = values
    return numpy_helper.from_array(dense, sparse.values.name)


def densify_sparse_initializers(model: onnx.ModelProto) -> RepairResult:
    """Store every sparse initializer as a dense one.

    onnx's type checker refuses a sparse tensor as the input of an ordinary
    op (``sparse_tensor(float)`` is not in Add's types) even though ONNX
    Runtime densifies them at load; dense initializers are what both agree on.
    """
    if not any(scope.graph.sparse_initializer for scope in iter_scopes(model.graph)):
        return RepairResult(model, False, ())
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes = []
    for scope in iter_scopes(out.graph):
        g = scope.graph
        for sp in g.sparse_initializer:
            g.initializer.append(_dense(sp))
            notes.append(f"sparse initializer '{sp.values.name}' {list(sp.dims)} stored dense (onnx's checker does not "
                         "accept sparse tensors as op inputs)")
        del g.sparse_initializer[:]
    for n in notes:
        log.info(n)
    return RepairResult(out, True, tuple(notes))


def tie_transposed_tables(model: onnx.ModelProto) -> RepairResult:
    """Store once an embedding table that the exporter wrote twice: a main-graph initializer that only MatMul or
    Gemm weight inputs read and that is exactly the transpose of a table a Gather reads becomes a Transpose of it.

    A tied output projection, constant-folded by torch's TorchScript exporter, is such a copy: left alone it is
    rounded and stored twice. Bit-equal values only, so the model computes exactly what it did.
    """
    g = model.graph
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n, k))
    inits = {t.name: t for t in g.initializer if len(t.dims) == 2 and t.data_type in FLOAT_TYPES | {onnx.TensorProto.DOUBLE}}
    outputs = {o.name for o in g.output} | {i.name for i in g.input}
    tables = {n: t for n, t in inits.items() if any(r.op_type == "Gather" and k == 0 for r, k in readers.get(n, ()))}
    pairs: list[tuple[str, str]] = []
    tied: set[str] = set()
    for bname, b in inits.items():
        uses = readers.get(bname, ())
        if bname in tables or bname in outputs or not uses or any(r.op_type not in ("MatMul", "Gemm") or k != 1 for r, k in uses):
            continue
        for aname, a in tables.items():
            if aname not in tied and a.data_type == b.data_type and list(a.dims) == list(b.dims)[::-1] \
                    and np.array_equal(read_tensor(a).T, read_tensor(b)):
                pairs.append((bname, aname))
                tied.add(aname)
                break
    if not pairs:
        return RepairResult(model, False, ())
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dropped = {b for b, _ in pairs}
    kept = [t for t in out.graph.initializer if t.name not in dropped]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    namer = Namer(all_names(out))
    nodes = [onnx.helper.make_node("Transpose", [a], [b], name=namer(f"{b}_tied"), perm=[1, 0]) for b, a in pairs]
    rest = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + rest)
    notes = tuple(f"'{b}' is the transpose of the embedding table '{a}' (a tied output projection the exporter stored "
                  "twice): it is read through a Transpose of the table, so the table is rounded and stored once"
                  for b, a in pairs)
    for n in notes:
        log.info(n)
    return RepairResult(out, True, notes)


__all__ = ["RepairResult", "densify_sparse_initializers", "drop_contradicted_shapes", "tie_transposed_tables"]
