"""Rounding methods: how a weight lands on its integer grid (pure numpy).

Every method returns the same thing, integers plus scale (and zero point) for
one ``DequantizeLinear``, so nothing changes for the runtimes:

- ``rtn``: min-max range, round to nearest (what the searches measure by default).
- ``mse``: per group (channel or block), the clipping range that minimises
  the squared error, weighted by ``diag(H)`` when calibration statistics
  exist (the output error without its cross terms) and unweighted otherwise.
- ``gptq``: on ``mse``'s grid, rounds one input column at a time and pushes
  each column's error onto the columns not yet rounded through the inverse
  of the damped ``H`` (Frantar et al., 2022), columns in decreasing
  ``diag(H)`` order.
- ``adaround``: on ``mse``'s grid, learns for each weight whether to round up
  or down by minimising ``tr(dW H dW^T)`` plus AdaRound's annealed
  regulariser (Nagel et al., 2020) with Adam, then rounds hard.

- ``hqq``: data-free, half-quadratic (Badri and Shaji, 2023, as ONNX Runtime's
  quantizer runs it): per group, alternates rounding with a shrinkage of the
  error under an l_p norm (p = 0.7, which tolerates a few large errors) and a
  closed-form update of the zero point (asymmetric grids) or of the scale
  (symmetric ones), keeping the iterate with the least mean absolute error.
  DequantizeLinear's zero points are integers, so the optimised zero point is
  rounded, and the integers re-rounded on it, at the end.

``gptq`` and ``adaround`` optimise the layer's output error on the
calibration data; if the result is not better there than ``mse`` (which can
happen when H is nearly singular), ``mse``'s integers are kept and the
outcome says so.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from ..config import Method
from .statistics import InputStats
from .qdq import Grid, GroupRange, QuantizedTensor, _round_clip, broadcast, group_reduce, logical_range

log = logging.getLogger(__name__)

# Clipping ratios tried by ``mse``: the range is scaled by each, per group.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
# GPTQ's damping: this fraction of the mean diagonal of H is added to its diagonal.
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128
# AdaRound: rectified-sigmoid stretch, iterations, Adam step, regulariser weight and its beta schedule.
ZETA, GAMMA = 1.1, -0.1
ADAROUND_ITERS = 300
ADAROUND_LR = 0.1
# Relative to a reconstruction loss normalised to 1 at round-to-nearest (tuned on a correlated 256x128 layer).
ADAROUND_LAMBDA = 3.0
ADAROUND_WARMUP = 0.2
ADAROUND_BETA = (20.0, 2.0)
# HQQ: the l_p norm of the error model, the shrinkage's starting beta and its growth per step, and the step limit.
HQQ_P, HQQ_BETA, HQQ_KAPPA, HQQ_ITERS = 0.7, 10.0, 1.01, 20


@dataclass(frozen=True)
class Rounded:
    """A rounded weight and what happened: the method that produced it, with a note if it fell back."""

    tensor: QuantizedTensor
    method: Method
    note: str = ""


def round_weight(w: np.ndarray, grid: Grid, method: Method = Method.RTN, stats: InputStats | None = None) -> Rounded:
    """Quantize float32 weight ``w`` with ``method``; data-aware methods need ``stats``."""
    if not method.layer_wise:
        raise ValueError(f"{method.value} is not a per-weight method; round with its layer-wise fallback")
    if method is Method.RTN:
        return Rounded(grid.quantize(w), method)
    if method is Method.HQQ:
        return Rounded(hqq(w, grid), method)
    base = grid.quantize(w, clip_range(w, grid, _element_weights(w, stats)))
    if method is Method.MSE:
        return Rounded(base, method)
    if stats is None:
        return Rounded(base, Method.MSE, f"{method.value} needs input statistics; used mse")
    lo, hi = logical_range(grid.bits, grid.symmetric)
    shape, axis, block = w.shape, grid.axis, grid.layout.block_size
    scale = np.broadcast_to(broadcast(base.scale.astype(np.float64), shape, axis, block), shape)
    zp = base.zero_point if base.zero_point is not None else np.zeros((), np.float64)
    zero = np.broadcast_to(broadcast(zp.astype(np.float64), shape, axis, block), shape)
    m, s, z = (stats.matrices(a).astype(np.float64) for a in (w, scale, zero))
    h = stats.mean()
    if method is Method.GPTQ:
        q = _gptq(m, h, s, z, lo, hi)
    else:
        q = _adaround(m, h, s, z, lo, hi, stats.matrices(base.values.astype(np.float64)))
    cand = dataclasses.replace(base, values=stats.from_matrices(q, shape).astype(grid.qtype.dtype))
    new_err = stats.output_error(cand.dequantize().astype(np.float32) - w, w)
    old_err = stats.output_error(base.dequantize().astype(np.float32) - w, w)
    if not new_err <= old_err:
        return Rounded(base, Method.MSE, f"{method.value} output error {new_err:.3g} was not below mse's {old_err:.3g}; kept mse")
    return Rounded(cand, method)


def hqq(w: np.ndarray, grid: Grid) -> QuantizedTensor:
    """Half-quadratic rounding: min-max grid, then per group the zero point (or, symmetric, the scale) that the
    proximal iterations find, with the integers rounded on it (see the module's docstring)."""
    base = grid.quantize(w)
    lo, hi = logical_range(grid.bits, grid.symmetric)
    axis, layout, block = grid.axis, grid.layout, grid.layout.block_size
    x = w.astype(np.float32)
    count = np.asarray(group_reduce(np.ones_like(x), layout, axis, np.add), np.float32)

    def spread(v: np.ndarray) -> np.ndarray:
        return np.broadcast_to(broadcast(np.asarray(v, np.float32), x.shape, axis, block), x.shape)

    def mean(v: np.ndarray) -> np.ndarray:
        return np.asarray(group_reduce(v, layout, axis, np.add), np.float32) / count

    scale = np.maximum(base.scale.astype(np.float32), np.finfo(np.float32).tiny)
    zero = base.zero_point.astype(np.float32) if base.zero_point is not None else np.zeros_like(scale)
    beta, best, kept = HQQ_BETA, np.inf, (scale, zero)
    for _ in range(HQQ_ITERS):
        s, z = spread(scale), spread(zero)
        q = np.clip(np.rint(x / s + z), lo, hi)
        err = x - (q - z) * s
        e = float(np.mean(np.abs(err)))
        if not e < best:
            break
        best, kept = e, (scale, zero)
        # The error model: the part of the error an l_p norm (p < 1) attributes to a few outliers.
        shrunk = np.sign(err) * np.maximum(np.abs(err) - np.power(np.abs(err) + 1e-8, HQQ_P - 1) / beta, 0)
        target = x - shrunk  # what q's dequantized values should match
        # DequantizeLinear's zero point is an integer: the zero point moves in whole steps, and the scale takes the
        # least-squares value for the integers and zero point (HQQ's own float zero point would round back).
        if not grid.symmetric:
            zero = np.clip(np.rint(mean(q - target / s)), lo, hi).astype(np.float32)
            z = spread(zero)
        num = np.asarray(group_reduce(target * (q - z), layout, axis, np.add), np.float32)
        den = np.asarray(group_reduce((q - z) * (q - z), layout, axis, np.add), np.float32)
        scale = np.where(den > 0, num / np.where(den > 0, den, 1), scale).astype(np.float32)
        scale = np.maximum(scale, np.finfo(np.float32).tiny)
        beta *= HQQ_KAPPA
    scale, zero = kept
    scale = scale.astype(base.scale.dtype)
    zp = np.clip(np.rint(zero), lo, hi).astype(grid.qtype.dtype) if base.zero_point is not None else None
    values = _round_clip(x, scale, zp, axis, block, lo, hi)  # QuantizeLinear's arithmetic on the final grid
    return dataclasses.replace(base, values=values.astype(grid.qtype.dtype), scale=scale, zero_point=zp)


def _element_weights(w: np.ndarray, stats: InputStats | None) -> np.ndarray | None:
    """diag(H) laid out like ``w``: each weight's share of the output error, ignoring cross terms."""
    if stats is None:
        return None
    diag = np.einsum("gkk->gk", stats.mean())
    # matrices(w) is a view; only its shape is needed.
    return stats.from_matrices(np.broadcast_to(diag[:, None, :], stats.matrices(w).shape), w.shape).astype(np.float32)


def clip_range(w: np.ndarray, grid: Grid, weights: np.ndarray | None = None) -> GroupRange:
    """Per group, the clipped range (min-max times a ratio in CLIP_RATIOS) with the least (weighted) squared error."""
    rng = grid.range_of(w)
    best_err = best_ratio = None
    for ratio in CLIP_RATIOS:
        r = np.float32(ratio)
        deq = grid.fake_quantize(w, GroupRange(rng.rmin * r, rng.rmax * r))
        deq -= w
        deq *= deq
        if weights is not None:
            deq *= weights
        err = np.asarray(group_reduce(deq, grid.layout, grid.axis, np.add))
        if best_err is None:
            best_err, best_ratio = err, np.full(err.shape, r, np.float32)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_ratio = np.where(better, r, best_ratio)
    return GroupRange(rng.rmin * best_ratio, rng.rmax * best_ratio)


def _damped(h: np.ndarray) -> np.ndarray:
    """H plus GPTQ_DAMP times its mean diagonal (1 where H is all zero), so it is safely invertible."""
    h = h.copy()
    k = h.shape[-1]
    mean = np.einsum("gkk->gk", h).mean(axis=1)
    h[:, np.arange(k), np.arange(k)] += (GPTQ_DAMP * np.where(mean > 0, mean, 1.0))[:, None]
    return h


def _gptq(m: np.ndarray, h: np.ndarray, s: np.ndarray, z: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """GPTQ over every group at once: m, s, z are [G, R, K], h is [G, K, K]; returns the integers as [G, R, K]."""
    k = m.shape[2]
    h = _damped(h)
    order = np.argsort(-np.einsum("gkk->gk", h), axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order[:, None, :], axis=2)
    w, s, z = take(m).copy(), take(s), take(z)
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to the later columns.
    u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    q = np.empty_like(w)
    for b0 in range(0, k, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, k)
        err = np.empty(w.shape[:2] + (b1 - b0,))
        for i in range(b0, b1):
            col = w[:, :, i]
            qi = np.clip(np.rint(col / s[:, :, i]) + z[:, :, i], lo, hi)
            q[:, :, i] = qi
            e = (col - (qi - z[:, :, i]) * s[:, :, i]) / u[:, i, i][:, None]
            w[:, :, i:b1] -= e[:, :, None] * u[:, None, i, i:b1]
            err[:, :, i - b0] = e
        # Lazy batch update of the columns after this block.
        w[:, :, b1:] -= np.matmul(err, u[:, b0:b1, b1:])
    back = np.empty_like(q)
    np.put_along_axis(back, np.broadcast_to(order[:, None, :], q.shape), q, axis=2)
    return back


def _adaround(
    m: np.ndarray, h: np.ndarray, s: np.ndarray, z: np.ndarray, lo: int, hi: int, start: np.ndarray
) -> np.ndarray:
    """AdaRound over every group at once, on the exact layer loss tr(dW H dW^T); returns integers [G, R, K].

    ``start`` (the nearest-rounded integers) sets the loss scale: the
    reconstruction term is divided by its error energy, so one step size
    and one regulariser weight fit every layer.
    """
    # float32 halves the cost of the K x K products that dominate; the loss only steers up/down choices.
    m, h, s, z, start = (a.astype(np.float32) for a in (m, h, s, z, start))
    ratio = m / s
    floor = np.floor(ratio)
    frac = ratio - floor
    p = np.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-3, 1 - 1e-3)
    v = np.log(p / (1 - p))
    d0 = (start - z) * s - m
    den = float(np.einsum("grk,gkl,grl->", d0, h, d0, optimize=True))
    den = den if den > 0 else 1.0
    mom, vel = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    warm = int(ADAROUND_ITERS * ADAROUND_WARMUP)
    n = v.size
    for t in range(ADAROUND_ITERS):
        sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        soft = np.clip(raw, 0.0, 1.0)
        qs = floor + soft + z
        inside = (qs > lo) & (qs < hi)
        dw = (np.clip(qs, lo, hi) - z) * s - m
        grad = (2.0 / den) * np.matmul(dw, h) * s * inside
        if t >= warm:
            frac_t = (t - warm) / max(ADAROUND_ITERS - warm - 1, 1)
            beta = ADAROUND_BETA[0] + (ADAROUND_BETA[1] - ADAROUND_BETA[0]) * frac_t
            a = 2.0 * soft - 1.0
            # d/dsoft of (lambda / n) * sum(1 - |2 soft - 1|^beta)
            grad -= (ADAROUND_LAMBDA / n) * 2.0 * beta * np.abs(a) ** (beta - 1.0) * np.sign(a)
        grad *= (ZETA - GAMMA) * sig * (1.0 - sig) * ((raw > 0) & (raw < 1))
        mom = b1 * mom + (1 - b1) * grad
        vel = b2 * vel + (1 - b2) * grad * grad
        v -= ADAROUND_LR * (mom / (1 - b1 ** (t + 1))) / (np.sqrt(vel / (1 - b2 ** (t + 1))) + eps)
    return np.clip(floor + (v >= 0) + z, lo, hi).astype(np.float64)


__all__ = ["Rounded", "clip_range", "round_weight"]
