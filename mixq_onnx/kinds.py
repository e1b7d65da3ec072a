"""The vocabulary of configuration: bit-width limits, layouts and the option enums.

Pure data with no dependencies inside the package, so that both the
configuration (:mod:`mixq_onnx.config`) and the target rules
(:mod:`mixq_onnx.targets`) can build on it without importing each other.
"""

from __future__ import annotations

import enum
import math
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


class Method(enum.Enum):
    """How a weight is rounded onto its chosen grid (``--method``)."""

    RTN = "rtn"
    MSE = "mse"
    GPTQ = "gptq"
    ADAROUND = "adaround"
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
