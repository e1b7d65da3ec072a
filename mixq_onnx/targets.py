"""What each runtime accepts and runs fast: one table of rules per ``--target``.

The rules decide three things: which weight options the search may choose
(:meth:`TargetRules.option_problem`), how activations are quantized and where
their Q/DQ pairs go (the placement fields), and what ``mixq-onnx check``
verifies in a finished model (:mod:`mixq_onnx.graph.check` reads the same table).
Sources, re-measured where a CPU can measure them: ``shared/runtime-facts.md``,
ONNX Runtime's QDQ selectors and FAQ, and TensorRT's QDQ rules; see docs/targets.md,
"Targets".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import ConfigError
from .kinds import Activations, Granularity, Scheme, Target


class _Use(Protocol):
    @property
    def op_type(self) -> str: ...


class WeightFacts(Protocol):
    """What the rules read of a weight (a :class:`mixq_onnx.graph.find.WeightSite` has it): pure data, no graph."""

    @property
    def uses(self) -> Sequence[_Use]: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def channel_axis(self) -> int | None: ...

    @property
    def via(self) -> tuple[str, ...]: ...

# Ops whose weight input a target may run as an integer (or fused low-bit) kernel.
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
GEMM_OPS = frozenset({"MatMul", "Gemm"})
# Ops that carry quantization from one integer op to the next (ORT has QLinear* kernels or drops Q/DQ around them).
JOIN_OPS = frozenset({"Add", "Concat"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})
# Data movement: the output keeps the input's scale and zero point, so ORT removes the Q/DQ around them and runs
# the op on the integers (measured on ORT 1.32 CPU for each of these; Resize only in its default nearest mode).
MOVE_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Slice", "Expand",
                      "Tile", "DepthToSpace", "Gather", "Resize"})
# Data movement with several outputs, each a slice of the input (ORT drops Q/DQ around it too, measured).
SPLIT_OPS = frozenset({"Split"})
# Activation functions folded into the preceding integer op when the Q range lies inside theirs.
FOLD_OPS = frozenset({"Relu", "Clip"})


@dataclass(frozen=True)
class TargetRules:
    """One runtime's rules."""

    target: Target
    scheme: Scheme | None  # the weight scheme the target requires, or None for any
    allow_int2: bool
    activation_types: frozenset[Activations]
    symmetric_activations: bool
    # True: Q/DQ on the inputs and outputs of integer ops (ORT's QDQ fusions need the output Q).
    # False: on the inputs only (TensorRT fuses the rest itself).
    quantize_outputs: bool
    # Ops whose sub-byte (INT4/INT2) weights run fast: MatMulNBits on ORT, INT4 weight-only GEMM on TensorRT.
    low_bit_ops: frozenset[str]
    # Ops that must keep 8-bit per-channel/per-tensor weights to run as integer kernels with activations.
    integer_ops: frozenset[str]
    # Sub-byte weights elsewhere still run (weight-only, unfused), unless the op must be an integer kernel.
    sub_byte_elsewhere: bool = True
    why_no_activations: str = ""
    # The weight scheme integer kernels need when activations are quantized, if the target has one.
    integer_scheme: Scheme | None = None
    # A zero Pad read only by a Conv is quantized on its input: ONNX Runtime then folds the Pad into the
    # QLinearConv (measured); a Q/DQ pair after the Pad would leave a float DQ -> Pad -> Q island.
    quantize_before_pad: bool = False
    # MatMuls keep a float output where the runtime fuses that into an integer kernel (ORT CPU: MatMulIntegerToFloat,
    # measured faster and more accurate than QLinearMatMul on MiniLM); the pipeline asks ORT which ones it fused.
    float_matmul_outputs: bool = False
    # Embedding tables dequantize only the looked-up rows (runtime scales); TensorRT wants constant DQ scales.
    gather_rows: bool = True
    # Ops whose weights at or below some width run, but so slowly that the target refuses them: (op, bits, why).
    slow_sub_byte: tuple[tuple[str, int, str], ...] = ()
    # What ``--activations auto`` means: the activation type whose integer kernels the target runs fastest.
    fastest_activations: Activations = Activations.NONE
    # Activation types the target runs, but slowly: why, as measured.
    slow_activations: tuple[tuple[Activations, str], ...] = ()
    # Layers that read one tensor with one op and equal precision are combined into one (TensorRT's horizontal
    # fusion): ``--precision-groups auto`` ties such weights' widths and layouts on this target.
    fuses_shared_input: bool = False

    def activation_warning(self, activations: Activations) -> str:
        """Why ``activations`` is a poor choice on this target, or ''."""
        return dict(self.slow_activations).get(activations, "")

    def required_scheme(self, activations: Activations) -> Scheme | None:
        return self.scheme or (self.integer_scheme if activations is not Activations.NONE else None)

    def default_scheme(self, activations: Activations) -> Scheme:
        return self.required_scheme(activations) or Scheme.ASYMMETRIC

    def check_config(self, scheme: Scheme, allow_int2: bool, activations: Activations) -> None:
        """Reject options the target cannot run, with what to use instead."""
        name = self.target.value
        need = self.required_scheme(activations)
        if need is not None and scheme is not need:
            why = "it rejects zero points" if self.scheme else "its integer kernels take a slow path for weights with zero points"
            raise ConfigError(f"--target {name} with --activations {activations.value} needs --scheme {need.value} ({why}); drop --scheme")
        if allow_int2 and not self.allow_int2:
            raise ConfigError(f"--target {name} cannot run INT2 weights; drop --int2")
        if activations is not Activations.NONE and activations not in self.activation_types:
            allowed = ", ".join(sorted(a.value for a in self.activation_types)) or "none"
            raise ConfigError(
                f"--target {name} does not run {activations.value} activations ({self.why_no_activations or 'see docs/targets.md, Targets'}); "
                f"use --activations {allowed}"
            )

    def option_problem(self, site: WeightFacts, bits: int, granularity: Granularity, axis: int, activations: bool) -> str:
        """Why this weight option breaks the target's rules, or '' if it is allowed."""
        name = self.target.value
        sub_byte = bits <= 4
        for u in site.uses:
            op = u.op_type
            integer = activations and op in self.integer_ops
            if sub_byte and op not in self.low_bit_ops and (integer or not self.sub_byte_elsewhere):
                return f"{name}: {op} weights need 8 bits (sub-byte weights run fast only on {'/'.join(sorted(self.low_bit_ops))})"
            for slow_op, max_bits, why in self.slow_sub_byte:
                if op == slow_op and bits <= max_bits:
                    return f"{name}: {op} weights need more than {max_bits} bits ({why})"
            if self.target is Target.TENSORRT:
                if op not in CONV_OPS | GEMM_OPS | {"Gather"}:
                    return f"tensorrt: its QDQ rules cover Conv, MatMul, Gemm and Gather weights, not {op}"
                if sub_byte and (granularity is not Granularity.BLOCK or site.shape[-1] % 2):
                    return "tensorrt: INT4 weights must be block-wise with an even last dimension"
                if not sub_byte and granularity is Granularity.BLOCK:
                    return "tensorrt: block-wise scales are for INT4 weights only"
                if granularity is Granularity.CHANNEL and (op == "Gather" or op == "ConvTranspose" or axis != site.channel_axis):
                    return f"tensorrt: per-channel scales on {op} weights are not on its output-channel axis"
                if granularity is Granularity.CHANNEL and site.via:
                    # The DequantizeLinear sits before the Reshape/Transpose, where TensorRT cannot match its axis.
                    return f"tensorrt: per-channel scales on a weight read through {'/'.join(site.via)} are not on the consumer's axis"
            if self.target is Target.ORT_CUDA and granularity is Granularity.BLOCK and op not in GEMM_OPS:
                return ("ort-cuda: its DequantizeLinear kernel has no block-wise form; blocks run only where they fuse into "
                        f"MatMulNBits (MatMul/Gemm), not on {op} (measured: 'Unsupported quantization type')")
            if integer and not sub_byte and granularity is Granularity.BLOCK:
                return f"{name}: integer {op} kernels need per-channel or per-tensor weight scales"
        return ""


RULES: dict[Target, TargetRules] = {
    Target.GENERIC: TargetRules(
        Target.GENERIC, None, True, frozenset({Activations.INT8, Activations.UINT8, Activations.INT16}), False, True,
        frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "LSTM", "GRU", "RNN"}), frozenset(),
        quantize_before_pad=True,
    ),
    Target.ORT_CPU: TargetRules(
        Target.ORT_CPU, None, True, frozenset({Activations.INT8, Activations.UINT8, Activations.INT16}), False, True,
        # DQ->MatMul/Gemm fuses into MatMulNBits for 2, 4 and 8 bits; 4-bit Gather tables are looked up packed (rewrite);
        # other sub-byte DQs run unfused.
        frozenset({"MatMul", "Gemm", "Gather"}), frozenset({"Conv", "MatMul", "Gemm"}),
        # Measured: EfficientNet-Lite0 with uint8 per-channel weights + zero points ran 56x slower than int8 symmetric.
        integer_scheme=Scheme.SYMMETRIC, quantize_before_pad=True, fastest_activations=Activations.UINT8, float_matmul_outputs=True,
        slow_sub_byte=(("Gather", 2, "2-bit tables are dequantized whole on every run (all-MiniLM-L6-v2 with a whole-table "
                                     "sub-byte embedding ran at 0.34x fp32); 4- and 8-bit tables dequantize only the looked-up rows"),),
        slow_activations=(
            (Activations.INT8, "ONNX Runtime's x86 CPU kernels are fastest with uint8 activations; with int8 activations 14 of "
                               "EfficientNet-Lite0's 49 Convs did not fuse and the model ran at 0.73-1.17x fp32 speed instead of "
                               "1.9x (measured, docs/RESULTS.md); use --activations uint8 or auto"),
            (Activations.INT16, "ONNX Runtime has no 16-bit integer Conv or MatMul kernels: 16-bit Q/DQ pairs run as float "
                                "conversions (slower than fp32); use --activations uint8 or auto for speed"),
        ),
    ),
    Target.ORT_CUDA: TargetRules(
        Target.ORT_CUDA, None, False, frozenset(), False, True, frozenset({"MatMul", "Gemm"}), frozenset(),
        sub_byte_elsewhere=False, why_no_activations="the CUDA EP has no integer Conv or QLinear kernels for QDQ activations; use --target tensorrt",
    ),
    Target.TENSORRT: TargetRules(
        Target.TENSORRT, Scheme.SYMMETRIC, False, frozenset({Activations.INT8}), True, False,
        frozenset({"MatMul", "Gemm"}), frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"}),
        sub_byte_elsewhere=False, why_no_activations="TensorRT quantizes activations to symmetric INT8 only",
        fastest_activations=Activations.INT8, gather_rows=False, fuses_shared_input=True,
    ),
}


def rules_for(target: Target) -> TargetRules:
    return RULES[target]


__all__ = ["RULES", "TargetRules", "WeightFacts", "rules_for"]
