"""The whole job, as a library: load, find weights, measure error, search, rewrite, verify, report.

The CLI is a thin layer over :func:`quantize` and :func:`quantize_file`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from .calibrate import collect_activation_ranges, collect_input_stats, load_calibration
from .config import Activations, Budget, Method, MixQuantRule, QuantConfig, Scheme, Sensitivity, Target, Uniform
from .errors import ConfigError, ModelError
from .find import Inventory, find_weights, gather_index_bounds
from .graph import MAIN, default_opset
from .io import EXTERNAL_THRESHOLD, check_output_path, load_model, save_model
from .layer_stats import InputStats
from .measure import Capabilities, Progress, measure
from .numerics import QTYPES, Grid, activation_params, container_for, required_opset
from .report import Report, build_report
from .placement import place_activations
from .rewrite import ActivationQDQ, apply_plan, correct_biases, insert_activation_qdq, raise_opset
from .targets import TargetRules, restrict, rules_for
from .rounding import Rounded, round_weight
from .search import Decision, Plan, search
from .verify import load_inputs, parse_input_shapes, random_inputs, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyOptions:
    """How to check the written model against the float one."""

    enabled: bool = True
    input_shapes: tuple[str, ...] = ()
    inputs: Path | None = None
    samples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--verify-samples must be at least 1, got {self.samples}")
        parse_input_shapes(self.input_shapes)


@dataclass(frozen=True)
class CalibrationOptions:
    """Where calibration samples come from (--calib) and how many to use (--calib-samples)."""

    path: Path
    samples: int | None = None

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"--calib-samples must be at least 1, got {self.samples}")


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    report: Report
    plan: Plan


def _needed_opset(config: QuantConfig) -> int:
    """The opset the most demanding candidate option would need."""
    sym = config.scheme is Scheme.SYMMETRIC
    weights = max(
        required_opset(container_for(b, sym, config.allow_int2), lay) for b in _bits_to_measure(config) for lay in config.layouts
    )
    return max(weights, ACTIVATION_QTYPES[config.activations].min_opset) if config.activations is not Activations.NONE else weights


def _bits_to_measure(config: QuantConfig) -> tuple[int, ...]:
    """Uniform mode needs one width (plus any forced); searches need every candidate and the reference."""
    forced = tuple(f.bits for f in config.force_bits)
    # A target may force 8 bits where the asked width is not allowed (see targets.restrict).
    forced += (8,) if config.target is not Target.GENERIC or config.activations is not Activations.NONE else ()
    if isinstance(config.search, Uniform):
        return (config.search.bits,) + forced
    extra = (config.search.ref_bits,) if isinstance(config.search, MixQuantRule) else ()
    return config.candidate_bits + extra + forced


def _nothing_to_quantize(where: str, inv: Inventory) -> ModelError:
    if inv.quant_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in inv.quant_ops.items())
        return ModelError(f"{where}: nothing to quantize: the model is already quantized ({ops}); pass the float model instead")
    reasons = Counter(s.reason.split(" (")[0].split(":")[0] for s in inv.skipped)
    top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "no float constants"
    return ModelError(f"{where}: nothing to quantize ({top}); lower --min-elements or check --keep-float if weights were expected")


def quantize(
    model: onnx.ModelProto | str | os.PathLike[str],
    config: QuantConfig | None = None,
    progress: Progress | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> QuantizeResult:
    """Quantize a model (a ModelProto or a path) and return the new model with its report.

    ``calibration`` (feeds for the float model, see :func:`load_calibration`)
    enables output-aware sensitivity. Never modifies the input. Raises a
    :class:`MixqError` subclass on bad input.
    """
    config = config or QuantConfig()
    if not calibration:
        needs = [f"--method {config.method.value}"] if config.method.needs_calibration else []
        needs += ["--bias-correction"] if config.bias_correction else []
        needs += [f"--activations {config.activations.value}"] if config.activations is not Activations.NONE else []
        if needs:
            raise ConfigError(f"{' and '.join(needs)} need calibration data; pass --calib FILE.npz (see README, 'Calibration data')")
    path = None
    if not isinstance(model, onnx.ModelProto):
        loaded = load_model(model)
        model, path = loaded.model, loaded.path
    where = str(path) if path else "model"
    inventory = find_weights(model, config)
    if not inventory.weights:
        raise _nothing_to_quantize(where, inventory)
    notes: list[str] = []
    if inventory.quant_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in inventory.quant_ops.items())
        notes.append(f"model already contains quantization ops ({ops}); those parts were left as they are")
    original = default_opset(model)
    change = raise_opset(model, _needed_opset(config))
    attempts: list[tuple[onnx.ModelProto, list[str]]] = []
    if change.model is not None:
        attempts.append((change.model, []))
    else:
        notes.append(change.note)
    if original >= 10:
        limit = "INT8 only" + (", per-tensor only" if original < 13 else "")
        attempts.append((model, [f"fell back to what opset {original} supports ({limit})"]))
    if not attempts:
        raise ModelError(f"{where}: opset {original} has no DequantizeLinear and {change.note}; convert the model to opset 13 or newer")
    failure = ""
    rules = rules_for(config.target)
    acts = config.activations is not Activations.NONE
    for base, fallback_notes in attempts:
        inv = inventory if base is model else find_weights(base, config)
        caps = Capabilities(default_opset(base), config.allow_int2)
        stats, no_stats = collect_input_stats(base, inv.weights, calibration) if calibration else ({}, {})
        tables = measure(inv.weights, config, caps, _bits_to_measure(config), progress, stats)
        tables, not_allowed = restrict(tables, rules, acts)
        if not tables:
            raise ModelError(f"{where}: --target {config.target.value} allows none of the weights' options ({not_allowed[0].reason})")
        plan = search(tables, config)
        uses_int2 = any(d.option.qtype.bits == 2 for d in plan.decisions)
        rounded = round_decisions(plan.decisions, config, stats)
        bias: dict[str, str] = {}
        source = base  # the float model the rewrite starts from: with corrected biases if asked
        if config.bias_correction:
            shifts = {d.table.site.name: stats[d.table.site.name].output_shift(_error(d, r)) for d, r in zip(plan.decisions, rounded)
                      if d.table.site.name in stats}
            corrected = correct_biases(base, inv.weights, shifts)
            source, bias = corrected.model, corrected.outcome
        # ORT fuses QGemm only with an explicit weight zero point (measured); a few bytes per Gemm output channel.
        zero_point_ops = frozenset({"Gemm"}) if acts and config.target is Target.ORT_CPU else frozenset()
        out = apply_plan(source, plan.decisions, [r.tensor for r in rounded], uses_int2, zero_point_ops)
        activation_info = None
        if acts:
            out, activation_info = _quantize_activations(source, out, plan, rules, config, calibration)
        problem = _check(out)
        if problem:
            failure = f"{failure}; {problem}" if failure else problem
            log.warning("output at opset %d failed onnx.checker: %s", caps.opset, problem)
            continue
        all_notes = notes + ([failure] if failure else []) + fallback_notes
        if uses_int2:
            all_notes.append("INT2 tensors need IR version 13 and opset 25; older runtimes cannot load this model")
        opset_info = {"original": original, "output": default_opset(out), "ir_version": out.ir_version,
                      "note": change.note if base is not model else ""}
        if calibration and config.sensitivity is Sensitivity.OUTPUT:
            all_notes.append(
                f"output sensitivity from {sum(len(next(iter(f.values()))) for f in calibration)} calibration samples for "
                f"{len(stats)} of {len(inv.weights)} weights; the others use weight error"
            )
        rounding = {d.table.site.name: {"method": r.method.value, "note": r.note, "bias_correction": bias.get(d.table.site.name)}
                    for d, r in zip(plan.decisions, rounded)}
        fallbacks = sum(bool(r.note) for r in rounded)
        if fallbacks:
            all_notes.append(f"{fallbacks} tensors kept a simpler rounding than --method {config.method.value} (see 'rounding' in --report)")
        inv_report = dataclasses.replace(inv, skipped=inv.skipped + tuple(not_allowed))
        report = build_report(inv_report, plan, config.describe(), opset_info, str(path) if path else None, None, all_notes, no_stats,
                              rounding, activation_info)
        return QuantizeResult(out, report, plan)
    raise ModelError(f"{where}: could not produce a valid quantized model ({failure}); please report this with the model")


ACTIVATION_QTYPES = {Activations.INT8: QTYPES["int8"], Activations.UINT8: QTYPES["uint8"], Activations.INT16: QTYPES["int16"]}


def _quantize_activations(
    base: onnx.ModelProto, out: onnx.ModelProto, plan: Plan, rules: TargetRules, config: QuantConfig,
    calibration: list[dict[str, np.ndarray]],
) -> tuple[onnx.ModelProto, dict]:
    """Place Q/DQ pairs on activations, calibrate their ranges on the float model, and insert them into ``out``."""
    weight_bits = {d.table.site.name: d.option.qtype.bits for d in plan.decisions if d.table.site.graph == MAIN}
    placement = place_activations(base, rules, weight_bits)
    qtype = ACTIVATION_QTYPES[config.activations]
    sym = rules.symmetric_activations
    ranges = collect_activation_ranges(base, placement.ranged, calibration, config.calib_method, qtype, sym)
    pairs = [ActivationQDQ(s.tensor, None, None, s.share) if s.share
             else ActivationQDQ(s.tensor, *activation_params(*ranges[s.tensor], qtype, sym)) for s in placement.sites]
    info = {
        "type": qtype.name, "symmetric": sym, "calib_method": config.calib_method.value,
        "tensors": [{"name": s.tensor, "reason": s.reason, "shares": s.share or None,
                     "range": list(ranges[s.share or s.tensor]),
                     "scale": float(p.scale) if p.scale is not None else None,
                     "zero_point": int(p.zero_point) if p.zero_point is not None else None}
                    for s, p in zip(placement.sites, pairs)],
        "float_nodes": [{"node": n, "reason": r} for n, r in placement.skipped],
    }
    return insert_activation_qdq(out, pairs), info


def round_decisions(decisions: tuple[Decision, ...], config: QuantConfig, stats: dict[str, InputStats]) -> list[Rounded]:
    """Each chosen option rounded with ``config.method``, in decision order; threads, as numpy releases the GIL."""
    symmetric = config.scheme is Scheme.SYMMETRIC

    def one(d: Decision) -> Rounded:
        o, w = d.option, d.table.site.array
        w = w.astype(np.float32) if w.dtype == ml_dtypes.bfloat16 else w
        grid = Grid(o.bits, symmetric, o.layout, o.axis, o.qtype, d.table.scale_dtype)
        return round_weight(w, grid, config.method, stats.get(d.table.site.name))

    if config.method is Method.RTN:
        return [one(d) for d in decisions]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, decisions))


def _error(d: Decision, r: Rounded) -> np.ndarray:
    w = d.table.site.array.astype(np.float32)
    return r.tensor.dequantize().astype(np.float32) - w


def _check(model: onnx.ModelProto) -> str:
    """onnx.checker's full check, or '' when it passes; models over 2 GB are checked when saved."""
    if model.ByteSize() > EXTERNAL_THRESHOLD:
        return ""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError and friends
        return str(exc).splitlines()[0][:300]
    return ""


def quantize_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    config: QuantConfig | None = None,
    verify_options: VerifyOptions | None = None,
    progress: Progress | None = None,
    calibration: CalibrationOptions | None = None,
) -> QuantizeResult:
    """Quantize ``input_path``, write ``output_path`` atomically and verify it in ONNX Runtime.

    With ``output_path`` None nothing is written (a plan only).
    """
    verify_options = verify_options or VerifyOptions()
    out = check_output_path(output_path, input_path) if output_path is not None else None
    shapes = parse_input_shapes(verify_options.input_shapes)
    loaded = load_model(input_path)
    feeds = load_calibration(calibration.path, Path(input_path), calibration.samples) if calibration else None
    result = quantize(loaded.model, config, progress, feeds)
    result.report.input = str(input_path)
    if out is None:
        return result
    save_model(result.model, out, loaded.had_external_data)
    result.report.output = str(out)
    in_bytes = Path(input_path).stat().st_size + _data_size(Path(input_path))
    out_bytes = out.stat().st_size + _data_size(out)
    result.report.totals = dataclasses.replace(result.report.totals, input_file_bytes=in_bytes, output_file_bytes=out_bytes)
    if verify_options.enabled:
        if verify_options.inputs is not None:
            feeds, source = load_inputs(verify_options.inputs), f"from {verify_options.inputs}"
        else:
            bounds = gather_index_bounds(loaded.model)
            feeds = random_inputs(Path(input_path), shapes, bounds, verify_options.samples, verify_options.seed)
            source = f"seeded random (seed {verify_options.seed})"
        result.report.verification = verify(Path(input_path), out, feeds, source)
    return result


def _data_size(model_path: Path) -> int:
    """Bytes of external data files beside a model (those it references)."""
    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return 0
    locs = {e.value for t in onnx.external_data_helper._get_all_tensors(m) for e in t.external_data if e.key == "location"}
    return sum((model_path.parent / loc).stat().st_size for loc in locs if (model_path.parent / loc).is_file())


__all__ = ["CalibrationOptions", "QuantizeResult", "VerifyOptions", "quantize", "quantize_file", "Budget"]
