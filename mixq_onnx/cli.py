"""The ``mixq-onnx`` command: a thin click layer over :func:`mixq_onnx.quantize_file`.

Only this module prints, draws progress bars and turns errors into exit codes.
"""

from __future__ import annotations

import os
import signal
import sys

# Until a command sets up its own handling, a signal ends the process at once and quietly: nothing has been
# written yet, and the imports below take a moment.
for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, lambda signum, frame: os._exit(128 + signum))

import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from .config import (
    Budget,
    ForceBits,
    Activations,
    CalibMethod,
    LayerWeighting,
    Layout,
    MaxLoss,
    Method,
    Metric,
    KQuantMixed,
    MixQuantRule,
    QuantConfig,
    Scheme,
    Reconstruction,
    Sensitivity,
    Smooth,
    Target,
    Uniform,
)
from . import __version__
from .errors import ConfigError, MixqError, VerdictError
from .executor import ExecutionOptions, ExecutorKind, make_executor
from .graph.check import check_model
from .graph.io import check_output_path, load_model, remove_stale, write_text_atomic
from .pipeline import GENERATED_WARNING, CalibrationOptions, VerifyOptions, quantize_file
from .kinds import DataSource, Evaluation, Level, OutputKind, PrecisionGroups, Thresholds
from .report import format_table, verdict_line

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``123456``, ``500KB``, ``1.5MB`` or ``2MiB`` -> bytes (KB/MB/GB are powers of 1000)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ConfigError(f"--max-size expects a size such as 1500000, 500KB, 1.5MB or 2MiB, got {text!r}")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def build_config(
    bits: int | None, qem: float | None, qem_ref_bits: int | None, target_bits: float | None, max_size: str | None,
    weighting: str, scheme: str | None, granularity: tuple[str, ...], candidate_bits: str, literal_bits: bool,
    int2: bool, metric: str, min_elements: int, keep_float: tuple[str, ...], force_bits: tuple[str, ...],
    sensitivity: str = "e2e", method: str = "rtn", search_with_method: bool = False, bias_correction: bool = False,
    activations: str = "none", calib_method: str = "minmax", target: str = "generic",
    max_loss: float | None = None, e2e_samples: int = 32, smooth: str | None = None, quantize_attention: bool = False,
    reconstruction: Reconstruction | None = None, evaluation: str = "blocks", eval_block_weights: int = 4,
    rule: str | None = None, precision_groups: str = "auto", awq: bool = False,
) -> QuantConfig:
    """Map CLI options one-to-one onto a validated :class:`QuantConfig`."""
    modes = [n for n, v in (("--bits", bits), ("--qem/--qem-ref-bits", qem if qem is not None else qem_ref_bits),
                            ("--target-bits", target_bits), ("--max-size", max_size), ("--max-loss", max_loss),
                            ("--rule", rule)) if v is not None]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} choose different searches; give only one")
    search: Uniform | Budget | MixQuantRule | MaxLoss | KQuantMixed
    if rule is not None:
        search = KQuantMixed()
    elif bits is not None:
        search = Uniform(bits)
    elif max_loss is not None:
        search = MaxLoss(max_loss)
    elif target_bits is not None or max_size is not None:
        search = Budget(target_bits, parse_size(max_size) if max_size is not None else None, LayerWeighting(weighting))
    elif qem is not None or qem_ref_bits is not None:
        search = MixQuantRule(qem if qem is not None else MixQuantRule.qem, qem_ref_bits if qem_ref_bits is not None else MixQuantRule.ref_bits)
    else:
        # The default: see docs/RESULTS.md for why data-free mixing below 8 bits is opt-in.
        search = Uniform(8)
    try:
        cands = tuple(int(b) for b in candidate_bits.split(","))
    except ValueError:
        raise ConfigError(f"--candidate-bits expects a comma-separated list such as 2,4,8, got {candidate_bits!r}") from None
    return QuantConfig(
        search=search,
        scheme=Scheme(scheme) if scheme else None,  # type: ignore[arg-type]
        layouts=tuple(Layout.parse(g) for g in granularity) if granularity else None,  # type: ignore[arg-type]
        candidate_bits=cands,
        storage_aware=not literal_bits,
        allow_int2=int2,
        metric=Metric(metric),
        sensitivity=Sensitivity(sensitivity),
        e2e_samples=e2e_samples,
        evaluation=Evaluation(evaluation),
        eval_block_weights=eval_block_weights,
        min_elements=min_elements,
        keep_float=keep_float,
        force_bits=tuple(ForceBits.parse(f) for f in force_bits),
        method=Method(method),
        search_with_method=search_with_method,
        bias_correction=bias_correction,
        activations=Activations(activations),
        calib_method=CalibMethod(calib_method),
        target=Target(target),
        smooth=_parse_smooth(smooth),
        quantize_attention=quantize_attention,
        reconstruction=reconstruction or Reconstruction(),
        precision_groups=PrecisionGroups(precision_groups),
        awq=awq,
    )


def build_execution(jobs: int, kind: str, ray_address: str | None) -> ExecutionOptions:
    """ExecutionOptions from --jobs, --executor and --ray-address, with errors that name the flags."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if kind == ExecutorKind.RAY.value and jobs != 1:
        raise ConfigError("--jobs sets local processes; with --executor ray the cluster decides its workers (drop --jobs)")
    if ray_address is not None and kind != ExecutorKind.RAY.value:
        raise ConfigError("--ray-address needs --executor ray")
    return ExecutionOptions(ExecutorKind(kind), jobs, ray_address)


def build_reconstruction(method: str, **given: object) -> Reconstruction | None:
    """Reconstruction from the --brecq-* options that were given (the others keep their defaults)."""
    named = {k: v for k, v in given.items() if v is not None and v is not False}
    if named and method != Method.BRECQ.value:
        flags = ", ".join("--brecq-" + k.replace("_", "-").replace("memory-mb", "memory") for k in named)
        raise ConfigError(f"{flags}: block reconstruction options need --method brecq; add it or drop them")
    if "fallback" in named:
        named["fallback"] = Method(named["fallback"])
    return Reconstruction(**named)  # type: ignore[arg-type]


# Each option group builds one library object from the options click parsed (keyed by parameter name).
Params = dict[str, Any]


def quant_config(p: Params) -> QuantConfig:
    """The search, quantization and target groups (and --calib-method) as a validated QuantConfig."""
    reconstruction = build_reconstruction(
        p["method"], iters=p["brecq_iters"], batch=p["brecq_batch"], samples=p["brecq_samples"],
        block_weights=p["brecq_block_weights"], lr=p["brecq_lr"], learn_scales=p["brecq_learn_scales"],
        fisher=p["brecq_fisher"], memory_mb=p["brecq_memory_mb"], fallback=p["brecq_fallback"])
    return build_config(
        p["bits"], p["qem"], p["qem_ref_bits"], p["target_bits"], p["max_size"], p["weighting"], p["scheme"], p["granularity"],
        p["candidate_bits"], p["literal_bits"], p["int2"], p["metric"], p["min_elements"], p["keep_float"], p["force_bits"],
        sensitivity=p["sensitivity"], method=p["method"], search_with_method=p["search_with_method"],
        bias_correction=p["bias_correction"], activations=p["activations"], calib_method=p["calib_method"],
        target=p["target"], max_loss=p["max_loss"], e2e_samples=p["e2e_samples"], smooth=p["smooth"],
        quantize_attention=p["quantize_attention"], reconstruction=reconstruction, evaluation=p["evaluation"],
        eval_block_weights=p["eval_block_weights"], rule=p["rule"], precision_groups=p["precision_groups"],
        awq=p["awq"])


def parse_output_kinds(specs: tuple[str, ...]) -> tuple[tuple[str, OutputKind], ...]:
    """``("logits=classes", "emb=embedding")`` -> ((name, kind), ...)."""
    out = []
    for spec in specs:
        name, sep, kind = spec.rpartition("=")
        try:
            out.append((name, OutputKind(kind)))
        except ValueError:
            name = ""
        if not sep or not name:
            raise ConfigError(f"--output-kind expects NAME=KIND with KIND one of {', '.join(k.value for k in OutputKind)}, got {spec!r}")
    return tuple(out)


def verification_options(p: Params) -> VerifyOptions:
    return VerifyOptions(not p["no_verify"], p["input_shape"], p["inputs_path"], p["verify_samples"], p["seed"],
                         p["holdout"], Thresholds.parse(p["threshold"]), parse_output_kinds(p["output_kind"]),
                         Level(p["require"]) if p["require"] else None)


def calibration_options(p: Params) -> CalibrationOptions | None:
    path = p["calib_path"]
    if p["data_loader_script"] is not None:
        if path is not None:
            raise ConfigError("--calib and --data-loader-script both give calibration data; give one")
        path = p["data_loader_script"]
    if path is None:
        if p["calib_samples"] is not None:
            raise ConfigError("--calib-samples needs --calib")
        return None
    return CalibrationOptions(path, p["calib_samples"])


def execution_options(p: Params) -> ExecutionOptions:
    return build_execution(p["jobs"], p["executor_kind"], p["ray_address"])


def _parse_smooth(text: str | None) -> Smooth | None:
    if text is None:
        return None
    if text == "search":
        return Smooth(None)
    try:
        return Smooth(float(text))
    except ValueError:
        raise ConfigError(f"--smooth takes an alpha from 0 to 1, or no value to search it; got {text!r}") from None


class _Progress:
    """Progress on stderr, one stage at a time: bars on a terminal, else a line per stage at most every few seconds.

    Off a terminal (CI, notebooks, log files) each line says the stage, how
    far it is, the time elapsed and an estimate of the time left.
    """

    EVERY_S = 5.0

    def __init__(self, enabled: bool, terminal: bool) -> None:
        self.enabled = enabled
        self.terminal = terminal
        self.bar: Any = None
        self.stage = ""
        self.done = 0
        self.started = self.last = 0.0
        self.shown = False

    def __call__(self, i: int, n: int, stage: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage != self.stage:
            self.close()
            self.stage, self.done, self.started, self.last, self.shown = stage, 0, now, now, False
            if self.terminal:
                self.bar = click.progressbar(length=n, label=stage, file=sys.stderr)
                self.bar.__enter__()
        if self.bar is not None:
            self.bar.update(i - self.done)
        elif now - self.last >= self.EVERY_S or (i == n and self.shown):
            # A stage that ends within the first few seconds prints nothing; a long one prints every few seconds and its end.
            elapsed = now - self.started
            left = f", about {_duration(elapsed * (n - i) / i)} left" if 0 < i < n else ""
            click.echo(f"{stage}: {i}/{n}, {_duration(elapsed)} elapsed{left}", err=True)
            self.last, self.shown = now, True
        self.done = i
        if i == n:
            self.close()
            self.stage = ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _echo_verdict(report: Any, quiet: bool) -> None:
    """The verdict as the run's last line; degraded and broken also go to stderr (even with --quiet)."""
    line = verdict_line(report)
    if line is None:
        return
    if report.verification.source == DataSource.GENERATED.value and not quiet:
        click.echo(f"warning: {GENERATED_WARNING}", err=True)
    if not quiet:
        click.echo(line)
    if report.verification.verdict.level in (Level.DEGRADED.value, Level.BROKEN.value):
        click.echo(f"warning: the quantized model is {report.verification.verdict.level}: {report.verification.verdict.reason}",
                   err=True)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _QuantizeByDefault(click.Group):
    """``mixq-onnx MODEL ...`` means ``mixq-onnx quantize MODEL ...``; ``mixq-onnx check ...`` is the checker."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] != "--version"):
            args = ["quantize", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_QuantizeByDefault, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="mixq-onnx", message="%(prog)s %(version)s")
def main() -> None:
    """mixq-onnx: quantize an ONNX model (the default command), or check one against a runtime's rules."""


def _setup_logging(quiet: bool, verbose: int) -> None:
    logging.basicConfig(
        level=logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.command("check", context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice([t.value for t in Target]), required=True, help="The runtime whose rules to check.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; the exit code says it all.")
def check(model: Path, target: str, quiet: bool) -> None:
    """Check a QDQ MODEL statically against TARGET's rules: list every violation and exit 1 if there is any.

    For ort-cpu, ONNX Runtime then optimises the model and every node that
    still computes in float between integer ops (a DequantizeLinear -> op ->
    QuantizeLinear round trip, or a Conv/MatMul/Gemm that did not fuse) is
    printed as a warning; warnings do not change the exit code.

    \b
    Example:
      mixq-onnx check model_q.onnx --target tensorrt
    """
    warnings = []
    try:
        violations = check_model(load_model(model).model, Target(target))
        if Target(target) is Target.ORT_CPU:
            from .runtime.fusion import ort_fusion

            fusion = ort_fusion(model)
            warnings = list(fusion.findings)
    except MixqError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug of ours: never exit 1, which means "violations found"
        click.echo(f"internal error: {type(exc).__name__}: {exc} (please report it)", err=True)
        sys.exit(70)
    if not quiet:
        for v in violations:
            click.echo(str(v))
        for w in warnings:
            click.echo(f"warning: {w}")
        if Target(target) is Target.ORT_CPU:
            fused = ", ".join(f"{k} {n}" for k, n in fusion.fused.items()) or "no integer kernels"
            click.echo(f"{model}: ONNX Runtime CPU fuses {fused}; {len(warnings)} node(s) compute in float between integer ops")
        click.echo(f"{model}: {len(violations)} violation(s) of the {target} rules" if violations else f"{model}: follows the {target} rules")
    sys.exit(1 if violations else 0)


@dataclass(frozen=True)
class OptionGroup:
    """A titled group of options; the command's help prints one section per group."""

    title: str
    options: tuple[Callable[[Callable[..., Any]], Callable[..., Any]], ...]

    def names(self) -> list[str]:
        """The parameter names of the group's options (as click passes them to the command)."""
        probe = click.command()(options(self)(lambda **_: None))
        return [p.name for p in probe.params if p.name]


def options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply every option of ``groups`` to a command, in the groups' order."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for group in reversed(groups):
            for option in reversed(group.options):
                f = option(f)
        return f
    return apply


class _GroupedCommand(click.Command):
    """Help with one section per option group."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        shown: set[str] = set()
        for group in GROUPS:
            names = group.names()
            rows = [records[n] for n in names if records.get(n)]
            shown.update(names)
            with formatter.section(group.title):
                formatter.write_dl(rows)  # type: ignore[arg-type]
        rest = [r for n, r in records.items() if r and n not in shown]
        if rest:
            with formatter.section("Other"):
                formatter.write_dl(rest)  # type: ignore[arg-type]


SEARCH = OptionGroup("Search: how bit-widths are chosen", (
    click.option("--bits", type=int, help="Uniform bit-width (2-8) for every weight, no search. This is the default, at 8 bits, when no search option is given."),
    click.option("--qem", type=float, help="MixQuant rule: per tensor, the cheapest option whose error is at most QEM x the reference (2.0 if only --qem-ref-bits is given)."),
    click.option("--qem-ref-bits", type=int, help="MixQuant reference bit-width: the reference is the median error of all tensors at this width. [default: 4]"),
    click.option("--target-bits", type=float, help="Budget search: the bytes of uniform B-bit per-channel quantization of the same weights "
                  "(interpolated for fractional B); the report prints the stored bits per weight used."),
    click.option("--max-size", help="Budget search: on-disk size of the quantized weights, e.g. 1.5MB, 800KB, 2MiB or bytes."),
    click.option("--max-loss", type=float, help="Accuracy target: the smallest plan whose measured end-to-end output distance "
                  "(KL for probability outputs and a language model's next-token logits, normalised MSE otherwise; the "
                  "report's 'distance') is at most this."),
    click.option("--rule", type=click.Choice(["kquant-mixed"]), help="A fixed rule instead of a search. kquant-mixed: llama.cpp's "
                  "Q4_K_M mix as ONNX Runtime GenAI and ModelOpt copy it: the attention value and MLP down projections of the "
                  "first and last eighth of the layers and every third layer between, and the output projection, at 8 bits "
                  "per channel; every other weight at 4 bits (default --granularity block128 then channel). Roles are found "
                  "from the graph, not from names."),
    click.option("--weighting", type=click.Choice([w.value for w in LayerWeighting]), default="equal", show_default=True, help="Budget search: weight of each tensor's normalised error in the total (equal, sqrt of params, params)."),
    click.option("--candidate-bits", default="2,3,4,5,6,7,8", show_default=True, help="Comma-separated bit-widths the search may use."),
    click.option("--literal-bits", is_flag=True, help="Keep 3, 5, 6, 7-bit widths even though they cost their container's bytes (for hardware with native n-bit math)."),
    click.option("--metric", type=click.Choice([m.value for m in Metric]), default="nmse", show_default=True, help="Error measure the search compares."),
    click.option("--sensitivity", type=click.Choice([x.value for x in Sensitivity]), default="e2e", show_default=True,
                  help="What the searches compare: e2e (the model's output distance with each weight quantized alone, on "
                  "--calib samples or generated inputs), output (the layer's output error on --calib data) or weight (roundoff)."),
    click.option("--e2e-samples", type=int, default=32, show_default=True, help="Samples the end-to-end measurements use (the first "
                  "calibration samples, else generated inputs)."),
    click.option("--evaluation", type=click.Choice([e.value for e in Evaluation]), default="blocks", show_default=True,
                  help="Where end-to-end sensitivity measures each option: blocks (on the weight's own block, carried to the "
                  "outputs by a gain fitted per weight on whole-model runs; the report gives the proxy's rank "
                  "correlation) or model (the whole model for every option: slower, exact)."),
    click.option("--sensitivity-cache", type=click.Path(path_type=Path), metavar="FILE",
                  help="Keep the end-to-end measurements and error tables in FILE and reuse them: a rerun or a sweep over budgets "
                  "measures only what is new (a budget the file covers runs the model not at all). A file made for another model, other samples or other rounding settings is not used (the run "
                  "says so) and is replaced."),
    click.option("--eval-block-weights", type=int, default=4, show_default=True,
                  help="Block-wise evaluation: the most quantized weights merged into one block (a layer that has more stays whole)."),
    click.option("--precision-groups", type=click.Choice([g.value for g in PrecisionGroups]), default="auto", show_default=True,
                  help="Budget and --max-loss searches: weights whose MatMuls read the same input (a layer's Q/K/V, an MLP's "
                  "gate and up) get one width and layout, chosen as one item. auto: where the target combines such layers "
                  "(tensorrt); on; off."),
    click.option("--search-with-method", is_flag=True, help="Let the search measure every candidate with --method instead of round-to-nearest (slower; see docs/search.md)."),
))

QUANTIZATION = OptionGroup("Quantization: weights, layouts and rounding", (
    click.option("--scheme", type=click.Choice([s.value for s in Scheme]), help="Weights: asymmetric (unsigned + zero point; the default) or symmetric (signed, narrow range, no zero point; the default for --target tensorrt)."),
    click.option("--granularity", multiple=True, help="tensor, channel, block32, block64 or block128; repeat to let the search choose among them. "
                  "Default: channel for --bits; channel, tensor and block32/64/128 for the searches."),
    click.option("--int2", is_flag=True, help="Allow INT2/UINT2 storage (output at opset 25, IR 13; TensorRT and older runtimes cannot load it)."),
    click.option("--min-elements", type=int, default=1024, show_default=True, help="Tensors with fewer elements stay float."),
    click.option("--keep-float", multiple=True, metavar="PATTERN", help="Leave tensors or nodes matching this glob in float. Repeatable."),
    click.option("--force-bits", multiple=True, metavar="PATTERN=N", help="Give tensors or nodes matching this glob N bits. Repeatable; the last match wins."),
    click.option("--awq", is_flag=True, help="Activation-aware weight scaling (AWQ-style) before anything is measured: per group of "
                  "weights that read one activation, rows scaled by mean|x|^alpha (alpha searched on the --calib samples for the "
                  "least weight-only output error at the search's low width and first --granularity) and 1/s folded into the "
                  "producer or multiplied in. Composes with every search and --method; needs --calib."),
    click.option("--method", type=click.Choice([m.value for m in Method]), default="rtn", show_default=True, help="Rounding: rtn (nearest), mse (clipping search), hqq (data-free half-quadratic scale and zero point), gptq, adaround or brecq (block reconstruction; needs the [brecq] extra). gptq, adaround and brecq need --calib."),
    click.option("--brecq-iters", type=int, help=f"Block reconstruction: optimisation steps per block. [default: {Reconstruction.iters}]"),
    click.option("--brecq-batch", type=int, help=f"Block reconstruction: calibration samples per step. [default: {Reconstruction.batch}]"),
    click.option("--brecq-samples", type=int, help=f"Block reconstruction: calibration samples it uses (the first N). [default: {Reconstruction.samples}]"),
    click.option("--brecq-block-weights", type=int, help="Block reconstruction: the most quantized weights merged into one block "
                  f"(a residual block or layer that has more stays whole). [default: {Reconstruction.block_weights}]"),
    click.option("--brecq-lr", type=float, help=f"Block reconstruction: Adam step size of the rounding variables. [default: {Reconstruction.lr}]"),
    click.option("--brecq-learn-scales", is_flag=True, help="Block reconstruction: also learn each weight scale (LSQ-style) with the rounding."),
    click.option("--brecq-fisher", is_flag=True, help="Block reconstruction: weigh the block-output error by the squared gradient of "
                  "the model's loss there (the float model's top-1 class as label; needs a classifier output)."),
    click.option("--brecq-memory", "brecq_memory_mb", type=int, help="Block reconstruction: MB of block activations kept in memory; "
                  f"the rest spills to temporary memory-mapped files. [default: {Reconstruction.memory_mb}]"),
    click.option("--brecq-fallback", type=click.Choice(["mse", "gptq", "adaround"]), help="Block reconstruction: the layer-wise method "
                  f"that sets the grid and starting integers, and that blocks which cannot be reconstructed keep. [default: {Reconstruction.fallback.value}]"),
    click.option("--bias-correction", is_flag=True, help="Fold each layer's mean output error on the calibration data into its bias (needs --calib)."),
))

CALIBRATION = OptionGroup("Calibration data", (
    click.option("--calib", "calib_path", type=click.Path(path_type=Path), help="Calibration samples: an .npz of arrays keyed by input name (first axis = samples), or a folder of .npz/.npy files. The end-to-end measurements then run on it; it also enables output sensitivity and gptq/adaround."),
    click.option("--data-loader-script", type=click.Path(path_type=Path), metavar="FILE.py[:FUNC]", help="Calibration "
                  "samples from a Python script, as Polygraphy's: FUNC (default load_data) yields dicts of arrays keyed by "
                  "input name. --calib and --inputs accept such a script too."),
    click.option("--calib-samples", type=int, help="Use only the first N calibration samples."),
    click.option("--calib-method", type=click.Choice([c.value for c in CalibMethod]), default="minmax", show_default=True, help="How activation ranges are chosen from the calibration data."),
))

TARGET = OptionGroup("Target runtime and activations", (
    click.option("--target", type=click.Choice([t.value for t in Target]), default="generic", show_default=True, help="Runtime whose rules the output follows: ONNX Runtime CPU or CUDA, TensorRT, or generic (weight-only, any runtime)."),
    click.option("--activations", type=click.Choice([a.value for a in Activations]), default="none", show_default=True, help="Static activation quantization with Q/DQ pairs where the target has integer kernels (needs --calib); auto: the target's fastest (uint8 for ort-cpu, int8 for tensorrt, none for generic and ort-cuda)."),
    click.option("--smooth", is_flag=False, flag_value="search", metavar="[ALPHA]", help="SmoothQuant before activation quantization: move MatMul/Gemm input outliers into the weights with strength ALPHA (0-1); without a value, ALPHA is searched per activation on the calibration data."),
    click.option("--quantize-attention", is_flag=True, help="Also quantize both inputs of activation x activation MatMuls (attention's Q.K^T and probabilities.V); off by default because it did not pay on ONNX Runtime CPU (docs/targets.md)."),
))

VERIFICATION = OptionGroup("Verification in ONNX Runtime", (
    click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime comparison with the float model."),
    click.option("--input-shape", multiple=True, metavar="NAME:DxD..", help="Shape for an input with dynamic dimensions, e.g. image:4x3x224x224. Repeatable."),
    click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), help="Verify on real held-out samples: an .npz of "
                  "arrays keyed by input name (first axis = samples), or a data-loader script FILE.py[:FUNC]. Without it "
                  "a --holdout share of --calib is kept back for verification; without either, generated inputs are used "
                  "and the verdict is 'unverified'."),
    click.option("--holdout", type=float, default=0.25, show_default=True, help="Share of --calib (at least 8 samples, at "
                  "most half; none below 16) held out of calibration and the search to verify on when --inputs is not given. 0: none."),
    click.option("--require", type=click.Choice(["good", "degraded"]), help="Fail (exit 6) and write nothing when the verdict "
                  "is below this; 'unverified' (generated inputs only) is below both."),
    click.option("--threshold", multiple=True, metavar="METRIC=GOOD:BROKEN", help="Verdict bounds of one metric: top1 "
                  "(default 0.99:0.9), cosine (0.999:0.95), sqnr in dB (25:10) or perplexity (float over quantized "
                  "next-token perplexity of a language model on real text, 0.95:0.8); at or above GOOD is good, below "
                  "BROKEN is broken. Repeatable."),
    click.option("--output-kind", multiple=True, metavar="NAME=KIND", help="What an output holds, when the guess is wrong: "
                  "classes (top-1 agreement), labels (exact), embedding (mean cosine) or values (SQNR). Repeatable."),
    click.option("--verify-samples", type=int, default=8, show_default=True, help="Random samples for verification."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random verification inputs."),
))

EXECUTION = OptionGroup("Execution: where the per-weight work runs", (
    click.option("--jobs", type=int, default=1, show_default=True, help="Run the independent work in N local processes: error tables, gptq/adaround rounding, and the search's ONNX Runtime evaluations (blocks, whole-model runs, plan checks). 1 uses threads for the first two and runs evaluations one at a time here. The output is the same."),
    click.option("--executor", "executor_kind", type=click.Choice([k.value for k in ExecutorKind]), default="local", show_default=True, help="Where the independent work (see --jobs) runs: local or ray (a Ray cluster; needs the [ray] extra)."),
    click.option("--ray-address", help="Ray cluster to connect to with --executor ray (default: the RAY_ADDRESS environment variable, else a new local instance)."),
))

OUTPUT = OptionGroup("Output and messages", (
    click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the quantized model (required unless --plan)."),
    click.option("--plan", "plan_only", is_flag=True, help="Print the plan and write nothing."),
    click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the full per-tensor report as JSON here."),
    click.option("--clean-temp", is_flag=True, help="First remove temporary .mixq-* files that killed runs left in the output's folder."),
    click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    click.option("-v", "--verbose", count=True, help="Log progress (-v) or details (-vv); show tracebacks of internal errors."),
))

GROUPS = (SEARCH, QUANTIZATION, CALIBRATION, TARGET, VERIFICATION, EXECUTION, OUTPUT)


@main.command("quantize", cls=_GroupedCommand, context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@options(*GROUPS)
def quantize(model: Path, **params: Any) -> None:
    """Quantize the weights of MODEL (.onnx) with a per-tensor bit-width search and write a QDQ model.

    \b
    Examples:
      mixq-onnx model.onnx -o model_q.onnx                  # uniform 8 bits per channel (the safe default)
      mixq-onnx model.onnx -o model_q.onnx --qem 1          # MixQuant rule
      mixq-onnx model.onnx -o model_q.onnx --target-bits 4  # best plan in the bytes of uniform 4-bit
      mixq-onnx model.onnx -o model_q.onnx --max-loss 0.01  # smallest plan within an output distance
      mixq-onnx model.onnx --plan                           # show the plan only
      mixq-onnx model.onnx -o q.onnx --target ort-cpu --activations auto --calib calib.npz
      mixq-onnx check q.onnx --target ort-cpu               # check a model against a runtime's rules
    """
    quiet, output, plan_only = params["quiet"], params["output"], params["plan_only"]
    _setup_logging(quiet, params["verbose"])
    # From here SIGINT and SIGTERM unwind the stack, so temporary files are removed on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if output is None and not plan_only:
            raise ConfigError("missing -o/--output; give the path for the quantized model, or pass --plan to only print the plan")
        config = quant_config(params)
        if params["activations"] == Activations.AUTO.value and not quiet:
            chosen = config.activations.value
            why = " (weight-only: this target has no integer activation kernels to use; --target ort-cpu or tensorrt has)" \
                if config.activations is Activations.NONE else ""
            click.echo(f"--activations auto on --target {config.target.value}: {chosen}{why}", err=True)
        verify_options = verification_options(params)
        calibration = calibration_options(params)
        execution = execution_options(params)
        if params["clean_temp"]:
            folder = (output.parent if output is not None and str(output.parent) else Path("."))
            for stale in remove_stale(folder):
                if not quiet:
                    click.echo(f"removed stale temporary {stale}", err=True)
        report_path = params["report_path"]
        if report_path is not None:
            reads = tuple(p for p in (params["calib_path"], params["inputs_path"], params["data_loader_script"]) if p is not None)
            writes = (output, output.parent / (output.name + ".data")) if output is not None else ()
            check_output_path(report_path, model, reads, what="report path",
                              writes=writes + ((params["sensitivity_cache"],) if params["sensitivity_cache"] else ()))
        progress = _Progress(not quiet, sys.stderr.isatty())
        try:
            with make_executor(execution) as executor:
                result = quantize_file(model, None if plan_only else output, config, verify_options, progress,
                                       calibration, executor, params["sensitivity_cache"])
        except VerdictError as exc:
            progress.close()
            if not quiet:
                click.echo(format_table(exc.result.report, max_rows=0 if params["verbose"] else 60))  # type: ignore[attr-defined]
            raise
        progress.close()
        # The model is in place: an interrupt now would only hide that it succeeded.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if report_path is not None:
            write_text_atomic(report_path, result.report.to_json())
        if not quiet:
            click.echo(format_table(result.report, max_rows=0 if params["verbose"] or plan_only else 60))
            if plan_only:
                click.echo("plan only: nothing written")
            elif output is not None:
                click.echo(f"wrote {output}")
        _echo_verdict(result.report, quiet)
    except MixqError as exc:
        if isinstance(exc, VerdictError) and not quiet:
            click.echo(verdict_line(exc.result.report))  # type: ignore[attr-defined]
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug of ours: still one line unless asked for details
        if params["verbose"]:
            raise
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for a traceback and please report it)", err=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
