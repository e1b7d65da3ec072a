"""What a decoder's weights do, read from the graph's structure rather than from names (exporters rename freely).

Rules that treat a transformer's layers differently, as llama.cpp's k-quant mixes do, need to know which weight is
an attention value projection, which an MLP down projection, which the output projection, and in which layer each
sits. Names are no guide (the dynamo exporter calls them ``val_39``); the data flow is:

- a layer's attention core is a MatMul whose first input comes from a Softmax; the weight whose MatMul feeds its
  second input (through reshapes, transposes, a cache Concat or a grouped-query repeat) is that layer's value
  projection, and layers are numbered in graph order;
- an MLP down projection reads an activation made by element-wise ops (a SwiGLU product, a GELU) from other weights'
  MatMuls only, which a normalisation's output never is (it passes through a ReduceMean);
- the output projection's MatMul reaches a graph output through reshapes and biases only.

The main graph is read; subgraphs are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

# Ops an activation passes through unchanged in meaning: layout, a cache Concat, a grouped-query repeat, a bias.
_MOVES = frozenset({"Reshape", "Transpose", "Concat", "Expand", "Tile", "Unsqueeze", "Squeeze", "Slice", "Cast",
                    "Identity", "Split", "Flatten", "Add", "Dropout"})
# Element-wise ops an MLP's activation function is made of.
_ELEMENTWISE = frozenset({"Mul", "Add", "Sub", "Div", "Sigmoid", "Tanh", "Erf", "Relu", "Gelu", "FastGelu", "QuickGelu",
                          "BiasGelu", "Silu", "Swish", "Softplus", "Cast", "Identity", "Pow", "Neg", "Exp", "Sqrt",
                          "Reciprocal", "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "Clip"})
# Ops between a stored weight and its MatMul that keep it the same tensor.
_WEIGHT_VIA = frozenset({"Transpose", "Identity", "Cast"})
_DEPTH = 16


@dataclass(frozen=True)
class DecoderRoles:
    """Weights by role, each with its layer (0-based, in graph order), and the number of layers found."""

    layers: int
    attention_values: dict[str, int]
    mlp_downs: dict[str, int]
    outputs: tuple[str, ...]

    def use_more_bits(self) -> frozenset[str]:
        """The weights llama.cpp's Q4_K_M (and the ONNX tools that copy it) give more bits: the value and down
        projections of the first and last eighth of the layers and of every third layer between, and the output
        projection."""
        n = self.layers
        promoted = {name for roles in (self.attention_values, self.mlp_downs) for name, i in roles.items()
                    if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}
        return frozenset(promoted | set(self.outputs))


def decoder_roles(model: onnx.ModelProto) -> DecoderRoles:
    """The roles of a decoder's (or encoder's) weights; no layers when the graph has no attention core."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    constants = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant" and n.output}
    position = {id(n): i for i, n in enumerate(g.node)}

    def stored(name: str) -> str | None:
        """The initializer or Constant a MatMul input is, through transposes and casts."""
        for _ in range(_DEPTH):
            if name in constants:
                return name
            p = producer.get(name)
            if p is None or p.op_type not in _WEIGHT_VIA or not p.input:
                return None
            name = p.input[0]
        return None

    def weight_of(node: onnx.NodeProto) -> str | None:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            return stored(node.input[1])
        return None

    def activations(node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and stored(i) is None]

    def upstream_weight(name: str, depth: int = _DEPTH) -> str | None:
        """The weight whose MatMul makes ``name``, through moves only."""
        p = producer.get(name)
        if p is None or depth == 0:
            return None
        w = weight_of(p)
        if w is not None:
            return w
        if p.op_type not in _MOVES:
            return None
        for i in activations(p):
            found = upstream_weight(i, depth - 1)
            if found is not None:
                return found
        return None

    def from_softmax(name: str, depth: int = 4) -> bool:
        p = producer.get(name)
        if p is None or depth == 0:
            return False
        if p.op_type == "Softmax":
            return True
        # Where: torch's attention replaces a fully masked row's NaNs, and the probabilities are one of its branches.
        branches = p.input[1:] if p.op_type == "Where" else p.input[:1]
        return p.op_type in ("Cast", "Dropout", "Identity", "Where") and any(from_softmax(i, depth - 1) for i in branches if i)

    def made_by_weights(name: str, depth: int = 10) -> bool:
        """Every activation path back from ``name`` ends at a weight's MatMul, through element-wise ops only."""
        p = producer.get(name)
        if p is None or depth == 0:
            return False
        if weight_of(p) is not None:
            return True
        acts = activations(p)
        return p.op_type in _ELEMENTWISE and bool(acts) and all(made_by_weights(i, depth - 1) for i in acts)

    cores: list[tuple[int, str]] = []
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and from_softmax(n.input[0]):
            v = upstream_weight(n.input[1])
            if v is not None:
                cores.append((position[id(n)], v))
    values = {v: i for i, (_, v) in enumerate(sorted(cores))}
    starts = [p for p, _ in sorted(cores)]
    downs: dict[str, int] = {}
    for n in g.node:
        w = weight_of(n)
        p = producer.get(n.input[0]) if n.input else None
        if w is None or w in values or p is None or weight_of(p) is not None or not made_by_weights(n.input[0]):
            continue
        layer = sum(s < position[id(n)] for s in starts) - 1
        if layer >= 0:
            downs.setdefault(w, layer)
    graph_outputs = {o.name for o in g.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def reaches_output(name: str, depth: int = 4) -> bool:
        """Whether ``name`` is a graph output, or becomes one through moves (a bias, a reshape) only."""
        if name in graph_outputs:
            return True
        return depth > 0 and any(r.op_type in _MOVES and r.output and reaches_output(r.output[0], depth - 1)
                                 for r in readers.get(name, ()))

    outputs = tuple(dict.fromkeys(w for n in g.node if (w := weight_of(n)) is not None and w not in values
                                  and w not in downs and reaches_output(n.output[0])))
    return DecoderRoles(len(cores), values, downs, outputs)


__all__ = ["DecoderRoles", "decoder_roles"]


def shared_input_groups(model: onnx.ModelProto, names: set[str]) -> tuple[tuple[str, ...], ...]:
    """Weights in ``names`` whose MatMul or Gemm reads the same activation: a layer's Q/K/V, an MLP's gate and up.

    Each weight counts only where one MatMul (or Gemm) of the main graph is
    its only reader, as its second input (directly or through transposes and
    casts); groups are in graph order, and have two members or more.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1

    def stored(name: str) -> str | None:
        for _ in range(_DEPTH):
            if name in names:
                return name if readers.get(name, 0) == 1 else None
            p = producer.get(name)
            if p is None or p.op_type not in _WEIGHT_VIA or not p.input or readers.get(name, 0) != 1:
                return None
            name = p.input[0]
        return None

    by_input: dict[str, list[str]] = {}
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[0] not in names:
            w = stored(n.input[1])
            if w is not None:
                by_input.setdefault(n.input[0], []).append(w)
    return tuple(tuple(ws) for ws in by_input.values() if len(set(ws)) == len(ws) >= 2)
