"""Whole-model runs as a chain of block sessions, so that one block's weights are loaded at a time.

An ONNX Runtime session of the whole model maps or copies every weight: on a
4 GB model the evaluator alone holds 4 GB. The chain cuts the main graph
into blocks (:func:`mixq_onnx.graph.blocks.partition`, the same cuts as the
block-wise evaluator) and runs a model block by block: a session for block
0, every run's outputs of it, the session released, then block 1 on those
outputs, and so on. Many runs go through each block together (a *sweep*),
so a block's session is made once per sweep, not once per run.

A run may replace weights (every searched weight a block reads is an
overridable input of that block's model) and may start at a later block:
a weight changes nothing before the first block that reads it, so a run
that replaces only that weight starts there, reading the float values of
the tensors that cross into it from a store kept by one float sweep
(:meth:`BlockChain.boundaries`). On a decoder, a weight in layer ``k`` of
``n`` costs ``(n - k) / n`` of a forward pass instead of a whole one.

Runs in flight hold their live activations; a sweep takes as many runs at
once as fit :data:`LIVE_BYTES` (measured on its first run), and more runs
make more sweeps.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..graph.blocks import Block, Partition, block_model, partition
from ..graph.io import scratch_dir, tensor_nbytes
from .inputs import Feed, session
from .store import ActivationStore, Shape, tensor_info

log = logging.getLogger(__name__)

R = TypeVar("R")

# Activations of the runs in flight in one sweep (each run keeps the tensors still to be read, per feed).
LIVE_BYTES = 256 * 2**20
# Float boundary activations kept in memory per store; beyond it they are memory-mapped from scratch files.
STORE_BYTES = 1024 * 2**20


class Swap(Protocol):
    """A replacement weight made where it is used (a rounding task), so tasks carry recipes rather than arrays."""

    def array(self) -> np.ndarray: ...


Replacement = Union[np.ndarray, Swap]


def materialize(replacement: Replacement) -> np.ndarray:
    return replacement if isinstance(replacement, np.ndarray) else replacement.array()


def _keep(outputs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    return outputs


def refusal(exc: BaseException) -> str:
    """ONNX Runtime's refusal in one line, as reports and warnings give it."""
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def block_session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    """A session for one block: all graph optimisations, and no memory arena kept between its short runs."""
    return session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, arena=False, threads=threads)


def free_dims(infos: Mapping[str, tuple[int, Shape]]) -> dict[str, tuple[int, Shape]]:
    """Activation inputs (rank 2 or more) with free dimensions; shapes and sizes (rank 0 and 1) keep theirs.

    Groups of samples stack differently, and the batch is not always the
    first axis (a recurrent layer's ``[T, N, C]``); operators such as
    Resize read the lengths of rank-1 inputs. Each input's dimensions get
    names of their own: ONNX Runtime takes one name for one size everywhere
    in the graph, and a shared name on two inputs that differ (Gemma's one
    key/value head beside its four query heads) makes it reuse a buffer of
    the wrong size.
    """
    return {k: (t, tuple(f"in{j}_d{i}" for i in range(len(dims))) if len(dims) >= 2 else dims)
            for j, (k, (t, dims)) in enumerate(infos.items())}


@dataclass(frozen=True)
class ChainRun:
    """One run through the chain: weights replaced by name, and the first block run (earlier ones are float)."""

    swaps: Mapping[str, Replacement] = field(default_factory=dict)
    start: int = 0


class BlockChain:
    """The main graph as blocks run one after another, each with its own session; see the module's docstring."""

    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, tuple[int, tuple[int, ...]]], block_weights: int,
                 store_bytes: int = STORE_BYTES, live_bytes: int = LIVE_BYTES, scratch: Path | None = None,
                 cut_by: Sequence[str] | None = None) -> None:
        """``weights``: the replaceable weights (main-graph initializers) by name, with ONNX element type and shape.

        ``scratch``: where a ``.mixq-PID-*`` folder for spilled boundary
        activations is made if any spill (default: the system's temporary
        folder). ``cut_by``: the initializers a block holds up to
        ``block_weights`` of (default: ``weights``).
        """
        self.model = model
        self.weights = dict(weights)
        self.partition: Partition = partition(model, list(cut_by if cut_by is not None else self.weights), block_weights,
                                              outputs_cut=True, anywhere=True)
        blocks = self.partition.blocks
        self.readers: dict[str, tuple[int, ...]] = {}
        for b in blocks:
            for w in b.weights:
                self.readers[w] = (*self.readers.get(w, ()), b.index)
        made = {o for b in blocks for o in b.outputs}
        self.output_names = tuple(o.name for o in model.graph.output)
        # The last block that makes a graph output: a run's outputs are all made once it has run.
        self.final = max(b.index for b in blocks if any(o in self.output_names for o in b.outputs)) if self.output_names \
            and any(o in made for o in self.output_names) else len(blocks) - 1
        self.made_out = frozenset(self.output_names)
        # Applied to each graph output as a block makes it, before it is held for the run's reduction (the
        # evaluator keeps a language model's logits at every k-th position: see sensitivity.LOGITS_BYTES).
        self.shrink: Callable[[str, np.ndarray], np.ndarray] | None = None
        self.last_read: dict[str, int] = {}
        for b in blocks:
            for name in b.inputs:
                self.last_read[name] = b.index
        # Runnable as a chain: cut at least once, and every graph output made by a block (not a constant or an input).
        self.usable = len(blocks) > 1 and all(o in made for o in self.output_names)
        self.threads = 0
        self.store_bytes = store_bytes
        self.live_bytes = live_bytes
        self.runs = 0  # block runs made
        self._scratch = scratch
        self._dir: Path | None = None
        self._stores: dict[Hashable, ActivationStore] = {}
        self._peak: dict[Hashable, int] = {}  # live bytes of one run on a key's feeds, as measured

    def __getstate__(self) -> dict[str, object]:
        # A worker reads the stores' arrays (memory maps travel as arrays) and never spills or removes the folder.
        return {**self.__dict__, "_dir": None, "_scratch": None}

    def start_of(self, swaps: Mapping[str, Replacement]) -> int:
        """The first block whose outputs ``swaps`` change: the earliest block that reads one of the weights."""
        return min((self.readers[w][0] for w in swaps if w in self.readers), default=len(self.partition.blocks))

    def close(self) -> None:
        """Drop the boundary stores and their scratch files (made again on demand; the measured peaks stay)."""
        self._stores = {}
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _spill_dir(self, key: Hashable) -> Path:
        if self._dir is None:
            self._dir = scratch_dir(self._scratch)
        return self._dir / f"s{len(self._stores)}"

    def keeping(self, key: Hashable) -> "BlockChain":
        """A copy that shares everything but keeps only the boundary values under ``key`` (to send to a worker)."""
        light = copy.copy(self)
        light._stores = {key: self._stores[key]} if key in self._stores else {}
        return light

    def stored(self, key: Hashable) -> bool:
        """Whether the float boundary values under ``key`` are kept (runs on those feeds can start late)."""
        return key in self._stores

    def boundaries(self, feeds: Sequence[Feed], key: Hashable) -> ActivationStore:
        """The float values of every tensor that crosses a cut (and of every graph output) on ``feeds``, per feed.

        Made by one float sweep on first use and kept under ``key`` (the
        caller's name for this list of feeds): runs that start at a later
        block read their float inputs from it, and the block-wise evaluator
        reads each block's float inputs and outputs from it.
        """
        store = self._stores.get(key)
        if store is None:
            store = ActivationStore(self.store_bytes, lambda: self._spill_dir(key))
            self._sweep([ChainRun()], feeds, None, store, key)
            self._stores[key] = store
        return store

    def run(self, runs: Sequence[ChainRun], feeds: Sequence[Feed], key: Hashable | None = None,
            reduce: Callable[[list[list[np.ndarray]]], R] = _keep) -> Iterator[R]:  # type: ignore[assignment]
        """``reduce`` of each run's graph outputs on each feed (``[feed][output]``), in order, a sweep's worth at a time.

        ``reduce`` is applied as soon as a run's outputs are made, so a
        sweep holds the runs' boundary activations, not their outputs (a
        decoder's logits are most of its activations). Runs that start
        after block 0 need :meth:`boundaries` of the same feeds under
        ``key`` (made here if missing).
        """
        store = self.boundaries(feeds, key) if any(r.start > 0 for r in runs) else None
        at = 0
        while at < len(runs):
            peak = self._peak.get(key)
            count = 1 if peak is None else max(1, self.live_bytes // max(peak, 1))
            yield from self._sweep(runs[at : at + count], feeds, store, None, key, reduce)
            at += count

    def _sweep(self, runs: Sequence[ChainRun], feeds: Sequence[Feed], store: ActivationStore | None,
               record: ActivationStore | None, key: Hashable | None,
               reduce: Callable[[list[list[np.ndarray]]], R] = _keep) -> list[R]:  # type: ignore[assignment]
        """Every run through every block it reaches, block by block; ``record`` keeps the boundary values."""
        blocks = self.partition.blocks
        live: list[list[dict[str, np.ndarray]]] = [[{} for _ in feeds] for _ in runs]
        results: dict[int, R] = {}
        peak = 0

        def value(r: int, g: int, name: str) -> np.ndarray:
            got = live[r][g].get(name)
            if got is not None:
                return got
            if name in feeds[g]:
                return np.asarray(feeds[g][name])
            if store is None:
                raise RuntimeError(f"block input {name!r} is neither fed nor made by an earlier block")
            return store.values[name][g]

        def finish(r: int) -> None:
            results[r] = reduce([[value(r, g, name) for name in self.output_names] for g in range(len(feeds))])
            live[r] = [{} for _ in feeds]

        # A recording sweep goes through every block (the block-wise evaluator reads blocks past the last output too).
        end = self.final if record is None else len(blocks) - 1
        for r, run in enumerate(runs):
            if run.start > end:  # nothing it changes reaches an output: the float outputs
                finish(r)
        for b in blocks:
            active = [r for r, run in enumerate(runs) if run.start <= b.index and r not in results]
            if not active:
                continue
            inputs = [[{i: value(r, g, i) for i in b.inputs} for g in range(len(feeds))] for r in active]
            infos = {i: tensor_info([f[i] for per_run in inputs for f in per_run]) for i in b.inputs}
            sess = block_session(self._block_model(b, infos), self.threads)
            names = [o.name for o in sess.get_outputs()]
            for r, per_run in zip(active, inputs):
                arrays = {w: materialize(runs[r].swaps[w]) for w in b.weights if w in runs[r].swaps}
                for g, feed in enumerate(per_run):
                    made = zip(names, sess.run(None, {**feed, **arrays}))
                    if self.shrink is not None and record is None:  # a recording sweep keeps outputs whole
                        made = ((n, self.shrink(n, a) if n in self.made_out and self.last_read.get(n, -1) <= b.index
                                 else a) for n, a in made)
                    live[r][g].update(made)
                    self.runs += 1
                del arrays
                if record is not None:
                    for name in (*b.inputs, *names):
                        if name not in record.values:
                            record.put(name, [value(r, g, name) for g in range(len(feeds))])
                if b.index == end:  # its outputs reduced now: a sweep never holds every run's outputs at once
                    finish(r)
            del inputs, sess
            for r in active:
                if r in results:
                    continue
                for g in range(len(feeds)):
                    for name in [n for n in live[r][g] if self.last_read.get(n, -1) <= b.index and n not in self.made_out]:
                        del live[r][g][name]
                peak = max(peak, sum(a.nbytes for env in live[r] for a in env.values()))
        if key is not None:
            self._peak[key] = max(self._peak.get(key, 0), peak)
        return [results[r] for r in range(len(runs))]

    def _block_model(self, block: Block, infos: dict[str, tuple[int, Shape]]) -> onnx.ModelProto:
        """The block alone; the replaceable weights it reads are overridable initializers (inputs with defaults)."""
        bm = block_model(self.model, block, free_dims(infos), [])
        bm.graph.input.extend(helper.make_tensor_value_info(w, *self.weights[w]) for w in block.weights if w in self.weights)
        return bm


# Initializers of at least this many bytes count towards a block's size when the float model alone is chained.
LARGE_BYTES = 2**20


def float_runner(model: onnx.ModelProto, block_weights: int = 4, large_bytes: int = LARGE_BYTES
                 ) -> Callable[[Feed], list[np.ndarray]] | None:
    """Runs of the float model as a chain of blocks of up to ``block_weights`` initializers of at least
    ``large_bytes``, or None if it cannot be cut.

    For checks that run a big model before the evaluator exists (whether
    generated inputs run): the weights are read a block at a time.
    """
    large = [t.name for t in model.graph.initializer if tensor_nbytes(t) >= large_bytes]
    chain = BlockChain(model, {}, block_weights, cut_by=large) if large else None
    if chain is None or not chain.usable:
        return None
    return lambda feed: next(chain.run([ChainRun()], [feed]))[0]


__all__ = ["float_runner", "refusal", "BlockChain", "ChainRun", "LIVE_BYTES", "Replacement", "STORE_BYTES", "Swap", "block_session", "free_dims",
           "materialize"]
