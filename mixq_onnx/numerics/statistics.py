"""Input statistics of one weight's layer, and the matrix view every data-aware method works in (pure numpy).

A weight W of a MatMul, Gemm or Conv acts on its input as ``y = M x`` per
group, where M is W rearranged as ``[groups, outputs per group, K]`` with K
ordered like the rows of the layer's (im2col) input. ``H = E[x x^T]`` and
``mu = E[x]`` over those rows are all the output-error measure, GPTQ,
AdaRound and bias correction need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class InputStats:
    """Running first and second moments of the input of one weight, per group."""

    hessian: np.ndarray  # [groups, K, K] sum of x x^T, float64
    op: str
    trans_b: bool
    rows: int = 0
    total: np.ndarray = field(init=False)  # [groups, K] sum of x
    seconds: float = 0.0  # time spent making and adding the rows (set by the caller), for cost reports

    def __post_init__(self) -> None:
        self.total = np.zeros(self.hessian.shape[:2])

    def add(self, rows: np.ndarray) -> None:
        """Accumulate a batch of input rows shaped [groups, rows, K].

        Each group's x^T x is one float32 BLAS product (rows in float32, as
        the model computes them); batches are summed in float64, so rounding
        does not grow with the number of batches. One 2-D product per group:
        numpy's stacked matmul of a transposed view runs without BLAS (6x
        slower on a depthwise Conv's 240 groups, 40x on one small group).
        """
        r = np.asarray(rows, dtype=np.float32)
        for g in range(r.shape[0]):
            m = r[g]
            self.hessian[g] += m.T @ m
        self.total += r.sum(axis=1, dtype=np.float64)
        self.rows += r.shape[1]

    def mean(self) -> np.ndarray:
        """H = E[x x^T], [groups, K, K]."""
        return self.hessian / max(self.rows, 1)

    def input_mean(self) -> np.ndarray:
        """E[x], [groups, K]."""
        return self.total / max(self.rows, 1)

    def matrices(self, w: np.ndarray) -> np.ndarray:
        """The weight (or its error) as [groups, outputs per group, K], K ordered like the input rows."""
        if self.op == "MatMul":
            return w.T[None]
        if self.op == "Gemm":
            return (w if self.trans_b else w.T)[None]
        if self.op == "Recurrent":
            return w  # [directions, gates * hidden, input] already
        g = self.hessian.shape[0]
        return w.reshape(g, w.shape[0] // g, -1)

    def from_matrices(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The inverse of :meth:`matrices`: back to the weight's own shape."""
        if self.op == "MatMul" or (self.op == "Gemm" and not self.trans_b):
            return m[0].T
        if self.op == "Gemm":
            return m[0]
        return m.reshape(shape)  # Conv, and Recurrent (already in its own shape)

    def output_shift(self, dw: np.ndarray) -> np.ndarray:
        """E[dW x] per output channel (flattened over groups): the mean error a weight change adds to the output."""
        d = self.matrices(dw).astype(np.float64)
        return np.einsum("gok,gk->go", d, self.input_mean()).reshape(-1)

    def output_error(self, dw: np.ndarray, w: np.ndarray) -> float:
        """Relative energy of the output perturbation: tr(dW H dW^T) / tr(W H W^T), summed over groups."""
        h = self.mean()
        d, m = self.matrices(dw).astype(np.float64), self.matrices(w).astype(np.float64)
        num = float(np.einsum("gok,gkl,gol->", d, h, d, optimize=True))
        den = float(np.einsum("gok,gkl,gol->", m, h, m, optimize=True))
        return num / den if den > 0 else 0.0
