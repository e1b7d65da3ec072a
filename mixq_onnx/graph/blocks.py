"""Cut a model's main graph into blocks for block reconstruction (``--method brecq``).

Part of the graph layer. A *cut* is a place in the node order where at most
one tensor that depends on a quantized weight is still needed later: the
residual stream between two residual blocks, the hidden state between two
transformer layers. Everything else alive there (the graph inputs, an
attention mask computed from them) does not change when weights are
quantized; these *side tensors* are fed to the block as they are.

Nodes that compute only from constants (a weight's Transpose or Reshape,
shape arithmetic on constants) belong to no segment: each block that reads
them gets its own copy. The segments between consecutive cuts are merged
greedily into blocks of at most ``max_weights`` quantized weights; a segment
with more weights than that stays one block, since it cannot be cut.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .scopes import reads

log = logging.getLogger(__name__)

# Their outputs do not depend on the values of their inputs, only on shapes.
SHAPE_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Block:
    """A run of main-graph nodes between two cuts."""

    index: int
    nodes: tuple[int, ...]  # positions in graph.node, constant-only helpers included, in graph order
    inputs: tuple[str, ...]  # activations read from before the block (graph inputs, earlier blocks' outputs)
    outputs: tuple[str, ...]  # tensors made here and read later (or graph outputs)
    weights: tuple[str, ...]  # quantized weights this block's nodes read
    affected_inputs: tuple[str, ...]  # inputs that change when earlier weights are quantized


@dataclass(frozen=True)
class Partition:
    blocks: tuple[Block, ...]
    # Weights read by more than one block: kept as rounded by the layer-wise method (one block cannot own them).
    shared: tuple[str, ...]


def partition(model: onnx.ModelProto, weights: Sequence[str], max_weights: int, outputs_cut: bool = False,
              anywhere: bool = False) -> Partition:
    """Blocks of the main graph, in order; ``weights`` are the quantized weights' names (main-graph constants).

    ``outputs_cut``: a graph output that no later node reads does not keep
    a cut from being made (a decoder's ``present.*`` cache outputs, one pair
    per layer, would otherwise leave no cut at all); the block that makes it
    lists it among its outputs all the same. Block reconstruction keeps the
    default, whose blocks hand every graph output to the last block.

    ``anywhere``: cut between any two nodes, not only where one tensor that
    depends on a weight crosses: blocks are then runs of nodes holding up
    to ``max_weights`` weights, whose outputs are every tensor they make
    that is read later. For a measurement on float inputs (the block-wise
    evaluator) any cut works; block reconstruction, which carries quantized
    activations forward, needs the narrow ones.
    """
    g = model.graph
    wanted = set(weights)
    constants = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    graph_inputs = [i.name for i in g.input if i.name not in constants]
    # Constant-only nodes: every read is a constant or another constant-only node's output.
    const_nodes: set[int] = set()
    for k, n in enumerate(g.node):
        if all(r in constants for r in reads(n)):
            const_nodes.add(k)
            constants.update(o for o in n.output if o)
    weight_of: dict[str, set[str]] = {w: {w} for w in wanted}  # constant tensor -> quantized weights it carries
    for k in sorted(const_nodes):
        n = g.node[k]
        carried = set().union(*(weight_of.get(r, set()) for r in reads(n)))
        for o in n.output:
            if o and carried:
                weight_of[o] = carried
    act = [k for k in range(len(g.node)) if k not in const_nodes]
    # Which activations depend on a quantized weight (through anything but a shape op).
    affected: set[str] = set()
    for k in act:
        n = g.node[k]
        if n.op_type not in SHAPE_OPS and any(r in affected or r in weight_of for r in reads(n)):
            affected.update(o for o in n.output if o)
    last_use: dict[str, int] = {}
    for pos, k in enumerate(act):
        for r in reads(g.node[k]):
            if r not in constants:
                last_use[r] = pos
    graph_outputs = {o.name for o in g.output}
    for name in graph_outputs if not outputs_cut else ():
        last_use[name] = len(act)
    made_at: dict[str, int] = {name: -1 for name in graph_inputs}
    for pos, k in enumerate(act):
        for o in g.node[k].output:
            if o:
                made_at[o] = pos
    # A cut after position p is where at most one affected tensor made at or before p is read after it.
    diff = np.zeros(len(act) + 2, np.int64)
    for name, pos in made_at.items():
        end = last_use.get(name, pos)
        if name in affected and end > pos:
            diff[pos + 1] += 1
            diff[end + 1] -= 1
    alive = np.cumsum(diff)  # alive[p + 1]: affected tensors alive across the place after position p
    cut_after = [pos for pos in range(len(act) - 1) if anywhere or alive[pos + 1] <= 1]
    block_weights = [
        {w for r in reads(g.node[k]) for w in weight_of.get(r, set())} for k in act
    ]
    segments: list[tuple[int, int]] = []
    begin = 0
    for pos in cut_after:
        segments.append((begin, pos + 1))
        begin = pos + 1
    segments.append((begin, len(act)))
    merged: list[tuple[int, int]] = []
    count = 0
    for s0, s1 in segments:
        n = len(set().union(*block_weights[s0:s1]))
        # Weightless segments join their neighbour; so do segments while the block stays within max_weights.
        if merged and (n == 0 or count == 0 or count + n <= max_weights):
            merged[-1] = (merged[-1][0], s1)
            count += n
        else:
            merged.append((s0, s1))
            count = n
    if outputs_cut:  # made in a block, listed as its output, but no longer alive across later cuts
        for name in graph_outputs:
            if name in made_at:
                last_use[name] = max(last_use.get(name, -1), _span_end(merged, made_at[name]))
    return _blocks(model, act, merged, const_nodes, constants, weight_of, affected, last_use, wanted)


def _span_end(spans: list[tuple[int, int]], pos: int) -> int:
    """The end of the span that holds position ``pos`` (so a tensor made there counts as the span's output)."""
    for s0, s1 in spans:
        if s0 <= pos < s1:
            return s1
    return pos


def _blocks(model: onnx.ModelProto, act: list[int], spans: list[tuple[int, int]], const_nodes: set[int],
            constants: set[str], weight_of: dict[str, set[str]], affected: set[str], last_use: dict[str, int],
            wanted: set[str]) -> Partition:
    g = model.graph
    producer = {o: k for k in const_nodes for o in g.node[k].output if o}
    owners: dict[str, set[int]] = {}
    blocks = []
    for index, (s0, s1) in enumerate(spans):
        main = [act[p] for p in range(s0, s1)]
        made = {o for k in main for o in g.node[k].output if o}
        helpers: set[int] = set()
        todo = [r for k in main for r in reads(g.node[k]) if r in producer]
        while todo:
            k = producer[todo.pop()]
            if k not in helpers:
                helpers.add(k)
                todo.extend(r for r in reads(g.node[k]) if r in producer)
        nodes = tuple(sorted(set(main) | helpers))
        ins = list(dict.fromkeys(r for k in main for r in reads(g.node[k]) if r not in constants and r not in made))
        outs = [o for k in main for o in g.node[k].output if o and last_use.get(o, -1) >= s1]
        ws = sorted({w for k in nodes for r in reads(g.node[k]) for w in weight_of.get(r, set())} & wanted)
        for w in ws:
            owners.setdefault(w, set()).add(index)
        blocks.append(Block(index, nodes, tuple(ins), tuple(outs), tuple(ws), tuple(i for i in ins if i in affected)))
    shared = tuple(sorted(w for w, b in owners.items() if len(b) > 1))
    return Partition(tuple(blocks), shared)


Shape = tuple[int | str, ...]


def block_model(model: onnx.ModelProto, block: Block, infos: dict[str, tuple[int, Shape]], weights_as_inputs: Sequence[str]
                ) -> onnx.ModelProto:
    """The block as a model of its own: its inputs, then ``weights_as_inputs`` as inputs, its outputs as outputs.

    ``infos`` gives each input's ONNX element type and shape (names for
    dimensions that vary); converters need at least the ranks. The other
    constants it reads are copied in as initializers.
    """
    g = model.graph
    nodes = [g.node[k] for k in block.nodes]
    read = {r for n in nodes for r in reads(n)}
    as_input = [w for w in weights_as_inputs if w in read]
    inits = [t for t in g.initializer if t.name in read and t.name not in as_input]
    # A quantized weight made by a Constant node becomes an input: drop that node.
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output and n.output[0] in as_input)]
    inputs = [helper.make_tensor_value_info(name, *infos[name]) for name in list(block.inputs) + as_input]
    outputs = [helper.make_empty_tensor_value_info(name) for name in block.outputs]
    graph = helper.make_graph(nodes, f"block{block.index}", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


__all__ = ["Block", "Partition", "block_model", "partition", "reads"]
