"""Benchmark: time to build the error table (find weights + measure every bit-width) on real topologies.

    python tools/bench_measure.py [--repeats 3] [--models resnet50,vgg19]

Uses the ResNet-50 (25.5M parameters) and VGG-19 (143.7M) topologies from
onnx's backend test data with seeded weights (tests/light_models.py).
Prints a table of medians and writes it, with the command, to
docs/bench_measure.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _table import markdown_table, publish  # noqa: E402
from mixq_onnx import Layout, QuantConfig  # noqa: E402
from mixq_onnx.find import find_weights  # noqa: E402
from mixq_onnx.measure import Capabilities, measure  # noqa: E402
from tests.light_models import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="resnet50,vgg19")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_measure.md")
    args = ap.parse_args()
    layouts = {"channel": (Layout.parse("channel"),), "channel+block32+block128": tuple(Layout.parse(x) for x in ("channel", "block32", "block128"))}
    rows = []
    for name in args.models.split(","):
        model = build(name)
        for label, lays in layouts.items():
            config = QuantConfig(layouts=lays, min_elements=0)
            caps = Capabilities(21, False)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                inv = find_weights(model, config)
                tables = measure(inv.weights, config, caps, config.candidate_bits)
                times.append(time.perf_counter() - t0)
            params = sum(w.params for w in inv.weights)
            options = sum(len(t.options) for t in tables)
            rows.append((name, f"{params / 1e6:.1f}M", str(len(inv.weights)), label, str(options), f"{statistics.median(times):.2f}"))
    head = ("model", "params", "tensors", "layouts", "options measured", "median s")
    command = ("python tools/bench_measure.py " + " ".join(sys.argv[1:])).strip()
    publish(args.out, "Error-table benchmark", f"Bits 2-8 for every weight, asymmetric; median of {args.repeats} runs.",
            command, markdown_table(head, rows))


if __name__ == "__main__":
    main()
