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
options it checked.

Then a budget sweep with ``--sensitivity-cache`` (calibration data): a cold
run at 4.5 bits, then warm runs at 4, 5, 6 and 4.5 bits; each row gives its
time against the cold run's, and the accuracy-size curve the cold run
predicted is plotted with the distance each warm run measured
(docs/plots/curve_CASE.png).

With ``--ocr``, OCR-class models with large inputs are built
(tools/make_ocr_models.py: a CRNN recognizer at 3 x 48 x 320 and a DBNet-style
detector at 3 x 640 x 640, random weights) and quantized with
``--calib`` (32 samples) ``--target-bits 4 --method gptq``.

The section replaces the one between the ``scaling`` markers in docs/RESULTS.md.
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
SWEEP = ("4.5", "4", "5", "6", "4.5")


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
    sweep_text, sweep = run_sweep(case, folder, ref, work, log)
    text = (f"### {case.title}\n\nCalibration: the first {CALIB_SAMPLES} samples; data-free rows measure on generated "
            f"inputs. Scores on {sum(len(next(iter(f.values()))) for f in case.eval_feeds)} held-out samples; fp32 "
            + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()) + ".\n\n" + markdown_table(head, rows) + "\n\n"
            + sweep_text)
    return text, data + sweep


def run_sweep(case, folder: Path, ref, work: Path, log) -> tuple[str, list[dict]]:
    """Budgets one after another on one --sensitivity-cache: the cold run's curve against what each run measured."""
    cache = work / f"{case.name}_sensitivity.json"
    cache.unlink(missing_ok=True)
    out = work / f"{case.name}_sweep.onnx"
    rows, data, curve, cold = [], [], [], None
    for k, budget in enumerate(SWEEP):
        cli = ["--target-bits", budget, "--calib", str(folder), "--sensitivity-cache", str(cache)]
        seconds, rss = run_measured({"model": str(case.model), "out": str(out), "spec": {"cli": cli}, "calib": ""})
        report = json.loads(Path(str(out) + ".json").read_text())
        scores = case.score(ref, outputs(out, case.eval_feeds))
        info = report["end_to_end"].get("sensitivity_cache", {})
        cold = cold or seconds
        curve = curve or report.get("curve", [])
        row = {"sweep": k, "budget": budget, "seconds": seconds, "rss_mb": rss, "hits": info.get("hits"),
               "misses": info.get("misses"), "distance": report["search"].get("distance"),
               "bytes": report["totals"]["quantized_bytes"], "curve": report.get("curve") if k == 0 else None, **scores}
        data.append(row)
        rows.append([budget, "cold" if k == 0 else "warm", str(info.get("hits")), str(info.get("misses")),
                     f"{report['search'].get('distance', float('nan')):.4g}", f"{scores[case.metric_name]:.4f}",
                     f"{seconds:.1f}", f"{seconds / cold:.2f}"])
        log(f"  sweep --target-bits {budget}: {seconds:.1f} s ({seconds / cold:.2f} of cold), hits {info.get('hits')}")
    plot_curve(case, curve, data, ROOT / "docs" / "plots" / f"curve_{case.name}.png")
    head = ["--target-bits", "cache", "reused", "measured", "distance (measured)", case.metric_name, "seconds", "/ cold"]
    text = (f"Budget sweep on one `--sensitivity-cache` (calibration data; each run verifies nothing, `--no-verify`): "
            f"![curve](plots/curve_{case.name}.png)\n\n" + markdown_table(head, rows) + "\n")
    return text, data


def plot_curve(case, curve: list[dict], runs: list[dict], path: Path) -> None:
    """The cold run's predicted curve (distance against weight bytes) and the distances the sweep's runs measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    ax.plot([p["bytes"] / 1e6 for p in curve], [p["predicted"] for p in curve], "o-", label="predicted (one cold run)")
    ax.scatter([r["bytes"] / 1e6 for r in runs], [r["distance"] for r in runs], color="C3", marker="x", s=60, zorder=3,
               label="measured by each run of the sweep")
    for p in curve:
        ax.annotate(f"{p['target_bits']:g}", (p["bytes"] / 1e6, p["predicted"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("quantized weight bytes (MB); labels: --target-bits")
    ax.set_ylabel("end-to-end distance")
    ax.set_title(f"{case.title}: accuracy-size curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def ocr_section(work: Path, log) -> tuple[str, list[dict]]:
    """OCR-class models with large inputs: --calib (32 samples) --target-bits 4 --method gptq, time and peak RSS."""
    from make_ocr_models import build

    folder = work / "ocr"
    models = build(folder)
    rows, data = [], []
    for model in models:
        out = work / f"{model.stem}_q.onnx"
        calib = folder / f"{model.stem}_calib"
        cli = ["--target-bits", "4", "--method", "gptq", "--calib", str(calib), "--holdout", "0"]
        seconds, rss = run_measured({"model": str(model), "out": str(out), "spec": {"cli": cli}, "calib": ""})
        report = json.loads(Path(str(out) + ".json").read_text())
        s, e2e = report["search"], report["end_to_end"]
        uniform = min((m["distance"] for m in s.get("measured", []) if m["plan"] == "uniform 4 bits channel"), default=None)
        proxy = e2e.get("block_proxy") or {}
        row = {"model": model.stem, "seconds": seconds, "rss_mb": rss, "distance": s.get("distance"),
               "uniform_channel_distance": uniform, "rank_correlation": proxy.get("rank_correlation"),
               "exponent": proxy.get("exponent"), "model_runs": e2e.get("evaluations")}
        data.append(row)
        rows.append([model.stem, f"{s.get('distance', float('nan')):.4g}", "-" if uniform is None else f"{uniform:.4g}",
                     str(e2e.get("evaluations")), f"{proxy.get('rank_correlation') or float('nan'):.3f}",
                     f"{proxy.get('exponent') or float('nan'):.2f}", f"{seconds:.1f}", f"{rss:.0f}"])
        log(f"  {model.stem}: {seconds:.1f} s, {rss:.0f} MB")
    head = ["model", "distance (searched)", "uniform 4-bit channel", "whole-model runs", "proxy rank corr.",
            "exponent", "seconds", "peak RSS MB"]
    text = ("### OCR-class models with large inputs\n\n`--calib` (32 samples, all used: `--holdout 0`) `--target-bits 4 "
            "--method gptq`, block-wise evaluation, models from `tools/make_ocr_models.py` (random weights: time and "
            "memory, not accuracy). Goal: at most 5 minutes on 2 cores.\n\n" + markdown_table(head, rows) + "\n")
    return text, data


def main() -> None:
    ocr = "--ocr" in sys.argv
    if ocr:
        sys.argv.remove("--ocr")
    extra = [ocr_section] if ocr else []
    run_cases(__doc__, ROOT, "bench_scaling.py" + (" --ocr" if ocr else ""), "scaling",
              "End-to-end search: block-wise against whole-model evaluation",
              "*whole-model runs*: forward passes of the whole model the search made (probes, checks, plan checks); "
              "*proxy rank corr.*: Spearman correlation of the block-wise proxy with end-to-end distances on the options "
              "it checked (held out from the gain and exponent fit). Each row is one fresh process.", run_case, extra)


if __name__ == "__main__":
    main()
