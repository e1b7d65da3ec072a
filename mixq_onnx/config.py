"""Configuration: frozen dataclasses and enums, validated on construction.

Each CLI option maps to exactly one field here.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

from .kinds import (
    Activations,
    BLOCK_SIZES,
    CalibMethod,
    Evaluation,
    Granularity,
    LayerWeighting,
    Layout,
    MAX_BITS,
    MIN_BITS,
    Method,
    Metric,
    PER_CHANNEL,
    PER_TENSOR,
    PrecisionGroups,
    Reconstruction,
    SEARCH_LAYOUTS,
    KQUANT_LAYOUTS,
    Scheme,
    Sensitivity,
    Smooth,
    Target,
)
from .targets import rules_for


@dataclass(frozen=True)
class Uniform:
    """Every tensor gets the same bit-width (the baseline)."""

    bits: int

    def __post_init__(self) -> None:
        _check_bits(self.bits, "--bits")


@dataclass(frozen=True)
class MixQuantRule:
    """MixQuant: per tensor, the cheapest option with ``err <= qem * ref``.

    ``ref`` is the median, over all searched tensors, of the normalised error
    at ``ref_bits`` with the first configured layout.  A model-wide reference
    makes layers comparable; a per-tensor reference would give every tensor
    the same bit-width (see docs/search.md).
    """

    qem: float = 2.0
    ref_bits: int = 4

    def __post_init__(self) -> None:
        if not self.qem > 0:
            raise ConfigError(f"--qem must be greater than 0, got {self.qem}")
        _check_bits(self.ref_bits, "--qem-ref-bits")


@dataclass(frozen=True)
class Budget:
    """Minimise the total weighted error subject to a size budget.

    Exactly one of ``target_bits`` (bits per weight value plus per-channel
    scales: the uniform per-channel plans at the container widths,
    interpolated, see :func:`mixq_onnx.planning.search.budget_limit`) and
    ``max_bytes`` (the whole output file: model and external data) is set.
    """

    target_bits: float | None = None
    max_bytes: int | None = None
    weighting: LayerWeighting = LayerWeighting.EQUAL

    def __post_init__(self) -> None:
        if (self.target_bits is None) == (self.max_bytes is None):
            raise ConfigError("give exactly one of --target-bits and --max-size")
        if self.target_bits is not None and not (0 < self.target_bits <= 32):
            raise ConfigError(f"--target-bits must be in (0, 32], got {self.target_bits}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"--max-size must be positive, got {self.max_bytes}")


@dataclass(frozen=True)
class MaxLoss:
    """Accuracy target: the smallest plan whose measured end-to-end output distance stays within ``max_loss``.

    The distance is the one the report prints (KL for probability outputs and a language model's next-token
    logits, normalised MSE otherwise, averaged over outputs).
    """

    max_loss: float

    def __post_init__(self) -> None:
        if not (self.max_loss > 0 and math.isfinite(self.max_loss)):
            raise ConfigError(f"--max-loss must be a positive number, got {self.max_loss}")


@dataclass(frozen=True)
class KQuantMixed:
    """The fixed rule of llama.cpp's Q4_K_M, as ModelOpt's ``enable_mixed_quant`` and ONNX Runtime GenAI's
    ``k_quant_mixed`` copy it (``--rule kquant-mixed``): the attention value and MLP down projections of the first and
    last eighth of the layers and of every third layer between, and the output projection, at ``high_bits`` per
    channel; every other weight at ``low_bits`` in the first layout.

    ``promoted`` names the weights that get ``high_bits``; the pipeline fills it from the graph's structure (see
    :mod:`mixq_onnx.graph.roles`), a caller may give it.
    """

    low_bits: int = 4
    high_bits: int = 8
    promoted: frozenset[str] | None = None

    def __post_init__(self) -> None:
        _check_bits(self.low_bits, "kquant-mixed low bits")
        _check_bits(self.high_bits, "kquant-mixed high bits")


Search = Uniform | MixQuantRule | Budget | MaxLoss | KQuantMixed


@dataclass(frozen=True)
class ForceBits:
    """``--force-bits PATTERN=N``: tensors or nodes matching PATTERN get N bits."""

    pattern: str
    bits: int

    def __post_init__(self) -> None:
        _check_bits(self.bits, f"--force-bits {self.pattern}")

    @classmethod
    def parse(cls, text: str) -> "ForceBits":
        pattern, sep, bits = text.rpartition("=")
        if not sep or not pattern or not bits.strip().isdigit():
            raise ConfigError(f"--force-bits expects PATTERN=N (for example 'conv1*=8'), got {text!r}")
        return cls(pattern, int(bits))


def matches(pattern: str, names: tuple[str, ...]) -> bool:
    """Glob match against any of a tensor's or its consumers' names."""
    return any(fnmatch.fnmatchcase(n, pattern) for n in names if n)


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides the output model; the same config gives the same bytes."""

    # Uniform 8 bits is the default: data-free mixing below 8 bits broke EfficientNet-Lite0 (docs/RESULTS.md).
    search: Search = field(default_factory=lambda: Uniform(8))
    # None: the target's scheme (symmetric for TensorRT, else asymmetric).
    scheme: Scheme = None  # type: ignore[assignment]
    # None: per-channel for uniform --bits; block 128 then per-channel for the k-quant rule (KQUANT_LAYOUTS); for the
    # searches per-channel and every block size (SEARCH_LAYOUTS).
    layouts: tuple[Layout, ...] = None  # type: ignore[assignment]
    candidate_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    storage_aware: bool = True
    allow_int2: bool = False
    metric: Metric = Metric.NMSE
    # End-to-end where the model runs on the evaluation samples; output/weight error otherwise (with a note).
    sensitivity: Sensitivity = Sensitivity.E2E
    # Samples the end-to-end measurements use (calibration samples first, else generated inputs).
    e2e_samples: int = 32
    # Where each option's end-to-end distance is measured: its own block (default) or the whole model.
    evaluation: Evaluation = Evaluation.BLOCKS
    # Quantized weights per evaluation block (a block is cut further only where the graph allows).
    eval_block_weights: int = 4
    min_elements: int = 1024
    keep_float: tuple[str, ...] = ()
    force_bits: tuple[ForceBits, ...] = ()
    method: Method = Method.RTN
    # Measure every candidate with ``method`` instead of round-to-nearest (costlier; see docs/search.md).
    search_with_method: bool = False
    bias_correction: bool = False
    activations: Activations = Activations.NONE
    calib_method: CalibMethod = CalibMethod.MINMAX
    target: Target = Target.GENERIC
    # SmoothQuant before W8A8 (--smooth): None = off; Smooth(alpha=None) searches alpha per activation.
    smooth: Smooth | None = None
    # Also quantize MatMuls of two activations (attention); off by default: it did not pay on ORT CPU (docs/targets.md).
    quantize_attention: bool = False
    # Only read with method brecq.
    reconstruction: Reconstruction = field(default_factory=Reconstruction)
    # AWQ-style activation-aware scaling of the weights before anything is measured (needs calibration data).
    awq: bool = False
    # Weights that read the same input share one width and layout in budget and --max-loss searches.
    precision_groups: PrecisionGroups = PrecisionGroups.AUTO
    # The groups themselves (weight names); the pipeline fills them from the graph when they are on.
    groups: tuple[tuple[str, ...], ...] = ()

    @property
    def awq_bits(self) -> int:
        """The width AWQ scales for: the uniform width, the k-quant rule's low width, else the narrowest
        candidate from 4 bits up (where rounding error matters)."""
        if isinstance(self.search, Uniform):
            return self.search.bits
        if isinstance(self.search, KQuantMixed):
            return self.search.low_bits
        return min((b for b in self.candidate_bits if b >= 4), default=min(self.candidate_bits))

    @property
    def groups_on(self) -> bool:
        """Whether ``precision_groups`` asks for groups on this target."""
        return self.precision_groups is PrecisionGroups.ON or (
            self.precision_groups is PrecisionGroups.AUTO and rules_for(self.target).fuses_shared_input)

    def __post_init__(self) -> None:
        rules = rules_for(self.target)
        if self.activations is Activations.AUTO:
            object.__setattr__(self, "activations", rules.fastest_activations)
        if self.scheme is None:
            object.__setattr__(self, "scheme", rules.default_scheme(self.activations))
        rules.check_config(self.scheme, self.allow_int2, self.activations)
        if self.layouts is None:
            object.__setattr__(self, "layouts", (PER_CHANNEL,) if isinstance(self.search, Uniform) else
                               KQUANT_LAYOUTS if isinstance(self.search, KQuantMixed) else SEARCH_LAYOUTS)
        if not self.layouts:
            raise ConfigError("give at least one --granularity")
        if len(set(self.layouts)) != len(self.layouts):
            raise ConfigError("--granularity was given twice with the same value")
        if not self.candidate_bits:
            raise ConfigError("give at least one candidate bit-width")
        for b in self.candidate_bits:
            _check_bits(b, "--candidate-bits")
        object.__setattr__(self, "candidate_bits", tuple(sorted(set(self.candidate_bits))))
        if self.min_elements < 0:
            raise ConfigError(f"--min-elements must be 0 or more, got {self.min_elements}")
        if self.quantize_attention and self.activations is Activations.NONE:
            raise ConfigError("--quantize-attention quantizes activation MatMul inputs; add --activations or drop it")
        if self.smooth is not None and self.activations is Activations.NONE:
            raise ConfigError("--smooth migrates activation outliers into the weights for activation quantization; "
                              "add --activations (auto, uint8 or int8) or drop --smooth")
        if self.e2e_samples < 1:
            raise ConfigError(f"--e2e-samples must be at least 1, got {self.e2e_samples}")
        if self.eval_block_weights < 1:
            raise ConfigError(f"--eval-block-weights must be at least 1, got {self.eval_block_weights}")
        if isinstance(self.search, MaxLoss) and self.sensitivity is not Sensitivity.E2E:
            raise ConfigError("--max-loss measures the model end to end; it cannot be combined with --sensitivity "
                              f"{self.sensitivity.value}")
        if isinstance(self.search, Budget) and self.search.target_bits is not None and self.search.target_bits < 4 \
                and not self.allow_int2:
            raise ConfigError(f"--target-bits {self.search.target_bits:g} is below 4: 3-bit values are stored in 4-bit "
                              "containers, so nothing smaller than 4 bits per weight can be written without INT2 storage; "
                              "add --int2 (opset 25) to reach it, or ask for 4 or more")
        if isinstance(self.search, Budget) and self.search.target_bits is not None and self.search.target_bits < 2:
            raise ConfigError(f"--target-bits {self.search.target_bits:g} is below 2, the narrowest container; ask for 2 or more")
        if isinstance(self.search, Budget) and self.search.target_bits is not None \
                and self.search.target_bits < min(self.candidate_bits):
            raise ConfigError(f"--target-bits {self.search.target_bits:g} is below the smallest candidate width "
                              f"({min(self.candidate_bits)}); raise it or add smaller --candidate-bits")
        if self.search_with_method and self.method is Method.RTN:
            raise ConfigError("--search-with-method needs a --method other than rtn (rtn is what the search measures anyway)")
        if self.awq and self.smooth is not None:
            raise ConfigError("--awq scales weights for weight-only rounding and --smooth for activation quantization; "
                              "use one of them")
        seen = [n for g in self.groups for n in g]
        if any(len(set(g)) < 2 for g in self.groups) or len(seen) != len(set(seen)):
            raise ConfigError("precision groups need two or more weights each, and a weight in one group at most")
        if isinstance(self.search, Uniform) and len(self.layouts) > 1:
            raise ConfigError(
                "several --granularity values need a search to choose among them (--qem, --target-bits or --max-size); "
                "uniform --bits, the default, takes one"
            )

    def describe(self) -> dict[str, Any]:
        """Plain data for the report: enums as their values, layouts and rules as their CLI spelling."""
        search = {"type": type(self.search).__name__}
        for f in dataclasses.fields(self.search):
            v = getattr(self.search, f.name)
            search[f.name] = v.value if isinstance(v, enum.Enum) else sorted(v) if isinstance(v, frozenset) else v
        return {
            "search": search,
            "scheme": self.scheme.value,
            "layouts": [lay.name for lay in self.layouts],
            "candidate_bits": list(self.candidate_bits),
            "storage_aware": self.storage_aware,
            "allow_int2": self.allow_int2,
            "metric": self.metric.value,
            "sensitivity": self.sensitivity.value,
            "e2e_samples": self.e2e_samples,
            "evaluation": self.evaluation.value,
            "eval_block_weights": self.eval_block_weights,
            "min_elements": self.min_elements,
            "keep_float": list(self.keep_float),
            "force_bits": [f"{r.pattern}={r.bits}" for r in self.force_bits],
            "method": self.method.value,
            "search_with_method": self.search_with_method,
            "bias_correction": self.bias_correction,
            "activations": self.activations.value,
            "calib_method": self.calib_method.value,
            "target": self.target.value,
            "quantize_attention": self.quantize_attention,
            "awq": self.awq,
            "precision_groups": self.precision_groups.value,
            "groups": [list(g) for g in self.groups],
            "smooth": None if self.smooth is None else ("search" if self.smooth.alpha is None else self.smooth.alpha),
            "reconstruction": None if self.method is not Method.BRECQ else {
                f.name: (v.value if isinstance(v := getattr(self.reconstruction, f.name), enum.Enum) else v)
                for f in dataclasses.fields(self.reconstruction)},
        }

    @property
    def layer_method(self) -> Method:
        """The per-weight rounding method: ``method``, or block reconstruction's layer-wise fallback."""
        return self.method if self.method.layer_wise else self.reconstruction.fallback

    def forced_bits(self, names: tuple[str, ...]) -> int | None:
        """The last ``--force-bits`` rule matching any of ``names`` wins."""
        hit = None
        for rule in self.force_bits:
            if matches(rule.pattern, names):
                hit = rule.bits
        return hit

    def kept_float(self, names: tuple[str, ...]) -> str | None:
        for pattern in self.keep_float:
            if matches(pattern, names):
                return pattern
        return None


def _check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise ConfigError(f"{what}: bit-width must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits}")


# The vocabulary of kinds is re-exported: config is where callers find every option type.
__all__ = [
    "BLOCK_SIZES", "MAX_BITS", "MIN_BITS", "PER_CHANNEL", "PER_TENSOR", "SEARCH_LAYOUTS", "Activations", "Budget", "CalibMethod",
    "ForceBits", "Granularity", "LayerWeighting", "Layout", "MaxLoss", "Method", "Metric", "MixQuantRule", "QuantConfig",
    "Reconstruction", "Scheme", "Sensitivity", "Smooth", "Target", "Uniform", "matches", "KQuantMixed",
]
