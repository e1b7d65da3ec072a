"""mixq-onnx: mixed-precision post-training weight quantization for any float ONNX model.

Pipeline (one module each): io (load) -> find (weights) -> measure (error) ->
search (bit-widths) -> rewrite (DequantizeLinear) -> verify (ONNX Runtime) -> report.
"""

from .config import (
    Budget,
    ForceBits,
    Granularity,
    LayerWeighting,
    Layout,
    Metric,
    MixQuantRule,
    QuantConfig,
    Method,
    Scheme,
    Sensitivity,
    Uniform,
)
from .calibrate import load_calibration
from .errors import BudgetError, ConfigError, MixqError, ModelError, OutputError, VerificationError
from .pipeline import CalibrationOptions, QuantizeResult, VerifyOptions, quantize, quantize_file

__version__ = "0.1.0"

__all__ = [
    "Budget", "BudgetError", "CalibrationOptions", "Sensitivity", "load_calibration", "ConfigError", "ForceBits", "Granularity", "LayerWeighting", "Layout", "Method", "Metric",
    "MixQuantRule", "MixqError", "ModelError", "OutputError", "QuantConfig", "QuantizeResult", "Scheme", "Uniform",
    "VerificationError", "VerifyOptions", "quantize", "quantize_file",
]
