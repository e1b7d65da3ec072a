"""Activation ranges from calibration data: streaming histograms and the four range rules (pure numpy).

Pass 1 records each tensor's min and max; pass 2 fills fixed-range
histograms (2048 bins, over ``[min(lo, 0), max(hi, 0)]`` and over ``|x|``),
so memory per tensor is constant whatever the number of samples.

- ``minmax``: the observed range.
- ``percentile``: the 0.01% and 99.99% quantiles (0 for a non-negative tensor).
- ``entropy``: TensorRT's rule: the ``|x|`` threshold whose quantized
  distribution is closest in KL divergence to the observed one.
- ``mse``: the range, scaled by a ratio in (0.3, 1], with the least expected
  squared quantization error over the histogram.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import CalibMethod
from .qdq import QType, activation_params

BINS = 2048
PERCENTILE = 99.99
ENTROPY_STEP = 8  # candidate thresholds every 8 bins
MSE_RATIOS = tuple(np.linspace(0.3, 1.0, 36))


@dataclass
class RangeHistogram:
    """Running range and histograms of one activation tensor."""

    lo: float = np.inf
    hi: float = -np.inf
    signed: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    magnitude: np.ndarray = field(default_factory=lambda: np.zeros(BINS))

    def observe(self, x: np.ndarray) -> None:
        """Pass 1: the range."""
        if x.size:
            self.lo = min(self.lo, float(np.min(x)))
            self.hi = max(self.hi, float(np.max(x)))

    @property
    def edges(self) -> tuple[float, float]:
        return min(self.lo, 0.0), max(self.hi, 0.0)

    @property
    def amax(self) -> float:
        return max(-self.lo, self.hi, 0.0)

    def accumulate(self, x: np.ndarray) -> None:
        """Pass 2: the histograms, over the range found in pass 1."""
        lo, hi = self.edges
        if hi > lo:
            self.signed += np.histogram(x, BINS, (lo, hi))[0]
            self.magnitude += np.histogram(np.abs(x), BINS, (0.0, self.amax))[0]

    def choose(self, method: CalibMethod, qtype: QType, symmetric: bool) -> tuple[float, float]:
        """The range to quantize this tensor with."""
        if not np.isfinite(self.lo):
            return 0.0, 0.0
        if method is CalibMethod.MINMAX or self.hi <= self.lo or not self.signed.any():
            return self.lo, self.hi
        if method is CalibMethod.PERCENTILE:
            return self._percentile()
        if method is CalibMethod.ENTROPY:
            t = self._entropy_threshold(qtype, symmetric)
            return (max(self.lo, -t), min(self.hi, t))
        return self._mse(qtype, symmetric)

    def _percentile(self) -> tuple[float, float]:
        lo, hi = self.edges
        cdf = np.cumsum(self.signed) / self.signed.sum()
        width = (hi - lo) / BINS
        q_lo = lo + width * int(np.searchsorted(cdf, 1 - PERCENTILE / 100))
        q_hi = lo + width * (int(np.searchsorted(cdf, PERCENTILE / 100)) + 1)
        return (0.0 if self.lo >= 0 else min(q_lo, 0.0)), max(q_hi, 0.0)

    def _entropy_threshold(self, qtype: QType, symmetric: bool) -> float:
        """Smallest-KL threshold on |x| (Migacz, TensorRT INT8 calibration, 2017)."""
        hist = self.magnitude.copy()
        # Exact zeros (ReLU outputs, padding) pile up in the first bin and would dominate the divergence.
        hist[0] = hist[1]
        nonneg = self.lo >= 0 and not symmetric
        levels = (qtype.qmax - qtype.qmin + 1) // (1 if nonneg else 2)
        levels = min(levels, BINS)
        width = self.amax / BINS
        best, best_kl = BINS, np.inf
        for i in range(levels, BINS + 1, ENTROPY_STEP):
            p = hist[:i].copy()
            p[-1] += hist[i:].sum()
            if p.sum() == 0:
                continue
            # Merge the first i bins into `levels` groups and spread each group's mass over its non-empty bins.
            groups = np.array_split(np.arange(i), levels)
            q = np.zeros(i)
            for g in groups:
                nz = hist[g] > 0
                if nz.any():
                    q[g[nz]] = hist[g].sum() / nz.sum()
            p, q = p / p.sum(), q / max(q.sum(), 1e-300)
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best, best_kl = i, kl
        return best * width

    def _mse(self, qtype: QType, symmetric: bool) -> tuple[float, float]:
        lo, hi = self.edges
        centers = lo + (np.arange(BINS) + 0.5) * (hi - lo) / BINS
        best, best_err = (self.lo, self.hi), np.inf
        for r in MSE_RATIOS:
            scale, zp = activation_params(self.lo * r, self.hi * r, qtype, symmetric)
            s, z = float(scale), float(zp)
            q = np.clip(np.rint(centers / s) + z, qtype.qmin, qtype.qmax)
            err = float(np.sum(self.signed * (centers - (q - z) * s) ** 2))
            if err < best_err:
                best, best_err = (self.lo * r, self.hi * r), err
        return best


__all__ = ["RangeHistogram"]
