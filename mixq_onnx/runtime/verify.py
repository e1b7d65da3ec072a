"""Run the float and quantized models in ONNX Runtime and compare their outputs, as data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError, VerificationError
from .inputs import session

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class OutputComparison:
    """How one output of the quantized model differs from the float model's."""

    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None


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
class Verification:
    inputs: str
    samples: int
    provider: str
    runs: tuple[RunComparison, ...]
    providers: tuple[ProviderStatus, ...] = ()


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


def load_inputs(path: Path) -> list[dict[str, np.ndarray]]:
    """One feed from an .npz file of arrays keyed by input name."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: not a regular file; give an .npz file of arrays keyed by input name for --inputs")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single array, not an .npz archive")
            feed = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read --inputs as an .npz file ({exc})") from exc
    if not feed:
        raise ConfigError(f"{path}: --inputs holds no arrays; give arrays keyed by input name")
    return [feed]


def compare(reference: np.ndarray, actual: np.ndarray, name: str) -> OutputComparison:
    """Distances between a float output and the quantized one; NaN where the float model itself overflows."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _compare(reference, actual, name)


def _compare(reference: np.ndarray, actual: np.ndarray, name: str) -> OutputComparison:
    r = np.asarray(reference, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    d = a - r
    noise = float(np.sum(d * d))
    signal = float(np.sum(r * r))
    denom = float(np.linalg.norm(r) * np.linalg.norm(a))
    top1 = None
    ref = np.asarray(reference)
    if ref.ndim == 2 and ref.shape[1] >= 2 and np.issubdtype(ref.dtype, np.floating):
        top1 = float(np.mean(np.argmax(ref, axis=1) == np.argmax(np.asarray(actual), axis=1)))
    return OutputComparison(
        name,
        float(np.max(np.abs(d))) if d.size else 0.0,
        float(np.mean(np.abs(d))) if d.size else 0.0,
        float(np.dot(r, a) / denom) if denom > 0 else 1.0,
        float(10 * np.log10(signal / noise)) if noise > 0 else float("inf"),
        top1,
    )


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


def verify(
    float_model: bytes | Path | onnx.ModelProto, quant_model: bytes | Path, feeds: list[dict[str, np.ndarray]], source: str
) -> Verification:
    """Run both models on ``feeds`` at each setting and compare every output.

    One session lives at a time: the float outputs are computed first and
    the float session is released before any quantized one is made, so a
    model near the memory's size can still be verified. The float session
    maps its weights instead of pre-packing copies of them.
    """
    runs = []
    ref_sess = _session(float_model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None,
                        config={"session.disable_prepacking": "1"})
    wanted = [i.name for i in ref_sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds[0]]
    if missing:
        raise ConfigError(f"verification inputs lack {missing}; the model's inputs are {wanted}")
    # Extra arrays (labels, say) may sit in the same .npz; they are not fed.
    feeds = [{n: f[n] for n in wanted} for f in feeds]
    feeds = _split_for_fixed_batch(feeds, ref_sess)
    if not feeds or any(np.asarray(v).ndim and np.asarray(v).shape[0] == 0 for f in feeds for v in f.values()):
        raise ConfigError("verification inputs have no samples; give at least one sample per input")
    names = [o.name for o in ref_sess.get_outputs()]
    try:
        refs = [ref_sess.run(None, f) for f in feeds]
    except Exception as exc:
        raise ConfigError(f"the float model does not run on the verification inputs ({str(exc).splitlines()[0][:200]}); pass --input-shape or --inputs") from exc
    del ref_sess
    available = ort.get_available_providers()
    settings = list(SETTINGS) + [(f"{p} (ORT_ENABLE_ALL)", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None, p)
                                 for p in GPU_PROVIDERS if p in available]
    statuses = [ProviderStatus(CPU, True)]
    for label, level, acc, provider in settings:
        try:
            sess = _session(quant_model, level, acc, provider)
            if provider not in sess.get_providers():
                raise RuntimeError(f"{provider} did not load")
            outs = [sess.run(None, f) for f in feeds]
        except Exception as exc:
            if provider != CPU:
                statuses.append(ProviderStatus(provider, False, str(exc).splitlines()[0][:300]))
                continue
            raise VerificationError(f"ONNX Runtime cannot run the quantized model at {label}: {str(exc).splitlines()[0][:300]}") from exc
        if provider != CPU:
            statuses.append(ProviderStatus(provider, True))
        del sess
        comps = []
        for k, name in enumerate(names):
            ref = np.concatenate([np.asarray(r[k]).reshape(1, -1) if np.asarray(r[k]).ndim == 0 else np.asarray(r[k]) for r in refs])
            got = np.concatenate([np.asarray(o[k]).reshape(1, -1) if np.asarray(o[k]).ndim == 0 else np.asarray(o[k]) for o in outs])
            comps.append(compare(ref, got, name))
        runs.append(RunComparison(label, tuple(comps)))
    # Samples = rows of the batch axis across all runs (an .npz holds many in one run).
    samples = sum(int(np.asarray(f[wanted[0]]).shape[0]) if np.asarray(f[wanted[0]]).ndim else 1 for f in feeds) if wanted else len(feeds)
    statuses += [ProviderStatus(p, False, "not available in this onnxruntime build") for p in GPU_PROVIDERS if p not in available]
    return Verification(source, samples, CPU, tuple(runs), tuple(statuses))
