"""The vocabulary of configuration: bit-width limits, layouts and the option enums.

Pure data with no dependencies inside the package, so that both the
configuration (:mod:`mixq_onnx.config`) and the target rules
(:mod:`mixq_onnx.targets`) can build on it without importing each other.
"""

from __future__ import annotations

import enum
import math
import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

MIN_BITS = 2
MAX_BITS = 8
BLOCK_SIZES = (32, 64, 128)


class Granularity(enum.Enum):
    """How many scales a tensor gets."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


@dataclass(frozen=True)
class Layout:
    """A granularity together with its block size (0 unless blockwise)."""

    granularity: Granularity
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.granularity is Granularity.BLOCK:
            if self.block_size not in BLOCK_SIZES:
                raise ConfigError(
                    f"block size {self.block_size} is not supported; use one of {BLOCK_SIZES}"
                )
        elif self.block_size:
            raise ConfigError("a block size only applies to blockwise granularity")

    @property
    def name(self) -> str:
        if self.granularity is Granularity.BLOCK:
            return f"block{self.block_size}"
        return self.granularity.value

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """Parse ``tensor``, ``channel`` or ``blockNN`` (NN in 32, 64, 128)."""
        t = text.strip().lower()
        if t in ("tensor", "per-tensor"):
            return cls(Granularity.TENSOR)
        if t in ("channel", "per-channel"):
            return cls(Granularity.CHANNEL)
        if t.startswith("block") and t[5:].isdigit():
            return cls(Granularity.BLOCK, int(t[5:]))
        raise ConfigError(
            f"unknown granularity {text!r}; use tensor, channel, block32, block64 or block128"
        )


PER_TENSOR = Layout(Granularity.TENSOR)
PER_CHANNEL = Layout(Granularity.CHANNEL)
# What the searches choose among by default: finer scales often buy more accuracy per byte than more bits, and
# per-tensor scales free the bytes of per-channel ones where a weight does not need them.
SEARCH_LAYOUTS = (PER_CHANNEL, PER_TENSOR) + tuple(Layout(Granularity.BLOCK, b) for b in BLOCK_SIZES)
# The k-quant mix as the ONNX tools write it: INT4 in blocks of 128, INT8 per channel for the promoted weights.
KQUANT_LAYOUTS = (Layout(Granularity.BLOCK, 128), PER_CHANNEL)


class Scheme(enum.Enum):
    """Asymmetric (unsigned container, zero point) or symmetric (signed, no zero point)."""

    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"


class Metric(enum.Enum):
    """The per-tensor error measure the search compares."""

    NMSE = "nmse"
    MSE = "mse"
    MAX_ABS = "max-abs"


class Sensitivity(enum.Enum):
    """What the searches compare.

    ``e2e``: how far the model's outputs move when that one weight alone is
    quantized (calibration samples, or generated inputs without data);
    ``output``: the error of the weight's own layer output on calibration
    data; ``weight``: the weight's own roundoff error.
    """

    E2E = "e2e"
    WEIGHT = "weight"
    OUTPUT = "output"


class Evaluation(enum.Enum):
    """How end-to-end sensitivity measures one option.

    ``blocks``: on the weight's own block, from the float activations at the
    block's boundary, times the block's gain fitted on a few end-to-end
    runs (see :mod:`mixq_onnx.runtime.blockwise`); where the model cannot be
    cut, and for weights no single block owns, the whole model is run.
    ``model``: the whole model for every option.
    """

    BLOCKS = "blocks"
    MODEL = "model"


class PrecisionGroups(enum.Enum):
    """Whether a search gives weights that read the same input (Q/K/V, gate/up) one width and layout.

    ``auto``: where the target combines such layers (TensorRT's horizontal
    fusion needs equal precision); ``on``; ``off``.
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Method(enum.Enum):
    """How a weight is rounded onto its chosen grid (``--method``)."""

    RTN = "rtn"
    MSE = "mse"
    GPTQ = "gptq"
    ADAROUND = "adaround"
    HQQ = "hqq"
    # Block reconstruction (BRECQ): not a per-weight rule; see Reconstruction and mixq_onnx.runtime.brecq.
    BRECQ = "brecq"

    @property
    def needs_calibration(self) -> bool:
        return self in (Method.GPTQ, Method.ADAROUND, Method.BRECQ)

    @property
    def layer_wise(self) -> bool:
        """Whether the method rounds one weight at a time (everything but block reconstruction)."""
        return self is not Method.BRECQ


@dataclass(frozen=True)
class Reconstruction:
    """How ``--method brecq`` runs: its cost controls (defaults sized for 2 CPU cores) and its fallback.

    ``fallback`` is the layer-wise method that gives the starting grid and
    integers, and that blocks which cannot be reconstructed keep.
    """

    iters: int = 200
    batch: int = 16
    samples: int = 256
    block_weights: int = 8
    lr: float = 0.1
    learn_scales: bool = False
    # Weigh the block-output error by the squared gradient of a pseudo-label loss at the model's classifier output.
    fisher: bool = False
    memory_mb: int = 1024
    fallback: Method = Method.GPTQ
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in (("--brecq-iters", self.iters), ("--brecq-batch", self.batch), ("--brecq-samples", self.samples),
                            ("--brecq-block-weights", self.block_weights)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 0:
            raise ConfigError(f"--brecq-memory must be 0 or more MB (0 keeps every block activation on disk), got {self.memory_mb}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--brecq-lr must be a positive number, got {self.lr}")
        if not self.fallback.layer_wise or self.fallback is Method.RTN:
            raise ConfigError(f"--brecq-fallback must be mse, gptq or adaround, got {self.fallback.value}")


class Activations(enum.Enum):
    """Static activation quantization (``--activations``): the integer type of activations, or none."""

    NONE = "none"
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    AUTO = "auto"  # the target's fastest: resolved by QuantConfig from the target's rules


@dataclass(frozen=True)
class Smooth:
    """SmoothQuant's migration strength: ``alpha`` in [0, 1], or None to search it per activation on the calibration data."""

    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--smooth must be from 0 to 1 (SmoothQuant's alpha), got {self.alpha}")


class CalibMethod(enum.Enum):
    """How an activation's range is chosen from its calibration values (``--calib-method``)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class Target(enum.Enum):
    """The runtime the output is made for (``--target``); its rules live in :mod:`mixq_onnx.targets`."""

    GENERIC = "generic"
    ORT_CPU = "ort-cpu"
    ORT_CUDA = "ort-cuda"
    TENSORRT = "tensorrt"


class LayerWeighting(enum.Enum):
    """How the budget search weighs each tensor's normalised error in the total."""

    EQUAL = "equal"
    SQRT = "sqrt"
    PARAMS = "params"


class OutputKind(enum.Enum):
    """What a model output holds, which decides the metric its verdict comes from (``--output-kind``).

    classes: scores along a class axis (top-1 agreement per position);
    labels: integer predictions (exact agreement); embedding: vectors
    compared by their mean cosine; values: anything else (SQNR).
    """

    CLASSES = "classes"
    LABELS = "labels"
    EMBEDDING = "embedding"
    VALUES = "values"


class Level(enum.Enum):
    """The verdict on a quantized model: good, degraded or broken on real data; unverified without it."""

    GOOD = "good"
    DEGRADED = "degraded"
    BROKEN = "broken"
    UNVERIFIED = "unverified"

    @property
    def rank(self) -> int:
        """Higher is better; unverified ranks below broken for ``--require`` (nothing is proven)."""
        return {"good": 3, "degraded": 2, "broken": 1, "unverified": 0}[self.value]


class DataSource(enum.Enum):
    """Where verification samples came from."""

    INPUTS = "inputs"  # --inputs: samples the user holds out
    HELD_OUT = "held-out calibration"  # a part of --calib the search and rounding never saw
    GENERATED = "generated"  # seeded random inputs: cannot tell whether the model still works


@dataclass(frozen=True)
class Threshold:
    """One metric's verdict bounds: at or above ``good`` is good, below ``broken`` is broken (higher is better)."""

    good: float
    broken: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.good) and math.isfinite(self.broken)) or self.broken > self.good:
            raise ConfigError(f"a verdict threshold needs finite GOOD >= BROKEN, got good {self.good:g}, broken {self.broken:g}")

    def level(self, value: float, count: int | None = None) -> Level:
        """The level of ``value``; for a rate measured on ``count`` trials, broken only when even the upper end of
        its one-sided 95% (Wilson) interval is below ``broken``: 2 flips in 16 samples are no proof of a broken model."""
        if not math.isfinite(value):
            return Level.GOOD if value > 0 else Level.BROKEN
        if value >= self.good:
            return Level.GOOD
        upper = wilson_upper(value, count) if count else value
        return Level.BROKEN if upper < self.broken else Level.DEGRADED


def wilson_upper(rate: float, count: int, z: float = 1.645) -> float:
    """The upper end of the Wilson score interval of a rate observed on ``count`` trials."""
    p, n = min(max(rate, 0.0), 1.0), float(count)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


@dataclass(frozen=True)
class Thresholds:
    """The documented default bounds of each verdict metric (docs/usage.md, 'Verdict'); ``--threshold`` overrides.

    top1: agreement with the float model's top-1 class (per position for
    sequences and maps, off the dominant class where one class fills most
    positions); cosine: mean cosine of embedding vectors; sqnr: signal to
    quantization noise of other outputs, in dB; perplexity: for a language
    model's next-token logits on real text, the float model's perplexity of
    the text's next tokens over the quantized model's.
    """

    top1: Threshold = Threshold(0.99, 0.90)
    cosine: Threshold = Threshold(0.999, 0.95)
    # The float model's next-token perplexity over the quantized model's, on real text: 0.95 is +5.3%, 0.80 +25%.
    perplexity: Threshold = Threshold(0.95, 0.80)
    sqnr: Threshold = Threshold(25.0, 10.0)

    @classmethod
    def parse(cls, specs: tuple[str, ...]) -> "Thresholds":
        """``("top1=0.98:0.85", "sqnr=20:8")`` -> Thresholds with those two replaced."""
        out = cls()
        names = [f.name for f in dataclasses.fields(cls)]
        for spec in specs:
            name, sep, bounds = spec.partition("=")
            good, sep2, broken = bounds.partition(":")
            try:
                if not sep or not sep2 or name not in names:
                    raise ValueError
                value = Threshold(float(good), float(broken))
            except ValueError:
                raise ConfigError(f"--threshold expects METRIC=GOOD:BROKEN with METRIC one of {', '.join(names)} "
                                  f"(for example 'top1=0.99:0.9'), got {spec!r}") from None
            out = dataclasses.replace(out, **{name: value})
        return out
