"""Activation-aware weight scaling (AWQ, Lin et al. 2024) for weight-only low-bit quantization of MatMul and Gemm.

A few input channels of a layer carry much larger activations than the rest,
and the weights' rows that multiply them matter most to the output. Scaling
row j of every weight that reads an activation X by ``s_j`` and dividing X's
channel j by ``s_j`` leaves ``(X / s)(s W) = X W`` exact in real arithmetic,
but the rounding error of ``s W`` on its grid then lands where it costs
least: salient rows get finer steps relative to their values.

Per group of weights that read one activation (they must share one ``s``;
the groups, and how ``1/s`` reaches X, are SmoothQuant's, see
:mod:`mixq_onnx.runtime.smoothing`), ``s = mean|X_j|^alpha``, normalised to
a geometric mean of one, with alpha searched over :data:`ALPHAS` on sampled
calibration rows for the smallest relative output error of the weight-only
product ``X (Q(s W) / s)`` against ``X W``, on the grid the weights will be
stored on. alpha 0 (no scaling) is a candidate, so a group is only scaled
where that lowers the error. The float model is changed before anything is
measured, so every search and every rounding method sees the scaled weights.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..graph.io import read_tensor
from ..numerics.qdq import Grid, quantize_weight
from .smoothing import (MAX_FACTOR, SEARCH_ROWS, Group, GroupScales, ScalingLabels, SmoothingResult, _weight_rows,
                        apply_smoothing, smoothing_groups)

log = logging.getLogger(__name__)

# AWQ's grid of exponents; 0 is "no scaling".
ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 21))


def awq_factors(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = mean|X_j|^alpha`` over a geometric mean of one; 1 where a channel is all zero; within [1/MAX, MAX]."""
    live = mean_abs > 0
    if alpha == 0.0 or not live.any():
        return np.ones(mean_abs.shape, np.float32)
    s = np.ones(mean_abs.shape, np.float64)
    s[live] = np.power(mean_abs[live].astype(np.float64), alpha)
    s[live] /= np.exp(np.mean(np.log(s[live])))
    return np.clip(s, 1.0 / MAX_FACTOR, MAX_FACTOR).astype(np.float32)


def weight_only_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, grid: Grid) -> float:
    """Relative output error of ``X (Q(s W) / s)`` against ``X W``, summed over the group's weights ([K, N] each)."""
    err = 0.0
    for w in weights:
        ws = (w * s[:, None]).astype(np.float32)
        # A [K, N] weight: blocks run along K (axis 0), a per-channel scale is per output channel (axis 1).
        axis = 0 if grid.layout.block_size else 1
        wq = quantize_weight(ws, grid.bits, grid.symmetric, grid.layout, axis, grid.qtype, np.dtype(np.float32)).dequantize()
        ref = x @ w
        err += float(np.sum((x @ (wq / s[:, None]) - ref) ** 2) / max(float(np.sum(ref**2)), 1e-30))
    return err


def choose_awq(group: Group, rows: np.ndarray, mean_abs: np.ndarray, weights: list[np.ndarray], grid: Grid) -> GroupScales:
    """The alpha of :data:`ALPHAS` with the smallest weight-only error on ``rows``; None where no scaling wins."""
    plain = weight_only_error(rows, weights, np.ones(rows.shape[1], np.float32), grid)
    best: tuple[float, float | None, np.ndarray | None] = (plain, None, None)
    for a in ALPHAS[1:]:
        s = awq_factors(mean_abs, a)
        e = weight_only_error(rows, weights, s, grid)
        if e < best[0]:
            best = (e, a, s)
    return GroupScales(group, best[1], best[2], plain, best[0])


def awq_model(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], grid: Grid,
              exclude: frozenset[str] = frozenset()) -> SmoothingResult:
    """Scale every MatMul/Gemm weight group of ``model`` for ``grid`` on the calibration ``feeds`` (one float pass)."""
    from .calibrate import stream_tensors  # runtime: runs the float model

    groups, skipped = smoothing_groups(model, exclude)
    if not groups:
        return SmoothingResult(model, [], skipped)
    names = [gr.tensor for gr in groups]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    batches: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in stream_tensors(model, names, feeds):
        for n in names:
            rows = np.asarray(values[n], np.float32).reshape(-1, np.shape(values[n])[-1])
            a = np.abs(rows).sum(axis=0, dtype=np.float64)
            sums[n] = sums[n] + a if n in sums else a
            counts[n] = counts.get(n, 0) + len(rows)
            batches[n].append(rows)
    consts = {t.name: t for t in model.graph.initializer}
    chosen = []
    for gr in groups:
        rows = np.concatenate(batches.pop(gr.tensor))
        if len(rows) > SEARCH_ROWS:
            rows = rows[np.linspace(0, len(rows) - 1, SEARCH_ROWS).astype(np.int64)]
        weights = [_weight_rows(read_tensor(consts[r.weight]).astype(np.float32), r.transposed) for r in gr.readers]
        gs = choose_awq(gr, rows, sums[gr.tensor] / max(counts[gr.tensor], 1), weights, grid)
        log.info("awq %s: alpha %s, weight-only output error %.3g -> %.3g", gr.tensor, gs.alpha, gs.error_plain,
                 gs.error_smoothed)
        chosen.append(gs)
    return SmoothingResult(apply_smoothing(model, chosen), chosen, skipped)


AWQ_LABELS = ScalingLabels("scaled", "not_scaled", "error_unscaled", "error_scaled",
                           "no alpha lowered the weight-only output error", "1/s folded into ", "Mul by 1/s inserted")


def describe_awq(result: SmoothingResult) -> dict[str, object]:
    """The report's ``awq`` section: each scaled activation with its alpha and errors, and each one left alone."""
    return result.describe(AWQ_LABELS)


__all__ = ["ALPHAS", "awq_factors", "awq_model", "choose_awq", "describe_awq", "weight_only_error"]
