"""Run the float and quantized models in ONNX Runtime and compare their outputs, as data."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError, VerificationError
from ..kinds import DataSource, Level, OutputKind, Thresholds
from ..numerics.metrics import OutputComparison, compare_output
from .inputs import check_index_values, feed_samples, is_script, script_feeds, session

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RunComparison:
    """All outputs compared under one ONNX Runtime configuration."""

    setting: str
    outputs: tuple[OutputComparison, ...]


@dataclass(frozen=True)
class ProviderStatus:
    """Whether the quantized model ran on one execution provider of this machine."""

    name: str
    ran: bool
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    """Whether the quantized model still does its job: good, degraded or broken on real data, unverified without.

    ``reason`` names the output, metric, value and setting that decided it.
    """

    level: str
    source: str
    reason: str


@dataclass(frozen=True)
class Verification:
    """The comparison of the written model with the float one, the data it ran on and the verdict."""

    inputs: str
    source: str
    samples: int
    provider: str
    runs: tuple[RunComparison, ...]
    providers: tuple[ProviderStatus, ...]
    verdict: Verdict
    thresholds: dict[str, list[float]]


# Execution providers the quantized model is also run on when this machine's onnxruntime has them.
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


# The settings users get: exact math, and ORT's default full optimisation in
# which DQ->MatMul becomes MatMulNBits with int8 activations (accuracy level 4).
CPU = "CPUExecutionProvider"
SETTINGS = (
    ("exact (ORT_DISABLE_ALL)", ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None, CPU),
    ("optimized (ORT_ENABLE_ALL, MatMulNBits accuracy_level 4)", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "4", CPU),
)


def parse_input_shapes(specs: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``name:1x3x224x224`` -> {name: (1, 3, 224, 224)}."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise ConfigError(f"--input-shape expects NAME:DxDxD with positive sizes (for example 'input:1x3x224x224'), got {spec!r}")
        out[name] = shape
    return out


def _session(model: bytes | Path | onnx.ModelProto, level: ort.GraphOptimizationLevel, accuracy: str | None,
             provider: str = CPU, config: dict[str, str] | None = None) -> ort.InferenceSession:
    config = {**(config or {}), **({"session.qdq_matmulnbits_accuracy_level": accuracy} if accuracy is not None else {})}
    return session(model, level, config or None, provider)


def load_inputs(path: Path, bounds: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Verification feeds from an .npz file of arrays keyed by input name (one feed), or a data-loader script.

    ``bounds`` (see :func:`mixq_onnx.graph.find.gather_index_bounds`) refuses token ids outside their table.
    """
    if is_script(path):
        feeds = script_feeds(path, "--inputs")
    else:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: not a regular file; give an .npz file of arrays keyed by input name, or a "
                              "data-loader script FILE.py[:FUNCTION], for --inputs")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not hasattr(data, "files"):
                    raise ValueError("a single array, not an .npz archive")
                feed = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(f"{path}: cannot read --inputs as an .npz file ({exc})") from exc
        if not feed:
            raise ConfigError(f"{path}: --inputs holds no arrays; give arrays keyed by input name")
        feeds = [feed]
    for f in feeds:
        check_index_values(path, f, bounds or {})
    return feeds


def _split_for_fixed_batch(feeds: list[dict[str, np.ndarray]], sess: ort.InferenceSession) -> list[dict[str, np.ndarray]]:
    """Many samples in one array become one feed each when the model's batch dimension is fixed at 1."""
    fixed_one = [i.name for i in sess.get_inputs() if i.shape and i.shape[0] == 1]
    if not fixed_one:
        return feeds
    out = []
    for f in feeds:
        rows = {np.asarray(f[n]).shape[0] for n in fixed_one if np.asarray(f[n]).ndim}
        if len(rows) == 1 and (n := rows.pop()) > 1 and all(np.asarray(v).ndim and np.asarray(v).shape[0] == n for v in f.values()):
            out.extend({k: np.asarray(v)[i : i + 1] for k, v in f.items()} for i in range(n))
        else:
            out.append(f)
    return out


def verdict_of(runs: tuple[RunComparison, ...], source: DataSource) -> Verdict:
    """The worst output verdict over every setting; generated inputs only ever give 'unverified'."""
    judged = [(Level(o.level), run.setting, o) for run in runs for o in run.outputs]
    if not judged:
        return Verdict(Level.UNVERIFIED.value, source.value, "no output could be compared")
    level, setting, o = min(judged, key=lambda j: (j[0].rank, j[2].value))
    names = {"top1": "top-1 agreement", "top1-foreground": "top-1 agreement off the dominant class",
             "decoded": "decoded agreement (1 - CER)", "cosine": "mean cosine", "sqnr": "SQNR",
             "perplexity": "next-token perplexity"}
    if o.metric == "perplexity" and o.perplexity is not None and o.perplexity_float is not None:
        value = f"{o.perplexity / o.perplexity_float - 1:+.2%} ({o.perplexity_float:.4g} -> {o.perplexity:.4g})"
    else:
        value = f"{o.value:.1f} dB" if o.metric == "sqnr" else f"{o.value:.4f}"
    reason = f"{o.name}: {names[o.metric]} {value} at {setting}"
    if source is DataSource.GENERATED:
        return Verdict(Level.UNVERIFIED.value, source.value,
                       f"generated inputs cannot tell whether the model still works (on them it would be {level.value}: {reason})")
    return Verdict(level.value, source.value, reason)


def verify(
    float_model: bytes | Path | onnx.ModelProto, quant_model: bytes | Path, feeds: list[dict[str, np.ndarray]], label: str,
    source: DataSource = DataSource.GENERATED, thresholds: Thresholds | None = None,
    kinds: dict[str, OutputKind] | None = None, progress: Callable[[int, int, str], None] | None = None,
    token_input: str | None = None,
) -> Verification:
    """Run both models on ``feeds`` at each setting, compare every output and give a verdict.

    One session lives at a time: the float outputs are computed first and
    the float session is released before any quantized one is made, so a
    model near the memory's size can still be verified. The float session
    maps its weights instead of pre-packing copies of them. ``kinds`` names
    the kind of outputs whose guess (see :mod:`mixq_onnx.numerics.metrics`)
    is wrong; ``progress(i, n, stage)`` is told of each run. ``token_input``:
    the input that holds a text's token ids (a language model's); its
    next-token logits are then judged by the text's perplexity.
    """
    thresholds = thresholds or Thresholds()
    kinds = kinds or {}
    runs = []
    ref_sess = _session(float_model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None,
                        config={"session.disable_prepacking": "1"})
    wanted = [i.name for i in ref_sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds[0]]
    if missing:
        raise ConfigError(f"verification inputs lack {missing} ({label}); the model's inputs are {wanted}")
    # Extra arrays (labels, say) may sit in the same .npz; they are not fed.
    feeds = [{n: f[n] for n in wanted} for f in feeds]
    feeds = _split_for_fixed_batch(feeds, ref_sess)
    if not feeds or any(np.asarray(v).ndim and np.asarray(v).shape[0] == 0 for f in feeds for v in f.values()):
        raise ConfigError("verification inputs have no samples; give at least one sample per input")
    names = [o.name for o in ref_sess.get_outputs()]
    unknown = sorted(set(kinds) - set(names))
    if unknown:
        raise ConfigError(f"--output-kind names {unknown}, which are not outputs of the model; its outputs are {names}")
    available = ort.get_available_providers()
    settings = list(SETTINGS) + [(f"{p} (ORT_ENABLE_ALL)", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None, p)
                                 for p in GPU_PROVIDERS if p in available]
    total, done = len(feeds) * (1 + len(settings)), 0

    def tick(stage: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, stage)

    try:
        refs = []
        for f in feeds:
            refs.append(ref_sess.run(None, f))
            tick("verification: float model")
    except Exception as exc:
        raise ConfigError(f"the float model does not run on the verification inputs ({label}: {str(exc).splitlines()[0][:200]}); "
                          "pass --input-shape or other --inputs") from exc
    del ref_sess
    sizes = [feed_samples(f) for f in feeds]
    statuses = [ProviderStatus(CPU, True)]
    for label_s, level, acc, provider in settings:
        try:
            sess = _session(quant_model, level, acc, provider)
            if provider not in sess.get_providers():
                raise RuntimeError(f"{provider} did not load")
            outs = []
            for f in feeds:
                outs.append(sess.run(None, f))
                tick(f"verification: {label_s.split(' (')[0]}")
        except Exception as exc:
            if provider != CPU:
                statuses.append(ProviderStatus(provider, False, str(exc).splitlines()[0][:300]))
                continue
            raise VerificationError(f"ONNX Runtime cannot run the quantized model at {label_s}: {str(exc).splitlines()[0][:300]}") from exc
        if provider != CPU:
            statuses.append(ProviderStatus(provider, True))
        del sess
        comps = []
        for k, name in enumerate(names):
            if not all(isinstance(r[k], np.ndarray) for r in refs) or not all(isinstance(o[k], np.ndarray) for o in outs):
                continue  # sequence and map outputs (ZipMap) are not tensors: they have no distance
            comps.append(compare_output(name, [r[k] for r in refs], [o[k] for o in outs], sizes, thresholds, kinds.get(name),
                                        [f[token_input] for f in feeds] if token_input in wanted else None))
        runs.append(RunComparison(label_s, tuple(comps)))
    samples = sum(sizes)
    statuses += [ProviderStatus(p, False, "not available in this onnxruntime build") for p in GPU_PROVIDERS if p not in available]
    bounds = {f.name: [getattr(thresholds, f.name).good, getattr(thresholds, f.name).broken] for f in dataclasses.fields(thresholds)}
    runs_t = tuple(runs)
    return Verification(label, source.value, samples, CPU, runs_t, tuple(statuses), verdict_of(runs_t, source), bounds)
