"""Where activation Q/DQ pairs go, for a target's rules (graph layer: reads protobuf, changes nothing).

Integer ops (Conv, MatMul, Gemm with an 8-bit weight) seed the placement:
their activation input is quantized and, for ONNX Runtime, their output too,
since ORT's QDQ fusions (QLinearConv, QLinearMatMul, QGemm) need a
QuantizeLinear after the op. An output read only by a Relu or Clip is
quantized after that activation instead, so ORT folds it into the Q range.
From there quantization spreads through Add and Concat (QLinearAdd,
QLinearConcat), pooling (QLinearAveragePool, QLinearGlobalAveragePool) and
data movement (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, MaxPool,
Slice, Expand, Tile, DepthToSpace, Gather, nearest Resize, and every output
of Split: the output reuses the input's scale and zero point, so ORT drops the
pair and moves integers).
A zero Pad read only by a Conv is quantized on its input, so ORT folds the
Pad into the QLinearConv instead of leaving a float island around it.
For TensorRT only the inputs of those ops are quantized; it fuses the rest.
Every integer-capable node left in float records why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .scopes import node_label
from .io import read_tensor
from ..targets import CONV_OPS, FOLD_OPS, GEMM_OPS, JOIN_OPS, MOVE_OPS, POOL_OPS, SPLIT_OPS, TargetRules

log = logging.getLogger(__name__)

FLOAT_ELEMS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


@dataclass(frozen=True)
class ActivationSite:
    """One activation tensor that gets a QuantizeLinear/DequantizeLinear pair."""

    tensor: str
    share: str  # the tensor whose scale and zero point it reuses, or '' for its own calibrated range
    reason: str


@dataclass(frozen=True)
class Placement:
    sites: tuple[ActivationSite, ...]
    skipped: tuple[tuple[str, str], ...]  # (node, why it stays float)
    # MatMul nodes with a quantized input and an 8-bit constant weight: label -> weight tensor name.
    integer_matmuls: tuple[tuple[str, str], ...] = ()

    @property
    def ranged(self) -> list[str]:
        """Tensors whose range must be calibrated (the others share one)."""
        return [s.tensor for s in self.sites if not s.share]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor that shape inference (or the model's own declarations) can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # shape inference gives up on some models (or on >2 GB); declared types still count
        # Said, not swallowed: activations whose type only inference knows cannot be quantized then.
        log.warning("shape inference failed (%s); activation placement uses the types the model declares",
                    str(exc).splitlines()[0][:200])
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _zero_constants(g: onnx.GraphProto) -> set[str]:
    """Names of constants that are a single 0 (a Pad's constant_value as exporters write it)."""
    pairs = [(t.name, t) for t in g.initializer]
    pairs += [(n.output[0], a.t) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return {name for name, t in pairs if t.data_type in FLOAT_ELEMS and np.prod(t.dims) <= 1 and not read_tensor(t).any()}


def _is_zero_pad(n: onnx.NodeProto, zeros: set[str]) -> bool:
    """A Pad in constant mode with value 0 (absent or a zero constant): padding a quantized tensor with its zero point."""
    if n.op_type != "Pad":
        return False
    mode = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "mode"), b"constant")
    value = n.input[2] if len(n.input) > 2 else ""
    return mode == b"constant" and (not value or value in zeros) and len(n.input) < 4


def _keeps_values(n: onnx.NodeProto) -> bool:
    """Whether a data-movement op only moves values (Resize does only in nearest mode)."""
    if n.op_type != "Resize":
        return True
    return next((helper.get_attribute_value(a) for a in n.attribute if a.name == "mode"), b"nearest") == b"nearest"


def place_activations(model: onnx.ModelProto, rules: TargetRules, weight_bits: dict[str, int], attention: bool = False,
                      float_outputs: frozenset[str] = frozenset()) -> Placement:
    """The Q/DQ sites for ``model``'s main graph; ``weight_bits`` maps each quantized weight to its container bits.

    With ``attention``, MatMuls of two activations (attention's Q.K^T and
    probabilities.V) get Q/DQ on both inputs too. The MatMuls labelled in
    ``float_outputs`` keep a float output: ONNX Runtime then runs them as
    MatMulIntegerToFloat (integer product, float result, no output grid).
    """
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    types = _elem_types(model)
    outputs = {o.name for o in g.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    zeros = _zero_constants(g)

    def is_act(name: str) -> bool:
        return bool(name) and name not in consts and types.get(name) in FLOAT_ELEMS

    def folded(name: str) -> str:
        """Follow a single Relu/Clip reader: the Q goes after it so ORT folds the activation into the Q range."""
        while name not in outputs and len(readers.get(name, [])) == 1 and readers[name][0].op_type in FOLD_OPS:
            nxt = readers[name][0]
            if any(i and i not in consts for i in nxt.input[1:]):
                break
            name = nxt.output[0]
        return name

    integer_ops = rules.integer_ops or CONV_OPS | GEMM_OPS
    chosen: dict[str, ActivationSite] = {}
    skipped: list[tuple[str, str]] = []
    integer_matmuls: list[tuple[str, str]] = []
    seeded_outputs: set[str] = set()

    def add(name: str, reason: str, share: str = "", output_ok: bool = False) -> bool:
        # A graph output is quantized only after an integer op, whose fusion needs the Q (the output then
        # carries the Q/DQ rounding, as in ONNX Runtime's own quantizer).
        if name in chosen or not is_act(name) or (name in outputs and not output_ok):
            return False
        chosen[name] = ActivationSite(name, share, reason)
        return True

    for i, n in enumerate(g.node):
        if n.op_type not in integer_ops:
            continue
        label = node_label(n, i)
        acts = [x for x in n.input[:2] if is_act(x)]
        weights = [x for x in n.input[:2] if x in consts]
        if n.op_type == "MatMul" and len(acts) == 2 and attention:
            # Attention's Q.K^T and probabilities.V: both inputs quantized, so ORT runs an integer QLinearMatMul.
            for x in acts:
                add(x, f"input of activation MatMul {label}")
            if rules.quantize_outputs:
                add(folded(n.output[0]), f"output of activation MatMul {label}", output_ok=True)
            seeded_outputs.add(folded(n.output[0]))
            continue
        if len(acts) != 1 or len(weights) != 1:
            skipped.append((label, "needs one activation and one constant weight input"))
            continue
        bits = weight_bits.get(weights[0])
        if bits is None:
            skipped.append((label, f"weight '{weights[0]}' stays float"))
            continue
        if bits < 8:
            skipped.append((label, f"weight '{weights[0]}' is {bits}-bit: runs weight-only (MatMulNBits or DequantizeLinear)"))
            continue
        pad = producer.get(acts[0])
        if (rules.quantize_before_pad and n.op_type == "Conv" and pad is not None and _is_zero_pad(pad, zeros)
                and len(readers[acts[0]]) == 1 and is_act(pad.input[0])):
            add(pad.input[0], f"input of Pad {pad.name or pad.output[0]} before {n.op_type} {label} (the Pad folds into the integer Conv)")
        else:
            add(acts[0], f"input of {n.op_type} {label}")
        if n.op_type == "MatMul":
            integer_matmuls.append((label, weights[0]))
        if label in float_outputs:
            skipped.append((label, "output left float: ONNX Runtime runs it as MatMulIntegerToFloat"))
            continue
        if rules.quantize_outputs:
            out = folded(n.output[0])
            add(out, f"output of {n.op_type} {label}" + (" after its activation" if out != n.output[0] else ""), output_ok=True)
        seeded_outputs.add(folded(n.output[0]))

    changed = True
    while changed:
        changed = False
        for i, n in enumerate(g.node):
            op, label = n.op_type, node_label(n, i)
            if op in SPLIT_OPS and rules.quantize_outputs and n.input and is_act(n.input[0]):
                # Several outputs, each a slice of the input: all keep its scale and ORT splits the integers.
                outs = [o for o in n.output if o]
                if n.input[0] in chosen or any(o in chosen for o in outs):
                    changed |= add(n.input[0], f"input of {op} {label}")
                    changed |= any([add(o, f"output of {op} {label} (keeps its input's scale)", share=n.input[0]) for o in outs])
                continue
            if op not in JOIN_OPS | POOL_OPS | MOVE_OPS or not n.input or not n.output or not _keeps_values(n):
                continue
            data = list(n.input) if op in JOIN_OPS else [n.input[0]]
            if not all(is_act(x) for x in data):
                continue
            out = folded(n.output[0])
            touched = any(x in chosen for x in data) or out in chosen
            if not rules.quantize_outputs:
                # TensorRT: quantize the inputs of joins and pools that read an integer op's output.
                if op in JOIN_OPS | POOL_OPS and any(x in seeded_outputs for x in data):
                    changed |= any([add(x, f"input of {op} {label}") for x in data])
                continue
            if not touched:
                continue
            if op in MOVE_OPS and out == n.output[0] and out not in chosen:
                changed |= add(data[0], f"input of {op} {label}")
                changed |= add(out, f"output of {op} {label} (keeps its input's scale)", share=data[0])
            else:
                changed |= any([add(x, f"input of {op} {label}") for x in data])
                changed |= add(out, f"output of {op} {label}")
    # Data movement keeps values, so its output reuses the input's parameters and ORT drops the pair around it.
    for n in g.node:
        moved = n.output[:1] if n.op_type in MOVE_OPS else n.output if n.op_type in SPLIT_OPS and rules.quantize_outputs else []
        for o in moved:
            if n.input and n.input[0] in chosen and o in chosen and not chosen[o].share and o not in outputs:
                chosen[o] = ActivationSite(o, n.input[0], f"{chosen[o].reason}; keeps the input's scale of {n.op_type}")
    # Shares point at the tensor whose range is calibrated.
    sites = []
    for s in chosen.values():
        root = s.share
        while root and chosen.get(root) and chosen[root].share:
            root = chosen[root].share
        sites.append(ActivationSite(s.tensor, root, s.reason))
    return Placement(tuple(sites), tuple(skipped), tuple(integer_matmuls))


__all__ = ["ActivationSite", "Placement", "place_activations"]
