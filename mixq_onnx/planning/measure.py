"""Measure the roundoff error each weight suffers at each bit-width and layout (pure numpy).

For every tensor, every candidate bit-width and every layout the tensor
accepts, we quantize exactly as the output model will (same scale, zero
point, rounding and container) and record MSE, normalised MSE (MSE over the
mean square of the weights, so tensors are comparable) and max absolute
error, together with the exact bytes the option takes on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..numerics.statistics import InputStats
from ..config import Granularity, Layout, Metric, QuantConfig, Scheme, Sensitivity
from ..executor import Executor, threads
from ..graph.find import Skipped, WeightSite
from ..numerics.metrics import weight_error
from ..numerics.qdq import Grid, GroupRange, QType, container_for, fake_quantize, required_opset, storage_bytes
from ..numerics.rounding import round_weight
from .cache import TABLE, SensitivityCache
from ..targets import TargetRules

log = logging.getLogger(__name__)

# (done, total, stage): the stage names what is being counted ("measuring error", "end-to-end sensitivity", ...).
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Capabilities:
    """What the output model may use: the highest default-domain opset, and INT2."""

    opset: int
    allow_int2: bool

    def container(self, bits: int, symmetric: bool) -> QType | None:
        """The narrowest container for ``bits`` this opset has, or None if DequantizeLinear is unavailable."""
        for allow_int4 in (True, False):
            q = container_for(bits if allow_int4 else 8, symmetric, self.allow_int2 and allow_int4)
            if q.min_opset <= self.opset:
                return q
        return None

    def allows(self, qtype: QType, layout: Layout) -> bool:
        return required_opset(qtype, layout) <= self.opset


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: bit-width, layout and container, with its cost and error."""

    bits: int
    layout: Layout
    axis: int
    qtype: QType
    nbytes: int
    mse: float
    nmse: float
    max_abs: float
    # tr(dW H dW^T) / tr(W H W^T) on calibration data, where the weight's input statistics exist.
    output_error: float | None = None
    # How far the model's outputs move with this weight alone quantized this way (see sensitivity.py).
    e2e: float | None = None

    def error(self, metric: Metric) -> float:
        return {Metric.NMSE: self.nmse, Metric.MSE: self.mse, Metric.MAX_ABS: self.max_abs}[metric]

    def uses_output_error(self, sensitivity: Sensitivity) -> bool:
        return sensitivity is Sensitivity.OUTPUT and self.output_error is not None

    def sensitivity(self, metric: Metric, sensitivity: Sensitivity) -> float:
        """The error the searches compare: the end-to-end distance or the output error when asked for and
        measured, else ``metric``."""
        if sensitivity is Sensitivity.E2E and self.e2e is not None:
            return self.e2e
        return self.output_error if self.uses_output_error(sensitivity) else self.error(metric)  # type: ignore[return-value]

    def label(self, sensitivity: Sensitivity, metric: Metric) -> str:
        """The name of the value :meth:`sensitivity` returns, for reasons in the report."""
        if sensitivity is Sensitivity.E2E and self.e2e is not None:
            return "end-to-end distance"
        return "output error" if self.uses_output_error(sensitivity) else metric.value

    @property
    def key(self) -> tuple[int, str]:
        return self.bits, self.layout.name


@dataclass(frozen=True)
class ErrorTable:
    """All measured options of one weight, in (layout order, bits) order."""

    site: WeightSite
    options: tuple[Option, ...]
    scale_dtype: np.dtype

    def get(self, bits: int, layout: Layout) -> Option | None:
        for o in self.options:
            if o.bits == bits and o.layout == layout:
                return o
        return None

    def grid(self, option: Option, symmetric: bool) -> Grid:
        """The grid an option stores this weight on: what rounding and the rewrite both use."""
        return Grid(option.bits, symmetric, option.layout, option.axis, option.qtype, self.scale_dtype)


# DequantizeLinear outputs float16 from opset 19.
FP16_DQ_OPSET = 19


def scale_dtype_for(dtype: np.dtype, opset: int) -> np.dtype:
    """float16 weights keep float16 scales where DequantizeLinear allows it.

    bfloat16 weights (no bf16 DequantizeLinear kernel in ONNX Runtime) and
    float16 ones below opset 19 get float32 scales and a Cast after the DQ.
    """
    return np.dtype(np.float16) if dtype == np.float16 and opset >= FP16_DQ_OPSET else np.dtype(np.float32)


def layout_axis(site: WeightSite, layout: Layout) -> int | None:
    """The axis a layout quantizes along for this weight, or None if it does not apply."""
    if layout.granularity is Granularity.TENSOR:
        return 0
    if layout.granularity is Granularity.CHANNEL:
        return site.channel_axis
    red = site.reduction_axis
    if red is None or site.shape[red] <= layout.block_size:
        return None
    return red


def valid_layouts(site: WeightSite, layouts: tuple[Layout, ...], caps: Capabilities, symmetric: bool) -> list[tuple[Layout, int]]:
    """The configured layouts this weight and opset accept, else per-channel, else per-tensor.

    A blockwise request on an axis no longer than the block falls back to
    per-channel, the closest layout that still applies; below opset 13 only
    per-tensor scales exist.
    """
    int8 = caps.container(8, symmetric)

    def usable(lay: Layout) -> int | None:
        ax = layout_axis(site, lay)
        return ax if ax is not None and int8 is not None and caps.allows(int8, lay) else None

    out = [(lay, ax) for lay in layouts if (ax := usable(lay)) is not None]
    if not out:
        for lay in (Layout(Granularity.CHANNEL), Layout(Granularity.TENSOR)):
            if (ax := usable(lay)) is not None:
                return [(lay, ax)]
    return out


@dataclass(frozen=True)
class Spec:
    """One way to store a tensor, before measuring it: width, layout, axis, container and exact bytes."""

    bits: int
    layout: Layout
    axis: int
    qtype: QType
    nbytes: int


def option_specs(site: WeightSite, config: QuantConfig, caps: Capabilities, bits_list: tuple[int, ...]) -> list[Spec]:
    """Every (width, layout) this weight and opset can store, with its bytes; nothing is quantized.

    Cheap enough to run before any calibration, so budgets are checked first.
    """
    symmetric = config.scheme is Scheme.SYMMETRIC
    sdt = scale_dtype_for(site.np_dtype, caps.opset)
    out = []
    for layout, axis in valid_layouts(site, config.layouts, caps, symmetric):
        for bits in bits_list:
            qtype = caps.container(bits, symmetric)
            if qtype is None or not caps.allows(qtype, layout):
                continue
            out.append(Spec(bits, layout, axis, qtype, storage_bytes(site.shape, layout, axis, qtype, symmetric, sdt.itemsize)))
    return out


def uniform_bytes(site: WeightSite, bits: int, config: QuantConfig, caps: Capabilities) -> int:
    """Bytes of this weight at uniform ``bits`` per channel (per tensor where it has no channel axis).

    The yardstick of ``--target-bits``: a budget of B bits means the bytes
    of uniform B-bit per-channel quantization of the same tensors.
    """
    symmetric = config.scheme is Scheme.SYMMETRIC
    sdt = scale_dtype_for(site.np_dtype, caps.opset)
    layout, axis = valid_layouts(site, (Layout(Granularity.CHANNEL),), caps, symmetric)[0]
    qtype = caps.container(bits, symmetric)
    assert qtype is not None, "callers only ask for widths the opset can store"
    return storage_bytes(site.shape, layout, axis, qtype, symmetric, sdt.itemsize)


def measure_tensor(
    site: WeightSite, config: QuantConfig, caps: Capabilities, bits_list: tuple[int, ...], stats: InputStats | None = None
) -> ErrorTable:
    """Quantize one tensor every candidate way and record error and bytes.

    Candidates are rounded to nearest unless ``config.search_with_method``
    asks for the configured rounding method (its cost times the candidates).
    """
    symmetric = config.scheme is Scheme.SYMMETRIC
    w = site.array
    sdt = scale_dtype_for(w.dtype, caps.opset)
    if w.dtype == ml_dtypes.bfloat16:
        w = w.astype(np.float32)
    w32 = w.astype(np.float32, copy=False)
    options: list[Option] = []
    ranges: dict[Layout, GroupRange] = {}
    for spec in option_specs(site, config, caps, bits_list):
        grid = Grid(spec.bits, symmetric, spec.layout, spec.axis, spec.qtype, sdt)
        if config.search_with_method:
            diff = round_weight(w, grid, config.layer_method, stats).tensor.dequantize().astype(np.float32)
        else:
            rng = ranges.setdefault(spec.layout, GroupRange.of(w, spec.layout, spec.axis))
            diff, _ = fake_quantize(w, spec.bits, symmetric, spec.layout, spec.axis, spec.qtype, sdt, rng)
        errors = weight_error(w32, diff)
        diff -= w32
        options.append(Option(spec.bits, spec.layout, spec.axis, spec.qtype, spec.nbytes, *errors,
                              stats.output_error(diff, w32) if stats is not None else None))
    return ErrorTable(site, tuple(options), sdt)


def _measure_task(task: tuple[WeightSite, QuantConfig, Capabilities, tuple[int, ...], InputStats | None]
                  ) -> tuple[tuple[Option, ...], np.dtype]:
    """One tensor's options (the site itself is not sent back: the caller has it)."""
    table = measure_tensor(*task)
    return table.options, table.scale_dtype


def measure(
    sites: tuple[WeightSite, ...],
    config: QuantConfig,
    caps: Capabilities,
    bits: tuple[int, ...],
    progress: Progress | None = None,
    stats: dict[str, InputStats] | None = None,
    executor: Executor | None = None,
    memo: SensitivityCache | None = None,
) -> list[ErrorTable]:
    """Error tables for every weight at each of ``bits``.

    Each tensor is an independent task on ``executor`` (default: threads in
    this process; numpy releases the GIL in its array loops); results come
    back in order, so the tables do not depend on where tasks ran. ``memo``
    (``--sensitivity-cache``) answers the tensors whose every option it
    holds, and keeps the others' for the next run.
    """
    bits_list = tuple(sorted(set(bits)))
    stats = stats or {}
    known = {i: opts for i, site in enumerate(sites)
             if memo is not None and (opts := _cached_options(site, config, caps, bits_list, memo, site.name in stats)) is not None}
    todo = [i for i in range(len(sites)) if i not in known]
    tasks = [(sites[i], config, caps, bits_list, stats.get(sites[i].name)) for i in todo]
    tables: list[ErrorTable | None] = [None] * len(sites)
    for i, opts in known.items():
        tables[i] = ErrorTable(sites[i], opts, scale_dtype_for(sites[i].np_dtype, caps.opset))
    if memo is not None:
        memo.tables_reused += len(known)
    with (threads() if executor is None else nullcontext(executor)) as run:
        for k, (i, (options, sdt)) in enumerate(zip(todo, run.map(_measure_task, tasks))):
            tables[i] = ErrorTable(sites[i], options, sdt)
            if memo is not None:
                for o in options:
                    for field, value in _error_fields(o):
                        memo.store(_table_key(sites[i], caps, o.bits, o.layout, o.axis, field), value)
            if progress is not None:
                progress(k + 1, len(todo), "measuring error")
    log.info("measured %d tensors at bits %s (%d from the sensitivity cache)", len(tables), bits_list, len(known))
    return [t for t in tables if t is not None]


def _table_key(site: WeightSite, caps: Capabilities, bits: int, layout: Layout, axis: int, field: str) -> tuple:
    return (TABLE, site.graph, site.name, caps.opset, bits, layout.name, axis, field)


def _error_fields(o: Option) -> list[tuple[str, float]]:
    return [("mse", o.mse), ("nmse", o.nmse), ("max_abs", o.max_abs)] + \
        ([("output_error", o.output_error)] if o.output_error is not None else [])


def _cached_options(site: WeightSite, config: QuantConfig, caps: Capabilities, bits_list: tuple[int, ...],
                    memo: SensitivityCache, with_stats: bool) -> tuple[Option, ...] | None:
    """The tensor's options from the cache, or None unless every field of every option is there."""
    out = []
    for spec in option_specs(site, config, caps, bits_list):
        fields = ("mse", "nmse", "max_abs") + (("output_error",) if with_stats else ())
        values = [memo.peek(_table_key(site, caps, spec.bits, spec.layout, spec.axis, f)) for f in fields]
        if any(v is None for v in values):
            return None
        out.append(Option(spec.bits, spec.layout, spec.axis, spec.qtype, spec.nbytes, *values[:3],  # type: ignore[arg-type]
                          values[3] if with_stats else None))
    return tuple(out)


def restrict(tables: list[ErrorTable], rules: TargetRules, activations: bool) -> tuple[list[ErrorTable], list[Skipped]]:
    """Each table with only the options the target allows; a weight with none left stays float, with the reason."""
    kept, dropped = [], []
    for t in tables:
        site = t.site
        problems = {o: rules.option_problem(site, o.qtype.bits, o.layout.granularity, o.axis, activations) for o in t.options}
        ok = tuple(o for o in t.options if not problems[o])
        if ok:
            kept.append(dataclasses.replace(t, options=ok))
        else:
            # The widest option's problem says what else is wrong once the width is settled.
            reason = problems[max(t.options, key=lambda o: o.qtype.bits)] if t.options else "no option measured"
            dropped.append(Skipped(site.name, site.graph, site.shape, site.dtype, site.params, reason))
    return kept, dropped


__all__ = ["Capabilities", "ErrorTable", "Option", "Spec", "measure", "restrict", "measure_tensor", "option_specs", "uniform_bytes", "valid_layouts"]
