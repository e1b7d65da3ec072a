"""Choose a bit-width and layout per weight: uniform, the MixQuant rule, or a size budget.

Pure Python/numpy: it works on error tables and never sees ONNX.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from ..config import Budget, KQuantMixed, LayerWeighting, MixQuantRule, QuantConfig, Uniform
from ..kinds import Granularity
from ..errors import BudgetError
from .measure import ErrorTable, Option, Spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """The option chosen for one weight, and why."""

    table: ErrorTable
    option: Option
    reason: str


@dataclass(frozen=True)
class SearchSummary:
    """What the search did, as data for the report."""

    mode: str
    details: dict[str, float | int | str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    summary: SearchSummary


def effective_bits(config: QuantConfig, options: Sequence[Option | Spec]) -> list[int]:
    """Candidate bit-widths after the storage-aware rule.

    By default only the widest candidate per container is kept: 3 bits in an
    INT4 container costs the same bytes as 4 and is strictly lossier.
    """
    bits = sorted({o.bits for o in options if o.bits in config.candidate_bits})
    if not config.storage_aware:
        return bits
    widest: dict[str, int] = {}
    for o in options:
        if o.bits in bits:
            widest[o.qtype.name] = max(widest.get(o.qtype.name, 0), o.bits)
    return sorted(set(widest.values()))


def candidates(config: QuantConfig, table: ErrorTable) -> list[Option]:
    keep = set(effective_bits(config, table.options))
    return [o for o in table.options if o.bits in keep]


def _first_layout_option(table: ErrorTable, bits: int) -> Option:
    for o in table.options:
        if o.bits == bits:
            return o
    # Containers below the opset cap can be missing; fall back to the widest measured.
    return max(table.options, key=lambda o: (o.bits <= bits, o.bits))


def _forced(config: QuantConfig, table: ErrorTable) -> Decision | None:
    bits = config.forced_bits(table.site.names)
    if bits is None:
        return None
    return Decision(table, _first_layout_option(table, bits), f"--force-bits {bits}")


def search(tables: list[ErrorTable], config: QuantConfig, limit: int | None = None, loss: float | None = None) -> Plan:
    """Pick one option per weight according to ``config.search``.

    ``limit``: the budget in bytes for a :class:`Budget` search (see
    :func:`budget_limit`). ``loss``: for :class:`MaxLoss`, the summed
    per-weight distance to stay within (default the asked loss; the pipeline
    corrects it with plan-level measurements).
    """
    forced = {t.site: d for t in tables if (d := _forced(config, t)) is not None}
    free = [t for t in tables if t.site not in forced]
    s = config.search
    if isinstance(s, Uniform):
        chosen = []
        for t in free:
            o = _first_layout_option(t, s.bits)
            why = f"uniform --bits {s.bits}" if o.bits == s.bits else f"--target {config.target.value} does not allow {s.bits} bits here"
            chosen.append(Decision(t, o, why))
        summary = SearchSummary("uniform", {"bits": s.bits})
    elif isinstance(s, KQuantMixed):
        chosen, summary = _kquant_mixed(free, s)
    elif isinstance(s, MixQuantRule):
        chosen, summary = _mixquant(free, config, s)
    elif isinstance(s, Budget):
        if limit is None:
            raise ValueError("a budget search needs its byte limit")
        chosen, summary = _budget(free, list(forced.values()), config, s, limit)
    else:
        chosen, summary = _smallest_within(free, list(forced.values()), config, s.max_loss if loss is None else loss)
    by_site = {d.table.site: d for d in chosen} | forced
    decisions = tuple(by_site[t.site] for t in tables)
    return Plan(decisions, summary)


def _err(config: QuantConfig, o: Option) -> float:
    return o.sensitivity(config.metric, config.sensitivity)


def _kquant_mixed(tables: list[ErrorTable], rule: KQuantMixed) -> tuple[list[Decision], SearchSummary]:
    """The promoted weights at the high width per channel (else in the first layout), the rest at the low width."""
    if rule.promoted is None:
        raise ValueError("the kquant-mixed rule needs its promoted weights (see mixq_onnx.graph.roles)")
    out = []
    for t in tables:
        if t.site.name in rule.promoted:
            per_channel = [o for o in t.options if o.bits == rule.high_bits and o.layout.granularity is Granularity.CHANNEL]
            o = per_channel[0] if per_channel else _first_layout_option(t, rule.high_bits)
            out.append(Decision(t, o, f"kquant-mixed: {rule.high_bits} bits (attention value, MLP down or output projection)"))
        else:
            out.append(Decision(t, _first_layout_option(t, rule.low_bits), f"kquant-mixed: {rule.low_bits} bits"))
    return out, SearchSummary("kquant-mixed", {"low_bits": rule.low_bits, "high_bits": rule.high_bits,
                                               "promoted": sorted(rule.promoted)})


def _mixquant(tables: list[ErrorTable], config: QuantConfig, rule: MixQuantRule) -> tuple[list[Decision], SearchSummary]:
    metric = config.metric
    refs = [_err(config, o) for t in tables if (o := _ref_option(t, rule.ref_bits)) is not None]
    ref = float(np.median(refs)) if refs else 0.0
    threshold = rule.qem * ref
    out = []
    for t in tables:
        opts = candidates(config, t)
        ok = [o for o in opts if _err(config, o) <= threshold]
        if ok:
            best = min(ok, key=lambda o: (o.nbytes, o.bits, _err(config, o)))
            label = best.label(config.sensitivity, metric)
            reason = f"{label} {_err(config, best):.3g} <= qem*ref {threshold:.3g}"
        else:
            best = min(opts, key=lambda o: (_err(config, o), o.nbytes))
            reason = f"no option within qem*ref {threshold:.3g}; most accurate option"
        out.append(Decision(t, best, reason))
    summary = SearchSummary(
        "mixquant",
        {"qem": rule.qem, "ref_bits": rule.ref_bits, "metric": metric.value, "ref": ref, "threshold": threshold},
    )
    return out, summary


def _ref_option(t: ErrorTable, ref_bits: int) -> Option | None:
    for o in t.options:
        if o.bits == ref_bits:
            return o
    return None


def layer_weight(weighting: LayerWeighting, params: int) -> float:
    return {LayerWeighting.EQUAL: 1.0, LayerWeighting.SQRT: math.sqrt(params), LayerWeighting.PARAMS: float(params)}[weighting]


@dataclass(frozen=True)
class _Item:
    """What a budget search chooses for: one weight, or a precision group (weights that must share bits and layout).

    ``choices[j]`` holds one option per member, all of the same width and
    layout; its cost and error are the members' sums.
    """

    members: tuple[ErrorTable, ...]
    choices: tuple[tuple[Option, ...], ...]


def _items(tables: list[ErrorTable], config: QuantConfig) -> list[_Item]:
    """The search's items: ``config.groups`` merged (members' options matched by width and layout), the rest alone.

    A group whose members share no (width, layout) is searched member by member, with a log line.
    """
    by_name = {t.site.name: t for t in tables}
    grouped: set[str] = set()
    items: list[_Item] = []
    for names in config.groups:
        members = tuple(by_name[n] for n in names if n in by_name)
        if len(members) < 2:
            continue
        keys = [{(o.bits, o.layout): o for o in candidates(config, t)} for t in members]
        common = [k for k in keys[0] if all(k in other for other in keys[1:])]
        if not common:
            log.info("precision group %s: no width and layout common to all; searched weight by weight", ", ".join(names))
            continue
        items.append(_Item(members, tuple(tuple(k[key] for k in keys) for key in common)))
        grouped.update(t.site.name for t in members)
    items += [_Item((t,), tuple((o,) for o in candidates(config, t))) for t in tables if t.site.name not in grouped]
    # Table order, so the solver (and the output) do not depend on how groups were listed.
    order = {t.site.name: i for i, t in enumerate(tables)}
    items.sort(key=lambda it: order[it.members[0].site.name])
    return [_Item(it.members, tuple(sorted(it.choices, key=lambda ch: (sum(o.nbytes for o in ch),
                                                                        sum(_err(config, o) for o in ch)))))
            for it in items]


def _item_arrays(items: list[_Item], config: QuantConfig, weighting: LayerWeighting | None
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per item, the cost and (weighted) error of each choice: the sums over its members."""
    costs = [np.array([sum(o.nbytes for o in ch) for ch in it.choices], dtype=np.int64) for it in items]
    errs = [np.array([sum(_err(config, o) * (layer_weight(weighting, t.site.params) if weighting else 1.0)
                          for t, o in zip(it.members, ch)) for ch in it.choices]) for it in items]
    return costs, errs


def _decisions(items: list[_Item], choice: list[int], reason: str) -> list[Decision]:
    out = []
    for it, c in zip(items, choice):
        why = reason if len(it.members) == 1 else (
            f"{reason}; precision group of {len(it.members)} ({', '.join(t.site.name for t in it.members)})")
        out += [Decision(t, o, why) for t, o in zip(it.members, it.choices[c])]
    return out


def _budget(
    tables: list[ErrorTable], forced: list[Decision], config: QuantConfig, budget: Budget, limit: int
) -> tuple[list[Decision], SearchSummary]:
    metric = config.metric
    items = _items(tables, config)
    fixed = sum(d.option.nbytes for d in forced)
    costs, errs = _item_arrays(items, config, budget.weighting)
    smallest = fixed + sum(int(c[0]) for c in costs)
    if smallest > limit:
        raise BudgetError(
            f"budget of {limit} bytes{_as_bits(budget)} cannot be met: the smallest plan that fits takes {smallest} bytes "
            f"with these options (ask for --max-size {smallest} or more, allow --int2, or force fewer tensors)",
            smallest,
        )
    choice, lower, exact = solve_mckp(costs, errs, limit - fixed)
    total = float(sum(e[c] for e, c in zip(errs, choice)))
    used = fixed + int(sum(c[i] for c, i in zip(costs, choice)))
    out = _decisions(items, choice, f"budget search ({budget.weighting.value} weighting)")
    summary = SearchSummary(
        "budget",
        {
            "limit_bytes": limit,
            "used_bytes": used,
            "target_bits": budget.target_bits,
            "max_bytes": budget.max_bytes,
            "weighting": budget.weighting.value,
            "metric": metric.value,
            "sensitivity": _label(config, tables),
            "objective": total,
            "lower_bound": lower,
            "gap": total - lower,
            "solver": "dynamic programming (exact)" if exact else "Lagrangian greedy with LP bound",
            "precision_groups": sum(len(it.members) > 1 for it in items),
        },
    )
    return out, summary


def _as_bits(budget: Budget) -> str:
    return f" (--target-bits {budget.target_bits:g}: uniform {budget.target_bits:g}-bit per-channel bytes)" if budget.target_bits else ""


def _label(config: QuantConfig, tables: list[ErrorTable]) -> str:
    labels = {o.label(config.sensitivity, config.metric) for t in tables for o in t.options}
    return " + ".join(sorted(labels))


def _smallest_within(
    tables: list[ErrorTable], forced: list[Decision], config: QuantConfig, loss: float
) -> tuple[list[Decision], SearchSummary]:
    """The fewest bytes whose summed per-weight distance is at most ``loss``: a bisection over knapsack budgets."""
    items = _items(tables, config)
    costs, errs = _item_arrays(items, config, None)
    fixed = sum(d.option.nbytes for d in forced)
    lo = sum(int(c.min()) for c in costs)
    hi = sum(int(c[int(np.argmin(e))]) for c, e in zip(costs, errs))
    best = [int(np.argmin(e)) for e in errs]

    def within(budget: int) -> list[int] | None:
        choice, _, _ = solve_mckp(costs, errs, budget)
        return choice if sum(e[c] for e, c in zip(errs, choice)) <= loss else None

    cheapest = within(lo) if costs else []
    if cheapest is not None:
        best, hi = cheapest, lo
    while hi - lo > max(1, hi // 1000):  # to 0.1% of the size: the measured plan decides the rest
        mid = (lo + hi) // 2
        choice = within(mid)
        if choice is None:
            lo = mid
        else:
            best, hi = choice, mid
    predicted = float(sum(e[c] for e, c in zip(errs, best)))
    out = _decisions(items, best, f"smallest plan within --max-loss (predicted {predicted:.3g})")
    used = fixed + int(sum(c[i] for c, i in zip(costs, best)))
    return out, SearchSummary("max-loss", {"max_loss": loss, "predicted": predicted, "used_bytes": used,
                                           "sensitivity": _label(config, tables)})


def plan_bytes(decisions: Iterable[Decision]) -> int:
    """The bytes of a plan's quantized weights."""
    return sum(d.option.nbytes for d in decisions)


def budget_limit(budget: Budget, uniform_total: dict[int, int], allow_int2: bool = False) -> int:
    """Bytes of the weights a budget allows.

    ``--target-bits B`` is B bits per weight value plus the scales and zero
    points of per-channel storage: the bytes of the uniform per-channel
    plans at the container widths (``uniform_total[b]`` for b = 2 with
    ``--int2``, 4 and 8), interpolated between them. 5 bits is the INT4
    plan plus a quarter of the gap to the INT8 plan, so every B between
    containers gives a distinct size and a real mix. ``--max-size`` is
    handled by the caller (it covers the whole file).
    """
    if budget.max_bytes is not None:
        return budget.max_bytes
    b = float(budget.target_bits)  # type: ignore[arg-type]
    if b >= 8:
        return int(uniform_total[8] * b / 8)
    anchors = [w for w in CONTAINER_WIDTHS if w >= 4 or allow_int2]
    lo = max(w for w in anchors if w <= b)
    hi = min(w for w in anchors if w >= b)
    if lo == hi:
        return uniform_total[lo]
    return int(np.floor(uniform_total[lo] + (b - lo) / (hi - lo) * (uniform_total[hi] - uniform_total[lo])))


# The widths whose uniform plans anchor --target-bits: where a container's values fill it.
CONTAINER_WIDTHS = (2, 4, 8)


DP_MAX_CELLS = 40_000_000


def solve_mckp(costs: list[np.ndarray], errs: list[np.ndarray], budget: int) -> tuple[list[int], float, bool]:
    """Multiple-choice knapsack: one option per item, total cost <= budget, least total error.

    Exact dynamic programming over cost (in units of the costs' gcd) when the
    table fits in memory; otherwise the greedy walk along each item's lower
    convex hull, which is optimal for the LP relaxation, followed by a fill
    pass. Returns (choice per item, lower bound on the optimum, exact?).
    """
    if not costs:
        return [], 0.0, True
    g = reduce(math.gcd, [int(c) for cs in costs for c in cs] + [max(budget, 1)]) or 1
    states = budget // g + 1
    if states * len(costs) <= DP_MAX_CELLS:
        choice = _dp(costs, errs, budget, g)
        val = float(sum(e[c] for e, c in zip(errs, choice)))
        return choice, val, True
    return _lagrangian(costs, errs, budget)


def _dp(costs: list[np.ndarray], errs: list[np.ndarray], budget: int, g: int) -> list[int]:
    states = budget // g + 1
    best = np.full(states, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(costs), states), dtype=np.int16)
    for i, (c, e) in enumerate(zip(costs, errs)):
        new = np.full(states, np.inf)
        for j in range(len(c)):
            k = int(c[j]) // g
            if k >= states:
                continue
            cand = np.full(states, np.inf)
            cand[k:] = best[: states - k] + e[j]
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    s = int(np.argmin(best))
    choice = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i, s])
        choice[i] = j
        s -= int(costs[i][j]) // g
    return choice


def _hull(c: np.ndarray, e: np.ndarray) -> list[int]:
    """Indices on the lower convex hull of (cost, error), cheapest first, error strictly falling."""
    order = sorted(range(len(c)), key=lambda j: (c[j], e[j]))
    hull: list[int] = []
    for j in order:
        if hull and e[j] >= e[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b if it lies on or above the segment a -> j.
            if (e[b] - e[a]) * (c[j] - c[a]) >= (e[j] - e[a]) * (c[b] - c[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _lagrangian(costs: list[np.ndarray], errs: list[np.ndarray], budget: int) -> tuple[list[int], float, bool]:
    hulls = [_hull(c, e) for c, e in zip(costs, errs)]
    pos = [0] * len(costs)
    used = sum(int(c[h[0]]) for c, h in zip(costs, hulls))
    steps = []
    for i, (c, e, h) in enumerate(zip(costs, errs, hulls)):
        for k in range(1, len(h)):
            dc = int(c[h[k]] - c[h[k - 1]])
            de = float(e[h[k - 1]] - e[h[k]])
            steps.append((-de / dc, i, k, dc, de))
    steps.sort()
    total = sum(float(e[h[0]]) for e, h in zip(errs, hulls))
    lower = None
    for _, i, k, dc, de in steps:
        if pos[i] != k - 1:
            continue
        if used + dc <= budget:
            used += dc
            total -= de
            pos[i] = k
        elif lower is None:
            # The LP relaxation takes this step fractionally: a bound on the optimum.
            lower = total - de * (budget - used) / dc
    choice = [h[p] for h, p in zip(hulls, pos)]
    if lower is None:
        lower = total
    return choice, float(lower), False
