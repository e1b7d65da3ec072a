"""End-to-end sensitivity: how far the model's outputs move when one weight is quantized.

One ONNX Runtime session serves every measurement: the searched weights
become graph inputs, so quantizing a weight (or a whole plan) is a matter of
feeding different arrays, never of rebuilding a session. Distances are
computed against the float model's outputs on the same samples:

- outputs whose float values are probabilities (non-negative, summing to 1
  along the last axis) or log-probabilities use KL(float || quantized);
- every other float output uses normalised MSE, ``sum (q - f)^2 / sum f^2``;

and the model's distance is their mean over outputs. Both are close to
additive over independent small perturbations, which is what lets the
knapsack add per-weight distances.
"""

from __future__ import annotations

import enum
import logging
import math
import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..errors import ConfigError
from ..executor import Executor, inline, ort_threads
from ..graph.find import Source, WeightSite, token_input
from ..graph.scopes import MAIN, iter_scopes
from .chain import BlockChain, ChainRun, Replacement, materialize, refusal
from .inputs import Feed, session
from ..planning.cache import SensitivityCache
from ..planning.measure import ErrorTable, Option

if TYPE_CHECKING:
    from .blockwise import BlockProxy

log = logging.getLogger(__name__)

R = TypeVar("R")


class OutputKind(enum.Enum):
    """How an output's distance is measured."""

    PROBABILITIES = "kl"
    LOG_PROBABILITIES = "kl (log-probabilities)"
    # A language model's next-token scores over its vocabulary: KL of their softmax, as the verdict's perplexity.
    LOGITS = "kl (next-token logits)"
    VALUES = "nmse"


def output_kind(values: list[np.ndarray], vocabulary: int | None = None) -> OutputKind | None:
    """KL for probability-like outputs and for next-token logits (``[N, T, V]``, V the ``vocabulary`` of the
    model's token input), NMSE for other float outputs, None for integer ones."""
    if not values or not np.issubdtype(values[0].dtype, np.floating) or values[0].ndim == 0:
        return None
    if vocabulary is not None and vocabulary >= 2 and all(v.ndim == 3 and v.shape[-1] == vocabulary for v in values):
        return OutputKind.LOGITS
    if any(v.shape[-1] < 2 for v in values):
        return OutputKind.VALUES
    arrays = [v.astype(np.float64) for v in values]
    if all(np.all(a >= 0) and np.all(a <= 1 + 1e-6) and np.allclose(a.sum(-1), 1.0, atol=1e-3) for a in arrays):
        return OutputKind.PROBABILITIES
    if all(np.all(a <= 1e-6) and np.allclose(np.exp(a).sum(-1), 1.0, atol=1e-3) for a in arrays):
        return OutputKind.LOG_PROBABILITIES
    return OutputKind.VALUES


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax along the last axis in float64, shifted by the maximum (a fresh array)."""
    out = z.astype(np.float64)
    out -= out.max(-1, keepdims=True)
    out -= np.log(np.exp(out).sum(-1, keepdims=True))
    return out


# Next-token logits kept for the distances, over every sample: a language model's reference outputs are kept at
# every k-th position so that they fit in this (KL is a mean over positions). Gemma 3's 262144-token vocabulary
# makes 32 calibration windows of 128 tokens 4.3 GB of logits.
LOGITS_BYTES = 256 * 2**20


def logits_stride(token_shapes: Sequence[tuple[int, ...]], vocabulary: int | None, budget: int | None = None) -> int:
    """The position stride that keeps every sample's next-token logits (float32 ``[N, T, vocabulary]``, one per
    token input of ``token_shapes``) within ``budget`` (default :data:`LOGITS_BYTES`); 1 when they fit."""
    budget = LOGITS_BYTES if budget is None else budget
    if not vocabulary or not token_shapes or any(len(s) != 2 for s in token_shapes):
        return 1
    total = sum(int(np.prod(s)) for s in token_shapes) * vocabulary * 4
    return max(1, min(-(-total // budget), min(int(s[1]) for s in token_shapes)))


def _kl_sum(p: np.ndarray, q: np.ndarray, log_space: bool, logits: bool = False) -> tuple[float, int]:
    """Sum over positions of KL(p || q) along the last axis, and the number of positions (``logits``: both are
    unnormalised scores, normalised here; a vocabulary of 50k makes this the cost of a run's distance)."""
    if logits:
        lp, lq = _log_softmax(p), _log_softmax(q)
        lq -= lp
        np.exp(lp, out=lp)
        kl = -np.einsum("...v,...v->...", lp, lq)
        return float(np.sum(np.maximum(kl, 0.0))), int(kl.size)
    if log_space:
        lp, lq = p.astype(np.float64), q.astype(np.float64)
        lq = lq - np.logaddexp.reduce(lq, axis=-1, keepdims=True)
        kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    else:
        pp = p.astype(np.float64)
        qq = np.clip(q.astype(np.float64), 1e-12, None)
        qq = qq / qq.sum(-1, keepdims=True)
        kl = np.sum(np.where(pp > 0, pp * (np.log(np.clip(pp, 1e-300, None)) - np.log(qq)), 0.0), axis=-1)
    return float(np.sum(np.maximum(kl, 0.0))), int(kl.size)


@dataclass(frozen=True)
class Eligibility:
    """Which weights the evaluator can swap, and why the others cannot."""

    names: tuple[str, ...]
    reasons: dict[str, str]


def eligibility(model: onnx.ModelProto, sites: Sequence[WeightSite]) -> Eligibility:
    """A weight can be swapped if it can become a main-graph input: fp32/fp16, one definition, no name clash."""
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.name] = counts.get(s.name, 0) + 1
    main_inputs = {i.name for i in model.graph.input}
    ok, reasons = [], {}
    for s in sites:
        if s.np_dtype not in (np.float32, np.float16):
            reasons[s.name] = f"{s.np_dtype} weights cannot be fed to ONNX Runtime"
        elif counts[s.name] > 1:
            reasons[s.name] = "the name is defined in several subgraphs"
        elif s.name in main_inputs:
            reasons[s.name] = "the name is already a graph input"
        else:
            ok.append(s.name)
    return Eligibility(tuple(ok), reasons)


@dataclass(frozen=True)
class InputSpec:
    """What :func:`weights_as_inputs` reads of a weight site, without its data: a worker rebuilds the model from it."""

    name: str
    graph: str
    source: Source
    np_dtype: np.dtype
    shape: tuple[int, ...]

    @staticmethod
    def of(site: WeightSite) -> "InputSpec":
        return InputSpec(site.name, site.graph, site.source, site.np_dtype, site.shape)


def weights_as_inputs(model: onnx.ModelProto, sites: Sequence[WeightSite | InputSpec]) -> onnx.ModelProto:
    """A copy of ``model`` in which each site is a main-graph input of the same name, type and shape.

    Main-graph initializers stay as the input's default value (an
    overridable initializer: ONNX Runtime uses it unless a run feeds the
    name), so a run only feeds the weights it swaps and the float ones stay
    in the model, mapped from disk where they live there. Others (Constant
    nodes, subgraph weights) are removed and must be fed; subgraphs keep
    reading them by name from the outer scope, which ONNX allows.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = {(s.graph, s.name): s for s in sites if not overridable(s)}
    for scope in iter_scopes(out.graph):
        g = scope.graph
        inits = [t for t in g.initializer if (scope.path, t.name) not in wanted]
        if len(inits) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(inits)
        nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output and (scope.path, n.output[0]) in wanted)]
        if len(nodes) != len(g.node):
            del g.node[:]
            g.node.extend(nodes)
    for s in sites:
        elem = helper.np_dtype_to_tensor_dtype(s.np_dtype)
        out.graph.input.append(helper.make_tensor_value_info(s.name, elem, list(s.shape)))
    return out


def overridable(site: WeightSite | InputSpec) -> bool:
    """Whether the evaluator can leave the weight in the model as an overridable initializer."""
    return site.graph == MAIN and site.source is Source.INITIALIZER


class EndToEnd:
    """The float model with its searched weights as inputs, its reference outputs and a distance function."""

    def __init__(self, model: onnx.ModelProto, sites: Sequence[WeightSite], feeds: list[Feed], source: str,
                 known_kinds: Mapping[str, str] | None = None, blocks: int = 0, scratch: Path | None = None) -> None:
        """``known_kinds``: the output kinds that a run of this very model on these samples found (a warm
        ``--sensitivity-cache`` keeps them); then the session and the reference pass wait for the first
        measurement, and a run that finds every measurement in the cache runs neither.

        ``blocks``: run the model as a chain of blocks of up to that many
        searched weights (:mod:`mixq_onnx.runtime.chain`) where it can be
        cut and every searched weight is a main-graph initializer, so no
        session ever holds all the weights; 0 runs one session of the whole
        model. ``scratch``: where the chain spills boundary activations.
        """
        if not feeds:
            raise ConfigError("end-to-end sensitivity needs at least one sample")
        self.eligibility = eligibility(model, sites)
        # A language model's token input indexes a table of this many rows: its logits are compared as KL.
        tokens = token_input(model)
        self._vocabulary = tokens[1] if tokens else None
        names = set(self.eligibility.names)
        chosen = [s for s in sites if s.name in names]
        self.model: onnx.ModelProto | None = model
        self.swappable = frozenset(names)
        # Only weights that had to leave the model are fed on every run; the rest stay in it.
        self.weights = {s.name: s.array for s in chosen if not overridable(s)}
        self._inputs = tuple(InputSpec.of(s) for s in chosen)
        # ONNX Runtime's intra-op threads (0: one per core); a worker process sets its share before its first run.
        self.threads = 0
        self._session_obj: ort.InferenceSession | None = None
        self.chain: BlockChain | None = None
        if blocks > 0 and chosen and not self.weights:
            chain = BlockChain(model, {s.name: (helper.np_dtype_to_tensor_dtype(s.np_dtype), s.shape) for s in chosen},
                               blocks, scratch=scratch)
            self.chain = chain if chain.usable else None
        if known_kinds is None and self.chain is None:
            self._session_obj = self._session(weights_as_inputs(model, chosen))
        # The inputs a session lists: graph inputs without an initializer, less the weights made inputs.
        inits = {t.name for t in model.graph.initializer}
        model_inputs = [i.name for i in model.graph.input if i.name not in inits and i.name not in names]
        self.feeds = self._split_large([{k: f[k] for k in model_inputs} for f in feeds])
        self.logits_stride = logits_stride([np.shape(f[tokens[0]]) for f in self.feeds if tokens[0] in f], self._vocabulary) \
            if tokens else 1
        if self.logits_stride > 1:
            log.info("next-token KL on every %d-th position: the logits of every position would take more than %d MiB",
                     self.logits_stride, LOGITS_BYTES // 2**20)
        if self.chain is not None:
            self.chain.shrink = self._shrink
        self.source = source
        self.samples = sum(_rows(f) for f in self.feeds)
        self.output_names = [o.name for o in model.graph.output]
        self._signals: dict[tuple[int, int], float] = {}
        self._references: list[list[np.ndarray]] | None = None
        self._batched = False
        self._kinds: dict[str, OutputKind] | None = None
        self._known = {n: OutputKind(k) for n, k in (known_kinds or {}).items()}
        if known_kinds is None:
            self._reference_pass()
        self.evaluations = 0

    def _reference_pass(self) -> None:
        """The float outputs on every feed, whether feeds can be stacked, and how each output is compared.

        On the chain, a block that ONNX Runtime refuses to run alone sends
        every measurement back to a session of the whole model.
        """
        if self.chain is not None:
            try:
                self._references = next(self.chain.run([ChainRun()], self.feeds))
            except Exception as exc:  # ORT raises its own types for blocks it cannot run alone
                log.warning("the model cannot be run block by block (%s); measuring on the whole model", refusal(exc))
                self.chain.close()
                self.chain = None
        if self.chain is None:
            self._references = [[self._shrink(n, o) for n, o in zip(self.output_names, self._run(f, {}))] for f in self.feeds]
        self._batched = self._batches_agree()
        kinds = {n: output_kind([r[k] for r in self._references], self._vocabulary) for k, n in enumerate(self.output_names)}
        self._kinds = {n: k for n, k in kinds.items() if k is not None}
        if not self._kinds:
            raise ConfigError("the model has no float outputs to compare")

    @property
    def references(self) -> list[list[np.ndarray]]:
        if self._references is None:
            self._reference_pass()
        return self._references  # type: ignore[return-value]

    def _shrink(self, name: str, a: np.ndarray) -> np.ndarray:
        """A language model's logits output at every ``logits_stride``-th position; anything else as it is."""
        if self.logits_stride > 1 and a.ndim == 3 and a.shape[-1] == self._vocabulary:
            return np.ascontiguousarray(a[:, :: self.logits_stride])
        return a

    @property
    def batched(self) -> bool:
        self.references  # noqa: B018 - made by the reference pass
        return self._batched

    @property
    def kinds(self) -> dict[str, OutputKind]:
        """How each float output is compared (before the reference pass: as the run that made the cache found)."""
        return self._kinds if self._kinds is not None else self._known

    def facts(self) -> dict[str, str]:
        """What a cache file keeps so that a later run can wait with the reference pass (see ``known_kinds``)."""
        if self._kinds is None:
            return {}
        return {"references": "ran", "outputs": json.dumps({n: k.value for n, k in sorted(self._kinds.items())})}

    def _split_large(self, feeds: list[Feed]) -> list[Feed]:
        """Feeds of several rows over ``BATCH_BYTES`` as one feed per row, where the model takes one row.

        Calibration folders arrive in batches of 8; eight page images of
        640 x 640 in one run hold gigabytes of activations, and the
        screening subsample would be a whole batch. Rows are grouped again
        (up to the byte cap) when runs are batched.
        """
        big = [f for f in feeds if _nbytes(f) > BATCH_BYTES and _rows(f) > 1 and all(np.ndim(v) for v in f.values())
               and len({np.shape(v)[0] for v in f.values()}) == 1]
        if not big:
            return feeds
        try:  # a model that fixes its batch size refuses one row
            self._run({k: np.asarray(v)[:1] for k, v in big[0].items()}, {})
        except Exception:
            return feeds
        out: list[Feed] = []
        for f in feeds:
            if any(f is b for b in big):
                out.extend({k: np.asarray(v)[j : j + 1] for k, v in f.items()} for j in range(_rows(f)))
            else:
                out.append(f)
        return out

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        return session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads=self.threads)

    @property
    def session(self) -> ort.InferenceSession:
        """The evaluation session; made again from the model in a worker process that received this evaluator."""
        if self._session_obj is None:
            if self.model is None:
                raise RuntimeError("this evaluator was detached from its model: it measures plan models only")
            self._session_obj = self._session(weights_as_inputs(self.model, self._inputs))
        return self._session_obj

    def __getstate__(self) -> dict[str, object]:
        # A session does not travel: the worker makes its own from the model (which, for weights on disk, is
        # only a graph whose tensors name their data files).
        return {**self.__dict__, "_session_obj": None}

    def close(self) -> None:
        """Remove the chain's spilled boundary values, if any (the evaluator still works: they are made again)."""
        if self.chain is not None:
            self.chain.close()

    def detached(self) -> "EndToEnd":
        """A copy without the model: the references and the distance, for measuring plan models elsewhere."""
        light = copy.copy(self)
        light.model, light._session_obj, light._inputs, light.weights = None, None, (), {}
        return light

    def distances(self, swaps: Sequence[tuple[str, Replacement]], feeds: Sequence[int] | None,
                  runner: Executor) -> Iterator[float]:
        """The distance of each swap (one weight replaced at a time), in order, measured on ``runner``.

        Here, one after the other on this session; on worker processes,
        the swaps are cut into one contiguous chunk per worker, and each
        worker makes one session for its chunk.
        """
        if self.chain is not None:  # each swap runs from the first block that reads its weight
            yield from self.chain_distances([ChainRun({name: r}, self.chain.start_of({name: r})) for name, r in swaps],
                                            feeds, runner)
            return
        if not runner.remote:
            for name, r in swaps:
                yield self.distance({name: materialize(r)}, feeds)
            return
        threads = ort_threads(runner)
        cuts = np.linspace(0, len(swaps), min(runner.workers, len(swaps)) + 1).round().astype(int)
        jobs = ((self, tuple(swaps[a:b]), None if feeds is None else tuple(feeds), threads) for a, b in zip(cuts, cuts[1:]))
        for values in runner.map(_distances_task, jobs):
            self.evaluations += len(values)
            yield from values

    def chain_distances(self, runs: Sequence[ChainRun], feeds: Sequence[int] | None, runner: Executor) -> Iterator[float]:
        """The distance of each run of the chain (its weights replaced, from its start block), in order, on ``runner``.

        Here, the runs go through the blocks together (see
        :meth:`BlockChain.run`); on worker processes, the runs are cut into
        one contiguous chunk per worker, each swept by its worker. Runs start
        late only on samples whose float boundary values are stored
        (:meth:`BlockChain.stored`); those travel with the chunks.
        """
        if self.chain is None:
            raise RuntimeError("this evaluator runs the whole model, not a chain of blocks")
        chosen = tuple(range(len(self.feeds))) if feeds is None else tuple(feeds)
        groups = self.run_groups(chosen)
        stacked, key = self.view(groups)
        if not self.chain.stored(key):
            # Late starts read the float values at every cut, which the block-wise evaluator keeps for its views;
            # on other samples (every page image, say) storing them could take gigabytes: run from block 0.
            runs = [replace(r, start=0) for r in runs]
        if not runner.remote:
            yield from self.chain.run(runs, stacked, key, lambda outs: self._score(zip(groups, outs)))
            return
        threads = ort_threads(runner)
        cuts = np.linspace(0, len(runs), min(runner.workers, len(runs)) + 1).round().astype(int)
        light = copy.copy(self)  # the chunks carry the boundary values of these samples only
        light.chain = self.chain.keeping(key)
        jobs = ((light, tuple(runs[a:b]), chosen, threads) for a, b in zip(cuts, cuts[1:]))
        for values in runner.map(_chain_task, jobs):
            self.evaluations += len(values)
            yield from values

    def plan_distances(self, plans: Iterable[Mapping[str, Replacement]], runner: Executor) -> Iterator[float]:
        """The distance of each plan (its weights replaced at once) on every sample, run as a chain from block 0."""
        yield from self.chain_distances([ChainRun(dict(p)) for p in plans], None, runner)

    def model_distances(self, models: Iterable[onnx.ModelProto], runner: Executor) -> Iterator[float]:
        """:meth:`model_distance` of each model, in order, on ``runner`` (worker processes get a detached copy)."""
        if not runner.remote:
            for m in models:
                yield self.model_distance(m)
            return
        light, threads = self.detached(), ort_threads(runner)
        for d in runner.map(_model_distance_task, ((light, m, threads) for m in models)):
            self.evaluations += 1
            yield d

    def _run(self, feed: Feed, replace_weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.chain is not None:
            return next(self.chain.run([ChainRun(replace_weights)], [feed]))[0]
        return self.session.run(None, {**feed, **self.weights, **replace_weights})

    def _batches_agree(self) -> bool:
        """Whether samples of one shape can run as one batch with the same outputs, stacked along axis 0.

        One run of 32 rows reads the weights once instead of 32 times; on
        models whose outputs are not batch-major (or that fix the batch size)
        the check fails and samples run one at a time.
        """
        # A few samples tell as well as many whether rows are independent and batch-major.
        group = self._groups(range(len(self.feeds)))[0][:BATCH_CHECK_ROWS]
        if len(group) < 2:
            return False
        try:
            outs = self._run(_stack([self.feeds[i] for i in group]), {})
        except Exception:  # ORT refuses a batch the model fixes to 1: run one sample at a time
            return False
        for k, out in enumerate(outs):
            ref = np.concatenate([np.asarray(self.references[i][k]) for i in group]) \
                if all(np.ndim(self.references[i][k]) for i in group) else None
            out = self._shrink(self.output_names[k], np.asarray(out))
            if ref is None or ref.shape != out.shape or ref.dtype != out.dtype:
                return False
            if np.issubdtype(ref.dtype, np.floating):
                scale = float(np.max(np.abs(ref))) if ref.size else 0.0
                if not np.allclose(out, ref, rtol=1e-3, atol=1e-4 * max(scale, 1e-12), equal_nan=True):
                    return False
            elif not np.array_equal(out, ref):
                return False
        return True

    def _groups(self, chosen: Sequence[int]) -> list[list[int]]:
        """Consecutive runs of same-shaped samples of up to ``BATCH_ROWS`` rows and ``BATCH_BYTES`` of input.

        The byte cap keeps ONNX Runtime's activations of one run in bounds:
        32 page images of 640 x 640 stacked would hold gigabytes at once.
        """
        groups: list[list[int]] = []
        rows = size = 0
        for i in chosen:
            r, b = _rows(self.feeds[i]), _nbytes(self.feeds[i])
            if groups and rows + r <= BATCH_ROWS and size + b <= BATCH_BYTES \
                    and _signature(self.feeds[i]) == _signature(self.feeds[groups[-1][0]]):
                groups[-1].append(i)
                rows += r
                size += b
            else:
                groups.append([i])
                rows, size = r, b
        return groups

    def run_groups(self, chosen: Sequence[int]) -> list[list[int]]:
        """How the feeds in ``chosen`` are run: stacked in groups when batching agrees, else one at a time."""
        return self._groups(chosen) if self.batched else [[i] for i in chosen]

    def view(self, groups: Sequence[Sequence[int]]) -> tuple[list[Feed], tuple]:
        """The stacked feeds of ``groups`` and the key the chain keeps their boundary values under."""
        return [self.stacked(g) for g in groups], ("groups", tuple(map(tuple, groups)))

    def stacked(self, group: Sequence[int]) -> Feed:
        """The feeds of one group as one feed (stacked along axis 0)."""
        return _stack([self.feeds[i] for i in group])

    def screening(self) -> tuple[int, ...]:
        """The feeds the screening stage measures on: an eighth of them, spread evenly."""
        return self.subsample(math.ceil(len(self.feeds) / 8))

    def subsample(self, count: int) -> tuple[int, ...]:
        """``count`` feeds spread evenly over all of them (every k-th), so a sorted sample set is still covered."""
        n = len(self.feeds)
        count = max(1, min(count, n))
        return tuple(sorted({int(i) for i in np.linspace(0, n - 1, count).round()}))

    def distance(self, replace_weights: dict[str, np.ndarray], feeds: Sequence[int] | None = None) -> float:
        """Mean over float outputs of the distance between the float outputs and those with ``replace_weights``.

        ``feeds`` limits the measurement to those feed indices (a subsample).
        """
        return self._distance(lambda feed: self._run(feed, replace_weights), feeds)

    def model_distance(self, model: onnx.ModelProto, feeds: Sequence[int] | None = None) -> float:
        """The same distance for ``model``: the float model with weights replaced by DequantizeLinear nodes.

        Used for whole plans: the quantized weights stay integers (and on disk
        for big models) instead of being fed as float copies of every weight.
        Graph optimisations are off, so each DequantizeLinear computes exactly
        the dequantized weight a swap would feed.
        """
        run = session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, threads=self.threads).run  # released on return
        return self._distance(lambda feed: run(None, feed), feeds)

    def _distance(self, run: Callable[[Feed], list[np.ndarray]], feeds: Sequence[int] | None) -> float:
        chosen = range(len(self.feeds)) if feeds is None else feeds
        self.references  # noqa: B018 - the reference pass, if it waited, before anything is compared
        return self._score((group, run(self.stacked(group))) for group in self.run_groups(chosen))

    def _score(self, runs: Iterable[tuple[Sequence[int], list[np.ndarray]]]) -> float:
        """The distance from each group of feeds' outputs (a group's run stacks its feeds, see :meth:`run_groups`)."""
        noise = {name: 0.0 for name in self.kinds}
        signal = {name: 0.0 for name in self.kinds}
        for group, outs in runs:
            starts = [0] * len(self.output_names)
            for i in group:  # a stacked run's outputs are the feeds' outputs one after the other (see _batches_agree)
                for k, name in enumerate(self.output_names):
                    kind = self.kinds.get(name)
                    if kind is None:
                        continue
                    f = self.references[i][k]
                    q = np.asarray(outs[k])
                    if len(group) > 1:
                        q = q[starts[k] : starts[k] + f.shape[0]]
                        starts[k] += f.shape[0]
                    if q.ndim == 3 and q.shape[1] != f.shape[1]:  # a whole run's logits (a chain shrinks them itself)
                        q = self._shrink(name, q)
                    if kind is OutputKind.VALUES:
                        noise[name] += squared_change(q, f)
                        signal[name] += self._signal(i, k)
                    else:
                        total, count = _kl_sum(f, q, kind is not OutputKind.PROBABILITIES, kind is OutputKind.LOGITS)
                        noise[name] += total
                        signal[name] += count
        self.evaluations += 1
        values = []
        for name, kind in self.kinds.items():
            if kind is OutputKind.VALUES:
                values.append(noise[name] / signal[name] if signal[name] > 0 else noise[name])
            else:
                values.append(noise[name] / max(signal[name], 1.0))
        return float(np.mean(values))

    def _signal(self, feed: int, output: int) -> float:
        """Sum of squares of one float reference output: the same at every run, so computed once."""
        key = (feed, output)
        value = self._signals.get(key)
        if value is None:
            value = self._signals[key] = energy(self.references[feed][output])
        return value

    def describe(self) -> dict[str, object]:
        runs = (f"a chain of {len(self.chain.partition.blocks)} block sessions"
                if self.chain is not None else "one session of the whole model")
        return {"samples": self.samples, "source": self.source, "outputs": {n: k.value for n, k in self.kinds.items()},
                "model_runs_as": runs,
                **({"logits_positions": f"every {self.logits_stride}th"} if self.logits_stride > 1 else {}),
                "weights_measured": len(self.eligibility.names),
                "not_measured": dict(sorted(self.eligibility.reasons.items()))}


def squared_change(q: np.ndarray, f: np.ndarray) -> float:
    """Sum of (q - f)^2 in float64: the noise of every normalised-MSE distance (model outputs, block outputs).

    Equal values are no change even where they are infinite (a -inf attention mask that crosses a block
    boundary); a value that turned non-finite is an infinite change.
    """
    with np.errstate(invalid="ignore"):  # inf - inf is handled below
        d = np.subtract(q, f, dtype=np.float64)
    total = float(np.sum(np.square(d, out=d)))
    if math.isnan(total):  # the rare path: inf - inf somewhere
        with np.errstate(invalid="ignore"):
            d = np.subtract(q, f, dtype=np.float64)
        d[np.asarray(q == f)] = 0.0
        total = float(np.sum(np.square(d, out=d)))
        total = math.inf if math.isnan(total) else total
    return total


def energy(a: np.ndarray) -> float:
    """Sum of a^2 in float64 over the finite values: the signal of a normalised-MSE distance (a mask's -inf
    entries, which never change, carry none)."""
    total = float(np.sum(np.square(a, dtype=np.float64)))
    if not math.isfinite(total):
        a = np.asarray(a)
        total = float(np.sum(np.square(a[np.isfinite(a)], dtype=np.float64)))
    return total


def _in_worker(evaluator: EndToEnd, threads: int, measure: Callable[[], R]) -> R:
    """Run ``measure`` in a worker with its share of threads; ONNX Runtime's errors travel back as their text."""
    evaluator.threads = threads
    if evaluator.chain is not None:
        evaluator.chain.threads = threads
    try:
        return measure()
    except Exception as exc:  # ORT's exception types do not always survive the trip back
        raise RuntimeError(str(exc)) from None


def _distances_task(job: tuple[EndToEnd, tuple[tuple[str, Replacement], ...], tuple[int, ...] | None, int]) -> list[float]:
    """A worker's chunk of swaps (see :meth:`EndToEnd.distances`)."""
    evaluator, swaps, feeds, threads = job
    return _in_worker(evaluator, threads, lambda: [evaluator.distance({name: materialize(r)}, feeds) for name, r in swaps])


def _chain_task(job: tuple[EndToEnd, tuple[ChainRun, ...], tuple[int, ...], int]) -> list[float]:
    """A worker's chunk of chain runs (see :meth:`EndToEnd.chain_distances`)."""
    evaluator, runs, feeds, threads = job
    return _in_worker(evaluator, threads, lambda: list(evaluator.chain_distances(runs, feeds, inline())))


def _model_distance_task(job: tuple[EndToEnd, onnx.ModelProto, int]) -> float:
    """One plan model measured in a worker (see :meth:`EndToEnd.model_distances`)."""
    evaluator, model, threads = job
    return _in_worker(evaluator, threads, lambda: evaluator.model_distance(model))


# Samples per run when they can be stacked: large enough that a run reads the weights once for many rows.
BATCH_ROWS = 32
# ... and at most this much input per run (a model's activations grow with its input).
BATCH_BYTES = 8 * 2**20
# Samples stacked to check that a model's rows are independent and batch-major.
BATCH_CHECK_ROWS = 4


def _signature(feed: Feed) -> tuple:
    """What must match for two feeds to stack along axis 0: names, trailing shapes and dtypes."""
    return tuple((k, np.shape(v)[1:], np.asarray(v).dtype.str, np.ndim(v) > 0) for k, v in sorted(feed.items()))


def _stack(feeds: list[Feed]) -> Feed:
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in feeds[0]}


def _nbytes(feed: Feed) -> int:
    return sum(np.asarray(v).nbytes for v in feed.values())


def _rows(feed: Feed) -> int:
    first = np.asarray(next(iter(feed.values()))) if feed else np.zeros(())
    return int(first.shape[0]) if first.ndim else 1


def limit_feeds(feeds: list[Feed], samples: int) -> list[Feed]:
    """The first ``samples`` samples of batched feeds (the last batch cut short if needed)."""
    out, left = [], samples
    for f in feeds:
        if left <= 0:
            break
        rows = _rows(f)
        if rows > left and all(np.asarray(v).ndim for v in f.values()):
            f = {k: np.asarray(v)[:left] for k, v in f.items()}
            rows = left
        out.append(f)
        left -= rows
    return out


Dequantize = Callable[[ErrorTable, Option], Replacement]
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class E2ESummary:
    """What the end-to-end measurement cost and covered, for the report."""

    screen_feeds: int
    feeds: int
    screened: int
    refined: int
    estimated: dict[str, str]
    # The block-wise proxy's summary (see mixq_onnx.runtime.blockwise), when it measured some weights.
    proxy: dict[str, object] | None = None


def _hull_neighbours(options: Sequence[Option], values: dict[tuple[int, str], float], chosen: Option) -> list[Option]:
    """The chosen option and its neighbours on the (bytes, distance) lower hull: the ones a budget shift would pick."""
    ordered = sorted(options, key=lambda o: (o.nbytes, values[o.key]))
    hull: list[Option] = []
    for o in ordered:
        if hull and values[o.key] >= values[hull[-1].key]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (values[b.key] - values[a.key]) * (o.nbytes - a.nbytes) >= (values[o.key] - values[a.key]) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    keep = {chosen.key}
    if chosen in hull:
        i = hull.index(chosen)
        keep |= {h.key for h in hull[max(0, i - 1): i + 2]}
    else:  # off the hull (exact knapsack fill): its hull bracket
        below = [h for h in hull if h.nbytes <= chosen.nbytes]
        above = [h for h in hull if h.nbytes > chosen.nbytes]
        keep |= {h.key for h in below[-1:] + above[:1]}
    return [o for o in options if o.key in keep]


def attach_e2e(
    tables: list[ErrorTable],
    evaluator: EndToEnd,
    dequantize: Dequantize,
    choose: Callable[[list[ErrorTable]], dict[str, Option]],
    progress: Progress | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
    refine_with: Dequantize | None = None,
    proxy: "BlockProxy | None" = None,
    memo: SensitivityCache | None = None,
    labels: tuple[str, str] = ("rtn", "rtn"),
    also: Callable[[list[ErrorTable]], list[dict[str, Option]]] | None = None,
    runner: Executor | None = None,
) -> tuple[list[ErrorTable], E2ESummary]:
    """Every option of every weight measured end to end, screened on a subsample and refined where it matters.

    Stage 1 measures every option on an eighth of the samples, spread
    evenly over them.
    ``choose`` (the search, on those values) picks an option per weight;
    stage 2 re-measures, on all samples, the picked option and its
    neighbours on the weight's (bytes, distance) hull. The other options
    keep their screening value times the weight's full/screen ratio.
    ``refine_with`` (default ``dequantize``) rounds the refined options: the
    pipeline passes the final rounding method, so the values that decide
    are those of the weights that will be written.

    With a ``proxy`` (:class:`mixq_onnx.runtime.blockwise.BlockProxy`), the
    weights it owns are measured on their own block instead of the whole
    model, in both stages, carried to the outputs by each weight's gain
    (fitted on the screening samples).

    Weights the evaluator cannot swap get their weight-error value times
    the median distance/error ratio of the others, and are listed. Weights
    in ``skip`` (forced widths) are not measured.

    ``memo`` answers measurements made before (``--sensitivity-cache``),
    keyed by what was measured, the weight, the option, how it was rounded
    (``labels``: the screening and the final rounding's names) and on which
    samples. ``also`` gives more picks (other budgets' plans) whose hull
    neighbours are refined as well, so those budgets find them measured.

    Each stage's measurements run as tasks on ``runner`` (default: here,
    one after the other): a task per block, and the whole-model ones cut
    into a chunk per worker. ``dequantize`` may return a recipe
    (:class:`~.chain.Swap`) instead of an array, so a task carries how to round a
    weight, not the rounded weight. The values do not depend on the runner.
    """
    n_feeds = len(evaluator.feeds)
    screen = proxy.screen if proxy is not None else evaluator.screening()
    screen_feeds = len(screen)
    runner = runner if runner is not None else inline()
    swappable = set(evaluator.eligibility.names)
    work = [t for t in tables if t.site.name in swappable and t.site.name not in skip]
    by_block = {t.site.name for t in work if proxy is not None and proxy.owns(t.site.name)}
    total = sum(len(t.options) for t in work)
    screened: dict[str, dict[tuple[int, str], float]] = {}

    def counted(values: Iterable[float], label: str, count: int) -> Iterator[float]:
        for i, v in enumerate(values):
            if progress is not None:
                progress(i + 1, count, label)
            yield v

    def measured(parts: list[tuple], compute: Callable[[list[int]], Iterable[float]]) -> list[float]:
        if memo is not None:
            return memo.measured_many(parts, compute)
        return list(compute(list(range(len(parts)))))

    def whole(pairs: Sequence[tuple[ErrorTable, Option]], rounding: Dequantize, label: str,
              feeds: Sequence[int] | None, what: str) -> list[float]:
        """Options measured on the whole model (``feeds``: a subsample, or None for every sample)."""
        if not pairs:
            return []
        parts = [("e2e", t.site.name, *o.key, label, "all" if feeds is None else "screen") for t, o in pairs]
        return measured(parts, lambda idx: counted(evaluator.distances(
            [(pairs[i][0].site.name, rounding(*pairs[i])) for i in idx], feeds, runner), what, len(idx)))

    def block(pairs: Sequence[tuple[ErrorTable, Option]], rounding: Dequantize, label: str, view: str,
              what: str) -> list[float | str]:
        """Options measured on their blocks; a block ONNX Runtime refuses gives its reason (never cached)."""
        if not pairs:
            return []
        parts = [("block", t.site.name, *o.key, label, view) for t, o in pairs]
        failed: dict[int, str] = {}

        def compute(idx: list[int]) -> list[float]:
            values = proxy.measure([(pairs[i][0].site.name, rounding(*pairs[i])) for i in idx], view, runner,  # type: ignore[union-attr]
                                   None if progress is None else lambda d, n: progress(d, n, what))
            failed.update((i, v) for i, v in zip(idx, values) if isinstance(v, str))
            return [math.nan if isinstance(v, str) else v for v in values]

        got = measured(parts, compute)
        for i in failed if memo is not None else ():  # a refusal is not a measurement: not to be found next time
            memo.forget(parts[i])
        return [failed.get(i, v) for i, v in enumerate(got)]

    proxy_info: dict[str, object] | None = None
    if proxy is not None and by_block:
        on_blocks = [t for t in work if t.site.name in by_block]
        pairs = [(t, o) for t in on_blocks for o in t.options]
        values = block(pairs, dequantize, labels[0], "screen", "block sensitivity")
        refused = next((v for v in values if isinstance(v, str)), None)
        if refused is not None:  # ONNX Runtime refused a block on its own: every weight runs the whole model instead
            log.warning("block-wise evaluation failed (%s); every option runs the whole model", refused)
            proxy_info, by_block = {"failed": refused}, set()
        else:
            raw: dict[str, dict[tuple[int, str], float]] = {t.site.name: {} for t in on_blocks}
            for (t, o), v in zip(pairs, values):
                raw[t.site.name][o.key] = float(v)
            by_name = {t.site.name: t for t in on_blocks}
            options = {(t.site.name, o.key): o for t in on_blocks for o in t.options}
            summary = proxy.fit(raw, lambda todo: whole([(by_name[n], options[(n, k)]) for n, k in todo], dequantize,
                                                         labels[0], screen, "block gains and checks"),
                                lambda n, k: f"{k[0]} bits {k[1]}")
            for name, vs in raw.items():
                screened[name] = {k: proxy.predict(name, v) for k, v in vs.items()}
            proxy_info = summary.describe()
    rest = [(t, o) for t in work if t.site.name not in by_block for o in t.options]
    for (t, o), v in zip(rest, whole(rest, dequantize, labels[0], screen, "end-to-end sensitivity")):
        screened.setdefault(t.site.name, {})[o.key] = v
    full: dict[str, dict[tuple[int, str], float]] = {t.site.name: {} for t in work}
    refined = 0
    if screen_feeds < n_feeds or refine_with is not None:
        round_final, final_label = (refine_with, labels[1]) if refine_with is not None else (dequantize, labels[0])

        def measure(todo: list[tuple[ErrorTable, Option]]) -> None:
            """On its block where the weight has one, on every sample; else (or if ORT refuses the block) the whole model."""
            on_block = [(t, o) for t, o in todo if t.site.name in by_block]
            fallback = [(t, o) for t, o in todo if t.site.name not in by_block]
            for (t, o), v in zip(on_block, block(on_block, round_final, final_label, "all", "refinement on every sample")):
                if isinstance(v, str):  # ONNX Runtime refused the block on these samples: the whole model instead
                    if t.site.name in by_block:
                        log.warning("block-wise refinement of %s failed (%s); measuring it on the whole model",
                                    t.site.name, v)
                        by_block.discard(t.site.name)
                    fallback.append((t, o))
                else:
                    full[t.site.name][o.key] = proxy.predict(t.site.name, v)  # type: ignore[union-attr]
            for (t, o), v in zip(fallback, whole(fallback, round_final, final_label, None, "refinement on every sample")):
                full[t.site.name][o.key] = v

        interim = [_with_e2e(t, screened.get(t.site.name)) for t in tables]
        picks = [choose(interim), *(also(interim) if also is not None else [])]
        todo: list[tuple[ErrorTable, Option]] = []
        for t in work:
            keys = {o.key for p in picks for o in _hull_neighbours(t.options, screened[t.site.name], p[t.site.name])}
            todo.extend((t, o) for o in t.options if o.key in keys)
        measure(todo)
        # A weight the subsample hardly exercised (a branch those samples do not take, say) cannot be
        # rescaled from it: all its options are measured on every sample.
        blind = [(t, o) for t in work if not any(screened[t.site.name][k] > 0 for k in full[t.site.name])
                 and any(v > 0 for v in full[t.site.name].values()) for o in t.options if o.key not in full[t.site.name]]
        measure(blind)
        refined = len(todo) + len(blind)
    else:
        full = screened
    if proxy_info is not None and by_block:
        proxy_info.update(block_runs=proxy.block_runs, spilled_bytes=proxy.spilled,  # type: ignore[union-attr]
                          samples={view: len(s) for view, s in proxy.samples.items()})  # type: ignore[union-attr]
    final: dict[str, dict[tuple[int, str], float]] = {}
    for t in work:
        s, f = screened[t.site.name], full[t.site.name]
        ratios = [f[k] / s[k] for k in f if s[k] > 0]
        ratio = float(np.median(ratios)) if ratios else 1.0
        final[t.site.name] = {o.key: f.get(o.key, s[o.key] * ratio) for o in t.options}
    # Weights that cannot be swapped: their own error on the same scale as the others' distances.
    pairs = [(final[t.site.name][o.key], o.nmse) for t in work for o in t.options if o.nmse > 0]
    scale = float(np.median([d / e for d, e in pairs])) if pairs else 1.0
    estimated = {}
    out = []
    for t in tables:
        if t.site.name in final:
            out.append(_with_e2e(t, final[t.site.name]))
        elif t.site.name in skip:
            out.append(t)
        else:
            estimated[t.site.name] = evaluator.eligibility.reasons.get(t.site.name, "not measured")
            out.append(_with_e2e(t, {o.key: o.nmse * scale for o in t.options}))
    log.info("end-to-end sensitivity: %d options screened on %d feed(s) (%d on their block), %d refined on %d", total,
             screen_feeds, sum(len(t.options) for t in work if t.site.name in by_block), refined, n_feeds)
    return out, E2ESummary(screen_feeds, n_feeds, total, refined, estimated, proxy_info)


def _with_e2e(t: ErrorTable, values: dict[tuple[int, str], float] | None) -> ErrorTable:
    if values is None:
        return t
    return replace(t, options=tuple(replace(o, e2e=values[o.key]) for o in t.options))


__all__ = ["E2ESummary", "EndToEnd", "OutputKind", "attach_e2e", "eligibility", "limit_feeds", "output_kind", "weights_as_inputs"]
