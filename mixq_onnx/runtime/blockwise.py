"""Block-wise sensitivity: each option measured on its own block, carried to the outputs by a fitted gain.

Measuring one option end to end costs a whole forward pass, so a search
over every option of every weight costs weights x options x the model. This
evaluator cuts the main graph into blocks (:func:`mixq_onnx.graph.blocks.partition`:
residual joins in CNNs, the residual stream between transformer layers),
keeps the float model's activations at the block boundaries (in memory up to
a budget, memory-mapped beyond it), and measures an option by running only
the block that reads the weight, on those activations:

    block distance = sum (q - f)^2 / sum f^2 over the block's float outputs.

A perturbation of the block's outputs reaches the model's outputs through
the rest of the network; for the small perturbations quantization makes,
the end-to-end distance is close to proportional to the block distance, with
a factor (the *gain*) that depends on where the block sits and on the
direction in which the weight moves the block's outputs. Those directions
differ between the weights of one block (a query projection against a value
projection), not between the options of one weight, so the gain is fitted
per weight: one *probe* per weight, its option in the middle of its block
distances, is measured end to end on the screening samples (an eighth of
them). The proxy for any option is then ``gain x block distance``. (A gain
per block was tried first: on the tiny transformer its rank correlation
with end-to-end distances among same-width options was 0.73-0.80, against
0.97 per weight.)

The proxy's error is stated, not assumed: *checks*, options spread over the
whole range that were not probes, are measured end to end too, and their
rank correlation with the proxy (Spearman) goes into the report. Whole plans
are still measured end to end (see :mod:`mixq_onnx.runtime.plans`), so
"never worse than uniform" does not rest on the proxy.

The measurements follow the end-to-end evaluator's two stages: every
option on the screening samples, then the options a budget shift could pick
(the chosen one and its neighbours on the weight's size/distance hull) on
every sample, both on the block. The cost is the float pass, one probe per
weight and a fixed number of checks (each a whole-model run on an eighth of
the samples), and block runs: options x the model becomes weights / 8 x
the model plus options x one block.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..executor import Executor, inline, ort_threads
from ..graph.blocks import Block, Partition, block_model, partition
from ..graph.find import WeightSite
from ..graph.io import scratch_dir
from .chain import Replacement, block_session, free_dims, materialize, refusal
from .sensitivity import EndToEnd, energy, overridable, squared_change
from .store import ActivationStore, tensor_info

log = logging.getLogger(__name__)

# Quantized weights per evaluation block: a block is cut further only where the graph allows it.
BLOCK_WEIGHTS = 4
# Options measured end to end, besides the probes, to state the proxy's rank correlation.
CHECKS = 16
# Weights that get a second probe, to measure how the end-to-end distance grows with the block distance.
SLOPES = 8
# The exponent of that growth is kept within this range (1: proportional).
EXPONENT_RANGE = (0.25, 1.5)
# Boundary activations kept in memory per view; the "all" view takes fewer samples rather than pass it (the screening
# view, at least one sample, spills to memory-mapped files beyond it).
STORE_BYTES = 1024 * 2**20

Key = tuple[int, str]


@dataclass(frozen=True)
class BlockJob:
    """One block's measurements as a task: the block as a model, its float inputs and outputs per group, the swaps."""

    model: onnx.ModelProto
    inputs: tuple[dict[str, np.ndarray], ...]
    outputs: tuple[str, ...]  # the float outputs compared
    references: tuple[tuple[np.ndarray, ...], ...]
    signal: float
    swaps: tuple[tuple[str, Replacement], ...]
    threads: int


def run_block(job: BlockJob) -> list[float] | str:
    """The block distance of each swap of ``job``, or why ONNX Runtime could not run the block."""
    try:
        sess = block_session(job.model, job.threads)
        out = []
        for name, replacement in job.swaps:
            array = materialize(replacement)
            noise = 0.0
            for feed, refs in zip(job.inputs, job.references):
                for q, f in zip(sess.run(list(job.outputs), {**feed, name: array}), refs):
                    noise += squared_change(q, f)
            out.append(noise / job.signal if job.signal > 0 else noise)
        return out
    except Exception as exc:  # the text travels back from a worker process; the caller falls back
        return refusal(exc)


@dataclass(frozen=True)
class ProxyCheck:
    """One option measured both ways: the proxy's prediction and the end-to-end distance (screening samples)."""

    weight: str
    option: str
    block: int
    proxy: float
    measured: float
    probe: bool  # used to fit the gains or the exponent (not held out)


@dataclass(frozen=True)
class ProxySummary:
    """What the block-wise evaluator did and how well its proxy matched end-to-end measurements."""

    blocks: int
    weights: int
    gains: dict[str, float]
    exponent: float
    checks: tuple[ProxyCheck, ...]
    rank_correlation: float | None
    block_runs: int
    spilled_bytes: int

    def describe(self) -> dict[str, object]:
        held_out = [c for c in self.checks if not c.probe]
        logs = [abs(math.log10(c.proxy / c.measured)) for c in held_out if c.proxy > 0 and c.measured > 0]
        return {
            "blocks": self.blocks,
            "weights": self.weights,
            "block_runs": self.block_runs,
            "spilled_bytes": self.spilled_bytes,
            "gains": {name: float(f"{g:.4g}") for name, g in sorted(self.gains.items())},
            "exponent": self.exponent,
            "rank_correlation": self.rank_correlation,
            "checked": len(held_out),
            "median_abs_log10_ratio": float(np.median(logs)) if logs else None,
            "checks": [{"weight": c.weight, "option": c.option, "block": c.block, "proxy": c.proxy,
                        "measured": c.measured, "probe": c.probe} for c in self.checks],
        }


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties), or None with fewer than 3 pairs or a constant side."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties share their mean rank
        tied = x == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


class BlockProxy:
    """The float activations at block boundaries, one ONNX Runtime session per block, and each block's gain."""

    def __init__(self, evaluator: EndToEnd, sites: Sequence[WeightSite], block_weights: int = BLOCK_WEIGHTS,
                 store_bytes: int = STORE_BYTES, screen: Sequence[int] | None = None, scratch: Path | None = None) -> None:
        """``screen``: the feeds the gains are fitted on (default: an eighth of them, as the end-to-end screening).

        ``scratch``: where a ``.mixq-PID-*`` folder for spilled activations
        is made if any spill (default: the system's temporary folder).
        """
        self.evaluator = evaluator
        model = evaluator.model
        eligible = [s for s in sites if s.name in evaluator.swappable and overridable(s)]
        # On a chain the evaluator's blocks are these blocks, and its float boundary values are these views' stores.
        self.chain = evaluator.chain
        self.partition: Partition = self.chain.partition if self.chain is not None else \
            partition(model, [s.name for s in eligible], block_weights, outputs_cut=True, anywhere=True)
        shared = set(self.partition.shared)
        self.owner = {w: b.index for b in self.partition.blocks for w in b.weights if w not in shared}
        self.infos = {s.name: (helper.np_dtype_to_tensor_dtype(s.np_dtype), s.shape) for s in eligible}
        self.gains: dict[str, float] = {}
        self.exponent = 1.0
        self.block_runs = 0
        self._scratch = scratch
        self._dir: Path | None = None
        self.store_bytes = store_bytes
        self.screen = tuple(screen) if screen is not None else evaluator.screening()
        # The screening samples, grouped as the whole-model runs on them group them, so a probe's block distance is
        # measured on exactly the samples of its end-to-end run; "all" is every sample, or as many as the store holds.
        self.samples: dict[str, tuple[int, ...]] = {"screen": self.screen}
        self.stores: dict[str, ActivationStore] = {}
        self.groups: dict[str, list[list[int]]] = {}
        # Sum of squares of each block's float outputs per view: the denominator of every block distance.
        self._signal: dict[tuple[str, int], float] = {}

    @property
    def usable(self) -> bool:
        """Whether the model was cut: one block is the whole model, where the end-to-end evaluator is as cheap."""
        return len(self.partition.blocks) > 1 and bool(self.owner)

    @property
    def spilled(self) -> int:
        return sum(s.spilled for s in self.stores.values())

    def owns(self, name: str) -> bool:
        return name in self.owner

    def close(self) -> None:
        self.stores = {}
        if self.chain is not None:  # its stores are made again if a later measurement needs them
            self.chain.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _spill_dir(self) -> Path:
        if self._dir is None:
            self._dir = scratch_dir(self._scratch)
        return self._dir

    def _block_model(self, block: Block, infos: dict) -> onnx.ModelProto:
        """The block alone; the weights it owns are overridable initializers, so a run can swap one.

        The float pass uses the same model, so the reference outputs are
        those of the very model the options run on, with nothing swapped
        (see :func:`mixq_onnx.runtime.chain.free_dims` for the inputs' shapes).
        """
        bm = block_model(self.evaluator.model, block, free_dims(infos), [])  # type: ignore[arg-type]
        owned = [w for w in block.weights if self.owner.get(w) == block.index]
        bm.graph.input.extend(helper.make_tensor_value_info(w, *self.infos[w]) for w in owned)
        return bm

    def _view(self, view: str) -> tuple[ActivationStore, list[list[int]]]:
        """The stored float activations of a view, made by a float pass on first use.

        The screening view comes first. The "all" view takes every sample
        unless their boundary activations would pass the store's budget
        (images of hundreds of pixels a side keep hundreds of megabytes per
        sample): then as many samples, spread over all of them, as fit.
        """
        if view in self.stores:
            return self.stores[view], self.groups[view]
        if view == "all":
            screen_store, _ = self._view("screen")
            n = len(self.evaluator.feeds)
            per_feed = (screen_store.in_memory + screen_store.spilled) / len(self.screen)
            fit = int(self.store_bytes // per_feed) if per_feed > 0 else n
            self.samples["all"] = tuple(range(n)) if fit >= n else self.evaluator.subsample(max(fit, len(self.screen)))
            if self.samples["all"] == self.screen:  # no room for more samples than the screening ones: the same view
                self.stores["all"], self.groups["all"] = self.stores["screen"], self.groups["screen"]
                return self.stores["all"], self.groups["all"]
        groups = self.evaluator.run_groups(self.samples[view])
        if self.chain is not None:  # the chain's float sweep keeps every boundary, under the key its runs use
            store = self.chain.boundaries(*self.evaluator.view(groups))
        else:
            store = ActivationStore(self.store_bytes, lambda: self._spill_dir() / view)
            self._float_pass(store, groups)
        self.stores[view], self.groups[view] = store, groups
        return store, groups

    def _float_pass(self, store: ActivationStore, groups: list[list[int]]) -> None:
        """Run the float model block by block on ``groups``, keeping what the owning blocks read and make."""
        blocks = self.partition.blocks
        last_owner = max(self.owner.values())
        needed: dict[str, int] = {}  # tensor -> the last block that reads it
        for b in blocks:
            for name in b.inputs:
                needed[name] = b.index
        feeds = [self.evaluator.stacked(g) for g in groups]
        env: dict[str, list[np.ndarray]] = {name: [f[name] for f in feeds] for name in feeds[0]}
        owning = set(self.owner.values())
        for b in blocks:
            if b.index > last_owner:
                break
            missing = [i for i in b.inputs if i not in env]
            if missing:  # an input that is neither fed nor made earlier (an optional graph input left out)
                raise RuntimeError(f"block {b.index} reads {missing[0]!r}, which no earlier block makes")
            sess = block_session(self._block_model(b, {i: tensor_info(env[i]) for i in b.inputs}))
            names = [o.name for o in sess.get_outputs()]
            outs = [sess.run(None, {i: env[i][g] for i in b.inputs}) for g in range(len(groups))]
            self.block_runs += len(groups)
            for k, name in enumerate(names):
                env[name] = [o[k] for o in outs]
            # A tensor has one float value: stored once, whether a block reads it or makes it (or both).
            for name in (*b.inputs, *names) if b.index in owning else ():
                if name not in store.values:
                    store.put(name, env[name])
            for name in [n for n in env if needed.get(n, -1) <= b.index and n not in feeds[0]]:
                del env[name]

    def measure(self, swaps: Sequence[tuple[str, Replacement]], view: str = "all", runner: Executor | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[float | str]:
        """The block distance of each swap (``name`` replaced): summed squared change over summed squares.

        ``view``: on every sample ("all") or on the screening samples
        ("screen"). The swaps of one block are one task on ``runner``
        (default: here, in turn); a block that ONNX Runtime refuses to run
        gives each of its swaps the refusal's text instead of a distance.
        ``progress(done, total)`` is called as each block's task returns.
        """
        runner = runner if runner is not None else inline()
        try:
            store, groups = self._view(view)
        except Exception as exc:  # ONNX Runtime refused a block in the float pass: no swap can be measured
            return [refusal(exc)] * len(swaps)
        order: dict[int, list[int]] = {}
        for i, (name, _) in enumerate(swaps):
            order.setdefault(self.owner[name], []).append(i)
        threads = ort_threads(runner)

        def jobs() -> Iterator[BlockJob]:
            for b, picked in order.items():
                block = self.partition.blocks[b]
                floats = [n for n in block.outputs if np.issubdtype(store.values[n][0].dtype, np.floating)]
                signal = self._signal.get((view, b))
                if signal is None:
                    signal = self._signal[(view, b)] = sum(
                        energy(store.values[n][g]) for g in range(len(groups)) for n in floats)
                yield BlockJob(self._block_model(block, {i: tensor_info(store.values[i]) for i in block.inputs}),
                               tuple({i: store.values[i][g] for i in block.inputs} for g in range(len(groups))),
                               tuple(floats), tuple(tuple(store.values[n][g] for n in floats) for g in range(len(groups))),
                               signal, tuple(swaps[i] for i in picked), threads)

        out: list[float | str] = [0.0] * len(swaps)
        done = 0
        for picked, values in zip(order.values(), runner.map(run_block, jobs())):
            self.block_runs += len(groups) * len(picked)
            for i, v in zip(picked, values if isinstance(values, list) else [values] * len(picked)):
                out[i] = v
            done += len(picked)
            if progress is not None:
                progress(done, len(swaps))
        return out

    def raw(self, name: str, array: np.ndarray, view: str = "all") -> float:
        """The block distance of one swap, here (see :meth:`measure`); raises if ONNX Runtime refuses the block."""
        value = self.measure([(name, array)], view)[0]
        if isinstance(value, str):
            raise RuntimeError(value)
        return value

    def fit(self, raw: dict[str, dict[Key, float]], end_to_end: Callable[[list[tuple[str, Key]]], list[float]],
            labels: Callable[[str, Key], str], checks: int = CHECKS) -> ProxySummary:
        """Each weight's gain from its probe, then held-out checks of the proxy, end to end on the screening samples.

        The probe is the weight's option in the middle of its block
        distances: big enough to be measured above float noise, small
        enough to stay in the near-linear range the other options share.
        ``raw`` holds block distances on :attr:`screen`, and
        ``end_to_end(pairs)`` measures (name, option) pairs on the whole
        model on the same samples (the caller rounds the weights, and may
        answer from a cache); the gain is the probe's ratio of the two.
        """
        probes: list[tuple[str, Key]] = []
        for name, values in raw.items():
            positive = sorted((v, k) for k, v in values.items() if v > 0)
            if positive:
                probes.append((name, positive[(len(positive) - 1) // 2][1]))
        # Slope probes: for a few weights spread over the model, the option farthest (in block distance) from the
        # probe, so the exponent of the response can be measured on pairs of one weight's options.
        spread = [probes[int(i)] for i in np.linspace(0, len(probes) - 1, min(SLOPES, len(probes))).round()] if probes else []
        slopes: list[tuple[str, Key]] = []
        for name, key in dict.fromkeys(spread):
            p = raw[name][key]
            far = max(((abs(math.log(v / p)), k) for k, v in raw[name].items() if v > 0), default=(0.0, key))
            if far[0] > math.log(2):
                slopes.append((name, far[1]))
        fitted = set(probes) | set(slopes)
        rest = sorted((v, name, key) for name, values in raw.items() for key, v in values.items()
                      if v > 0 and (name, key) not in fitted)
        spots = sorted({int(i) for i in np.linspace(0, len(rest) - 1, min(checks, len(rest))).round()}) if rest else []
        held = [(rest[i][1], rest[i][2]) for i in spots]
        todo = probes + slopes + held
        measured = dict(zip(todo, end_to_end(todo)))
        probe_of = dict(probes)
        ratios = []
        for name, key in slopes:
            p = probe_of[name]
            a, b = measured[(name, p)], measured[(name, key)]
            if a > 0 and b > 0:
                ratios.append(math.log(b / a) / math.log(raw[name][key] / raw[name][p]))
        # The exponent: 1 is proportional; a saturating output (a sigmoid map, say) grows slower than its blocks.
        self.exponent = float(np.clip(np.median(ratios), *EXPONENT_RANGE)) if ratios else 1.0
        # A weight whose options never move its block's outputs (on these samples) gets no gain: its distances are 0.
        self.gains = {name: 0.0 for name in raw} | {name: measured[(name, key)] / raw[name][key] ** self.exponent
                                                   for name, key in probes}
        found = tuple(ProxyCheck(name, labels(name, key), self.owner[name], self.predict(name, raw[name][key]),
                                 measured[(name, key)], (name, key) in fitted) for name, key in todo)
        rho = spearman([c.proxy for c in found if not c.probe], [c.measured for c in found if not c.probe])
        return ProxySummary(len(self.partition.blocks), len(self.owner), self.gains, self.exponent, found, rho,
                            self.block_runs, self.spilled)

    def predict(self, name: str, block_distance: float) -> float:
        """The proxy for the end-to-end distance: the weight's gain times its block distance to the fitted exponent."""
        return self.gains[name] * block_distance ** self.exponent if block_distance > 0 else 0.0


__all__ = ["BLOCK_WEIGHTS", "BlockProxy", "ProxyCheck", "ProxySummary", "spearman"]
