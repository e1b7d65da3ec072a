"""Benchmark deployment speed: fp32 vs weight-only vs full QDQ on ONNX Runtime CPU, with fused-op counts.

    pip install '.[bench]'
    python tools/bench_deploy.py                      # digits, EfficientNet-Lite0, MiniLM -> docs/RESULTS.md
    python tools/bench_deploy.py --cases digits

For each model: latency (median of --runs single-sample runs, one thread,
ORT_ENABLE_ALL, every model of a case in the same run), the time ONNX
Runtime's profiler attributes to each op type (MatMul-like ops separately),
accuracy against fp32, the quantized ops in ORT's optimised graph, and the
number of `mixq-onnx check` violations for each target. The section it writes
replaces the one between the ``deployment`` markers in docs/RESULTS.md.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _table import bench_arguments, generated_by, markdown_table, replace_section  # noqa: E402
from bench import op_counts, outputs  # noqa: E402
from bench_rounding import write_calib_folder  # noqa: E402

MATMUL_OPS = {"MatMul", "MatMulNBits", "FusedMatMul", "Gemm", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
              "DynamicQuantizeMatMul", "MatMulInteger"}


def variants(name: str) -> list[tuple[str, list[str]]]:
    """(label, CLI args) per case; '{calib}' is filled in."""
    weight_only = [("weight-only int8 (default)", [])]
    if name == "minilm":
        return weight_only + [
            ("weight-only INT4 block32, ort-cpu", ["--target", "ort-cpu", "--bits", "4", "--granularity", "block32", "--method", "gptq",
                                                  "--calib", "{calib}"]),
            ("weight-only INT4 block128, ort-cpu", ["--target", "ort-cpu", "--bits", "4", "--granularity", "block128", "--method", "gptq",
                                                   "--calib", "{calib}"]),
            ("W8 + A8 (uint8), ort-cpu", ["--target", "ort-cpu", "--activations", "uint8", "--calib-method", "percentile",
                                         "--calib", "{calib}"]),
        ]
    return weight_only + [
        ("W8 + A8 (uint8), ort-cpu, minmax", ["--target", "ort-cpu", "--activations", "uint8", "--calib", "{calib}"]),
        ("W8 + A8 (uint8), ort-cpu, gptq + percentile", ["--target", "ort-cpu", "--activations", "uint8", "--method", "gptq",
                                                        "--calib-method", "percentile", "--calib", "{calib}"]),
        ("W8 + A8 (int8), ort-cpu, gptq + percentile", ["--target", "ort-cpu", "--activations", "int8", "--method", "gptq",
                                                       "--calib-method", "percentile", "--calib", "{calib}"]),
        ("W8 + A8 (int8), tensorrt, gptq + percentile", ["--target", "tensorrt", "--activations", "int8", "--method", "gptq",
                                                        "--calib-method", "percentile", "--calib", "{calib}"]),
    ]


def _session(path: Path, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.enable_profiling = profile
    so.profile_file_prefix = str(path.parent / "profile")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median single-sample latency of each model, interleaved so that machine noise hits all alike."""
    one = {k: v[:1] for k, v in feed.items()}
    sessions = {k: _session(p) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, one)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, one)
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def op_time(path: Path, feed: dict[str, np.ndarray], runs: int = 10) -> dict[str, float]:
    """ms per run that ORT's profiler attributes to each op type."""
    one = {k: v[:1] for k, v in feed.items()}
    s = _session(path, profile=True)
    for _ in range(runs):
        s.run(None, one)
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return dict(per)


def run_case(case, work: Path, runs: int, log) -> str:
    from mixq_onnx.check import check_model
    from mixq_onnx.cli import main as cli
    from mixq_onnx.config import Target
    import onnx

    calib = write_calib_folder(case.calib_feeds, work / f"{case.name}_deploy_calib")
    ref = outputs(case.model, case.eval_feeds)
    paths = {"fp32": case.model}
    rows_meta = {}
    for label, args in variants(case.name):
        out = work / f"{case.name}_deploy_{len(paths)}.onnx"
        cli_args = [str(calib) if a == "{calib}" else a for a in args]
        t0 = time.perf_counter()
        try:
            cli.main(args=[str(case.model), "-o", str(out), "--no-verify", "-q", *cli_args], standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
        rows_meta[label] = (time.perf_counter() - t0, cli_args)
        paths[label] = out
        log(f"  quantized {label} in {rows_meta[label][0]:.1f} s")
    lat = latencies(paths, case.eval_feeds[0], runs)
    rows, mms = [], []
    for label, path in paths.items():
        scores = case.score(ref, outputs(path, case.eval_feeds))
        ops = op_time(path, case.eval_feeds[0])
        mm = sum(v for k, v in ops.items() if k in MATMUL_OPS)
        model = onnx.load(str(path))
        checks = {t.value: len(check_model(model, t)) for t in Target}
        mms.append(mm)
        rows.append([label, f"{path.stat().st_size / 1e6:.2f}", *(f"{v:.4f}" for v in scores.values()), f"{lat[label]:.3f}",
                     f"{lat['fp32'] / lat[label]:.2f}x", "", "" if label == "fp32" else op_counts(path),
                     " ".join(f"{k}:{v}" for k, v in checks.items()) if label != "fp32" else ""])
        log(f"  {label}: {case.metric_name} {scores[case.metric_name]:.4f}, {lat[label]:.2f} ms ({lat['fp32'] / lat[label]:.2f}x)")
    col = len(rows[0]) - 3  # the MatMul/Gemm column
    for r, mm in zip(rows, mms):
        r[col] = f"{mm:.3f} ({mms[0] / mm:.2f}x)" if mm > 0 else f"{mm:.3f}"
    head = ["model", "MB", *case.score(ref, ref), "latency ms", "speed-up vs fp32", "MatMul/Gemm ms (speed-up)",
            "quantized ops after ORT optimisation", "check violations per target"]
    cmds = "\n".join(f"- {label}: `mixq-onnx MODEL -o OUT {' '.join(a if a != str(calib) else 'CALIB_DIR' for a in args)}`"
                     for label, (_, args) in rows_meta.items())
    return (f"### {case.title}\n\n{len(list(calib.glob('*.npz')))} calibration samples; scores on "
            f"{sum(len(next(iter(f.values()))) for f in case.eval_feeds)} held-out samples.\n\n"
            + markdown_table(head, rows) + "\n\n" + cmds + "\n")


def main() -> None:
    ap = bench_arguments(__doc__.splitlines()[0], ROOT)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    from bench_cases import CASES

    t0 = time.time()
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    parts = []
    for name in args.cases.split(","):
        print(f"case {name}", flush=True)
        parts.append(run_case(CASES[name](args.cache), work, args.runs, lambda s: print(s, flush=True)))
    minutes = (time.time() - t0) / 60
    section = (
        "## Deployment speed: weight-only vs activation quantization on ONNX Runtime CPU\n\n"
        + generated_by("bench_deploy.py", args.cases, minutes) + " "
        f"Latency: median of {args.runs} single-sample runs per model, one thread, "
        "ORT_ENABLE_ALL, the models of a case interleaved in the same run; speed-ups are ratios within that run. "
        "*MatMul/Gemm ms*: time ORT's profiler gives MatMul-like kernels (MatMul, MatMulNBits, Gemm, QGemm, QLinearMatMul, "
        "MatMulIntegerToFloat) per run. *check violations*: `mixq-onnx check` of that file against each target "
        "(0 = follows its rules). GPU providers were not run here; see README, Targets.\n\n" + "\n".join(parts)
    )
    replace_section(args.out / "RESULTS.md", "deployment", section)
    print(section)
    print(f"updated {args.out / 'RESULTS.md'} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
