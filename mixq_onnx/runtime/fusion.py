"""What ONNX Runtime makes of a QDQ model: its optimised graph, the integer kernels it fused, and what stayed float.

The answer comes from the runtime itself (the graph ORT writes after its
optimisations), not from a restatement of its rules, so it stays true as ORT
changes. :func:`mixq_onnx.graph.check.fusion_findings` reads the graph.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from ..graph.check import FUSED_OPS, Violation, fusion_findings
from ..errors import ModelError
from ..graph.io import EXTERNAL_THRESHOLD, model_bytes, ort_model


@dataclass(frozen=True)
class FusionReport:
    """ORT's optimised graph in numbers: op counts, fused integer kernels, and where float work remains."""

    ops: dict[str, int]
    findings: tuple[Violation, ...]

    @property
    def fused(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.ops.items()) if k in FUSED_OPS}


def ort_optimized(path: Path) -> onnx.ModelProto:
    """The graph ONNX Runtime's CPU provider runs for the model at ``path``, after its extended optimisations.

    ORT_ENABLE_EXTENDED holds the QDQ fusions and stays portable (the layout
    transformations of ORT_ENABLE_ALL are machine-specific).
    """
    with tempfile.TemporaryDirectory(prefix="mixq-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"{path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0][:200]})") from exc
        return onnx.load(str(out))


def integer_inputs(model: onnx.ModelProto) -> set[str] | None:
    """Names of the tensors that ORT CPU's optimised graph of ``model`` feeds to fused integer kernels.

    None when the model is too large to hand to ONNX Runtime from memory (the
    caller then keeps its conservative choice).
    """
    if model_bytes(model) > EXTERNAL_THRESHOLD:
        return None
    with ort_model(model) as src, tempfile.TemporaryDirectory(prefix="mixq-ort-") as tmp:
        path = src if isinstance(src, Path) else Path(tmp) / "model.onnx"
        if not isinstance(src, Path):
            path.write_bytes(src)
        optimized = ort_optimized(path)
    return {i for n in optimized.graph.node if n.op_type in FUSED_OPS for i in n.input}


def ort_fusion(path: Path) -> FusionReport:
    """Op counts and float islands of the model at ``path`` as ONNX Runtime's CPU provider optimises it."""
    optimized = ort_optimized(path)
    ops = Counter(n.op_type for n in optimized.graph.node)
    return FusionReport(dict(ops), tuple(fusion_findings(optimized)))


__all__ = ["FusionReport", "integer_inputs", "ort_fusion", "ort_optimized"]
