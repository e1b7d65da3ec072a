"""The accuracy-size curve: the best plan the measurements predict at each budget, from one set of measurements.

Once every option of every weight has a distance, a budget search is a
knapsack that takes milliseconds to seconds; the measurements are the
expensive part. So one run can tell the user what every size would cost in
accuracy: for each ``--target-bits`` B on a grid, the plan the search would
pick, its bytes and its predicted distance (the sum of its options'
distances, the quantity the search minimises). Where a plan of the curve was
also measured whole (the run's own plan, a uniform rival, a plan a
``--sensitivity-cache`` holds), its measured distance is given beside the
prediction. A user reads a size off the curve instead of guessing, then asks
for it (with the cache, that run measures nothing again). With
``--sensitivity-cache`` the pipeline also refines the options every point of
the curve picks and measures every point's plan, so the curve is measured
throughout and a later run at any of its budgets is answered from the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import Budget, QuantConfig
from ..errors import BudgetError, ConfigError
from .measure import ErrorTable
from .search import Decision, Plan, budget_limit, plan_bytes, search

# Bits per weight the curve is drawn at (with --int2 it starts at 2).
GRID = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0)


@dataclass(frozen=True)
class CurvePoint:
    """The plan a budget search picks at ``target_bits``: its bytes, predicted and (where checked) measured distance."""

    target_bits: float
    limit_bytes: int
    bytes: int
    bits_per_weight: float
    predicted: float
    measured: float | None
    # The distance the search adds up ('end-to-end distance', 'nmse', 'output error').
    quantity: str


def curve_plans(tables: Sequence[ErrorTable], config: QuantConfig, uniform_totals: dict[int, int],
                grid: Sequence[float] = GRID) -> list[tuple[float, int, Plan]]:
    """(bits, byte limit, plan) for each budget on ``grid`` the options can meet (below 4 bits only with INT2).

    ``uniform_totals``: the bytes of the uniform per-channel plans at each
    container width, which anchor ``--target-bits`` (see :func:`budget_limit`).
    Plans of equal bytes at neighbouring budgets are listed once, at the
    smallest budget.
    """
    out: list[tuple[float, int, Plan]] = []
    weighting = config.search.weighting if isinstance(config.search, Budget) else Budget.weighting
    for bits in grid:
        try:
            cfg = dataclasses.replace(config, search=Budget(target_bits=bits, weighting=weighting))
            limit = budget_limit(cfg.search, uniform_totals, config.allow_int2)  # type: ignore[arg-type]
            plan = search(list(tables), cfg, limit)
        except (ConfigError, BudgetError):  # a budget the options cannot meet (below 4 bits without INT2, say)
            continue
        if out and plan_bytes(out[-1][2].decisions) == plan_bytes(plan.decisions):
            continue
        out.append((bits, limit, plan))
    return out


def accuracy_size_curve(tables: Sequence[ErrorTable], config: QuantConfig, plans: Sequence[tuple[float, int, Plan]],
                        measured: Callable[[tuple[Decision, ...]], float | None] = lambda ds: None) -> list[CurvePoint]:
    """One point per plan of :func:`curve_plans`; ``measured(decisions)`` gives a plan's measured distance, or None."""
    params = sum(t.site.params for t in tables)
    out: list[CurvePoint] = []
    for bits, limit, plan in plans:
        used = plan_bytes(plan.decisions)
        predicted = float(sum(d.option.sensitivity(config.metric, config.sensitivity) for d in plan.decisions))
        quantity = plan.decisions[0].option.label(config.sensitivity, config.metric) if plan.decisions else ""
        out.append(CurvePoint(bits, limit, used, 8.0 * used / max(params, 1), predicted, measured(plan.decisions),
                              quantity))
    return out


__all__ = ["CurvePoint", "GRID", "accuracy_size_curve", "curve_plans"]
