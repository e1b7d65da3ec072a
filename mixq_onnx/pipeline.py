"""The whole job, as a library: load, find weights, measure error, search, rewrite, verify, report.

The CLI is a thin layer over :func:`quantize` and :func:`quantize_file`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .runtime.brecq import ReconstructionResult, reconstruct, require_torch
from .runtime.calibrate import HOLDOUT_FRACTION, collect_activation_ranges, collect_input_stats, hold_out, load_calibration
from .config import Activations, Budget, KQuantMixed, MaxLoss, Method, MixQuantRule, QuantConfig, Scheme, Sensitivity, Target, Uniform
from .errors import BudgetError, ConfigError, ModelError, VerdictError
from .executor import Executor, for_runtime
from .runtime.fusion import integer_inputs, ort_fusion
from .graph.find import Inventory, Skipped, WeightSite, find_weights, gather_index_bounds, token_input
from .graph.scopes import MAIN, default_opset
from .graph.io import (EXTERNAL_THRESHOLD, Spill, check_output_path, has_external_data, load_model, model_bytes, model_digest,
                       model_files, output_bytes, stage_model, tensor_nbytes, write_text_atomic, inline_bytes,
                       inline_copy, spill_initializers)
from .runtime.inputs import Feed, InputInfo, feed_samples, generate_inputs, input_infos, is_script, session
from .planning.measure import Capabilities, ErrorTable, Option, Progress, Spec, measure, option_specs, restrict, uniform_bytes
from .numerics.qdq import QTYPES, Grid, activation_params, container_for, required_opset
from .runtime.plans import (CONTAINER_WIDTHS, Rounder, RoundedSequence, budget_limit, measure_plans, plan_key,
                            never_worse_than_uniform, smallest_within_loss, uniform_rivals)
from .report import Report, RoundingEntry, build_report
from .graph.placement import Placement, place_activations
from .graph.roles import decoder_roles, shared_input_groups
from .graph.repair import densify_sparse_initializers, drop_contradicted_shapes, tie_transposed_tables
from .graph.rewrite import ActivationQDQ, apply_plan, correct_biases, insert_activation_qdq, raise_opset
from .targets import TargetRules, rules_for
from .numerics.metrics import weight_error
from .numerics.rounding import Rounded
from .numerics.statistics import InputStats
from .planning.search import Decision, Plan, effective_bits, plan_bytes, search
from .runtime.sensitivity import LOGITS_BYTES, EndToEnd, attach_e2e, limit_feeds
from .runtime.blockwise import BlockProxy
from .runtime.chain import float_runner
from .planning.cache import SensitivityCache, feeds_digest
from .planning.curve import CurvePoint, accuracy_size_curve, curve_plans
from .runtime.awq import awq_model, describe_awq
from .runtime.smoothing import ActivationGrid, SmoothingResult, smooth_model
from .kinds import DataSource, Evaluation, Level, OutputKind, Thresholds
from .runtime.verify import load_inputs, parse_input_shapes, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyOptions:
    """How to check the written model against the float one, and what verdict the run must reach.

    ``inputs``: held-out samples (an .npz or a data-loader script); without
    them a ``holdout`` share of the calibration data is kept back for the
    check, and without either the check runs on ``samples`` generated
    inputs (verdict 'unverified'). ``kinds`` names the kind of outputs whose
    guess is wrong; ``require`` refuses (writes nothing) a verdict below it.
    """

    enabled: bool = True
    input_shapes: tuple[str, ...] = ()
    inputs: Path | None = None
    samples: int = 8
    seed: int = 0
    holdout: float = HOLDOUT_FRACTION
    thresholds: Thresholds = field(default_factory=Thresholds)
    kinds: tuple[tuple[str, OutputKind], ...] = ()
    require: Level | None = None

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--verify-samples must be at least 1, got {self.samples}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be an integer from 0 to 2^63-1, got {self.seed}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"--holdout must be at least 0 and below 1, got {self.holdout}")
        if self.require is Level.UNVERIFIED:
            raise ConfigError("--require takes good or degraded")
        if self.require is not None and not self.enabled:
            raise ConfigError("--require needs the verification that --no-verify skips; drop one of them")
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
    """The quantized model, its report and plan.

    ``spill`` holds the scratch file the new weights of a model with
    external data were written to; ``model`` reads from it until
    :meth:`close` (or garbage collection) removes it. ``input_spill``
    likewise, for the weights of a big inline input.
    """

    model: onnx.ModelProto
    report: Report
    plan: Plan
    spill: Spill | None = None
    # Where quantize_file put the weights of a big inline input; the float tensors of ``model`` read from it.
    input_spill: Spill | None = None

    def close(self) -> None:
        for s in (self.spill, self.input_spill):
            if s is not None:
                s.close()


def _needed_opset(config: QuantConfig) -> int:
    """The opset the most demanding candidate option would need."""
    sym = config.scheme is Scheme.SYMMETRIC
    weights = max(
        required_opset(container_for(b, sym, config.allow_int2), lay) for b in _bits_to_measure(config) for lay in config.layouts
    )
    return max(weights, ACTIVATION_QTYPES[config.activations].min_opset) if config.activations is not Activations.NONE else weights


def _bits_to_measure(config: QuantConfig, caps: Capabilities | None = None) -> tuple[int, ...]:
    """Uniform mode needs one width (plus any forced); searches need their candidates and the reference.

    With the storage-aware rule only the widest candidate of each container
    is measured: the others cost the same bytes and lose more.
    """
    forced = tuple(f.bits for f in config.force_bits)
    # A target may force 8 bits where the asked width is not allowed (see targets.restrict).
    forced += (8,) if config.target is not Target.GENERIC or config.activations is not Activations.NONE else ()
    if isinstance(config.search, Uniform):
        return tuple(sorted({config.search.bits, *forced}))
    if isinstance(config.search, KQuantMixed):
        return tuple(sorted({config.search.low_bits, config.search.high_bits, *forced}))
    extra = (config.search.ref_bits,) if isinstance(config.search, MixQuantRule) else ()
    cands = config.candidate_bits
    if config.storage_aware:
        sym = config.scheme is Scheme.SYMMETRIC
        widest: dict[str, int] = {}
        for b in cands:
            q = caps.container(b, sym) if caps is not None else container_for(b, sym, config.allow_int2)
            name = q.name if q is not None else ""
            widest[name] = max(widest.get(name, 0), b)
        cands = tuple(widest.values())
    return tuple(sorted({*cands, *extra, *forced}))


def _nothing_to_quantize(where: str, inv: Inventory) -> ModelError:
    if inv.quant_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in inv.quant_ops.items())
        return ModelError(f"{where}: nothing to quantize: the model is already quantized ({ops}); pass the float model instead")
    reasons = Counter(s.reason.split(" (")[0].split(":")[0] for s in inv.skipped)
    top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "no float constants"
    return ModelError(f"{where}: nothing to quantize ({top}); lower --min-elements or check --keep-float if weights were expected")


def _uses_e2e(config: QuantConfig) -> bool:
    """Whether the search needs the end-to-end evaluator (uniform widths and fixed rules need no sensitivity at all)."""
    return not isinstance(config.search, (Uniform, KQuantMixed)) \
        and (config.sensitivity is Sensitivity.E2E or isinstance(config.search, Budget))


def _needs_stats(config: QuantConfig) -> bool:
    """Whether anything in this run reads the layers' input statistics (they cost a pass with im2col over the data)."""
    return config.method is not Method.RTN or config.bias_correction or config.sensitivity is Sensitivity.OUTPUT


def _allowed_specs(sites: tuple[WeightSite, ...], config: QuantConfig, caps: Capabilities, rules: TargetRules, acts: bool,
                   bits: tuple[int, ...]) -> dict[str, list[Spec]]:
    out = {}
    for site in sites:
        specs = [sp for sp in option_specs(site, config, caps, bits)
                 if not rules.option_problem(site, sp.qtype.bits, sp.layout.granularity, sp.axis, acts)]
        out[site.name] = specs
    return out


def _budget_limit(where: str, config: QuantConfig, caps: Capabilities, sites: tuple[WeightSite, ...],
                  specs: dict[str, list[Spec]], fixed_bytes: int) -> int | None:
    """The weights' budget in bytes, checked against the smallest plan that fits before any expensive work.

    ``fixed_bytes`` is what the output file holds besides the quantized
    weights (graph, float tensors, DequantizeLinear nodes): ``--max-size``
    covers the whole file, so the weights get what remains.
    """
    budget = config.search
    if not isinstance(budget, Budget):
        return None
    used = [s for s in sites if specs.get(s.name)]
    limit = budget_limit(budget, _uniform_totals(used, config, caps), config.allow_int2)
    if budget.max_bytes is not None:
        limit -= fixed_bytes
    smallest = 0
    for s in used:
        forced = config.forced_bits(s.names)
        opts = [sp for sp in specs[s.name] if sp.bits in set(effective_bits(config, specs[s.name]))]
        pool = [sp for sp in specs[s.name] if sp.bits == forced][:1] if forced is not None else opts
        smallest += min((sp.nbytes for sp in pool or specs[s.name]), default=0)
    if budget.max_bytes is not None and smallest > limit:
        raise BudgetError(f"{where}: --max-size {budget.max_bytes} bytes cannot be met: the smallest file that can be written "
                          f"takes about {smallest + fixed_bytes} bytes ({smallest} of quantized weights, {fixed_bytes} of "
                          f"graph and float tensors); ask for --max-size {smallest + fixed_bytes} or more, allow --int2, or "
                          "force fewer tensors", smallest + fixed_bytes)
    if smallest > limit:
        bits = f" (--target-bits {budget.target_bits:g})" if budget.target_bits else ""
        raise BudgetError(f"{where}: budget of {limit} bytes{bits} cannot be met: the smallest plan that fits takes {smallest} bytes "
                          f"(ask for --max-size {smallest} or more, allow --int2, or force fewer tensors)", smallest)
    return limit


def _uniform_totals(sites: Sequence[WeightSite], config: QuantConfig, caps: Capabilities) -> dict[int, int]:
    """The weights' bytes in the uniform per-channel plan at each container width: what --target-bits interpolates."""
    return {b: sum(uniform_bytes(s, b, config, caps) for s in sites) for b in CONTAINER_WIDTHS}


def _fixed_bytes(model: onnx.ModelProto, sites: tuple[WeightSite, ...]) -> int:
    """An estimate of the output's bytes besides the quantized weights' data, scales and zero points.

    The model's bytes less its weights' float data, plus per weight what a
    DequantizeLinear costs in the graph (the node, and the names and headers
    of its three tensors). :func:`quantize` measures the real file and
    tightens the budget if this was short.
    """
    weights = sum(tensor_nbytes(s.tensor) for s in sites)
    per_weight = sum(160 + 6 * len(s.name.encode()) for s in sites)
    return max(model_bytes(model) - weights, 0) + per_weight


def _evaluator(model: onnx.ModelProto, sites: tuple[WeightSite, ...], feeds: list[Feed] | None, source: str,
               config: QuantConfig, cache: SensitivityCache | None = None, scratch: Path | None = None
               ) -> tuple[EndToEnd | None, str]:
    """The end-to-end evaluator on up to ``config.e2e_samples`` samples, or None and why it cannot run.

    With a cache made by a run of this model on these samples (which ran it end to end), the evaluator's reference
    pass waits until a measurement is missing.
    """
    if not feeds:
        return None, source or "no samples to run the model on"
    known = json.loads(cache.meta["outputs"]) if cache is not None and cache.warm and "outputs" in cache.meta else None
    try:
        blocks = config.eval_block_weights if config.evaluation is Evaluation.BLOCKS else 0
        ev = EndToEnd(model, sites, limit_feeds(feeds, config.e2e_samples), source, known, blocks, scratch)
    except ConfigError as exc:
        return None, str(exc)
    except Exception as exc:  # ONNX Runtime raises its own types for models it cannot run
        return None, f"ONNX Runtime cannot run the model with its weights as inputs ({str(exc).splitlines()[0][:200]})"
    if not ev.eligibility.names:
        return None, "no weight can be fed to ONNX Runtime: " + "; ".join(sorted(set(ev.eligibility.reasons.values())))
    return ev, ""


def _sensitivity_cache(path: Path, base: onnx.ModelProto, evaluation: list[Feed] | None, calibration: list[Feed] | None,
                       config: QuantConfig) -> SensitivityCache:
    """The cache file's measurements, valid only for this model, these samples and the settings that change a value."""
    settings = {"scheme": config.scheme.value, "method": config.method.value, "layer_method": config.layer_method.value,
                "search_with_method": config.search_with_method, "evaluation": config.evaluation.value,
                "eval_block_weights": config.eval_block_weights, "bias_correction": config.bias_correction,
                "logits_bytes": LOGITS_BYTES}
    context = {"model": model_digest(base),
               "samples": feeds_digest(limit_feeds(evaluation, config.e2e_samples)) if evaluation else "-",
               # The layers' statistics (data-aware rounding, output errors in the tables) read the calibration data.
               "calibration": feeds_digest(calibration) if calibration and _needs_stats(config) else "-",
               "settings": json.dumps(settings, sort_keys=True)}
    return SensitivityCache(path, context)


def _block_proxy(evaluator: EndToEnd, sites: tuple[WeightSite, ...], config: QuantConfig, scratch: Path | None
                 ) -> tuple[BlockProxy | None, str]:
    """The block-wise evaluator where asked and where the model can be cut, else None and why not."""
    if config.evaluation is not Evaluation.BLOCKS:
        return None, ""
    try:
        proxy = BlockProxy(evaluator, sites, config.eval_block_weights, scratch=scratch)
    except Exception as exc:  # ONNX Runtime raises its own types for blocks it cannot run alone
        msg = f"the model's blocks cannot be run alone ({str(exc).splitlines()[0][:200]}); every option runs the whole model"
        log.warning(msg)
        return None, msg
    if not proxy.usable:
        proxy.close()
        return None, "the model cannot be cut into blocks; every option runs the whole model"
    return proxy, ""


def quantize(
    model: onnx.ModelProto | str | os.PathLike[str],
    config: QuantConfig | None = None,
    progress: Progress | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
    evaluation: list[dict[str, np.ndarray]] | None = None,
    evaluation_source: str = "",
    scratch: Path | None = None,
    executor: Executor | None = None,
    output_name: str = "model_q.onnx",
    sensitivity_cache: Path | None = None,
    inline_output: bool = False,
) -> QuantizeResult:
    """Quantize a model (a ModelProto or a path) and return the new model with its report.

    ``sensitivity_cache``: a file of end-to-end measurements to reuse and
    extend (see :mod:`mixq_onnx.planning.cache`); the output is the same
    with or without it.

    ``output_name`` is the file name the model will be saved under (its
    data file's name is stored in the model, so ``--max-size`` counts it).
    ``inline_output``: the model's external tensors are the caller's spill
    of an inline input, and the output is written inline (see
    :func:`quantize_file`): ``--max-size`` counts that form.

    ``calibration`` (feeds for the float model, see :func:`load_calibration`)
    enables output-aware sensitivity and the data-aware methods.
    ``evaluation`` are the samples the end-to-end measurements run on
    (default: the calibration samples, else generated inputs). A model
    whose weights live in external data is never loaded whole: its new
    weights go to a scratch file in ``scratch`` (default: the system's
    temporary folder), removed by :meth:`QuantizeResult.close`.
    ``executor`` runs the per-weight tasks (default: threads in this
    process); the output is the same wherever they run. Never modifies the
    input. Raises a :class:`MixqError` subclass on bad input.

    The stages, each returning a frozen result the next one reads:
    :func:`prepare` (load, find the weights, choose the opset once, smooth),
    :func:`measure_errors` (statistics, error tables, the target's rules),
    :func:`choose_widths` (end-to-end sensitivity, search, whole-plan
    checks), :func:`write_model` (rounding, reconstruction, bias
    correction, rewrite, activations, checker) and the report.
    """
    config = config or QuantConfig()
    _check_inputs(config, calibration)
    prepared = prepare(model, config, calibration)
    config = _with_groups(_with_roles(config, prepared), prepared)
    if evaluation is None and calibration:
        evaluation, evaluation_source = calibration, "calibration samples"
    elif evaluation is None and _uses_e2e(config):
        evaluation, evaluation_source = _generated(prepared.original, {}, config.e2e_samples, 0)
        evaluation = evaluation or []
    # The file's measurements (error tables, end-to-end distances) are valid for this model, these samples and the
    # settings that change a value; read before anything is measured.
    memo = _sensitivity_cache(sensitivity_cache, prepared.base, evaluation, calibration, config) \
        if sensitivity_cache is not None else None
    measured = measure_errors(prepared, config, calibration, progress, executor, memo)
    rounder = Rounder(config, measured.stats, executor)
    chosen = choose_widths(prepared, measured, config, rounder, evaluation, evaluation_source, calibration, progress,
                           memo, scratch)
    try:
        written = write_model(prepared, measured, chosen, config, rounder, calibration, scratch, progress)
        if isinstance(config.search, Budget) and config.search.max_bytes is not None:
            measured, chosen, written = _fit_file(prepared, measured, chosen, written, config, rounder, calibration, scratch,
                                                  progress, output_name, inline_output)
    finally:
        if memo is not None:  # what was measured stays useful if writing fails
            if chosen.evaluator is not None:  # whether the model ran, and its outputs' kinds, for a later run
                memo.meta.update(chosen.evaluator.facts())
            write_text_atomic(sensitivity_cache, memo.text(), "the sensitivity cache")  # type: ignore[arg-type]
        if chosen.evaluator is not None:
            chosen.evaluator.close()
    return QuantizeResult(written.model, _report(prepared, measured, chosen, written, config, calibration), chosen.plan, written.spill)


def _fit_file(prepared: Prepared, measured: Measured, chosen: Chosen, written: Written, config: QuantConfig, rounder: Rounder,
              calibration: list[Feed] | None, scratch: Path | None, progress: Progress | None, output_name: str,
              inline_output: bool) -> tuple[Measured, Chosen, Written]:
    """Make the written file fit ``--max-size`` exactly: measure what it would take on disk, give the weights what the
    rest of the file really leaves, and search again (on the same measurements) until the plan stops changing."""
    max_bytes = config.search.max_bytes  # type: ignore[union-attr]
    external = has_external_data(prepared.original)

    def file_bytes(model: onnx.ModelProto) -> int:
        if inline_output and model_bytes(model) <= EXTERNAL_THRESHOLD:  # written inline, as quantize_file does
            return inline_bytes(model)
        return output_bytes(model, output_name + ".data", external)

    best: tuple[Measured, Chosen, Written, int] | None = None
    seen = set()
    for _ in range(4):
        size = file_bytes(written.model)
        fixed = size - plan_bytes(chosen.plan.decisions)
        if size <= max_bytes and (best is None or size > best[3]):
            best = (measured, chosen, written, size)
        seen.add(tuple(d.option.key for d in chosen.plan.decisions))
        limit = max_bytes - fixed
        if limit == measured.limit:
            break
        log.info("the file would take %d bytes (%d besides the weights); searching again with %d bytes for the weights",
                 size, fixed, limit)
        measured = dataclasses.replace(measured, limit=limit)

        def file_fits(ds: tuple[Decision, ...], chosen: Chosen = chosen, measured: Measured = measured) -> bool:
            # Only rivals within a few bytes per weight of the limit can fit once their own graph is counted.
            if plan_bytes(ds) > measured.limit + 32 * len(ds):  # type: ignore[operator]
                return False
            trial = dataclasses.replace(chosen, plan=Plan(ds, chosen.plan.summary))
            w = write_model(prepared, measured, trial, config, rounder, calibration, scratch, None)
            try:
                return file_bytes(w.model) <= max_bytes
            finally:
                if w.spill is not None:
                    w.spill.close()

        try:
            plan = pick_plan(list(chosen.tables), config, limit, chosen.evaluator, rounder, progress, file_fits, chosen.memo)
        except BudgetError as exc:
            smallest = int(exc.smallest_reachable) + fixed
            raise BudgetError(f"{prepared.where}: --max-size {max_bytes} bytes cannot be met: the smallest file that can be "
                              f"written takes about {smallest} bytes ({int(exc.smallest_reachable)} of quantized weights, "
                              f"{fixed} of graph and float tensors); ask for --max-size {smallest} or more, allow --int2, "
                              "or force fewer tensors", smallest) from exc
        if tuple(d.option.key for d in plan.decisions) in seen:
            break
        chosen = dataclasses.replace(chosen, plan=plan)
        if best is None or best[2] is not written:
            if written.spill is not None:
                written.spill.close()
        written = write_model(prepared, measured, chosen, config, rounder, calibration, scratch, progress)
    else:
        size = file_bytes(written.model)
        if size <= max_bytes and (best is None or size > best[3]):
            best = (measured, chosen, written, size)
    if best is None:
        raise BudgetError(f"{prepared.where}: --max-size {max_bytes} bytes: the written file still takes {size} bytes after "
                          "tightening the weight budget; ask for a larger size", size)
    measured, chosen, kept, size = best
    if kept is not written and written.spill is not None:
        written.spill.close()
    details = {**chosen.plan.summary.details, "max_file_bytes": max_bytes, "file_bytes": size,
               "fixed_bytes": size - plan_bytes(chosen.plan.decisions)}
    plan = Plan(chosen.plan.decisions, dataclasses.replace(chosen.plan.summary, details=details))
    return measured, dataclasses.replace(chosen, plan=plan), kept


def _with_roles(config: QuantConfig, prepared: Prepared) -> QuantConfig:
    """The k-quant rule with its promoted weights found in the graph (a config that names them keeps its own)."""
    rule = config.search
    if not isinstance(rule, KQuantMixed) or rule.promoted is not None:
        return config
    roles = decoder_roles(prepared.base)
    if not roles.layers:
        raise ModelError(f"{prepared.where}: --rule kquant-mixed needs transformer layers, and no attention core (a "
                         "MatMul of Softmax probabilities and value projections) was found; use --target-bits or --bits")
    promoted = roles.use_more_bits() & {w.name for w in prepared.inventory.weights}
    log.info("kquant-mixed: %d layers; %d weights get %d bits", roles.layers, len(promoted), rule.high_bits)
    return dataclasses.replace(config, search=dataclasses.replace(rule, promoted=promoted))


def _with_groups(config: QuantConfig, prepared: Prepared) -> QuantConfig:
    """The precision groups (weights that read one input) filled in from the graph, for searches that choose widths."""
    if not config.groups_on or config.groups or not isinstance(config.search, (Budget, MaxLoss)):
        return config
    groups = shared_input_groups(prepared.base, {w.name for w in prepared.inventory.weights})
    log.info("precision groups: %d (%d weights) share one width and layout", len(groups), sum(map(len, groups)))
    return dataclasses.replace(config, groups=groups)


def _check_inputs(config: QuantConfig, calibration: list[Feed] | None) -> None:
    """Refuse, before any work, options whose extra or data is missing."""
    if config.method is Method.BRECQ:
        require_torch()
    if not calibration:
        needs = [f"--method {config.method.value}"] if config.method.needs_calibration else []
        needs += ["--bias-correction"] if config.bias_correction else []
        needs += ["--awq"] if config.awq else []
        needs += [f"--activations {config.activations.value}"] if config.activations is not Activations.NONE else []
        if needs:
            raise ConfigError(f"{' and '.join(needs)} need calibration data; pass --calib FILE.npz (see docs/search.md, 'Output sensitivity with calibration data')")


@dataclass(frozen=True)
class Prepared:
    """Stage 1: the input, the float model the rest works on (at the output's opset, smoothed if asked) and its weights."""

    original: onnx.ModelProto
    path: Path | None
    base: onnx.ModelProto
    inventory: Inventory
    original_opset: int
    opset_note: str
    smoothing: SmoothingResult | None
    notes: tuple[str, ...]
    awq: SmoothingResult | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "model"


def prepare(model: onnx.ModelProto | str | os.PathLike[str], config: QuantConfig, calibration: list[Feed] | None) -> Prepared:
    """Load, find the weights and choose the opset once, up front (the most demanding candidate's), then smooth."""
    path = None
    if not isinstance(model, onnx.ModelProto):
        loaded = load_model(model)
        model, path = loaded.model, loaded.path
    where = str(path) if path else "model"
    inventory = find_weights(model, config)
    if not inventory.weights:
        raise _nothing_to_quantize(where, inventory)
    notes: list[str] = []
    slow = rules_for(config.target).activation_warning(config.activations)
    if slow:
        msg = f"--activations {config.activations.value} on --target {config.target.value}: {slow}"
        log.warning(msg)
        notes.append(msg)
    if inventory.quant_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in inventory.quant_ops.items())
        notes.append(f"model already contains quantization ops ({ops}); those parts were left as they are")
    original = default_opset(model)
    needed = _needed_opset(config)
    change = raise_opset(model, needed)
    if change.model is not None:
        base = change.model
    elif not isinstance(config.search, Uniform):
        # A search judged against an INT8-only fallback would report budgets and errors for something the user did
        # not ask for: refuse, with the converter's reason.
        raise ModelError(f"{where}: {change.note}; the search's widths and layouts need opset {needed}. Convert the model "
                         "to a newer opset first (onnx.version_converter), or use uniform --bits")
    elif original >= 10:
        base = model
        limit = "INT8 containers only" + (", per-tensor only" if original < 13 else "")
        msg = f"{change.note}; fell back to what opset {original} supports ({limit})"
        log.warning(msg)
        notes.append(msg)
    else:
        raise ModelError(f"{where}: opset {original} has no DequantizeLinear and {change.note}; convert the model to opset 13 or newer")
    opset_note = change.note if base is not model else ""
    for repair in (densify_sparse_initializers, drop_contradicted_shapes, tie_transposed_tables):
        fixed = repair(base)
        base = fixed.model
        notes.extend(fixed.notes)
    smoothing = None
    if config.smooth is not None and calibration:
        smoothing = _smooth(base, config, calibration)
        base = smoothing.model
    awq = None
    if config.awq and calibration:
        awq = _awq(base, config, calibration)
        base = awq.model
    inv = inventory if base is model else find_weights(base, config)
    return Prepared(model, path, base, inv, original, opset_note, smoothing, tuple(notes), awq)


def _awq(model: onnx.ModelProto, config: QuantConfig, calibration: list[Feed]) -> SmoothingResult:
    """AWQ-style scaling on the float model, for the width it will mostly be stored at and the first layout."""
    bits, symmetric = config.awq_bits, config.scheme is Scheme.SYMMETRIC
    qtype = container_for(bits, symmetric, config.allow_int2)
    grid = Grid(bits, symmetric, config.layouts[0], 0, qtype, np.dtype(np.float32))
    kept = frozenset(t.name for t in model.graph.initializer if config.kept_float((t.name,)))
    result = awq_model(model, calibration, grid, kept)
    applied = sum(g.alpha is not None for g in result.groups)
    log.info("awq: %d of %d MatMul/Gemm inputs scaled for %d bits %s", applied, len(result.groups) + len(result.skipped),
             bits, config.layouts[0].name)
    return result


def _smooth(model: onnx.ModelProto, config: QuantConfig, calibration: list[Feed]) -> SmoothingResult:
    """SmoothQuant on the float model, for the activation type and weight scheme the target's integer kernels use."""
    rules = rules_for(config.target)
    act = ActivationGrid(ACTIVATION_QTYPES[config.activations], rules.symmetric_activations, config.calib_method)
    weight_qtype = container_for(8, config.scheme is Scheme.SYMMETRIC, False)
    kept = frozenset(t.name for t in model.graph.initializer if config.kept_float((t.name,)))
    alpha = config.smooth.alpha if config.smooth is not None else None
    result = smooth_model(model, calibration, alpha, act, weight_qtype, kept)
    applied = sum(g.alpha is not None for g in result.groups)
    log.info("smoothing applied to %d of %d MatMul/Gemm inputs", applied, len(result.groups) + len(result.skipped))
    return result


@dataclass(frozen=True)
class Measured:
    """Stage 2: every weight's error at each allowed option, the layer statistics, and the byte budget."""

    caps: Capabilities
    tables: tuple[ErrorTable, ...]
    not_allowed: tuple[Skipped, ...]
    stats: dict[str, InputStats]
    no_stats: dict[str, str]
    limit: int | None


def measure_errors(prepared: Prepared, config: QuantConfig, calibration: list[Feed] | None, progress: Progress | None,
                   executor: Executor | None, memo: SensitivityCache | None = None) -> Measured:
    """Check the budget can be met, collect statistics if anything uses them, measure and keep the target's options."""
    rules = rules_for(config.target)
    acts = config.activations is not Activations.NONE
    base, inv, where = prepared.base, prepared.inventory, prepared.where
    caps = Capabilities(default_opset(base), config.allow_int2)
    bits = _bits_to_measure(config, caps)
    limit = _budget_limit(where, config, caps, inv.weights, _allowed_specs(inv.weights, config, caps, rules, acts, bits),
                          _fixed_bytes(base, inv.weights) if isinstance(config.search, Budget) and config.search.max_bytes else 0)
    stats, no_stats = collect_input_stats(base, inv.weights, calibration, progress) if calibration and _needs_stats(config) else ({}, {})
    if calibration and not _needs_stats(config):
        no_stats = {s.name: "not collected: nothing in this run uses layer statistics" for s in inv.weights}
    tables, not_allowed = restrict(measure(inv.weights, config, caps, bits, progress, stats, executor, memo), rules, acts)
    if not tables:
        raise ModelError(f"{where}: --target {config.target.value} allows none of the weights' options ({not_allowed[0].reason})")
    return Measured(caps, tuple(tables), tuple(not_allowed), stats, no_stats, limit)


@dataclass(frozen=True)
class Chosen:
    """Stage 3: the plan (one option per weight, with its reason) and what the end-to-end measurements did."""

    plan: Plan
    end_to_end: dict[str, object] | None
    notes: tuple[str, ...]
    # What the plan was picked from, so a tighter budget can be searched again without measuring again.
    tables: tuple[ErrorTable, ...] = ()
    evaluator: EndToEnd | None = None
    # The measurements this run made or reused (kept in --sensitivity-cache when given).
    memo: SensitivityCache | None = None
    # The best plan at each budget, from the same measurements.
    curve: tuple[CurvePoint, ...] = ()


def choose_widths(prepared: Prepared, measured: Measured, config: QuantConfig, rounder: Rounder, evaluation: list[Feed] | None,
                  evaluation_source: str, calibration: list[Feed] | None, progress: Progress | None,
                  cache: SensitivityCache | None = None, scratch: Path | None = None) -> Chosen:
    """End-to-end sensitivity where asked, the search, and the whole-plan checks (never worse than uniform; --max-loss).

    ``cache``: the ``--sensitivity-cache`` file's measurements, reused
    where they were made on the same model, samples and settings. When it
    held a run of this model, the evaluator's reference pass waits until a
    measurement is missing: a budget the file already covers runs nothing.
    """
    evaluator, why_not = _evaluator(prepared.base, tuple(t.site for t in measured.tables), evaluation, evaluation_source,
                                    config, cache, scratch) if _uses_e2e(config) else (None, "")
    try:
        return _choose_with(prepared, measured, config, rounder, evaluator, why_not, evaluation_source, calibration,
                            progress, cache, scratch)
    except BaseException:
        if evaluator is not None:
            evaluator.close()
        raise


def _choose_with(prepared: Prepared, measured: Measured, config: QuantConfig, rounder: Rounder, evaluator: EndToEnd | None,
                 why_not: str, evaluation_source: str, calibration: list[Feed] | None, progress: Progress | None,
                 cache: SensitivityCache | None, scratch: Path | None) -> Chosen:
    """:func:`choose_widths` once the evaluator is made (or not: ``why_not``)."""
    tables, limit, notes = list(measured.tables), measured.limit, []
    calibrated = bool(calibration)
    totals = _uniform_totals([t.site for t in tables], config, measured.caps)
    cache_path = cache.path if cache is not None else None
    # Without a file the measurements are still kept for this run: a plan measured twice (--max-size refits) runs once,
    # and the curve can say which of its plans were measured.
    memo = (cache if cache is not None else SensitivityCache(None, {})) if evaluator is not None else None
    e2e_info: dict[str, object] | None = None
    if _uses_e2e(config) and evaluator is None:
        if isinstance(config.search, MaxLoss):
            raise ModelError(f"{prepared.where}: --max-loss needs the model to run end to end, and it cannot: {why_not}")
        fallback = "output error where calibration statistics exist, else weight error" if calibrated else "weight error"
        msg = f"end-to-end measurements are not possible ({why_not}); the search uses {fallback}"
        if config.sensitivity is Sensitivity.E2E:
            log.warning(msg)
            notes.append(msg)
    elif evaluator is not None and config.sensitivity is Sensitivity.E2E:
        forced = {t.site.name for t in tables if config.forced_bits(t.site.names) is not None}

        def choose(ts: list[ErrorTable]) -> dict[str, Option]:
            return {d.table.site.name: d.option for d in search(ts, config, limit).decisions}

        proxy, why_whole = _block_proxy(evaluator, tuple(t.site for t in tables), config, scratch)
        try:
            labels = (config.layer_method.value if config.search_with_method else Method.RTN.value, config.layer_method.value)

            def curve_picks(ts: list[ErrorTable]) -> list[dict[str, Option]]:
                return [{d.table.site.name: d.option for d in plan.decisions}
                        for _, _, plan in curve_plans(ts, config, totals)]

            # With a cache file the user means to come back at other sizes: refine what every budget of the curve picks.
            tables, summary = attach_e2e(tables, evaluator, rounder.search_value, choose, progress, skip=forced,
                                         refine_with=rounder.swap if config.method is not Method.RTN else None,
                                         proxy=proxy, memo=memo, labels=labels,
                                         also=curve_picks if cache_path is not None else None,
                                         runner=for_runtime(rounder.executor))
        finally:
            if proxy is not None:
                proxy.close()
        e2e_info = {**evaluator.describe(), "screen_feeds": summary.screen_feeds, "feeds": summary.feeds,
                    "options_screened": summary.screened, "options_refined": summary.refined,
                    "estimated_from_weight_error": summary.estimated, "evaluation": config.evaluation.value,
                    **({"block_proxy": summary.proxy} if summary.proxy is not None else {}),
                    **({"whole_model_because": why_whole} if why_whole else {})}
    if evaluator is not None and evaluation_source.startswith("generated"):
        msg = ("the search ranks plans on generated inputs (no --calib or --inputs): its end-to-end distances say how "
               "the outputs move on random data, not on yours")
        log.warning(msg)
        notes.append(msg)
    plan = pick_plan(tables, config, limit, evaluator, rounder, progress, memo=memo)
    points = [] if isinstance(config.search, (Uniform, KQuantMixed)) else curve_plans(tables, config, totals)
    if cache_path is not None and memo is not None and evaluator is not None:
        # Every plan of the curve measured whole, and the uniform rivals that fit its largest budget: the curve is
        # measured throughout, and a later run at any of its budgets finds all its plan checks in the file.
        rivals = [ds for _, ds in uniform_rivals(points[-1][2], config) if plan_bytes(ds) <= points[-1][1]] if points else []
        measure_plans([p.decisions for _, _, p in points] + rivals, evaluator, rounder, memo, for_runtime(rounder.executor),
                      None if progress is None else lambda d, n: progress(d, n, "measuring the curve"))
    curve = tuple(accuracy_size_curve(
        tables, config, points,
        lambda ds: memo.peek(plan_key(ds, evaluator, rounder)) if memo is not None and evaluator is not None else None))
    if evaluator is not None:
        e2e_info = {**(e2e_info or evaluator.describe()), "evaluations": evaluator.evaluations,
                    "reference_pass": "ran" if evaluator.facts() else "not needed: every measurement was in the cache"}
    if isinstance(config.search, Uniform):
        other = [d for d in plan.decisions if d.option.bits != config.search.bits]
        if other:
            msg = (f"{len(other)} of {len(plan.decisions)} tensors cannot take {config.search.bits} bits under --target "
                   f"{config.target.value} and use {sorted({d.option.bits for d in other})} bits instead (see 'reason' in --report)")
            log.warning(msg)
            notes.append(msg)
    if cache is not None:
        if cache.discarded:
            notes.append(cache.note)
        e2e_info = {**(e2e_info or {}), "sensitivity_cache": cache.describe()}
    return Chosen(plan, e2e_info, tuple(notes), tuple(tables), evaluator, memo, curve)


def pick_plan(tables: list[ErrorTable], config: QuantConfig, limit: int | None, evaluator: EndToEnd | None, rounder: Rounder,
              progress: Progress | None, fits: Callable[[tuple[Decision, ...]], bool] | None = None,
              memo: SensitivityCache | None = None) -> Plan:
    """The search on measured tables, then the whole-plan checks (never worse than uniform; --max-loss)."""
    plan = search(tables, config, limit)
    runner = for_runtime(rounder.executor)
    if evaluator is not None and isinstance(config.search, Budget):
        plan = never_worse_than_uniform(plan, config, limit, evaluator, rounder, progress, fits, memo, runner)  # type: ignore[arg-type]
    elif evaluator is not None and isinstance(config.search, MaxLoss):
        plan = smallest_within_loss(tables, config, config.search.max_loss, evaluator, rounder, progress=progress,
                                    memo=memo, runner=runner)
    return plan


@dataclass(frozen=True)
class Written:
    """Stage 4: the quantized model (its new weights in ``spill`` when streamed) and how each weight was rounded."""

    model: onnx.ModelProto
    rounding: dict[str, RoundingEntry]
    activations: dict | None
    reconstruction: ReconstructionResult | None
    spill: Spill | None
    # (mse, nmse, max |d|) of the written integers, for weights not rounded to nearest.
    errors: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def write_model(prepared: Prepared, measured: Measured, chosen: Chosen, config: QuantConfig, rounder: Rounder,
                calibration: list[Feed] | None, scratch: Path | None, progress: Progress | None) -> Written:
    """Round the chosen options, reconstruct blocks and correct biases if asked, rewrite, add activation Q/DQ, check."""
    rules, plan, base = rules_for(config.target), chosen.plan, prepared.base
    acts = config.activations is not Activations.NONE
    uses_int2 = any(d.option.qtype.bits == 2 for d in plan.decisions)
    # A model whose weights stay on disk is rewritten one weight at a time: each is rounded when the rewrite
    # reaches it and its integers go straight to a scratch file. Bias correction and reconstruction need every
    # rounded weight at once, so they keep the whole list.
    spill = Spill(scratch) if has_external_data(base) else None
    streamed = spill is not None and config.method is not Method.BRECQ and not config.bias_correction
    rounded: list[Rounded] = []
    if not streamed:
        rounder.prefetch(((d.table, d.option) for d in plan.decisions), progress)
        rounded = [rounder.get(d.table, d.option) for d in plan.decisions]
    reconstruction = None
    if config.method is Method.BRECQ:
        rounded, reconstruction = _reconstruct(base, plan, rounded, calibration, config, progress)  # type: ignore[arg-type]
    bias: dict[str, str] = {}
    source = base  # the float model the rewrite starts from: with corrected biases if asked
    if config.bias_correction:
        stats = measured.stats
        shifts = {d.table.site.name: stats[d.table.site.name].output_shift(_error(d, r)) for d, r in zip(plan.decisions, rounded)
                  if d.table.site.name in stats}
        corrected = correct_biases(base, prepared.inventory.weights, shifts)
        source, bias = corrected.model, corrected.outcome
    # ORT fuses QGemm only with an explicit weight zero point (measured); a few bytes per Gemm output channel.
    zero_point_ops = frozenset({"Gemm"}) if acts and config.target is Target.ORT_CPU else frozenset()
    produce = (lambda i: rounder.get(plan.decisions[i].table, plan.decisions[i].option, keep=False)) if streamed \
        else rounded.__getitem__
    errors: dict[str, tuple[float, float, float]] = {}

    def produce_measured(i: int) -> Rounded:
        # The table's errors are round-to-nearest's; the report shows those of the integers actually written.
        r = produce(i)
        if r.method is not Method.RTN:
            site = plan.decisions[i].table.site
            errors[site.name] = weight_error(site.array.astype(np.float32), r.tensor.dequantize())
        return r

    rounding = RoundedSequence(len(plan.decisions), produce_measured)
    weights = [(d.table.site, d.table.grid(d.option, config.scheme is Scheme.SYMMETRIC)) for d in plan.decisions]
    out = apply_plan(source, weights, rounding, uses_int2, zero_point_ops, rules.gather_rows, spill)
    activation_info = None
    if acts:
        out, activation_info = _quantize_activations(source, out, plan, rules, config, calibration)  # type: ignore[arg-type]
    problem = _check(out)
    if problem and _check(prepared.original):
        # The input already fails the full check (onnx's inference cannot follow it everywhere, e.g. sparse
        # initializers), so only the structural check can judge what we changed.
        problem = _check(out, full=False)
    if problem:
        raise ModelError(f"{prepared.where}: the quantized model at opset {measured.caps.opset} fails onnx.checker ({problem}); "
                         "please report this with the model")
    methods = {d.table.site.name: RoundingEntry(m.value, note, bias.get(d.table.site.name))
               for d, (m, note) in zip(plan.decisions, rounding.done)}
    return Written(out, methods, activation_info, reconstruction, spill, errors)


def _report(prepared: Prepared, measured: Measured, chosen: Chosen, written: Written, config: QuantConfig,
            calibration: list[Feed] | None) -> Report:
    """The report of a run, from every stage's result."""
    out, plan = written.model, chosen.plan
    notes = [*prepared.notes, *chosen.notes]
    if any(d.option.qtype.bits == 2 for d in plan.decisions):
        notes.append("INT2 tensors need IR version 13 and opset 25; older runtimes cannot load this model")
    opset_info = {"original": prepared.original_opset, "output": default_opset(out), "ir_version": out.ir_version,
                  "note": prepared.opset_note}
    if calibration and config.sensitivity is Sensitivity.OUTPUT:
        notes.append(
            f"output sensitivity from {sum(len(next(iter(f.values()))) for f in calibration)} calibration samples for "
            f"{len(measured.stats)} of {len(prepared.inventory.weights)} weights; the others use weight error"
        )
    fallbacks = sum(bool(r.note) for r in written.rounding.values())
    if fallbacks:
        notes.append(f"{fallbacks} tensors kept a simpler rounding than --method {config.method.value} (see 'rounding' in --report)")
    inv_report = dataclasses.replace(prepared.inventory, skipped=prepared.inventory.skipped + measured.not_allowed)
    report = build_report(inv_report, plan, config.describe(), opset_info, str(prepared.path) if prepared.path else None, None,
                          notes, measured.no_stats, written.rounding, written.activations, chosen.end_to_end, written.errors,
                          chosen.curve)
    report.reconstruction = written.reconstruction.describe() if written.reconstruction is not None else None
    if prepared.smoothing is not None and report.activations is not None:
        report.activations["smoothing"] = prepared.smoothing.describe()
    if prepared.awq is not None:
        report.awq = describe_awq(prepared.awq)
    return report


def _reconstruct(model: onnx.ModelProto, plan: Plan, rounded: list[Rounded], calibration: list[Feed], config: QuantConfig,
                 progress: Progress | None) -> tuple[list[Rounded], ReconstructionResult]:
    """Block reconstruction of the plan's main-graph weights, starting from their layer-wise rounding.

    Each weight that is not reconstructed keeps the layer-wise result, with
    a note saying why (its block fell back, or did not improve; it is read
    by several blocks; it lives in a subgraph).
    """
    main = {d.table.site.name: (d, r) for d, r in zip(plan.decisions, rounded) if d.table.site.graph == MAIN}
    result = reconstruct(model, {n: r.tensor for n, (_, r) in main.items()},
                         {n: d.table.site.array for n, (d, _) in main.items()}, calibration, config.reconstruction, progress)
    block_of = {w: b for b in result.blocks for w in b.weights}
    fallback = config.reconstruction.fallback.value
    out = []
    for d, r in zip(plan.decisions, rounded):
        name = d.table.site.name
        if name in result.tensors:
            out.append(Rounded(result.tensors[name], Method.BRECQ))
            continue
        if d.table.site.graph != MAIN:
            why = "inside a subgraph (blocks are cut from the main graph)"
        elif name not in block_of:
            why = "read by several blocks (no one block owns it)"
        else:
            b = block_of[name]
            why = f"block {b.index + 1} {b.status}: {b.reason}"
        out.append(Rounded(r.tensor, r.method, f"{why}; kept {fallback}" + (f" ({r.note})" if r.note else "")))
    return out, result


ACTIVATION_QTYPES = {Activations.INT8: QTYPES["int8"], Activations.UINT8: QTYPES["uint8"], Activations.INT16: QTYPES["int16"]}


def _quantize_activations(
    base: onnx.ModelProto, out: onnx.ModelProto, plan: Plan, rules: TargetRules, config: QuantConfig,
    calibration: list[dict[str, np.ndarray]],
) -> tuple[onnx.ModelProto, dict]:
    """Place Q/DQ pairs on activations, calibrate their ranges on the float model, and insert them into ``out``.

    Where the target fuses a MatMul with a float output (ORT CPU's
    MatMulIntegerToFloat), MatMul outputs are first left float; ONNX Runtime
    then optimises the result, and every MatMul it did not turn into an
    integer kernel (its own fusions can win first, e.g. MatMul + bias into a
    float Gemm) gets its output Q back, so that it fuses as QLinearMatMul.
    """
    weight_bits = {d.table.site.name: d.option.qtype.bits for d in plan.decisions if d.table.site.graph == MAIN}
    full = place_activations(base, rules, weight_bits, config.quantize_attention)
    trial = full
    if rules.float_matmul_outputs and full.integer_matmuls:
        trial = place_activations(base, rules, weight_bits, config.quantize_attention,
                                  frozenset(label for label, _ in full.integer_matmuls))
    qtype = ACTIVATION_QTYPES[config.activations]
    sym = rules.symmetric_activations
    # One calibration pass covers both placements.
    ranges = collect_activation_ranges(base, list(dict.fromkeys(full.ranged + trial.ranged)), calibration,
                                       config.calib_method, qtype, sym)

    def pairs_for(placement: Placement) -> list[ActivationQDQ]:
        return [ActivationQDQ(s.tensor, None, None, s.share) if s.share
                else ActivationQDQ(s.tensor, *activation_params(*ranges[s.tensor], qtype, sym)) for s in placement.sites]

    placement, pairs = trial, pairs_for(trial)
    result = insert_activation_qdq(out, pairs)
    if trial is not full:
        fused = integer_inputs(result)
        producer = {o: n for n in result.graph.node for o in n.output}
        integer_name = {label: producer[w].input[0] for label, w in full.integer_matmuls
                        if w in producer and producer[w].op_type == "DequantizeLinear"}
        keep = frozenset(label for label, _ in full.integer_matmuls
                         if fused is not None and integer_name.get(label) in fused)
        if keep != frozenset(label for label, _ in full.integer_matmuls):
            placement = place_activations(base, rules, weight_bits, config.quantize_attention, keep) if keep else full
            missing = [t for t in placement.ranged if t not in ranges]
            if missing:  # spreading from fewer seeds reaches no new tensors; this only guards that assumption
                ranges.update(collect_activation_ranges(base, missing, calibration, config.calib_method, qtype, sym))
            pairs = pairs_for(placement)
            result = insert_activation_qdq(out, pairs)
    info = {
        "type": qtype.name, "symmetric": sym, "calib_method": config.calib_method.value,
        "tensors": [{"name": s.tensor, "reason": s.reason, "shares": s.share or None,
                     "range": list(ranges[s.share or s.tensor]),
                     "scale": float(p.scale) if p.scale is not None else None,
                     "zero_point": int(p.zero_point) if p.zero_point is not None else None}
                    for s, p in zip(placement.sites, pairs)],
        "float_nodes": [{"node": n, "reason": r} for n, r in placement.skipped],
    }
    return result, info


def _error(d: Decision, r: Rounded) -> np.ndarray:
    w = d.table.site.array.astype(np.float32)
    return r.tensor.dequantize().astype(np.float32) - w


def _check(model: onnx.ModelProto, full: bool = True) -> str:
    """onnx.checker's (full) check, or '' when it passes; models with data on disk are checked when saved."""
    if has_external_data(model) or model.ByteSize() > EXTERNAL_THRESHOLD:
        return ""
    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception as exc:  # ValidationError, InferenceError and friends
        return str(exc).splitlines()[0][:300]
    return ""


# Models above this size run block by block wherever they are run whole before the evaluator exists.
CHAIN_BYTES = 256 * 2**20
# Inline inputs past this many bytes run with their weights spilled to a scratch file (see quantize_file).
SPILL_BYTES = CHAIN_BYTES


def _generated(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], samples: int, seed: int
               ) -> tuple[list[Feed] | None, str]:
    """Generated feeds and how they were made, or (None, why not) when the model does not run on them."""
    bounds = gather_index_bounds(model)
    # A big model runs block by block, so this check does not read every weight at once (see runtime/chain.py).
    run = float_runner(model) if model_bytes(model) > CHAIN_BYTES else None
    try:
        gen = generate_inputs(model, shapes, bounds, samples, seed, run)
    except ConfigError as exc:
        return None, str(exc)
    return gen.feeds, f"generated inputs ({gen.describe()}, seed {seed})"


GENERATED_WARNING = ("verification ran on generated inputs, which cannot tell whether the model still works; pass real "
                     "samples with --inputs FILE.npz (or a data-loader script), or --calib with at least 16 samples "
                     "(a quarter is held out)")


@dataclass(frozen=True)
class _Data:
    """The samples a run uses: calibration (less any held-out part), verification, and the search's evaluation."""

    calibration: list[Feed] | None
    verify: list[Feed] | None
    verify_label: str
    verify_source: DataSource
    evaluation: list[Feed] | None
    evaluation_label: str
    shapes: dict[str, tuple[int, ...]]


def _data(model: onnx.ModelProto, inputs: list[InputInfo], config: QuantConfig, verify_options: VerifyOptions,
          calibration: CalibrationOptions | None, writes: bool) -> _Data:
    """Load and split the data: --inputs verify; else a held-out part of --calib does; else generated inputs.

    The search's whole-model measurements run on the calibration samples
    (what remains of them), else on --inputs, else on generated inputs, so
    that 'never worse than uniform' and --max-loss are judged on real data
    whenever there is any. The split does not depend on whether a file is
    written, so --plan shows the plan a write would make.
    """
    shapes = parse_input_shapes(verify_options.input_shapes)
    bounds = gather_index_bounds(model)
    feeds = load_calibration(calibration.path, model, calibration.samples, inputs=inputs) if calibration else None
    given = load_inputs(verify_options.inputs, bounds) if verify_options.inputs is not None else None
    verify_feeds: list[Feed] | None = None
    label, source = "", DataSource.GENERATED
    if given is not None and verify_options.enabled:
        verify_feeds, label, source = given, f"--inputs {verify_options.inputs}", DataSource.INPUTS
    elif feeds and verify_options.enabled:
        kept, held = hold_out(feeds, verify_options.holdout)
        if held:
            n, total = sum(feed_samples(f) for f in held), sum(feed_samples(f) for f in feeds)
            feeds, verify_feeds, source = kept, held, DataSource.HELD_OUT
            label = (f"held-out --calib samples (the last {n} of {total} in {calibration.path}, "  # type: ignore[union-attr]
                     "unseen by the search and rounding)")
    if verify_feeds is None and writes and verify_options.enabled:
        # Inputs are made (and dynamic sizes probed) before anything is written, so a model that cannot run fails first.
        gen = generate_inputs(model, shapes, bounds, verify_options.samples, verify_options.seed)
        verify_feeds, label, shapes = gen.feeds, f"generated inputs (seed {verify_options.seed}, {gen.describe()})", gen.shapes
    evaluation, evaluation_label = None, ""
    if not feeds and _uses_e2e(config):
        if given is not None:
            evaluation, evaluation_label = given, f"--inputs {verify_options.inputs}"
        else:
            evaluation, evaluation_label = _generated(model, shapes, config.e2e_samples, verify_options.seed)
            evaluation = evaluation or []
    return _Data(feeds, verify_feeds, label, source, evaluation, evaluation_label, shapes)


def quantize_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    config: QuantConfig | None = None,
    verify_options: VerifyOptions | None = None,
    progress: Progress | None = None,
    calibration: CalibrationOptions | None = None,
    executor: Executor | None = None,
    sensitivity_cache: str | os.PathLike[str] | None = None,
) -> QuantizeResult:
    """Quantize ``input_path``, verify it in ONNX Runtime and write ``output_path`` atomically.

    With ``output_path`` None nothing is written (a plan only). A verdict
    below ``verify_options.require`` raises :class:`VerdictError` (carrying
    the result) and writes nothing. ``sensitivity_cache`` is read and
    rewritten (see :func:`quantize`), also for a plan only.
    """
    verify_options = verify_options or VerifyOptions()
    reads = tuple(f for p in (calibration.path if calibration else None, verify_options.inputs) if p is not None
                  for f in _data_files(Path(p)))
    out = check_output_path(output_path, input_path, reads) if output_path is not None else None
    cache = check_output_path(sensitivity_cache, input_path, reads, what="sensitivity cache",
                              writes=(out, out.parent / (out.name + ".data")) if out is not None else ()) \
        if sensitivity_cache is not None else None
    loaded = load_model(input_path)
    model, input_spill = loaded.model, None
    if not loaded.had_external_data and model_bytes(model) > SPILL_BYTES:
        # A big inline model runs as one with external data (its weights in a scratch file, read one at a time and
        # mapped by ONNX Runtime), and is written inline again.
        input_spill = Spill(out.parent if out is not None else None)
        model = spill_initializers(model, input_spill)
        loaded = dataclasses.replace(loaded, model=model)
    del model
    try:  # on any refusal the scratch file goes at once
        inputs = check_runs_in_ort(Path(input_path), loaded.model, as_file=not loaded.had_external_data and input_spill is None)
        outputs = [o.name for o in loaded.model.graph.output]
        unknown = sorted({n for n, _ in verify_options.kinds} - set(outputs))
        if unknown:
            raise ConfigError(f"--output-kind names {unknown}, which are not outputs of the model; its outputs are {outputs}")
        config = config or QuantConfig()
        data = _data(loaded.model, inputs, config, verify_options, calibration, out is not None)
        result = quantize(loaded.model, config, progress, data.calibration, data.evaluation, data.evaluation_label,
                          out.parent if out is not None else None, executor, out.name if out is not None else "model_q.onnx",
                          cache, inline_output=input_spill is not None)
    except BaseException:
        if input_spill is not None:
            input_spill.close()
        raise
    result.input_spill = input_spill
    result.report.input = str(input_path)
    if data.evaluation is not None and data.evaluation is data.verify:
        result.report.notes.append("without --calib the search measured its plans on the --inputs samples, which the "
                                   "verification then reuses: hold some out of the search with --calib for an unbiased verdict")
    if out is None:
        return result
    # The model is written in full beside OUT, verified there, and only then moved into place: OUT either holds
    # the complete, verified model or is untouched.
    written = result.model
    if input_spill is not None and model_bytes(written) <= EXTERNAL_THRESHOLD:
        written = inline_copy(written)
    staged = stage_model(written, out, loaded.had_external_data)
    del written
    try:
        if data.verify is not None:
            if data.verify_source is DataSource.GENERATED:
                log.info(GENERATED_WARNING)  # the CLI prints it as a warning; the report keeps it as a note
                result.report.notes.append(GENERATED_WARNING)
            result.report.verification = verify(loaded.model, staged.path, data.verify, data.verify_label, data.verify_source,
                                                verify_options.thresholds, dict(verify_options.kinds), progress,
                                                tokens[0] if (tokens := token_input(loaded.model)) else None)
        if config.target is Target.ORT_CPU or config.activations is not Activations.NONE:
            result.report.runtime = _runtime_info(staged.path)
        staged_bytes = staged.path.stat().st_size + _data_size(staged.path)
        in_bytes = Path(input_path).stat().st_size + _data_size(Path(input_path))
        result.report.totals = dataclasses.replace(result.report.totals, input_file_bytes=in_bytes, output_file_bytes=staged_bytes)
        _check_verdict(result, verify_options.require, out)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    result.report.output = str(out)
    return result


def _data_files(path: Path) -> list[Path]:
    """The files a data option reads: a folder's files, a script's file (without ``:FUNCTION``), or the file."""
    if is_script(path):
        return [Path(str(path).rpartition(".py:")[0] + ".py") if ".py:" in str(path) else path]
    return sorted(path.iterdir()) if path.is_dir() else [path]


def _check_verdict(result: QuantizeResult, require: Level | None, out: Path) -> None:
    """Raise VerdictError when the verdict is below ``require`` (the caller then writes nothing)."""
    v = result.report.verification
    if require is None or v is None:
        return
    level = Level(v.verdict.level)
    if level.rank < require.rank:
        how = " (pass real data with --inputs or --calib)" if level is Level.UNVERIFIED else ""
        raise VerdictError(f"{out}: not written: the verdict is {level.value} ({v.verdict.reason}), below --require "
                           f"{require.value}{how}", result)


def _runtime_info(path: Path) -> dict[str, object]:
    """What ONNX Runtime's CPU provider fuses in the written model, and where it still computes in float."""
    fusion = ort_fusion(path)
    for f in fusion.findings:
        log.info("ONNX Runtime CPU: %s", f)
    return {"provider": "CPUExecutionProvider", "fused": fusion.fused,
            "not_fused": [{"node": f.node, "rule": f.rule, "message": f.message} for f in fusion.findings]}


def check_runs_in_ort(path: Path, model: onnx.ModelProto, as_file: bool = False) -> list[InputInfo]:
    """Refuse, as a model error, an input ONNX Runtime cannot load (unknown opset or domain, duplicate names...).

    Returns the model's inputs as ONNX Runtime describes them (what calibration data is checked against).
    ``model`` is the input as :func:`load_model` read it (its small external tensors inline, which ORT's
    shape inference needs). ``as_file``: the file at ``path`` holds the whole model, and is handed to ONNX
    Runtime as it is, which saves serializing it again; the model in memory (repaired on load) is the
    authority when that fails.
    """
    # Without pre-packing ORT maps the weights instead of copying them: loading costs no memory.
    config = {"session.disable_prepacking": "1"}
    if as_file:
        try:
            return input_infos(session(path, config=config))
        except Exception:  # ORT raises its own exception types; judged on the model in memory below
            pass
    try:
        return input_infos(session(model, config=config))
    except Exception as exc:  # ORT raises its own exception types
        raise ModelError(f"{path}: ONNX Runtime cannot load the input model ({str(exc).splitlines()[0][:240]}); "
                         "fix or re-export the model first") from exc


def _data_size(model_path: Path) -> int:
    """Bytes of external data files beside a model (those it references)."""
    return sum(f.stat().st_size for f in model_files(model_path)[1:])


__all__ = ["CalibrationOptions", "QuantizeResult", "VerifyOptions", "quantize", "quantize_file", "Budget"]
