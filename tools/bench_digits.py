"""Benchmark: accuracy and size of the digits CNN under each search mode, on its held-out test split.

    python tools/bench_digits.py

Quantizes models/digits_cnn.onnx with the CLI's library path for each
configuration, evaluates test accuracy in ONNX Runtime (CPU, default
optimisations, MatMulNBits accuracy level 4 as users get it), and writes
the table, with this command, to docs/bench_digits.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _table import markdown_table, publish  # noqa: E402
from mixq_onnx import Budget, Layout, MixQuantRule, QuantConfig, Uniform, VerifyOptions, quantize_file  # noqa: E402

CASES: list[tuple[str, QuantConfig]] = [
    ("uniform 8 bits", QuantConfig(search=Uniform(8), min_elements=0)),
    ("uniform 4 bits", QuantConfig(search=Uniform(4), min_elements=0)),
    ("uniform 3 bits", QuantConfig(search=Uniform(3), min_elements=0)),
    ("uniform 2 bits (INT2)", QuantConfig(search=Uniform(2), allow_int2=True, min_elements=0)),
    ("default (MixQuant qem 2, min-elements 1024)", QuantConfig()),
    ("MixQuant qem 1", QuantConfig(search=MixQuantRule(1.0), min_elements=0)),
    ("MixQuant qem 2", QuantConfig(search=MixQuantRule(2.0), min_elements=0)),
    ("MixQuant qem 4", QuantConfig(search=MixQuantRule(4.0), min_elements=0)),
    ("budget 5 bits", QuantConfig(search=Budget(target_bits=5.0), min_elements=0)),
    ("budget 3.5 bits, INT2 + blocks", QuantConfig(search=Budget(target_bits=3.5), allow_int2=True,
                                                    layouts=(Layout.parse("channel"), Layout.parse("block32")), min_elements=0)),
]


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.mean(np.argmax(sess.run(None, {"image": x})[0], 1) == y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_digits.md")
    args = ap.parse_args()
    src = ROOT / "models" / "digits_cnn.onnx"
    data = np.load(ROOT / "models" / "digits_test.npz")
    x, y = data["image"], data["label"]
    rows = [("fp32", "32.00", str(src.stat().st_size), "1.00", f"{accuracy(src, x, y):.2%}")]
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in CASES:
            out = Path(tmp) / "q.onnx"
            result = quantize_file(src, out, config, VerifyOptions(enabled=False))
            t = result.report.totals
            rows.append((label, f"{t.avg_bits:.2f}", str(out.stat().st_size), f"{src.stat().st_size / out.stat().st_size:.2f}", f"{accuracy(out, x, y):.2%}"))
    head = ("method", "stored bits/weight", "file bytes", "compression", f"test accuracy (n={len(y)})")
    publish(args.out, "Digits CNN benchmark",
            "Stored bits include scales and zero points of the quantized tensors; the file size includes everything.",
            "python tools/bench_digits.py", markdown_table(head, rows))


if __name__ == "__main__":
    main()
