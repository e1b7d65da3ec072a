"""The per-layer report: plain data, a stable JSON schema and a terminal table."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .graph.find import Inventory
from .planning.curve import CurvePoint
from .planning.search import Plan
from .numerics.metrics import OutputComparison
from .runtime.verify import Verification

SCHEMA = "mixq-onnx/report/v1"


def _float_itemsize(dtype: str) -> int:
    return 2 if dtype in ("float16", "bfloat16") else 4


@dataclass(frozen=True)
class OptionEntry:
    """One measured way to store a weight."""

    bits: int
    granularity: str
    container: str
    bytes: int
    mse: float
    nmse: float
    max_abs: float
    output_error: float | None
    e2e: float | None


@dataclass(frozen=True)
class ChosenEntry(OptionEntry):
    """The option the search chose: where its scales run, its container's width, and the float bytes it replaces."""

    axis: int | None
    container_bits: int
    float_bytes: int


@dataclass(frozen=True)
class RoundingEntry:
    """How the chosen option's integers were rounded, and why a simpler method was kept if it was."""

    method: str
    note: str
    bias_correction: str | None


@dataclass(frozen=True)
class TensorEntry:
    """One quantized weight: where it is, what reads it, every option measured, the choice and why."""

    name: str
    graph: str
    source: str
    op_types: str
    consumers: list[str]
    via: list[str]
    shape: list[int]
    dtype: str
    params: int
    channel_axis: int | None
    reduction_axis: int | None
    errors: list[OptionEntry]
    output_statistics: str
    chosen: ChosenEntry
    reason: str
    rounding: RoundingEntry
    notes: list[str]


@dataclass(frozen=True)
class SkippedEntry:
    """A float constant left alone, and why."""

    name: str
    graph: str
    shape: list[int]
    dtype: str
    params: int
    reason: str


@dataclass(frozen=True)
class Totals:
    tensors: int
    params: int
    float_bytes: int
    quantized_bytes: int
    compression: float
    avg_bits: float
    avg_logical_bits: float
    input_file_bytes: int | None = None
    output_file_bytes: int | None = None


@dataclass
class Report:
    """Everything a user needs to trust the output: choices, reasons, totals and the check."""

    input: str | None
    output: str | None
    config: dict[str, Any]
    opset: dict[str, Any]
    search: dict[str, Any]
    tensors: list[TensorEntry]
    skipped: list[SkippedEntry]
    quant_ops_found: dict[str, int]
    totals: Totals
    verification: Verification | None = None
    notes: list[str] = field(default_factory=list)
    activations: dict[str, Any] | None = None
    # The end-to-end evaluator: samples, output distances, weights measured, evaluations run.
    end_to_end: dict[str, Any] | None = None
    # ONNX Runtime CPU's optimised graph of the output: fused integer kernels, and nodes that stayed float.
    runtime: dict[str, Any] | None = None
    # Block reconstruction (--method brecq): the blocks, what each did and its block-output error before and after.
    reconstruction: dict[str, Any] | None = None
    # AWQ-style scaling (--awq): per activation, the alpha chosen (or why none) and the weight-only output errors.
    awq: dict[str, Any] | None = None
    # The accuracy-size curve: the plan the same measurements pick at each --target-bits, predicted and measured.
    curve: list[CurvePoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"schema": SCHEMA, **d}
        return _json_safe(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


# Floats that JSON cannot hold are written as "inf"/"-inf" (and NaN as null) by _json_safe.
_FLOAT = {"anyOf": [{"type": "number"}, {"enum": ["inf", "-inf", None]}]}


def _type_schema(tp: Any) -> dict[str, Any]:
    """JSON Schema of one annotated type, as to_dict() writes it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return {}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return dict(_FLOAT)
    if tp is str:
        return {"type": "string"}
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if len(args) == 2 else {}}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        return {"type": "object", "title": tp.__name__, "description": " ".join((tp.__doc__ or "").split()),
                "properties": {n: _type_schema(hints[n]) for n in names}, "required": names, "additionalProperties": False}
    raise TypeError(f"no JSON Schema for {tp!r}")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :meth:`Report.to_dict`, generated from the dataclasses (docs/report.schema.json)."""
    body = _type_schema(Report)
    body["properties"] = {"schema": {"const": SCHEMA}, **body["properties"]}
    body["required"] = ["schema", *body["required"]]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA, **body}


def _json_safe(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def build_report(
    inventory: Inventory,
    plan: Plan,
    config: dict[str, Any],
    opset: dict[str, Any],
    input_path: str | None,
    output_path: str | None,
    notes: list[str],
    no_stats: dict[str, str] | None = None,
    rounding: dict[str, RoundingEntry] | None = None,
    activations: dict[str, Any] | None = None,
    end_to_end: dict[str, Any] | None = None,
    written_errors: dict[str, tuple[float, float, float]] | None = None,
    curve: Sequence[CurvePoint] = (),
) -> Report:
    """The report of a plan; ``written_errors`` replace the chosen option's (round-to-nearest) errors where the
    written integers came from another rounding method."""
    tensors = []
    params = float_bytes = qbytes = logical = 0
    for d in plan.decisions:
        site, o = d.table.site, d.option
        fb = site.params * _float_itemsize(site.dtype)
        params += site.params
        float_bytes += fb
        qbytes += o.nbytes
        logical += site.params * o.bits
        tensors.append(TensorEntry(
            site.name, site.graph, site.source.value, site.op_types, [u.node for u in site.uses], list(site.via),
            list(site.shape), site.dtype, site.params, site.channel_axis, site.reduction_axis,
            [OptionEntry(x.bits, x.layout.name, x.qtype.name, x.nbytes, x.mse, x.nmse, x.max_abs, x.output_error, x.e2e)
             for x in d.table.options],
            "collected" if o.output_error is not None else (no_stats or {}).get(site.name, "no calibration data"),
            ChosenEntry(o.bits, o.layout.name, o.qtype.name, o.nbytes, *(written_errors or {}).get(site.name, (o.mse, o.nmse, o.max_abs)),
                        o.output_error, o.e2e,
                        o.axis if o.layout.name != "tensor" else None, o.qtype.bits, fb),
            d.reason,
            (rounding or {}).get(site.name, RoundingEntry("rtn", "", None)),
            list(site.notes),
        ))
    skipped = [SkippedEntry(s.name, s.graph, list(s.shape), s.dtype, s.params, s.reason) for s in inventory.skipped]
    totals = Totals(
        len(tensors),
        params,
        float_bytes,
        qbytes,
        float_bytes / qbytes if qbytes else 0.0,
        8 * qbytes / params if params else 0.0,
        logical / params if params else 0.0,
    )
    return Report(input_path, output_path, config, opset, {"mode": plan.summary.mode, **plan.summary.details},
                  tensors, skipped, inventory.quant_ops, totals, None, notes, activations, end_to_end, curve=list(curve))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _search_lines(search: dict[str, Any], t: Totals) -> list[str]:
    """The budget against what was used, and the plans measured end to end with the one returned."""
    out = []
    if search.get("limit_bytes") is not None and t.params:
        per = 8 / t.params
        used = search.get("used_bytes") or 0
        if search.get("max_bytes") is not None:
            file = f"; file {search['file_bytes']} bytes" if search.get("file_bytes") is not None else ""
            out.append(f"budget: --max-size {search['max_bytes']} bytes for the whole file: {search['limit_bytes']} bytes "
                       f"({search['limit_bytes'] * per:.3f} bits/weight) for the weights after the graph and float tensors; "
                       f"used {used} bytes ({used * per:.3f} bits/weight){file}")
        else:
            out.append(f"budget: --target-bits {search['target_bits']:g} = {search['limit_bytes']} bytes of weights "
                       f"({search['limit_bytes'] * per:.3f} stored bits/weight incl. scales); used {used} bytes "
                       f"({used * per:.3f} bits/weight)")
    if search.get("max_loss") is not None:
        out.append(f"accuracy target: --max-loss {search['max_loss']:g}; returned plan measures {search.get('distance', float('nan')):.4g}")
    for m in search.get("measured", []):
        mark = "  <- returned" if m["plan"] == search.get("returned") else ""
        out.append(f"  measured end to end: {m['plan']}: {m['bytes']} bytes, distance {m['distance']:.4g}{mark}")
    return out


def curve_lines(curve: Sequence[CurvePoint]) -> list[str]:
    """The accuracy-size curve as a small table: one row per budget whose plan differs in size."""
    if not curve:
        return []
    rows = [("--target-bits", "weights", "bits/weight", f"predicted {curve[0].quantity}", "measured")]
    rows += [(f"{p.target_bits:g}", _size(p.bytes), f"{p.bits_per_weight:.3f}", f"{p.predicted:.4g}",
              "-" if p.measured is None else f"{p.measured:.4g}") for p in curve]
    return ["accuracy-size curve (the best plan these measurements predict at each budget; pick a size, rerun with "
            "--sensitivity-cache to reuse them):"] + ["  " + line for line in _aligned(rows)]


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as lines whose columns line up (each as wide as its widest cell)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def format_table(report: Report, max_rows: int = 0) -> str:
    """A readable table: one row per quantized tensor, then skips, totals and the check."""
    rows = [("tensor", "op", "shape", "params", "bits", "layout", "store", "bytes", "nmse", "reason")]
    shown = report.tensors if not max_rows else report.tensors[:max_rows]
    for t in shown:
        c = t.chosen
        rows.append((t.name[:40], t.op_types, "x".join(map(str, t.shape)), str(t.params), str(c.bits),
                     c.granularity, c.container, _size(c.bytes), f"{c.nmse:.2e}", t.reason[:48]))
    lines = _aligned(rows)
    if max_rows and len(report.tensors) > max_rows:
        lines.append(f"... {len(report.tensors) - max_rows} more tensors (see --report)")
    if report.skipped:
        lines.append("")
        lines.append(f"left in float ({len(report.skipped)}):")
        for s in report.skipped[: max_rows or None]:
            lines.append(f"  {s.name[:48]}  {'x'.join(map(str, s.shape)) or 'scalar'}  {s.reason}")
        if max_rows and len(report.skipped) > max_rows:
            lines.append(f"  ... {len(report.skipped) - max_rows} more (see --report)")
    t = report.totals
    lines.append("")
    lines.append(
        f"search: {report.search['mode']}; {t.tensors} tensors, {t.params} weights: {_size(t.float_bytes)} float -> "
        f"{_size(t.quantized_bytes)} quantized ({t.compression:.2f}x), {t.avg_bits:.3f} stored bits/weight incl. scales, "
        f"{t.avg_logical_bits:.3f} logical bits"
    )
    lines.extend(_search_lines(report.search, t))
    lines.extend(curve_lines(report.curve))
    e = report.end_to_end
    if e:
        lines.append(f"end-to-end: {e['samples']} sample(s), {e['source']}; distance per output: "
                     + ", ".join(f"{n} {k}" for n, k in e["outputs"].items()) + f"; {e.get('evaluations', 0)} model runs"
                     + (f"; {len(e['not_measured'])} weights not measurable (see --report)" if e.get("not_measured") else ""))
    if t.input_file_bytes and t.output_file_bytes:
        lines.append(f"file: {_size(t.input_file_bytes)} -> {_size(t.output_file_bytes)} ({t.input_file_bytes / t.output_file_bytes:.2f}x)")
    if report.opset.get("note"):
        lines.append(f"opset: {report.opset['note']}")
    for n in report.notes:
        lines.append(f"note: {n}")
    if report.activations:
        a = report.activations
        why = Counter(f["reason"].split(" (")[0].split(":")[0] for f in a["float_nodes"])
        whys = "; ".join(f"{n} x {r}" for r, n in why.most_common(3))
        lines.append(f"activations: {len(a['tensors'])} tensors quantized to {a['type']} ({a['calib_method']} ranges); "
                     f"{len(a['float_nodes'])} integer-capable nodes left in float" + (f" ({whys})" if whys else "")
                     + " (see 'activations' in --report)")
        sm = a.get("smoothing")
        if sm:
            alphas = sorted({g["alpha"] for g in sm["applied"]})
            shown = ", ".join(f"{x:g}" for x in alphas[:4]) + (" ..." if len(alphas) > 4 else "")
            left = Counter(g["reason"].split(" (")[0] for g in sm["not_applied"])
            lines.append(f"smoothing: {len(sm['applied'])} MatMul/Gemm inputs smoothed (alpha {shown or '-'}), "
                         f"{len(sm['not_applied'])} left alone" + (": " + "; ".join(f"{n} x {r}" for r, n in left.most_common(3))
                                                                   if left else ""))
    if report.reconstruction:
        blocks = report.reconstruction["blocks"]
        status = Counter(b["status"] for b in blocks)
        lines.append(f"block reconstruction: {len(blocks)} blocks on {report.reconstruction['samples']} samples: "
                     + ", ".join(f"{n} {k}" for k, n in sorted(status.items())) + " (see 'reconstruction' in --report)")
        for b in blocks:
            if b["status"] == "fallback":
                lines.append(f"  block {b['index'] + 1} fell back: {b['reason']}")
    if report.runtime:
        fused = ", ".join(f"{k} {v}" for k, v in report.runtime["fused"].items()) or "nothing"
        left = len(report.runtime["not_fused"])
        lines.append(f"ONNX Runtime CPU fuses: {fused}" + (f"; {left} node(s) still compute in float between integer ops "
                                                          "(see 'runtime' in --report)" if left else ""))
    v = report.verification
    if v is not None:
        lines.append("")
        lines.append(f"verification on {v.samples} sample(s), {v.inputs}, {v.provider}:")
        for run in v.runs:
            for o in run.outputs:
                lines.append(f"  {run.setting}: {_output_line(o)}")
        ran = [p.name for p in v.providers if p.ran]
        skipped = [f"{p.name} ({p.detail})" for p in v.providers if not p.ran]
        lines.append(f"  ran on: {', '.join(ran)}" + (f"; not run: {', '.join(skipped)}" if skipped else ""))
    return "\n".join(lines)


def _output_line(o: OutputComparison) -> str:
    """One output's metrics: the verdict's metric first, then the rest."""
    parts = []
    if o.perplexity is not None and o.perplexity_float is not None:
        parts.append(f"next-token perplexity {o.perplexity:.4g} (float {o.perplexity_float:.4g}, "
                     f"{o.perplexity / o.perplexity_float - 1:+.2%})")
    if o.top1_agreement is not None:
        where = f" along axis {o.class_axis}" if o.class_axis is not None else ""
        parts.append(f"top-1 agreement {o.top1_agreement:.2%}{where}")
    if o.foreground_agreement is not None:
        parts.append(f"off the dominant class {o.foreground_agreement:.2%}")
    if o.decoded_agreement is not None:
        parts.append(f"decoded (1 - CER) {o.decoded_agreement:.2%}")
    if o.sequence_match is not None:
        parts.append(f"whole sequences {o.sequence_match:.2%}")
    if o.kl is not None:
        parts.append(f"KL {o.kl:.3g}")
    if o.mean_cosine is not None:
        parts.append(f"mean cosine {o.mean_cosine:.5f}")
    parts.append(f"cosine {o.cosine:.5f}, SQNR {o.sqnr_db:.1f} dB, max|d| {o.max_abs:.3g}")
    return f"{o.name} ({o.kind}): {o.level}: " + ", ".join(parts)


def verdict_line(report: Report) -> str | None:
    """The run's last line: the verdict, what decided it and on which data (None without verification)."""
    v = report.verification
    if v is None:
        return None
    return f"verdict: {v.verdict.level} ({v.verdict.reason}; on {v.samples} samples: {v.inputs})"
