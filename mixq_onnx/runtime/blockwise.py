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

The cost is the float pass, one probe per weight and a fixed number of
checks (each a whole-model run on an eighth of the samples) and, per
option, one block's run on every sample: options x the model becomes
weights / 8 x the model plus options x one block.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import helper

from ..graph.blocks import Block, Partition, block_model, partition
from ..graph.find import WeightSite
from .inputs import session
from .sensitivity import EndToEnd, overridable
from .store import ActivationStore, tensor_info

log = logging.getLogger(__name__)

# Quantized weights per evaluation block: a block is cut further only where the graph allows it.
BLOCK_WEIGHTS = 4
# Options measured end to end, besides the probes, to state the proxy's rank correlation.
CHECKS = 16
# Boundary activations kept in memory; the rest is memory-mapped from a scratch folder.
STORE_BYTES = 512 * 2**20

Key = tuple[int, str]


@dataclass(frozen=True)
class ProxyCheck:
    """One option measured both ways: the proxy's prediction and the end-to-end distance (screening samples)."""

    weight: str
    option: str
    block: int
    proxy: float
    measured: float
    probe: bool


@dataclass(frozen=True)
class ProxySummary:
    """What the block-wise evaluator did and how well its proxy matched end-to-end measurements."""

    blocks: int
    weights: int
    gains: dict[str, float]
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
                 store_bytes: int = STORE_BYTES, screen: Sequence[int] | None = None) -> None:
        """``screen``: the feeds the gains are fitted on (default: an eighth of them, as the end-to-end screening)."""
        self.evaluator = evaluator
        model = evaluator.model
        eligible = [s for s in sites if s.name in evaluator.swappable and overridable(s)]
        self.partition: Partition = partition(model, [s.name for s in eligible], block_weights, outputs_cut=True)
        shared = set(self.partition.shared)
        self.owner = {w: b.index for b in self.partition.blocks for w in b.weights if w not in shared}
        self.infos = {s.name: (helper.np_dtype_to_tensor_dtype(s.np_dtype), s.shape) for s in eligible}
        self.gains: dict[str, float] = {}
        self.block_runs = 0
        self._session: tuple[int, ort.InferenceSession, list[str]] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="mixq-blocks-")
        self.store = ActivationStore(store_bytes, Path(self._tmp.name))
        n = len(evaluator.feeds)
        self.screen = tuple(screen) if screen is not None else evaluator.subsample(math.ceil(n / 8))
        # Every sample, then the screening samples again (grouped as the whole-model runs on them group them), so a
        # probe's block distance is measured on exactly the samples of its end-to-end run.
        everything, screened = evaluator.run_groups(range(n)), evaluator.run_groups(self.screen)
        self.groups = everything + screened
        self._views = {"all": range(len(everything)), "screen": range(len(everything), len(self.groups))}
        self._passed = False  # the float pass runs at the first block measurement (a warm cache may need none)

    @property
    def usable(self) -> bool:
        """Whether the model was cut: one block is the whole model, where the end-to-end evaluator is as cheap."""
        return len(self.partition.blocks) > 1 and bool(self.owner)

    def owns(self, name: str) -> bool:
        return name in self.owner

    def close(self) -> None:
        self._session = None
        self.store = ActivationStore(0, Path(self._tmp.name))
        self._tmp.cleanup()

    def _block_session(self, block: Block) -> tuple[ort.InferenceSession, list[str]]:
        """The block as a model whose owned weights are overridable initializers (one session kept at a time)."""
        if self._session is not None and self._session[0] == block.index:
            return self._session[1], self._session[2]
        self._session = None
        sess, names = self._new_session(block, {i: tensor_info(self.store.values[i]) for i in block.inputs})
        self._session = (block.index, sess, names)
        return sess, names

    def _new_session(self, block: Block, infos: dict) -> tuple[ort.InferenceSession, list[str]]:
        """A session of the block alone; the weights it owns are overridable initializers, so a run can swap one.

        The float pass uses the same model, so the reference outputs are
        those of this very session with nothing swapped.
        """
        bm = block_model(self.evaluator.model, block, infos, [])
        owned = [w for w in block.weights if self.owner.get(w) == block.index]
        bm.graph.input.extend(helper.make_tensor_value_info(w, *self.infos[w]) for w in owned)
        sess = session(bm, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        return sess, [o.name for o in sess.get_outputs()]

    def _float_pass(self) -> None:
        """Run the float model block by block on every group of samples, keeping what the owning blocks read."""
        self._passed = True
        blocks = self.partition.blocks
        last_owner = max(self.owner.values())
        needed: dict[str, int] = {}  # tensor -> the last block that reads it
        for b in blocks:
            for name in b.inputs:
                needed[name] = b.index
        env: dict[str, list[np.ndarray]] = {}
        feeds = [self.evaluator.stacked(g) for g in self.groups]
        for name in feeds[0]:
            env[name] = [f[name] for f in feeds]
        owning = {i for i in self.owner.values()}
        for b in blocks:
            if b.index > last_owner:
                break
            missing = [i for i in b.inputs if i not in env]
            if missing:  # an input that is neither fed nor made earlier (an optional graph input left out)
                raise RuntimeError(f"block {b.index} reads {missing[0]!r}, which no earlier block makes")
            if b.index in owning:
                for name in b.inputs:
                    if name not in self.store.values:
                        self.store.put(name, env[name])
            sess, names = self._new_session(b, {i: tensor_info(env[i]) for i in b.inputs})
            outs = [sess.run(None, {i: env[i][g] for i in b.inputs}) for g in range(len(self.groups))]
            self.block_runs += len(self.groups)
            for k, name in enumerate(names):
                env[name] = [o[k] for o in outs]
                if b.index in owning:
                    self.store.put(f"{b.index}/out/{name}", env[name])
            for name in [n for n in env if needed.get(n, -1) <= b.index and n not in feeds[0]]:
                del env[name]

    def raw(self, name: str, array: np.ndarray, view: str = "all") -> float:
        """The block distance with ``name`` replaced by ``array``: summed squared change over summed squares.

        ``view``: on every sample ("all") or on the screening samples ("screen").
        """
        if not self._passed:
            self._float_pass()
        block = self.partition.blocks[self.owner[name]]
        sess, names = self._block_session(block)
        noise = signal = 0.0
        for g in self._views[view]:
            outs = sess.run(None, {**{i: self.store.values[i][g] for i in block.inputs}, name: array})
            for k, out in enumerate(outs):
                ref = self.store.values[f"{block.index}/out/{names[k]}"][g]
                if not np.issubdtype(ref.dtype, np.floating):
                    continue
                d = np.asarray(out, np.float64) - np.asarray(ref, np.float64)
                noise += float(np.sum(d * d))
                signal += float(np.sum(np.square(ref, dtype=np.float64)))
        self.block_runs += len(self._views[view])
        return noise / signal if signal > 0 else noise

    def fit(self, raw: dict[str, dict[Key, float]], end_to_end: Callable[[str, Key], float],
            screen_raw: Callable[[str, Key], float], labels: Callable[[str, Key], str], checks: int = CHECKS,
            progress: Callable[[int, int, str], None] | None = None) -> ProxySummary:
        """Each weight's gain from its probe, then held-out checks of the proxy, end to end on the screening samples.

        The probe is the weight's option in the middle of its block
        distances: big enough to be measured above float noise, small
        enough to stay in the near-linear range the other options share.
        The gain is the probe's end-to-end distance over its block distance
        on the same samples; ``raw`` holds block distances on every sample.
        ``end_to_end(name, key)`` measures an option on the whole model and
        ``screen_raw(name, key)`` on its block, both on :attr:`screen`
        (the caller rounds the weight, and may answer from a cache).
        """
        probes: list[tuple[str, Key]] = []
        for name, values in raw.items():
            positive = sorted((v, k) for k, v in values.items() if v > 0)
            if positive:
                probes.append((name, positive[(len(positive) - 1) // 2][1]))
        probe_set = set(probes)
        rest = sorted((v, name, key) for name, values in raw.items() for key, v in values.items()
                      if v > 0 and (name, key) not in probe_set)
        spots = sorted({int(i) for i in np.linspace(0, len(rest) - 1, min(checks, len(rest))).round()}) if rest else []
        held = [(rest[i][1], rest[i][2]) for i in spots]
        measured: dict[tuple[str, Key], float] = {}
        on_screen: dict[str, float] = {}
        for done, (name, key) in enumerate(probes + held):
            measured[(name, key)] = end_to_end(name, key)
            if (name, key) in probe_set:
                on_screen[name] = screen_raw(name, key)
            if progress is not None:
                progress(done + 1, len(probes) + len(held), "block gains and checks")
        # A weight whose options never move its block's outputs (on these samples) gets no gain: its distances are 0.
        self.gains = {name: 0.0 for name in raw} | {name: measured[(name, key)] / on_screen[name]
                                                   for name, key in probes if on_screen[name] > 0}
        found = tuple(ProxyCheck(name, labels(name, key), self.owner[name], self.gains[name] * raw[name][key],
                                 measured[(name, key)], (name, key) in probe_set) for name, key in probes + held)
        rho = spearman([c.proxy for c in found if not c.probe], [c.measured for c in found if not c.probe])
        return ProxySummary(len(self.partition.blocks), len(self.owner), self.gains, found, rho, self.block_runs,
                            self.store.spilled)


__all__ = ["BLOCK_WEIGHTS", "BlockProxy", "ProxyCheck", "ProxySummary", "spearman"]
