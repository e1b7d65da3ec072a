"""Benchmark deployment speed on ONNX Runtime CPU: fp32 vs weight-only vs full QDQ vs ORT's own quantizer, same run.

    pip install '.[bench]'
    python tools/bench_deploy.py        # EfficientNet-Lite0 (two exports), all-MiniLM-L6-v2 -> docs/RESULTS.md
    python tools/bench_deploy.py --cases minilm

For each model: latency at batch 1 with 1 and 2 threads (MiniLM also at
sequence lengths 16 and 128), as the median of --runs runs with every model
of a case interleaved in the same run so that machine noise hits all alike;
accuracy against fp32 on held-out inputs; the integer kernels in ORT's
optimised graph and the nodes that still compute in float between integer
ops (`mixq-onnx check --target ort-cpu` warnings); and `mixq-onnx check`
violations for each target. The peer is ONNX Runtime's `quantize_static`
(QDQ, int8 per-channel weights, uint8 activations) on the same file and
calibration samples. The section it writes replaces the one between the
``deployment`` markers in docs/RESULTS.md.
"""

from __future__ import annotations

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
from bench import outputs  # noqa: E402
from bench_rounding import write_calib_folder, write_ort_calib  # noqa: E402

CASES = "efficientnet,efficientnet_pad,minilm"
THREADS = (1, 2)
SEQUENCES = (16, 128)
PEER = "peer: ORT quantize_static QDQ (W int8 per-channel, A uint8)"


def variants(name: str) -> list[tuple[str, list[str]]]:
    """(label, CLI args) per case; '{calib}' is filled in, and the PEER label runs ORT's quantizer instead."""
    preset = ["--target", "ort-cpu", "--activations", "auto", "--calib", "{calib}"]
    if name == "minilm":
        return [
            ("weight-only int8 (default)", []),
            ("weight-only INT4 block32 (embeddings too), ort-cpu, gptq",
             ["--target", "ort-cpu", "--bits", "4", "--granularity", "block32", "--method", "gptq", "--calib", "{calib}"]),
            ("weight-only INT4 block32, ort-cuda, gptq",
             ["--target", "ort-cuda", "--bits", "4", "--granularity", "block32", "--method", "gptq", "--calib", "{calib}"]),
            ("W8A8 ort-cpu preset, no smoothing", preset),
            ("W8A8 ort-cpu preset + --smooth", [*preset, "--smooth"]),
            ("W8A8 ort-cpu preset + --smooth, gptq", [*preset, "--smooth", "--method", "gptq"]),
            ("W8A8 ort-cpu preset + --smooth + --quantize-attention", [*preset, "--smooth", "--quantize-attention"]),
            ("W8A8 tensorrt, --smooth", ["--target", "tensorrt", "--activations", "auto", "--smooth", "--calib", "{calib}"]),
            (PEER, []),
        ]
    return [
        ("weight-only int8 (default)", []),
        ("W8A8 ort-cpu preset (--activations auto = uint8), gptq, percentile", [*preset, "--method", "gptq", "--calib-method", "percentile"]),
        ("W8A8 ort-cpu, --activations int8 (warned), gptq, percentile",
         ["--target", "ort-cpu", "--activations", "int8", "--method", "gptq", "--calib-method", "percentile", "--calib", "{calib}"]),
        ("W8A8 tensorrt (int8), gptq, percentile",
         ["--target", "tensorrt", "--activations", "auto", "--method", "gptq", "--calib-method", "percentile", "--calib", "{calib}"]),
        (PEER, []),
    ]


def _session(path: Path, threads: int = 1, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    # Interleaved sessions: an idle session's spinning worker threads would steal the cores from the one being timed.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = profile
    so.profile_file_prefix = str(path.parent / "profile")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, Path], one: dict[str, np.ndarray], runs: int, threads: int) -> dict[str, float]:
    """Median latency of each model on the batch-1 feed ``one``, interleaved so that machine noise hits all alike."""
    sessions = {k: _session(p, threads) for k, p in paths.items()}
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


def latency_feeds(case) -> dict[str, dict[str, np.ndarray]]:
    """Batch-1 inputs per latency setting: the first held-out sample, and for MiniLM its tokens repeated to 16 and 128."""
    first = {k: v[:1] for k, v in case.eval_feeds[0].items()}
    if "input_ids" not in first:
        return {"": first}
    ids = first["input_ids"][0][first["attention_mask"][0] > 0]
    out = {}
    for n in SEQUENCES:
        row = np.resize(ids, n)[None].astype(np.int64)
        out[f"seq {n}"] = {"input_ids": row, "attention_mask": np.ones_like(row), "token_type_ids": np.zeros_like(row)}
    return out


def _peer(case, calib_feeds, out: Path, work: Path) -> None:
    """ONNX Runtime's static QDQ quantizer with the defaults its documentation recommends for CPU."""
    from bench import _calib_reader
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calib = write_ort_calib(calib_feeds, work / f"{case.name}_deploy_ort_calib.npz")
    quantize_static(str(case.model), str(out), _calib_reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def run_case(case, work: Path, runs: int, log) -> tuple[str, dict]:
    from mixq_onnx.graph.check import check_model
    from mixq_onnx.cli import main as cli
    from mixq_onnx.config import Target
    from mixq_onnx.runtime.fusion import ort_fusion
    import onnx

    calib = write_calib_folder(case.calib_feeds, work / f"{case.name}_deploy_calib")
    ref = outputs(case.model, case.eval_feeds)
    paths = {"fp32": case.model}
    commands = {}
    for label, args in variants(case.name):
        out = work / f"{case.name}_deploy_{len(paths)}.onnx"
        cli_args = [str(calib) if a == "{calib}" else a for a in args]
        t0 = time.perf_counter()
        if label == PEER:
            _peer(case, case.calib_feeds, out, work)
        else:
            try:
                cli.main(args=[str(case.model), "-o", str(out), "--no-verify", "-q", *cli_args], standalone_mode=False)
            except SystemExit as exc:
                if exc.code:
                    raise
            commands[label] = cli_args
        paths[label] = out
        log(f"  quantized {label} in {time.perf_counter() - t0:.1f} s")
    settings = [(t, name, feed) for t in THREADS for name, feed in latency_feeds(case).items()]
    lat = {(t, name): latencies(paths, feed, runs, t) for t, name, feed in settings}
    rows, data = [], {}
    for label, path in paths.items():
        scores = case.score(ref, outputs(path, case.eval_feeds))
        fusion = ort_fusion(path)
        model = onnx.load(str(path))
        checks = {t.value: len(check_model(model, t)) for t in Target}
        timing = {f"{t}T {name}".strip(): (lat[(t, name)][label], lat[(t, name)]["fp32"] / lat[(t, name)][label]) for t, name, _ in settings}
        data[label] = {"MB": path.stat().st_size / 1e6, "scores": scores, "latency_ms": {k: v[0] for k, v in timing.items()},
                       "speed_up": {k: v[1] for k, v in timing.items()}, "fused": fusion.fused, "float_between_integer_ops": len(fusion.findings)}
        rows.append([label, f"{path.stat().st_size / 1e6:.2f}", *(f"{v:.4f}" for v in scores.values()),
                     *(f"{ms:.3g} ({x:.2f}x)" for ms, x in timing.values()),
                     "" if label == "fp32" else (", ".join(f"{k} {v}" for k, v in fusion.fused.items()) or "none"),
                     "" if label == "fp32" else str(len(fusion.findings)),
                     " ".join(f"{k}:{v}" for k, v in checks.items()) if label != "fp32" else ""])
        log(f"  {label}: {case.metric_name} {scores[case.metric_name]:.4f}; " + ", ".join(f"{k} {v[1]:.2f}x" for k, v in timing.items()))
    head = ["model", "MB", *case.score(ref, ref), *(f"batch 1, {t} thread{'s' if t > 1 else ''}{', ' + n if n else ''}: ms (vs fp32)"
                                                      for t, n, _ in settings),
            "integer kernels after ORT optimisation", "float ops between integer ops", "check violations per target"]
    cmds = "\n".join(f"- {label}: `mixq-onnx MODEL -o OUT {' '.join(a if a != str(calib) else 'CALIB_DIR' for a in args)}`"
                     for label, args in commands.items())
    text = (f"### {case.title}\n\n{len(list(calib.glob('*.npz')))} calibration samples; scores on "
            f"{sum(len(next(iter(f.values()))) for f in case.eval_feeds)} held-out samples.\n\n"
            + markdown_table(head, rows) + "\n\n" + cmds + "\n")
    return text, data


def main() -> None:
    ap = bench_arguments(__doc__.splitlines()[0], ROOT)
    ap.set_defaults(cases=CASES)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    from bench_cases import CASES as ALL

    t0 = time.time()
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    parts, summary = [], {}
    for name in args.cases.split(","):
        print(f"case {name}", flush=True)
        text, summary[name] = run_case(ALL[name](args.cache), work, args.runs, lambda s: print(s, flush=True))
        parts.append(text)
    minutes = (time.time() - t0) / 60
    section = (
        "## Deployment speed on ONNX Runtime CPU: weight-only, W8A8 presets and ORT's own quantizer\n\n"
        + generated_by("bench_deploy.py", args.cases, minutes) + " "
        f"Latency: median of {args.runs} runs per model at batch 1, with 1 and 2 intra-op threads (thread spinning off, "
        "so that the sessions of the other models, run in between, do not steal the cores), ORT_ENABLE_ALL; the "
        "models of a case run interleaved in the same process, and speed-ups are ratios within that run. MiniLM runs at "
        "sequence lengths 16 and 128 (the first held-out sentence's tokens repeated). *integer kernels*: the fused integer "
        "ops in ORT's optimised graph. *float ops between integer ops*: nodes of that graph that still compute in float "
        "between quantized tensors (`mixq-onnx check --target ort-cpu` warnings). *check violations*: `mixq-onnx check` "
        "of the file against each target (0 = follows its rules). The GPU section below runs these files on the CUDA "
        "and TensorRT providers.\n\n" + "\n".join(parts)
    )
    replace_section(args.out / "RESULTS.md", "deployment", section)
    (args.out / "results-deployment.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(section)
    print(f"updated {args.out / 'RESULTS.md'} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
