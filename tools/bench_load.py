"""How our LLM files load and run in ONNX Runtime, against ORT's own MatMulNBits files of the same model.

    python tools/bench_load.py                              # the 135M decoder -> docs/RESULTS.md "load"
    python tools/bench_load.py --model models/tiny_decoder.onnx --rounds 3 --no-write

For one decoder (by default .cache/bench/decoder_135m.onnx, which
tools/make_decoder.py builds: random weights, so only its times and memory
mean something here), this writes ORT's ``MatMulNBitsQuantizer`` files
(RTN and HQQ, 4 bits, block 32 and 128) and ours (``--bits 4`` at the same
blocks, and ``--rule kquant-mixed``), then measures each file in a process
of its own with default session options on 2 threads:

- load: seconds to create the InferenceSession (parse, optimise, fuse);
- RSS after load, and peak RSS after the runs (``ru_maxrss``);
- run: the median latency of a batch-1 forward pass over a 64-token prompt.

Files are measured round-robin, --rounds times, so that machine noise hits
all of them alike; the medians are reported with each file's ratios to
ORT's RTN file of the same block size. The goal (issue 21) is at most 1.2x
ORT's file in load time and memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from _table import markdown_table, replace_section  # noqa: E402
from bench_llm import ORT_NBITS  # noqa: E402

DEFAULT = ROOT / ".cache" / "bench" / "decoder_135m.onnx"

# One measurement, in a fresh process: load, RSS after load, median run latency, peak RSS.
PROBE = """
import json, resource, statistics, sys, time
import numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = 2
so.log_severity_level = 3
t = time.perf_counter()
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tokens = int(sys.argv[2])
feeds = {}
for i in sess.get_inputs():
    if i.type != "tensor(int64)":
        raise SystemExit(f"input {i.name} is {i.type}: this probe feeds token ids, masks and positions only")
    if "mask" in i.name:
        feeds[i.name] = np.ones((1, tokens), np.int64)
    elif "position" in i.name:
        feeds[i.name] = np.arange(tokens, dtype=np.int64)[None]
    else:
        feeds[i.name] = np.random.default_rng(0).integers(0, 200, (1, tokens)).astype(np.int64)
sess.run(None, feeds)
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append(time.perf_counter() - t)
print(json.dumps({"load": load, "rss_load": rss_load, "run": statistics.median(times),
                  "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def probe(path: Path, tokens: int, runs: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(tokens), str(runs)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(model: Path, work: Path) -> list[tuple[str, str, Path]]:
    """(label, peer label to compare with, path) for every file, written into ``work``."""
    files: list[tuple[str, str, Path]] = []
    for algo in ("rtn", "hqq"):
        for block in (32, 128):
            out = work / f"ort_{algo}_{block}.onnx"
            subprocess.run([sys.executable, "-c", ORT_NBITS, str(model), str(out), algo, str(block)], check=True,
                           capture_output=True)
            files.append((f"ORT MatMulNBits {algo.upper()} block{block}", f"ORT MatMulNBits RTN block{block}", out))
    mixq = [sys.executable, "-m", "mixq_onnx.cli", str(model), "--no-verify", "--quiet"]
    for block in (32, 128):
        out = work / f"mixq_block{block}.onnx"
        subprocess.run([*mixq, "-o", str(out), "--bits", "4", "--granularity", f"block{block}"], check=True)
        files.append((f"mixq --bits 4 --granularity block{block}", f"ORT MatMulNBits RTN block{block}", out))
    out = work / "mixq_kquant.onnx"
    subprocess.run([*mixq, "-o", str(out), "--rule", "kquant-mixed"], check=True)
    files.append(("mixq --rule kquant-mixed", "ORT MatMulNBits RTN block128", out))
    files.append(("fp32", "ORT MatMulNBits RTN block32", model))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=5, help="measurements per file, round-robin (default 5)")
    ap.add_argument("--tokens", type=int, default=64, help="prompt length of the timed runs (default 64)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} not found: build it with python tools/make_decoder.py {args.model}")
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    files = build(args.model, work)
    seen: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in files}
    for r in range(args.rounds):
        for label, _, path in files:
            seen[label].append(probe(path, args.tokens, args.runs))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {label: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for label, ms in seen.items()}
    rows, data = [], []
    for label, peer, path in files:
        m, p = med[label], med[peer]
        ratios = {k: m[k] / p[k] for k in m}
        data.append({"file": label, "bytes": path.stat().st_size, "peer": peer, **m,
                     **{f"{k}_ratio": v for k, v in ratios.items()}})
        rows.append([label, f"{path.stat().st_size / 1e6:.1f}", f"{m['load']:.2f}", f"{ratios['load']:.2f}x",
                     f"{m['rss_load'] / 2**20:.0f}", f"{m['rss_peak'] / 2**20:.0f}", f"{ratios['rss_peak']:.2f}x",
                     f"{m['run'] * 1e3:.1f}", f"{ratios['run']:.2f}x", peer.replace("ORT MatMulNBits ", "ORT ")])
    head = ["file", "MB", "load s", "load vs peer", "RSS after load MB", "peak RSS MB", "peak vs peer",
            f"run ms ({args.tokens} tokens)", "run vs peer", "peer"]
    table = markdown_table(head, rows)
    print(table)
    if args.no_write:
        return
    import onnxruntime

    machine = f"{platform.machine()}, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    command = "python tools/bench_load.py" + ("" if args.model == DEFAULT else f" --model {args.model}")
    (ROOT / "docs" / "results-load.json").write_text(json.dumps({"machine": machine, "command": command,
                                                                 "rows": data}, indent=1) + "\n")
    text = (f"## Loading LLM files in ONNX Runtime, against ORT's own MatMulNBits files\n\nGenerated by `{command}` "
            f"({machine}; 2 cores). The model is {args.model.name} (tools/make_decoder.py: 135M parameters, llama "
            "architecture, a tied 49152 x 576 embedding, random weights, so only time and memory mean something). "
            "Each file is loaded in a process of its own with default session options on 2 threads; medians of "
            f"{args.rounds} round-robin rounds. Load is the InferenceSession's creation; run is a batch-1 forward "
            f"pass over {args.tokens} tokens. Ratios are to ORT's RTN file at the same block size (the k-quant "
            "rule against block 128). ORT's files keep the tied table in float (the projection reads it through a "
            "Transpose, which their quantizer skips); ours store it once, 4-bit and transposed, so the projection "
            "runs as MatMulNBits and the lookup dequantizes only the rows it gathers.\n\n" + table + "\n")
    replace_section(ROOT / "docs" / "RESULTS.md", "load", text)
    print("updated docs/RESULTS.md")


if __name__ == "__main__":
    main()
