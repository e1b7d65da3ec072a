"""Whole plans measured end to end: never worse than uniform at the same bytes, and the accuracy target.

The per-weight distances a search adds up are a model of the real loss; a
plan's real loss is what the end-to-end evaluator measures with every weight
of the plan quantized at once. This module measures the searched plan and
its rivals (every uniform plan that fits the same budget) and returns the
best, and finds the smallest plan whose measured distance meets
``--max-loss``. Weights are rounded with the final method, once each (a
cache), so what is compared is what is written.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx

from ..config import PER_CHANNEL, Method, QuantConfig, Scheme
from ..errors import BudgetError
from ..executor import Executor, inline, threads
from ..graph.find import WeightSite
from ..graph.io import Spill, has_external_data
from ..graph.rewrite import apply_plan
from ..numerics.statistics import InputStats
from ..planning.cache import SensitivityCache
from ..planning.measure import ErrorTable, Option
from ..numerics.qdq import Grid, QuantizedTensor
from ..numerics.rounding import Rounded, round_weight
from ..planning.search import CONTAINER_WIDTHS, Decision, Plan, SearchSummary, budget_limit, candidates, plan_bytes, search
from .sensitivity import EndToEnd, Progress

log = logging.getLogger(__name__)


_RoundTask = tuple[WeightSite, Grid, Method, "InputStats | None"]


def _round_task(task: _RoundTask) -> Rounded:
    """Round one weight (read from the model here, so a worker process reads its own tensor)."""
    site, grid, method, stats = task
    w = site.array
    w = w.astype(np.float32) if w.dtype == ml_dtypes.bfloat16 else w
    return round_weight(w, grid, method, stats)


@dataclass(frozen=True)
class RoundSpec:
    """How to make one option's dequantized weight where it is used (a :class:`~.sensitivity.Swap`).

    An evaluation task carries this instead of the array: a worker reads
    the weight and rounds it itself, and a block task holding a dozen
    options holds one array at a time.
    """

    task: _RoundTask

    def array(self) -> np.ndarray:
        site, grid, method, _ = self.task
        if method is Method.RTN:  # the same floats as quantizing and dequantizing, without the integer container
            w = site.array  # read afresh: this array is ours to overwrite (a tied table is 671 MB on Gemma 3)
            w = w.astype(np.float32) if w.dtype == ml_dtypes.bfloat16 else w
            return grid.fake_quantize(w, grid.range_of(w), in_place=True).astype(site.np_dtype, copy=False)
        return _round_task(self.task).tensor.dequantize().astype(site.np_dtype, copy=False)


@dataclass(frozen=True)
class Dequantized:
    """A rounded weight, dequantized where it is used (a :class:`~.sensitivity.Swap`): its integers travel, not floats."""

    rounded: Rounded
    dtype: np.dtype

    def array(self) -> np.ndarray:
        return self.rounded.tensor.dequantize().astype(self.dtype)


class Rounder:
    """Rounds (weight, option) pairs with a method and remembers the result, so each is rounded once."""

    def __init__(self, config: QuantConfig, stats: dict[str, InputStats], executor: Executor | None = None) -> None:
        self.config = config
        self.stats = stats
        self.executor = executor
        self._cache: dict[tuple[str, str, int, str, str], Rounded] = {}

    def _task(self, table: ErrorTable, option: Option, method: Method) -> _RoundTask:
        return table.site, table.grid(option, self.config.scheme is Scheme.SYMMETRIC), method, self.stats.get(table.site.name)

    @staticmethod
    def _key(table: ErrorTable, option: Option, method: Method) -> tuple[str, str, int, str, str]:
        return table.site.graph, table.site.name, option.bits, option.layout.name, method.value

    def get(self, table: ErrorTable, option: Option, method: Method | None = None, keep: bool = True) -> Rounded:
        """The weight rounded with ``method`` (default: the configured one); ``keep=False`` does not cache it."""
        method = method or self.config.layer_method
        key = self._key(table, option, method)
        hit = self._cache.get(key)
        if hit is None:
            hit = _round_task(self._task(table, option, method))
            # Round-to-nearest is cheap to redo; only the costly methods are worth the memory.
            if method is not Method.RTN and keep:
                self._cache[key] = hit
        return hit

    def prefetch(self, pairs: Iterable[tuple[ErrorTable, Option]], progress: Progress | None = None) -> None:
        """Round many pairs as parallel tasks (see :mod:`mixq_onnx.executor`); later ``get`` calls hit the cache."""
        method = self.config.layer_method
        todo = list({self._key(t, o, method): (t, o) for t, o in pairs if self._key(t, o, method) not in self._cache}.items())
        if method is Method.RTN or len(todo) < 2:
            return
        tasks = [self._task(t, o, method) for _, (t, o) in todo]
        with (threads() if self.executor is None else nullcontext(self.executor)) as run:
            for i, ((key, _), rounded) in enumerate(zip(todo, run.map(_round_task, tasks))):
                self._cache[key] = rounded
                if progress is not None:
                    progress(i + 1, len(todo), f"rounding ({method.value})")

    def swap(self, table: ErrorTable, option: Option, method: Method | None = None) -> RoundSpec | Dequantized:
        """The option's weight for an evaluation, made where it is used: a recipe where rounding is cheap and not
        kept, else the rounded integers (default method: the configured one)."""
        method = method or self.config.layer_method
        if method is Method.RTN and self._key(table, option, method) not in self._cache:
            return RoundSpec(self._task(table, option, method))
        return Dequantized(self.get(table, option, method), table.site.np_dtype)

    def search_value(self, table: ErrorTable, option: Option) -> RoundSpec | Dequantized:
        """What the search measures: round-to-nearest, or the method with ``--search-with-method``."""
        return self.swap(table, option, self.config.layer_method if self.config.search_with_method else Method.RTN)


@dataclass(frozen=True)
class Measured:
    """One plan measured end to end."""

    label: str
    nbytes: int
    distance: float

    def as_dict(self) -> dict[str, object]:
        return {"plan": self.label, "bytes": self.nbytes, "distance": self.distance}


class RoundedSequence(Sequence[QuantizedTensor]):
    """A plan's quantized tensors, made on demand in order, remembering how each was rounded (for the report).

    Handed to :func:`mixq_onnx.graph.rewrite.apply_plan`, which reads each
    once: with a spill file, one rounded weight is in memory at a time.
    """

    def __init__(self, count: int, produce: Callable[[int], Rounded]) -> None:
        self._count = count
        self._produce = produce
        self._done: dict[int, tuple[Method, str]] = {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> QuantizedTensor:  # type: ignore[override]
        r = self._produce(i)
        self._done[i] = (r.method, r.note)
        return r.tensor

    @property
    def done(self) -> list[tuple[Method, str]]:
        """(method, note) per tensor, in order; every tensor must have been made."""
        return [self._done[i] for i in range(self._count)]


def plan_model(model: onnx.ModelProto, decisions: Sequence[Decision], rounder: Rounder, spill: Spill | None
               ) -> onnx.ModelProto:
    """``model`` with the decided weights as DequantizeLinear of their rounded integers (rounded one at a time)."""
    symmetric = rounder.config.scheme is Scheme.SYMMETRIC
    weights = [(d.table.site, d.table.grid(d.option, symmetric)) for d in decisions]
    tensors = RoundedSequence(len(decisions), lambda i: rounder.get(decisions[i].table, decisions[i].option))
    return apply_plan(model, weights, tensors, any(d.option.qtype.bits == 2 for d in decisions), spill=spill)


def measure_plan(decisions: Iterable[Decision], evaluator: EndToEnd, rounder: Rounder,
                 memo: SensitivityCache | None = None, runner: Executor | None = None) -> float:
    """The end-to-end distance with every weight of the plan quantized (those the evaluator can swap)."""
    return measure_plans([tuple(decisions)], evaluator, rounder, memo, runner)[0]


def measure_plans(plans: Sequence[Sequence[Decision]], evaluator: EndToEnd, rounder: Rounder,
                  memo: SensitivityCache | None = None, runner: Executor | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Each plan's end-to-end distance with every weight it quantizes (those the evaluator can swap), in order.

    On the evaluator's chain of blocks, every plan runs in one sweep of
    the blocks, each block's weights rounded as that block runs. Otherwise
    a plan is measured as a model with DequantizeLinear nodes, not by
    feeding a float copy of every weight: memory holds one rounded weight at
    a time (its integers go to a scratch file when the model's weights live
    on disk), not the whole model again. Plans are models built here one at
    a time, as ``runner`` (default: here) takes them; worker processes
    measure them in parallel. ``memo`` answers a plan measured before
    (keyed by every weight's option and the rounding method).
    """
    chosen = [[d for d in ds if d.table.site.name in evaluator.swappable] for ds in plans]
    runner = runner if runner is not None else inline()
    spills: deque[Spill] = deque()
    streamed = has_external_data(evaluator.model)  # type: ignore[arg-type]

    def models(idx: list[int]) -> Iterator[onnx.ModelProto]:
        for i in idx:
            rounder.prefetch((d.table, d.option) for d in chosen[i])
            spill = Spill() if streamed else None
            if spill is not None:
                spills.append(spill)
            yield plan_model(evaluator.model, chosen[i], rounder, spill)  # type: ignore[arg-type]

    def swapped(idx: list[int]) -> Iterator[float]:
        """On a chain: each block's weights rounded as the block runs, every plan in one sweep of the blocks."""
        rounder.prefetch((d.table, d.option) for i in idx for d in chosen[i])
        swaps = [{d.table.site.name: rounder.swap(d.table, d.option) for d in chosen[i]} for i in idx]
        for k, d in enumerate(evaluator.plan_distances(swaps, runner)):
            if progress is not None:
                progress(k + 1, len(idx))
            yield d

    def as_models(idx: list[int]) -> Iterator[float]:
        try:
            for k, d in enumerate(evaluator.model_distances(models(idx), runner)):
                if spills:  # the oldest plan in flight was measured: its scratch integers can go
                    spills.popleft().close()
                if progress is not None:
                    progress(k + 1, len(idx))
                yield d
        finally:
            while spills:
                spills.popleft().close()

    compute = swapped if evaluator.chain is not None else as_models
    if memo is not None:
        return memo.measured_many([plan_key(ds, evaluator, rounder) for ds in chosen], compute)
    return list(compute(list(range(len(chosen)))))


def plan_key(decisions: Iterable[Decision], evaluator: EndToEnd, rounder: Rounder) -> tuple[str, str, str]:
    """What names a whole-plan measurement: the rounding method and every measured weight's option."""
    ds = [d for d in decisions if d.table.site.name in evaluator.swappable]
    digest = hashlib.blake2b(repr(_signature(ds)).encode(), digest_size=16).hexdigest()
    return "plan", rounder.config.layer_method.value, digest


def uniform_rivals(plan: Plan, config: QuantConfig) -> list[tuple[str, tuple[Decision, ...]]]:
    """Every uniform plan (one width and layout for all searched weights; forced ones kept) the options allow.

    A weight without the layout (a block longer than its axis) uses per-channel, then its cheapest layout, at the same width.
    """
    forced = {d.table.site.name for d in plan.decisions if d.reason.startswith("--force-bits")}
    out = []
    seen = set()
    widths = sorted({o.bits for d in plan.decisions for o in candidates(config, d.table)})
    for bits in widths:
        for layout in config.layouts:
            ds = []
            for d in plan.decisions:
                if d.table.site.name in forced:
                    ds.append(d)
                    continue
                opts = [o for o in candidates(config, d.table) if o.bits == bits]
                pick = next((o for o in opts if o.layout == layout), None) or next((o for o in opts if o.layout == PER_CHANNEL), None) \
                    or min(opts, key=lambda o: o.nbytes, default=None)
                if pick is None:
                    break
                ds.append(Decision(d.table, pick, f"uniform {bits} bits {layout.name}: measured best end to end among plans that fit"))
            else:
                signature = tuple(d.option.key for d in ds)
                if signature not in seen:  # a layout no weight can use repeats another plan
                    seen.add(signature)
                    out.append((f"uniform {bits} bits {layout.name}", tuple(ds)))
    return out


def never_worse_than_uniform(plan: Plan, config: QuantConfig, limit: int, evaluator: EndToEnd, rounder: Rounder,
                             progress: Progress | None = None,
                             fits: Callable[[tuple[Decision, ...]], bool] | None = None,
                             memo: SensitivityCache | None = None, runner: Executor | None = None) -> Plan:
    """The searched plan, or the uniform plan that fits and measures better end to end.

    A rival fits when its bytes are within ``limit``, or when ``fits`` says
    so (``--max-size``: the rival's own file fits, though its weights' bytes
    are a little over a limit estimated for another plan's graph). The
    plans are measured as tasks on ``runner`` (see :func:`measure_plans`).
    """
    rivals = [(label, ds) for label, ds in uniform_rivals(plan, config)
              if plan_bytes(ds) <= limit or (fits is not None and fits(ds))]
    everything = [("searched", plan.decisions), *rivals]
    distances = measure_plans([ds for _, ds in everything], evaluator, rounder, memo, runner,
                              None if progress is None else lambda d, n: progress(d, n, "whole-plan checks"))
    measured = [(Measured(label, plan_bytes(ds), d), ds) for (label, ds), d in zip(everything, distances)]
    best, decisions = min(measured, key=lambda m: (m[0].distance, m[0].nbytes))
    if best.label != "searched":
        log.info("%s measured better end to end than the searched plan; returning it", best.label)
    details = {**plan.summary.details, "measured": [m.as_dict() for m, _ in measured], "returned": best.label,
               "distance": best.distance, "used_bytes": best.nbytes}
    return Plan(decisions, SearchSummary(plan.summary.mode, details))


def smallest_within_loss(tables: list[ErrorTable], config: QuantConfig, max_loss: float, evaluator: EndToEnd,
                         rounder: Rounder, rounds: int = 6, progress: Progress | None = None,
                         memo: SensitivityCache | None = None, runner: Executor | None = None) -> Plan:
    """The smallest plan whose measured end-to-end distance is at most ``max_loss``.

    The knapsack's summed per-weight distances predict a plan's loss; each
    round measures the predicted plan and rescales the target by
    measured/predicted, keeping the smallest plan that measured within the
    loss. Uniform plans are candidates too. Raises BudgetError if even the
    most accurate plan is over the loss.
    """
    accurate = search(tables, config, loss=0.0)  # nothing meets 0: the bisection ends at the most accurate plan
    best_d = measure_plan(accurate.decisions, evaluator, rounder, memo, runner)
    measured = [Measured("most accurate", plan_bytes(accurate.decisions), best_d)]
    if best_d > max_loss:
        raise BudgetError(f"--max-loss {max_loss:g} cannot be met: even the most accurate plan ({plan_bytes(accurate.decisions)} "
                          f"bytes, 8 bits where allowed) measures {best_d:.4g}; raise --max-loss", best_d)
    fits: list[tuple[Measured, tuple[Decision, ...]]] = [(measured[0], accurate.decisions)]
    seen = {_signature(accurate.decisions)}
    target = max_loss
    for k in range(rounds):
        if progress is not None:
            progress(k + 1, rounds, "accuracy target rounds")
        plan = search(tables, config, loss=target)
        if _signature(plan.decisions) in seen:  # the rescaled target picks a plan already measured: converged
            break
        seen.add(_signature(plan.decisions))
        d = measure_plan(plan.decisions, evaluator, rounder, memo, runner)
        predicted = float(plan.summary.details["predicted"])
        m = Measured(f"searched, round {k + 1} (predicted {predicted:.3g})", plan_bytes(plan.decisions), d)
        measured.append(m)
        if d <= max_loss:
            fits.append((m, plan.decisions))
        if predicted <= 0 or d <= 0:
            break
        nxt = target * max_loss / d
        if abs(nxt - target) <= 0.02 * target:
            break
        target = nxt
    rivals = []
    for label, ds in uniform_rivals(accurate, config):
        if _signature(ds) not in seen:
            seen.add(_signature(ds))
            rivals.append((label, ds))
    for (label, ds), d in zip(rivals, measure_plans([ds for _, ds in rivals], evaluator, rounder, memo, runner)):
        m = Measured(label, plan_bytes(ds), d)
        measured.append(m)
        if d <= max_loss:
            fits.append((m, ds))
    best, decisions = min(fits, key=lambda f: (f[0].nbytes, f[0].distance))
    reason = f"smallest plan measured within --max-loss {max_loss:g} ({best.label})"
    decisions = tuple(d if d.reason.startswith("--force-bits") else replace(d, reason=reason) for d in decisions)
    return Plan(decisions, SearchSummary("max-loss", {"max_loss": max_loss, "measured": [x.as_dict() for x in measured],
                                                      "returned": best.label, "distance": best.distance, "used_bytes": best.nbytes}))


def _signature(decisions: Iterable[Decision]) -> tuple[tuple[str, tuple[int, str]], ...]:
    return tuple((d.table.site.name, d.option.key) for d in decisions)


__all__ = ["CONTAINER_WIDTHS", "Measured", "RoundSpec", "Rounder", "budget_limit", "measure_plan", "measure_plans", "plan_key", "never_worse_than_uniform", "smallest_within_loss", "uniform_rivals"]
