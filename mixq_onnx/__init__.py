"""mixq-onnx: mixed-precision post-training weight quantization for any float ONNX model.

Pipeline (one module each): io (load) -> find (weights) -> measure (error) ->
search (bit-widths) -> rewrite (DequantizeLinear) -> verify (ONNX Runtime) -> report.

The public names below are imported on first use, so that ``import
mixq_onnx.cli`` can set up its signal handling before onnx and onnxruntime
load.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    **{name: "config" for name in ("Budget", "ForceBits", "Granularity", "LayerWeighting", "Layout", "MaxLoss", "Metric",
                                   "MixQuantRule", "QuantConfig", "Method", "Scheme", "Sensitivity", "Uniform")},
    "load_calibration": "runtime.calibrate",
    **{name: "errors" for name in ("BudgetError", "ConfigError", "MixqError", "ModelError", "OutputError", "VerificationError")},
    **{name: "pipeline" for name in ("CalibrationOptions", "QuantizeResult", "VerifyOptions", "quantize", "quantize_file")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mixq_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
