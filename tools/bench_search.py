"""Benchmark the bit-width searches at the uniform-INT4 size: weight, output and end-to-end sensitivity.

    pip install '.[bench]'
    python tools/bench_search.py                    # digits, EfficientNet-Lite0, MiniLM -> docs/RESULTS.md
    python tools/bench_search.py --cases digits     # quick

For each model: uniform 4 and 8 bits as yardsticks, then ``--target-bits 4``
(the bytes of uniform 4-bit per-channel) and ``--max-size`` at the
uniform-INT4 file plus a quarter of its weights' bytes (1.25x for the
weights; ``--max-size`` covers the whole file), each data-free and with 32 calibration samples, with round-to-nearest
and GPTQ, and with weight, output (calibration only) and end-to-end
sensitivity. The searches run with their default option set (per-channel,
per-tensor and block 32/64/128; no INT2). Each row is one fresh process,
timed around the whole call (statistics and end-to-end measurements
included) with its peak RSS; scores are on held-out samples. The section
replaces the one between the ``search`` markers in docs/RESULTS.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _table import markdown_table, run_cases  # noqa: E402
from bench import outputs, run_measured  # noqa: E402
from bench_rounding import write_calib_folder  # noqa: E402

CALIB_SAMPLES = 32


def configs(int4_bytes: int, int4_file: int) -> list[tuple[str, str, str, str, list[str]]]:
    """(budget, data, method, sensitivity, CLI args); '{calib}' marks the calibration folder."""
    out = [("uniform 8", "none", "rtn", "-", ["--bits", "8"]),
           ("uniform 4", "none", "rtn", "-", ["--bits", "4"]),
           ("uniform 4", "calib", "gptq", "-", ["--bits", "4", "--method", "gptq", "--calib", "{calib}"])]
    # --max-size is the whole file: the uniform-INT4 file plus a quarter of its weights' bytes gives the weights 1.25x.
    roomy = str(int(int4_file + 0.25 * int4_bytes))
    for budget, args in (("--target-bits 4", ["--target-bits", "4"]), ("--max-size 1.25x INT4", ["--max-size", roomy])):
        for sens in ("weight", "e2e"):
            out.append((budget, "none", "rtn", sens, [*args, "--sensitivity", sens]))
        for method in ("rtn", "gptq"):
            for sens in ("weight", "output", "e2e"):
                out.append((budget, "calib", method, sens, [*args, "--sensitivity", sens, "--method", method, "--calib", "{calib}"]))
    return out


def run_case(case, work: Path, log) -> tuple[str, list[dict]]:
    folder = write_calib_folder(case.calib_feeds, work / f"{case.name}_search_calib")
    for extra in sorted(folder.glob("*.npz"))[CALIB_SAMPLES:]:
        extra.unlink()
    ref = outputs(case.model, case.eval_feeds)
    out = work / f"{case.name}_search.onnx"
    run_measured({"model": str(case.model), "out": str(out), "spec": {"cli": ["--bits", "4"]}, "calib": ""})
    int4 = json.loads(Path(str(out) + ".json").read_text())["totals"]["quantized_bytes"]
    rows, data = [], []
    for budget, source, method, sens, args in configs(int4, out.stat().st_size):
        cli = [str(folder) if a == "{calib}" else a for a in args]
        seconds, rss = run_measured({"model": str(case.model), "out": str(out), "spec": {"cli": cli}, "calib": ""})
        scores = case.score(ref, outputs(out, case.eval_feeds))
        report = json.loads(Path(str(out) + ".json").read_text())
        search = report["search"]
        returned = search.get("returned", "-")
        mixed = len({(t["chosen"]["bits"], t["chosen"]["granularity"]) for t in report["tensors"]})
        data.append({"budget": budget, "data": source, "method": method, "sensitivity": sens, "bytes": report["totals"]["quantized_bytes"],
                     "stored_bits": report["totals"]["avg_bits"], "returned": returned, "seconds": seconds, "rss_mb": rss,
                     "distance": search.get("distance"), **scores})
        rows.append([budget, source, method, sens, f"{report['totals']['quantized_bytes'] / int4:.3f}", f"{report['totals']['avg_bits']:.3f}",
                     *(f"{v:.4f}" for v in scores.values()), returned, str(mixed), f"{seconds:.1f}", f"{rss:.0f}"])
        log(f"  {budget} {source} {method} {sens}: {case.metric_name} {scores[case.metric_name]:.4f} ({seconds:.1f} s, {returned})")
    fp32 = case.score(ref, ref)
    head = ["budget", "calibration", "method", "sensitivity", "bytes / INT4", "stored bits/weight", *fp32,
            "plan returned", "distinct (bits, layout)", "seconds", "peak RSS MB"]
    text = (f"### {case.title}\n\nUniform INT4 per-channel weights: {int4} bytes. Calibration: the first {CALIB_SAMPLES} "
            f"samples (unpadded, one .npz each); data-free rows measure on generated inputs. Scores on "
            f"{sum(len(next(iter(f.values()))) for f in case.eval_feeds)} held-out samples; fp32 scores "
            + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()) + ".\n\n" + markdown_table(head, rows) + "\n")
    return text, data


def main() -> None:
    run_cases(__doc__, ROOT, "bench_search.py", "search",
              "Bit-width search at the uniform-INT4 size: weight, output and end-to-end sensitivity",
              "*plan returned*: the plan the search measured best end to end among itself and the uniform plans that fit "
              "(`searched`, or the uniform rival that won). *bytes / INT4*: quantized weight bytes over those of uniform "
              "4-bit per-channel.", run_case)


if __name__ == "__main__":
    main()
