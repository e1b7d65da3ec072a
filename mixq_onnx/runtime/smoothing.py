"""Activation smoothing (SmoothQuant, Xiao et al. 2023) for MatMul and Gemm inputs before W8A8 quantization.

Transformer activations have a few input channels whose values are 10-100x
larger than the rest, so one per-tensor activation scale wastes most of the
8-bit grid on them. Smoothing divides each input channel j of an activation
X by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies row j of
every weight that reads X by ``s_j``: ``(X / s) (s W) = X W`` exactly in real
arithmetic, and the outliers move into the weights, which are quantized per
output channel.

Three steps, each a plain function:

- :func:`smoothing_groups` (graph): every float activation read as input A of
  MatMul/Gemm nodes with a constant 2-D weight; the readers that share it
  form one group, since they must share one ``s``.
- :func:`choose_scales` (numpy): ``max|X_j|`` from calibration samples, and
  per group the alpha (given, or searched over :data:`ALPHAS`) that gives the
  smallest relative output error of the quantized product ``Q(X/s) Q(sW)``
  against ``X W`` on sampled rows, with "no smoothing" as a candidate.
- :func:`apply_smoothing` (graph): ``1/s`` is folded into the producer whose
  output only the group reads (a LayerNormalization's scale and bias, or a
  MatMul's/Gemm's weight columns and bias, see :func:`_fold_site`); otherwise
  a ``Mul`` by ``1/s`` is inserted in front of the group's readers. Weights
  become ``s W``. Every activation left alone says why.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..numerics.ranges import RangeHistogram
from ..config import PER_CHANNEL, CalibMethod
from ..graph.scopes import Namer, all_names, node_label
from ..graph.io import read_tensor
from ..numerics.qdq import QType, activation_params, dequantize_linear, quantize_linear, quantize_weight

log = logging.getLogger(__name__)

# Alphas the search tries per group (0.5 is SmoothQuant's default; larger moves more of the range into the weights).
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Rows of each activation the alpha search evaluates (evenly spread over the calibration samples).
SEARCH_ROWS = 2048
# Smoothing factors are kept within this ratio of 1 so no channel is scaled into float32 under- or overflow.
MAX_FACTOR = 1e4
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class ActivationGrid:
    """How activations will be quantized: the integer type, symmetry and the calibration method of their ranges."""

    qtype: QType
    symmetric: bool
    method: CalibMethod


@dataclass(frozen=True)
class Reader:
    """One MatMul/Gemm that reads the activation as input A: its node and how its weight is laid out."""

    node: str  # label
    index: int  # position in the graph's node list
    weight: str
    transposed: bool  # Gemm with transB: the weight is [N, K]


@dataclass(frozen=True)
class Group:
    """An activation and the linear ops reading it, which share one smoothing vector."""

    tensor: str
    readers: tuple[Reader, ...]
    # Where 1/s is folded: constants of the producer, each with how it is divided ('vector': elementwise on its
    # last axis, 'cols' / 'rows': a weight's output channels); empty when a Mul is inserted instead.
    fold: tuple[tuple[str, str], ...] = ()
    fold_op: str = ""


@dataclass(frozen=True)
class GroupScales:
    """The smoothing chosen for a group: alpha (None: not smoothed) and the errors that decided it."""

    group: Group
    alpha: float | None
    scales: np.ndarray | None
    error_plain: float
    error_smoothed: float


@dataclass(frozen=True)
class ScalingLabels:
    """How a report section names a per-channel rescaling's outcome (SmoothQuant's, or AWQ's)."""

    done: str
    left: str
    unchanged: str
    changed: str
    why_not: str
    fold_prefix: str
    inserted: str


SMOOTHQUANT_LABELS = ScalingLabels("applied", "not_applied", "error_unsmoothed", "error_smoothed",
                                   "smoothing did not lower the quantized output error", "folded into ", "Mul inserted")


@dataclass
class SmoothingResult:
    """The smoothed float model and a record of every activation considered."""

    model: onnx.ModelProto
    groups: list[GroupScales]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe(self, labels: ScalingLabels = SMOOTHQUANT_LABELS) -> dict[str, object]:
        """Each rescaled activation with its alpha, how ``1/s`` reached it and its errors; each one left alone, with why."""
        return {
            labels.done: [{"tensor": g.group.tensor, "readers": [r.node for r in g.group.readers], "alpha": g.alpha,
                           "how": labels.fold_prefix + g.group.fold_op if g.group.fold else labels.inserted,
                           labels.unchanged: g.error_plain, labels.changed: g.error_smoothed}
                          for g in self.groups if g.alpha is not None],
            labels.left: [{"tensor": g.group.tensor, "reason": f"{labels.why_not} ({g.error_plain:.3g} before)"}
                          for g in self.groups if g.alpha is None] + [{"tensor": t, "reason": r} for t, r in self.skipped],
        }


def _consts(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def smoothing_groups(model: onnx.ModelProto, exclude: frozenset[str] = frozenset()) -> tuple[list[Group], list[tuple[str, str]]]:
    """The activations of the main graph that can be smoothed, and those that cannot (with why).

    Weights must be 2-D float initializers read by nothing else, so that
    scaling their rows changes no other consumer. Names in ``exclude``
    (weights the user keeps float) are not touched.
    """
    g = model.graph
    consts = _consts(g)
    readers: dict[str, list[tuple[int, onnx.NodeProto]]] = {}
    producer: dict[str, tuple[int, onnx.NodeProto]] = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            readers.setdefault(name, []).append((i, n))
        for o in n.output:
            producer[o] = (i, n)
    outputs = {o.name for o in g.output}
    candidates: dict[str, list[Reader]] = {}
    skipped: list[tuple[str, str]] = []
    for i, n in enumerate(g.node):
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        x, w = n.input[0], n.input[1]
        if x in consts or w not in consts:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        wt = consts[w]
        problem = ""
        if len(wt.dims) != 2 or wt.data_type not in FLOAT_TYPES:
            problem = f"weight '{w}' is not a 2-D float matrix"
        elif attrs.get("transA", 0):
            problem = "Gemm with transA"
        elif len(readers.get(w, [])) != 1:
            problem = f"weight '{w}' is shared with other nodes"
        elif w in exclude:
            problem = f"weight '{w}' stays float (--keep-float)"
        if problem:
            skipped.append((x, f"{node_label(n, i)}: {problem}"))
            continue
        candidates.setdefault(x, []).append(Reader(node_label(n, i), i, w, bool(attrs.get("transB", 0)) and n.op_type == "Gemm"))
    groups = []
    for x, rs in candidates.items():
        if any(s[0] == x for s in skipped):
            skipped.append((x, "another reader cannot be smoothed, and all readers must share the factors"))
            continue
        linear = {r.index for r in rs}
        fold: tuple[tuple[str, str], ...] = ()
        op = ""
        if x in producer and x not in outputs and {i for i, _ in readers[x]} == linear:
            fold, op = _fold_site(producer[x][1], producer, readers, consts, outputs)
        groups.append(Group(x, tuple(rs), fold, op))
    return groups, skipped


def _fold_site(node: onnx.NodeProto, producer: dict, readers: dict, consts: dict, outputs: set[str]
               ) -> tuple[tuple[tuple[str, str], ...], str]:
    """The producer constants that absorb 1/s, if ``node`` (the activation's only producer) can take it exactly.

    A LayerNormalization's scale and bias; a Mul by a constant vector (an
    RMSNorm's gain, decomposed); a MatMul's or Gemm's constant
    weight columns (and bias), optionally through an ``Add`` of a constant
    bias. Every constant must be read by that node alone, so nothing else
    changes.
    """
    def only_reader(name: str, n: onnx.NodeProto) -> bool:
        return name in consts and [m for _, m in readers.get(name, [])] == [n]

    def vector(name: str) -> bool:
        """A constant that varies only along its last axis (the activation's channels)."""
        dims = consts[name].dims
        return len(dims) >= 1 and int(np.prod(dims)) == dims[-1]

    if node.op_type == "LayerNormalization":
        params = [v for v in node.input[1:3] if v]
        if params and all(only_reader(v, node) and vector(v) for v in params):
            return tuple((v, "vector") for v in params), "LayerNormalization"
        return (), ""
    if node.op_type == "Mul" and len(node.input) == 2:
        # An RMSNorm's gain, as exporters decompose it: normed * gamma.
        c = [v for v in node.input if v in consts]
        if len(c) == 1 and only_reader(c[0], node) and vector(c[0]) and consts[c[0]].dims[-1] > 1:
            return ((c[0], "vector"),), "Mul (a normalisation's gain)"
        return (), ""
    bias: list[str] = []
    if node.op_type == "Add" and len(node.input) == 2:
        c = [v for v in node.input if v in consts]
        a = [v for v in node.input if v not in consts]
        if len(c) != 1 or len(a) != 1 or not vector(c[0]) or a[0] not in producer or a[0] in outputs \
                or len(readers.get(a[0], [])) != 1:
            return (), ""
        bias, node = c, producer[a[0]][1]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or not only_reader(node.input[1], node) \
            or len(consts[node.input[1]].dims) != 2 or attrs.get("alpha", 1.0) != 1.0:
        return (), ""
    weight = (node.input[1], "rows" if attrs.get("transB", 0) else "cols")
    gemm_bias = [node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else []
    if gemm_bias and not (only_reader(gemm_bias[0], node) and vector(gemm_bias[0]) and attrs.get("beta", 1.0) == 1.0):
        return (), ""
    return (weight, *((b, "vector") for b in gemm_bias + bias)), node.op_type + (" + bias Add" if bias else "")


def _weight_rows(w: np.ndarray, transposed: bool) -> np.ndarray:
    """The weight as [K, N]: row j multiplies input channel j."""
    return w.T if transposed else w


def _quantized_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, act: ActivationGrid, weight_qtype: QType) -> float:
    """Relative error of Q(x/s) Q(s w) against x w, summed over the group's weights ([K, N] each)."""
    xs = (x / s).astype(np.float32)
    hist = RangeHistogram()
    hist.observe(xs)
    if act.method is not CalibMethod.MINMAX:
        hist.accumulate(xs)
    scale, zp = activation_params(*hist.choose(act.method, act.qtype, act.symmetric), act.qtype, act.symmetric)
    xq = dequantize_linear(quantize_linear(xs, scale, zp, act.qtype), scale, zp)
    err = 0.0
    for w in weights:
        ws = (w * s[:, None]).astype(np.float32)
        wq = quantize_weight(ws, 8, weight_qtype.signed, PER_CHANNEL, 1, weight_qtype, np.dtype(np.float32)).dequantize()
        ref = x @ w
        err += float(np.sum((xq @ wq - ref) ** 2) / max(np.sum(ref**2), 1e-30))
    return err


def smoothing_factors(amax_x: np.ndarray, amax_w: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, 1 where a channel is all zero, bounded to [1/MAX_FACTOR, MAX_FACTOR]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(amax_x, alpha) / np.power(amax_w, 1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0) & (amax_x > 0) & (amax_w > 0), s, 1.0)
    return np.clip(s, 1.0 / MAX_FACTOR, MAX_FACTOR).astype(np.float32)


def choose_scales(group: Group, rows: np.ndarray, amax_x: np.ndarray, weights: list[np.ndarray], alpha: float | None,
                  act: ActivationGrid, weight_qtype: QType) -> GroupScales:
    """The smoothing of one group: ``alpha`` if given, else the searched alpha with the smallest quantized error.

    ``rows`` are sampled activation rows [n, K]; ``amax_x`` is max|X_j| over
    all calibration samples; ``weights`` are the readers' weights as [K, N].
    Smoothing that does not lower the error on the sampled rows is not
    applied (alpha None), unless ``alpha`` was given.
    """
    amax_w = np.max([np.max(np.abs(w), axis=1) for w in weights], axis=0)
    plain = _quantized_error(rows, weights, np.ones(rows.shape[1], np.float32), act, weight_qtype)
    if alpha is not None:
        s = smoothing_factors(amax_x, amax_w, alpha)
        return GroupScales(group, alpha, s, plain, _quantized_error(rows, weights, s, act, weight_qtype))
    best = (plain, None, None)
    for a in ALPHAS:
        s = smoothing_factors(amax_x, amax_w, a)
        e = _quantized_error(rows, weights, s, act, weight_qtype)
        if e < best[0]:
            best = (e, a, s)
    return GroupScales(group, best[1], best[2], plain, best[0])


def apply_smoothing(model: onnx.ModelProto, chosen: list[GroupScales]) -> onnx.ModelProto:
    """A copy of ``model`` with each smoothed group's weights scaled and ``1/s`` folded or multiplied in front."""
    out = copy.deepcopy(model)
    g = out.graph
    consts = _consts(g)
    namer = Namer(all_names(out))
    inserts: dict[int, list[onnx.NodeProto]] = {}
    for gs in chosen:
        if gs.alpha is None or gs.scales is None:
            continue
        s = gs.scales
        for r in gs.group.readers:
            t = consts[r.weight]
            w = read_tensor(t)
            scaled = (w * s[None, :]) if r.transposed else (w * s[:, None])
            t.CopyFrom(numpy_helper.from_array(scaled.astype(w.dtype), t.name))
        x = gs.group.tensor
        if gs.group.fold:
            for name, how in gs.group.fold:
                t = consts[name]
                v = read_tensor(t)
                d = s.astype(v.dtype)
                v = v / d[:, None] if how == "rows" else v / d
                t.CopyFrom(numpy_helper.from_array(v.astype(read_tensor(t).dtype), t.name))
            continue
        inv_name, out_name = namer(f"{x}_smooth_inverse"), namer(f"{x}_smoothed")
        dtype = np.float16 if any(consts[r.weight].data_type == onnx.TensorProto.FLOAT16 for r in gs.group.readers) else np.float32
        g.initializer.append(numpy_helper.from_array((1.0 / s).astype(dtype), inv_name))
        mul = onnx.helper.make_node("Mul", [x, inv_name], [out_name], name=namer(f"{x}_Smooth"))
        first = min(r.index for r in gs.group.readers)
        inserts.setdefault(first, []).append(mul)
        for r in gs.group.readers:
            g.node[r.index].input[0] = out_name
    if inserts:
        nodes = []
        for i, n in enumerate(g.node):
            nodes.extend(inserts.get(i, []))
            nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
    return out


def smooth_model(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], alpha: float | None, act: ActivationGrid,
                 weight_qtype: QType, exclude: frozenset[str] = frozenset()) -> SmoothingResult:
    """Smooth every MatMul/Gemm input of ``model`` on the calibration ``feeds`` (one streaming pass of the float model)."""
    from .calibrate import stream_tensors  # runtime: runs the float model

    groups, skipped = smoothing_groups(model, exclude)
    if not groups:
        return SmoothingResult(model, [], skipped)
    names = [gr.tensor for gr in groups]
    amax: dict[str, np.ndarray] = {}
    batches: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in stream_tensors(model, names, feeds):
        for n in names:
            x = np.asarray(values[n], np.float32)
            rows = x.reshape(-1, x.shape[-1])
            a = np.max(np.abs(rows), axis=0)
            amax[n] = np.maximum(amax[n], a) if n in amax else a
            batches[n].append(rows)
    consts = _consts(model.graph)
    chosen = []
    for gr in groups:
        rows = np.concatenate(batches.pop(gr.tensor))
        rows = rows[np.linspace(0, len(rows) - 1, min(SEARCH_ROWS, len(rows))).astype(np.int64)] if len(rows) > SEARCH_ROWS else rows
        weights = [_weight_rows(read_tensor(consts[r.weight]).astype(np.float32), r.transposed) for r in gr.readers]
        gs = choose_scales(gr, rows.astype(np.float32), amax[gr.tensor], weights, alpha, act, weight_qtype)
        log.info("smoothing %s: alpha %s, quantized output error %.3g -> %.3g", gr.tensor, gs.alpha, gs.error_plain, gs.error_smoothed)
        chosen.append(gs)
    return SmoothingResult(apply_smoothing(model, chosen), chosen, skipped)


__all__ = ["ALPHAS", "SMOOTHQUANT_LABELS", "ActivationGrid", "ScalingLabels", "Group", "GroupScales", "SmoothingResult", "apply_smoothing", "choose_scales", "smooth_model",
           "smoothing_factors", "smoothing_groups"]
