"""Walking ONNX graphs: every graph and subgraph with a stable path, and name resolution.

Part of the graph layer: this module and ``find``, ``rewrite`` and ``io`` are
the only ones that touch protobuf.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx

MAIN = "main"


@dataclass
class GraphScope:
    """One graph (the main graph or a subgraph) and where it sits."""

    path: str
    graph: onnx.GraphProto
    parent: "GraphScope | None" = None
    # Names defined in this graph: inputs, initializers and node outputs.
    defined: set[str] = field(default_factory=set)


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or ``<op>#<index>`` for unnamed nodes, for paths and messages."""
    return node.name or f"{node.op_type}#{index}"


def iter_scopes(graph: onnx.GraphProto, path: str = MAIN, parent: GraphScope | None = None) -> Iterator[GraphScope]:
    """Yield every graph in depth-first order, parents before their subgraphs."""
    scope = GraphScope(path, graph, parent)
    scope.defined.update(i.name for i in graph.input)
    scope.defined.update(i.name for i in graph.initializer)
    scope.defined.update(i.values.name for i in graph.sparse_initializer if i.values.name)
    for n in graph.node:
        scope.defined.update(o for o in n.output if o)
    yield scope
    for idx, node in enumerate(graph.node):
        for attr in node.attribute:
            subs = list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
            if attr.type == onnx.AttributeProto.GRAPH:
                subs = [attr.g]
            for k, sub in enumerate(subs):
                suffix = f"{attr.name}" if attr.type == onnx.AttributeProto.GRAPH else f"{attr.name}[{k}]"
                yield from iter_scopes(sub, f"{path}/{node_label(node, idx)}:{suffix}", scope)


def resolve(scope: GraphScope, name: str) -> GraphScope | None:
    """The innermost scope that defines ``name`` as seen from ``scope``."""
    s: GraphScope | None = scope
    while s is not None:
        if name in s.defined:
            return s
        s = s.parent
    return None


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    out: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else [])
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                out.update(i for i in list(n.input) + sorted(_subgraph_reads(n)) if i and i not in defined)
                defined.update(n.output)
    return out


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and what its subgraphs take from the outer scope."""
    return [i for i in node.input if i] + sorted(_subgraph_reads(node) - set(node.input))


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name anywhere in the model, to avoid collisions."""
    names: set[str] = set()
    for scope in iter_scopes(model.graph):
        g = scope.graph
        names |= scope.defined
        names.update(v.name for v in g.value_info)
        names.update(o.name for o in g.output)
        for n in g.node:
            names.add(n.name)
            names.update(n.input)
    names.discard("")
    return names


class Namer:
    """Deterministic, collision-free names for new tensors and nodes."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0
