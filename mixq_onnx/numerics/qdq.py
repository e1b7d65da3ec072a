"""Quantize and dequantize numerics in pure numpy (no ONNX import).

``quantize_linear`` and ``dequantize_linear`` follow the ONNX operator
definitions exactly as onnx.reference computes them (the same division,
``rint`` half-to-even rounding, saturation and float32 dequantization), so
that what we measure and store is bit for bit what a runtime computes.
One table describes every storage dtype; one helper broadcasts scales and
zero points for per-tensor, per-axis and blockwise layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..config import Granularity, Layout


@dataclass(frozen=True)
class QType:
    """A storage dtype for quantized integers."""

    name: str
    bits: int
    signed: bool
    dtype: np.dtype
    # The opset from which DequantizeLinear accepts this dtype at all.
    min_opset: int

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def nbytes(self, count: int) -> int:
        """Packed bytes for ``count`` values (sub-byte types are packed, odd tails padded)."""
        return -(-count * self.bits // 8)


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        QType("int8", 8, True, np.dtype(np.int8), 10),
        QType("uint8", 8, False, np.dtype(np.uint8), 10),
        QType("int4", 4, True, np.dtype(ml_dtypes.int4), 21),
        QType("uint4", 4, False, np.dtype(ml_dtypes.uint4), 21),
        QType("int2", 2, True, np.dtype(ml_dtypes.int2), 25),
        QType("uint2", 2, False, np.dtype(ml_dtypes.uint2), 25),
        # Activations only (--activations int16).
        QType("int16", 16, True, np.dtype(np.int16), 21),
        QType("uint16", 16, False, np.dtype(np.uint16), 21),
    )
}


def container_for(bits: int, symmetric: bool, allow_int2: bool) -> QType:
    """The narrowest storage dtype that holds ``bits``-bit values."""
    if bits <= 2 and allow_int2:
        width = 2
    elif bits <= 4:
        width = 4
    else:
        width = 8
    return QTYPES[("int" if symmetric else "uint") + str(width)]


def logical_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range a ``bits``-bit value uses inside its container.

    Symmetric ranges are narrow ([-(2^(b-1)-1), 2^(b-1)-1]) so zero is exact,
    no zero point is needed and TensorRT's [-127, 127] rule holds at 8 bits.
    """
    if symmetric:
        m = (1 << (bits - 1)) - 1
        return -m, m
    return 0, (1 << bits) - 1


def required_opset(qtype: QType, layout: Layout) -> int:
    """The lowest default-domain opset whose DequantizeLinear can express this."""
    need = qtype.min_opset
    if layout.granularity is Granularity.CHANNEL:
        need = max(need, 13)
    elif layout.granularity is Granularity.BLOCK:
        need = max(need, 21)
    return need


def broadcast(value: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """Make a scale or zero point broadcastable to ``shape``, as the ONNX ops do."""
    if value.size == 1:
        return value.reshape(())
    if not block_size:
        dims = [1] * len(shape)
        dims[axis] = value.size
        return value.reshape(dims)
    value = np.repeat(value, block_size, axis=axis)
    if value.shape[axis] != shape[axis]:  # a short last block: a view of the first shape[axis] entries
        value = value[(slice(None),) * axis + (slice(0, shape[axis]),)]
    return value


def _blocked(x: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """``x`` viewed with whole blocks as an axis of their own (axis + 1), so that a block's scale broadcasts
    along it instead of being repeated block_size times; returns the view and the block size left to apply
    (0 once blocks are an axis; a short last block, or no blocks, keeps the array as it is).
    """
    if not block_size or x.shape[axis] % block_size:
        return x, block_size
    return x.reshape(x.shape[:axis] + (x.shape[axis] // block_size, block_size) + x.shape[axis + 1:]), 0


def _per_block(value: np.ndarray, x: np.ndarray, axis: int, block_size: int, blocked: bool) -> np.ndarray:
    """A scale or zero point shaped to broadcast against ``x`` as :func:`_blocked` left it (``blocked``: as a view)."""
    if not blocked or value.size == 1:
        return broadcast(value, x.shape, axis, block_size)
    return value.reshape(value.shape[:axis + 1] + (1,) + value.shape[axis + 1:])


def _round_clip(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block_size: int, lo: int, hi: int
) -> np.ndarray:
    """round(x / scale) + zero_point saturated to [lo, hi], as integer-valued floats.

    The one shared implementation behind QuantizeLinear and the weight
    quantizer. ``x / scale`` is computed in the inputs' own dtype and rounded
    half to even, as onnx.reference does. Staying in floating point is exact
    (every value involved is an integer below 2^24) and saturates where the
    reference's int32 cast would overflow.
    """
    view, left = _blocked(x, axis, block_size)
    return _round_clip_view(view, scale, zero_point, axis, left, lo, hi, view is not x).reshape(x.shape)


def _round_clip_view(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block_size: int,
                     lo: int, hi: int, blocked: bool, in_place: bool = False) -> np.ndarray:
    s = _per_block(scale, x, axis, block_size, blocked)
    q = np.divide(x, s, out=x) if in_place and x.dtype == np.result_type(x, s) else x / s
    np.rint(q, out=q)  # in place: one fresh array per call, not two (page faults dominate on big weights)
    if q.dtype != np.float32:
        q = q.astype(np.float32)
    # Adding the zero point (or 0) also turns rint's -0.0 into the +0.0 an integer would give.
    q += _per_block(zero_point.astype(np.float32), x, axis, block_size, blocked) if zero_point is not None else np.float32(0)
    return np.clip(q, lo, hi, out=q)


def quantize_linear(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    qtype: QType,
    axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """ONNX QuantizeLinear (opset 21+ semantics): saturate to the full container range."""
    return _round_clip(x, scale, zero_point, axis, block_size, qtype.qmin, qtype.qmax).astype(qtype.dtype)


def dequantize_linear(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1, block_size: int = 0
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale in float32, cast to the scale's dtype."""
    flat = q.astype(np.float32)
    dx, block = _blocked(flat, axis, block_size)
    blocked = dx is not flat
    if zero_point is not None:
        dx -= _per_block(zero_point.astype(np.float32), dx, axis, block, blocked)
    dx *= _per_block(scale, dx, axis, block, blocked)
    return dx.reshape(q.shape).astype(scale.dtype, copy=False)


def group_reduce(w: np.ndarray, layout: Layout, axis: int, ufunc: np.ufunc) -> np.ndarray:
    """``ufunc`` (min, max, add) over each quantization group, shaped like the ONNX scale input."""
    if layout.granularity is Granularity.TENSOR:
        return ufunc.reduce(w, axis=None)
    if layout.granularity is Granularity.CHANNEL:
        others = tuple(i for i in range(w.ndim) if i != axis)
        return ufunc.reduce(w, axis=others) if others else w.copy()
    # Whole blocks reduce as one more axis of a reshaped view (reduceat is several times slower); a short last
    # block is reduced on its own.
    size, block = w.shape[axis], layout.block_size
    whole = size - size % block
    parts = []
    if whole:
        head = w[(slice(None),) * axis + (slice(0, whole),)] if whole != size else w
        parts.append(ufunc.reduce(head.reshape(w.shape[:axis] + (whole // block, block) + w.shape[axis + 1:]), axis=axis + 1))
    if whole != size:
        parts.append(ufunc.reduce(w[(slice(None),) * axis + (slice(whole, size),)], axis=axis, keepdims=True))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


@dataclass(frozen=True)
class GroupRange:
    """Per-group minimum and maximum of a weight, computed once per layout."""

    rmin: np.ndarray  # float32
    rmax: np.ndarray  # float32

    @classmethod
    def of(cls, w: np.ndarray, layout: Layout, axis: int) -> "GroupRange":
        return cls(
            np.asarray(group_reduce(w, layout, axis, np.minimum), dtype=np.float32),
            np.asarray(group_reduce(w, layout, axis, np.maximum), dtype=np.float32),
        )


def params_from_range(
    rng: GroupRange, bits: int, symmetric: bool, qtype: QType, scale_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray | None]:
    """Min-max scale (and zero point when asymmetric) for ``bits``-bit values.

    Ranges are widened to include 0 so that zero is represented exactly.
    Scales are kept at or above the scale dtype's smallest normal number:
    a subnormal scale makes ``x / scale`` overflow.
    """
    lo, hi = logical_range(bits, symmetric)
    rmin = np.minimum(rng.rmin, np.float32(0))
    rmax = np.maximum(rng.rmax, np.float32(0))
    if symmetric:
        scale = np.maximum(-rmin, rmax) / np.float32(hi)
    else:
        scale = (rmax - rmin) / np.float32(hi - lo)
    tiny = np.float32(ml_dtypes.finfo(scale_dtype).smallest_normal)
    scale = np.where(scale > 0, np.maximum(scale, tiny), np.float32(1)).astype(scale_dtype)
    zp = None if symmetric else np.clip(np.float32(lo) - np.rint(rmin / scale.astype(np.float32)), lo, hi)
    if np.dtype(scale_dtype).itemsize < 4:
        scale, zp = _fit_grid(scale, zp, lo, hi, scale_dtype)
    return scale, (None if zp is None else zp.astype(qtype.dtype))


def _fit_grid(scale: np.ndarray, zp: np.ndarray | None, lo: int, hi: int, scale_dtype: np.dtype
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Shrink narrow (float16) scales until every grid point is finite in the scale's dtype.

    Rounding the scale up to float16 and the zero point to an integer can
    push the grid's ends past float16's largest value (weights of +-65504,
    say), which DequantizeLinear would turn into infinities. The ends are
    computed in float32 and the scale stepped down to the next float16
    below until they fit; only values at the very end of the range move.
    """
    top = np.float32(ml_dtypes.finfo(scale_dtype).max)
    z = zp.astype(np.float32) if zp is not None else np.float32(0)
    for _ in range(8):
        s32 = scale.astype(np.float32)
        ends = np.maximum(np.abs((np.float32(lo) - z) * s32), np.abs((np.float32(hi) - z) * s32))
        over = ends > top
        if not np.any(over):
            break
        fitted = (s32 * (top / np.maximum(ends, top))).astype(scale_dtype)
        fitted = np.nextafter(fitted, np.zeros_like(fitted))
        scale = np.where(over, fitted, scale).astype(scale_dtype)
    return scale, zp


@dataclass(frozen=True)
class QuantizedTensor:
    """Integers plus the scale and zero point that DequantizeLinear needs."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    qtype: QType
    bits: int
    layout: Layout
    axis: int

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def dequantize(self) -> np.ndarray:
        return dequantize_linear(self.values, self.scale, self.zero_point, self.axis, self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: packed integers, scales and zero points."""
        zp = self.qtype.nbytes(self.zero_point.size) if self.zero_point is not None else 0
        return self.qtype.nbytes(self.values.size) + self.scale.nbytes + zp


def quantize_weight(
    w: np.ndarray,
    bits: int,
    symmetric: bool,
    layout: Layout,
    axis: int,
    qtype: QType,
    scale_dtype: np.dtype,
    rng: GroupRange | None = None,
) -> QuantizedTensor:
    """Min-max round-to-nearest quantization of one weight tensor.

    The integers are QuantizeLinear's output further clipped to the logical
    ``bits``-bit range, so a 3-bit tensor in an INT4 container really uses
    only 8 levels.
    """
    rng = rng if rng is not None else GroupRange.of(w, layout, axis)
    scale, zp = params_from_range(rng, bits, symmetric, qtype, scale_dtype)
    lo, hi = logical_range(bits, symmetric)
    q = _round_clip(w, scale, zp, axis, layout.block_size, lo, hi).astype(qtype.dtype)
    return QuantizedTensor(q, scale, zp, qtype, bits, layout, axis)


def fake_quantize(
    w: np.ndarray, bits: int, symmetric: bool, layout: Layout, axis: int, qtype: QType, scale_dtype: np.dtype, rng: GroupRange,
    in_place: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Dequantized weight (as float32) and its scale, without materialising the integer container.

    Gives exactly ``quantize_weight(...).dequantize()``: the integers are
    the same integer-valued floats, and (q - zp) * scale is the same float32
    arithmetic DequantizeLinear does. ``in_place``: ``w`` (the caller's own,
    writable copy) is overwritten and returned, so a big weight costs one
    array rather than two (the same values: the same operations in place).
    """
    scale, zp = params_from_range(rng, bits, symmetric, qtype, scale_dtype)
    lo, hi = logical_range(bits, symmetric)
    x, block = _blocked(w, axis, layout.block_size)
    blocked = x is not w
    q = _round_clip_view(x, scale, zp, axis, block, lo, hi, blocked, in_place and w.flags.writeable)
    if zp is not None:
        q -= _per_block(zp.astype(np.float32), x, axis, block, blocked)
    q *= _per_block(scale, x, axis, block, blocked)
    if scale.dtype != np.float32:
        q = q.astype(scale.dtype).astype(np.float32)
    return q.reshape(w.shape), scale


def scale_count(shape: tuple[int, ...], layout: Layout, axis: int) -> int:
    """Number of scales a layout needs for a tensor of ``shape``."""
    if layout.granularity is Granularity.TENSOR:
        return 1
    if layout.granularity is Granularity.CHANNEL:
        return shape[axis]
    n = int(np.prod(shape)) // shape[axis]
    return n * -(-shape[axis] // layout.block_size)


def storage_bytes(shape: tuple[int, ...], layout: Layout, axis: int, qtype: QType, symmetric: bool, scale_itemsize: int) -> int:
    """Exact on-disk bytes of a quantized tensor, computed without quantizing it."""
    n = int(np.prod(shape))
    s = scale_count(shape, layout, axis)
    return qtype.nbytes(n) + s * scale_itemsize + (0 if symmetric else qtype.nbytes(s))


@dataclass(frozen=True)
class Grid:
    """Where a weight's integers live: bit-width, scheme, layout and axis, container and scale dtype."""

    bits: int
    symmetric: bool
    layout: Layout
    axis: int
    qtype: QType
    scale_dtype: np.dtype

    def quantize(self, w: np.ndarray, rng: GroupRange | None = None) -> QuantizedTensor:
        return quantize_weight(w, self.bits, self.symmetric, self.layout, self.axis, self.qtype, self.scale_dtype, rng)

    def fake_quantize(self, w: np.ndarray, rng: GroupRange, in_place: bool = False) -> np.ndarray:
        return fake_quantize(w, self.bits, self.symmetric, self.layout, self.axis, self.qtype, self.scale_dtype, rng,
                             in_place)[0]

    def range_of(self, w: np.ndarray) -> GroupRange:
        return GroupRange.of(w, self.layout, self.axis)


def activation_params(rmin: float, rmax: float, qtype: QType, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor scale and zero point for an activation range, over the container's full range.

    The range is widened to include 0 (zero padding and ReLU outputs must be
    exact). Symmetric: zero point 0 and ``scale = max|r| / qmax``.
    Asymmetric: ``[rmin, rmax]`` maps onto ``[qmin, qmax]``, so a ReLU output
    (rmin = 0) gets zero point qmin and its Q saturates exactly like the ReLU.
    """
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if symmetric:
        scale = max(-rmin, rmax) / qtype.qmax
        zp = 0
    else:
        scale = (rmax - rmin) / (qtype.qmax - qtype.qmin)
        zp = int(np.clip(qtype.qmin - np.rint(rmin / scale), qtype.qmin, qtype.qmax)) if scale > 0 else 0
    tiny = float(np.finfo(np.float32).smallest_normal)
    scale = scale if scale > tiny else 1.0
    return np.array(scale, np.float32), np.array(zp, qtype.dtype)
