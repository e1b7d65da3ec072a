"""Benchmark the rounding methods (rtn, mse, gptq, adaround), sensitivity and bias correction on real models.

    pip install '.[bench]'
    python tools/bench_rounding.py                      # digits, EfficientNet-Lite0, MiniLM -> docs/RESULTS.md
    python tools/bench_rounding.py --cases digits       # quick

At 4 and 3 bits, uniform and budget mode, every method with weight and with
output sensitivity, with and without bias correction; then the memory bound:
calibration with 256 samples, ours against ONNX Runtime's static quantizer.
Each quantization runs in a fresh process (tools/bench.py's worker), timed
once around the whole call (calibration included) with its peak RSS. The
section it writes replaces the one between the ``rounding`` markers in
docs/RESULTS.md; tools/bench.py keeps it when it rewrites the rest.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _table import bench_setup, generated_by, markdown_table, publish_section  # noqa: E402
from bench import BUDGET_OPTS, outputs, run_measured  # noqa: E402

METHODS = ("rtn", "mse", "gptq", "adaround")
# Calibration samples for the method comparison (EfficientNet's statistics cost ~0.25 s an image).
CALIB = {"digits": 256, "efficientnet": 64, "minilm": 128}
MEMORY_SAMPLES = 256


def unpadded_samples(feeds: list[dict[str, np.ndarray]]):
    """Each sample of each batch on its own, token inputs cut to their attention mask."""
    for feed in feeds:
        for j in range(len(next(iter(feed.values())))):
            sample = {name: a[j : j + 1] for name, a in feed.items()}
            if "attention_mask" in sample:
                length = int(sample["attention_mask"].sum())
                sample = {name: a[:, :length] for name, a in sample.items()}
            yield sample


def write_calib_folder(feeds: list[dict[str, np.ndarray]], folder: Path) -> Path:
    """One .npz per sample, so no sample is padded."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for k, sample in enumerate(unpadded_samples(feeds)):
        np.savez(folder / f"{k:05d}.npz", **sample)
    return folder


def write_ort_calib(feeds: list[dict[str, np.ndarray]], path: Path) -> Path:
    """tools/bench.py's format for ONNX Runtime's reader: one batch per sample, keys 'index:input'."""
    np.savez(path, **{f"{k}:{name}": a for k, sample in enumerate(unpadded_samples(feeds)) for name, a in sample.items()})
    return path


def configs() -> list[tuple[str, str, str, str, bool, list[str]]]:
    """(mode, bits, method, sensitivity, bias correction, CLI args); '{calib}' is filled in per case."""
    out = []
    for bits in ("4", "3"):
        for m in METHODS:
            for bc in (False, True):
                args = ["--bits", bits, "--method", m] + (["--bias-correction"] if bc else [])
                out.append(("uniform", bits, m, "-", bc, args))
    for bits in ("4", "3"):
        for sens in ("weight", "output"):
            for m in METHODS:
                args = ["--target-bits", bits, *BUDGET_OPTS, "--method", m, "--sensitivity", sens]
                out.append(("budget", bits, m, sens, False, args))
        out.append(("budget", bits, "gptq", "output", True, ["--target-bits", bits, *BUDGET_OPTS, "--method", "gptq",
                                                             "--sensitivity", "output", "--bias-correction"]))
    out.append(("budget, --search-with-method", "3", "gptq", "output", False,
                ["--target-bits", "3", *BUDGET_OPTS, "--method", "gptq", "--sensitivity", "output", "--search-with-method"]))
    return out


def needs_calib(args: list[str]) -> bool:
    return ("--bias-correction" in args or "output" in args or any(m in args for m in ("mse", "gptq", "adaround")))


def run_case(case, work: Path, log) -> tuple[str, list[dict]]:
    n = CALIB[case.name]
    folder = write_calib_folder(case.calib_feeds, work / f"{case.name}_rounding_calib")
    for extra in sorted(folder.glob("*.npz"))[n:]:
        extra.unlink()
    ref = outputs(case.model, case.eval_feeds)
    rows, data = [], []
    for mode, bits, method, sens, bc, args in configs():
        out = work / f"{case.name}_rounding.onnx"
        cli = [*args, "--calib", str(folder)] if needs_calib(args) else args
        seconds, rss = run_measured({"model": str(case.model), "out": str(out), "spec": {"cli": cli}, "calib": ""})
        scores = case.score(ref, outputs(out, case.eval_feeds))
        report = json.loads(Path(str(out) + ".json").read_text())
        kept = sum(t["rounding"]["method"] != method for t in report["tensors"])
        stored = report["totals"]["avg_bits"]
        data.append({"mode": mode, "bits": bits, "method": method, "sensitivity": sens, "bias_correction": bc,
                     "stored_bits": stored, "seconds": seconds, "rss_mb": rss, **scores})
        rows.append([mode, bits, method, sens, "yes" if bc else "no", f"{stored:.3f}",
                     *(f"{v:.4f}" for v in scores.values()), f"{seconds:.1f}", f"{rss:.0f}", str(kept)])
        log(f"  {mode} {bits} {method} {sens} bc={bc}: {case.metric_name} {scores[case.metric_name]:.4f} ({seconds:.1f} s)")
    fp32 = case.score(ref, ref)
    head = ["mode", "bits", "method", "sensitivity", "bias correction", "stored bits/weight", *fp32,
            "calibration + quantize s", "peak RSS MB", "tensors that kept mse"]
    text = (f"### {case.title}\n\n{n} calibration samples (unpadded, one .npz each), scores on "
            f"{sum(len(next(iter(f.values()))) for f in case.eval_feeds)} held-out samples; fp32 scores "
            + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()) + ".\n\n" + markdown_table(head, rows) + "\n")
    return text, data


def memory_case(case, work: Path, log) -> list[str]:
    """Peak RSS of calibration with MEMORY_SAMPLES samples: ours (GPTQ, uniform 4) against ORT's static quantizer."""
    feeds = case.calib_feeds
    have = sum(len(next(iter(f.values()))) for f in feeds)
    folder = write_calib_folder(feeds, work / f"{case.name}_memory_calib")
    ort_calib = write_ort_calib(feeds, work / f"{case.name}_memory_ort.npz")
    out = work / f"{case.name}_memory.onnx"
    rows = []
    for name, spec in (
        ("mixq-onnx --bits 4 --method gptq --calib", {"cli": ["--bits", "4", "--method", "gptq", "--calib", str(folder)]}),
        ("mixq-onnx --bits 4 (no calibration)", {"cli": ["--bits", "4"]}),
        ("ORT quantize_static (MinMax, QDQ)", {"ort": {"kind": "static", "weight": "QInt8"}}),
    ):
        try:
            seconds, rss = run_measured({"model": str(case.model), "out": str(out), "spec": spec, "calib": str(ort_calib)})
            rows.append([case.title, str(have), name, f"{seconds:.1f}", f"{rss:.0f}"])
        except RuntimeError as exc:
            rows.append([case.title, str(have), name, "failed", str(exc).splitlines()[-1][:80]])
        log(f"  memory {case.name}: {rows[-1]}")
    return rows


def main() -> None:
    from bench_cases import case_with_calibration

    args, work, t0 = bench_setup(__doc__, ROOT)
    parts, memory, summary = [], [], {}
    for name in args.cases.split(","):
        print(f"case {name}", flush=True)
        case = case_with_calibration(name, args.cache, MEMORY_SAMPLES)
        text, data = run_case(case, work, lambda s: print(s, flush=True))
        parts.append(text)
        summary[name] = data
        if name != "digits":
            memory += memory_case(case, work, lambda s: print(s, flush=True))
    minutes = (time.time() - t0) / 60
    section = (
        "## Rounding methods, sensitivity and bias correction\n\n"
        + generated_by("bench_rounding.py", args.cases, minutes) + " "
        "Each row is one fresh process, timed once around the whole call "
        "(statistics collection included) with its peak RSS. *uniform* rows have no search, so sensitivity does not "
        "apply; *budget* rows use --target-bits with channel, block32 and block128 layouts and INT2 allowed. "
        "*tensors that kept mse*: tensors where GPTQ/AdaRound did not beat the mse grid on the calibration data "
        "(or had no statistics) and kept it.\n\n" + "\n".join(parts)
    )
    if memory:
        section += (
            f"\n### Memory bound: calibration with {MEMORY_SAMPLES} samples\n\n"
            "Peak RSS of the whole process (model, calibration arrays, statistics and one batch of activations "
            "included). ONNX Runtime's static quantizer runs its default MinMax calibration over the same samples, "
            "one per batch.\n\n" + markdown_table(["model", "samples", "tool", "seconds", "peak RSS MB"], memory) + "\n"
        )
    publish_section(args.out, "rounding", section, summary, minutes)


if __name__ == "__main__":
    main()
