"""Peak memory and time of mixq-onnx on generated decoder stacks of growing size, against ONNX Runtime's MatMulNBits.

    python tools/bench_memory.py                         # 0.7, 2, 4 and 8 GB stacks -> docs/RESULTS.md "memory"
    python tools/bench_memory.py --sizes 0.7 --repeats 1 --no-write   # a quick look
    python tools/bench_memory.py --decoder .cache/bench/decoder_135m.onnx   # a 135M decoder -> "decoder"

Stacks come from tools/make_stack.py (fp32, external data, hidden 2048: the
largest weight is 2048 x 8192 fp32 = 64 MiB) and are cached in --dir. Every
run is its own process; its peak RSS is the kernel's ``ru_maxrss`` for that
process (file-backed pages it touched included), its time the wall clock
around it; the median of --repeats is reported (one run from 3 GB up). The goal for mixq's runs is
1.5 GB plus three times the largest weight. ORT's quantizer
(``MatMulNBitsQuantizer``, 4 bits, block 32, symmetric) runs in the same
session, so time ratios compare runs on the same machine state.

``--decoder PATH`` measures the data-free searches and ORT's HQQ on one
decoder instead (tools/make_decoder.py builds a 135M-parameter one with
random weights: its times and memory are those of a real one, its
distances mean nothing) and writes docs/RESULTS.md "decoder".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from _table import markdown_table, replace_section  # noqa: E402
from make_stack import build, layer_params  # noqa: E402

HIDDEN = 2048
LARGEST = 4 * HIDDEN * 4 * HIDDEN
GOAL = 1.5e9 + 3 * LARGEST

RUNS = {
    "mixq default (int8)": ["--no-verify"],
    "mixq --bits 4 block32": ["--bits", "4", "--granularity", "block32", "--no-verify"],
    "mixq --target-bits 4 (weight error)": ["--target-bits", "4", "--sensitivity", "weight", "--no-verify"],
    "mixq --target-bits 4 (end to end)": ["--target-bits", "4", "--no-verify"],
    "mixq --target-bits 4.5 (end to end)": ["--target-bits", "4.5", "--no-verify"],
    "mixq --bits 4 block32, verified (4 samples)": ["--bits", "4", "--granularity", "block32", "--verify-samples", "4"],
}
# The end-to-end search (block-wise since it became the default) runs up to this size.
E2E_MAX_GB = 4.5
VERIFY_SIZES = (4.0,)
# Stacks from this size run once per cell (minutes each).
BIG = 3e9

ORT_SCRIPT = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
m = onnx.load(sys.argv[1])
q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True)
q.process()
onnx.save_model(q.model.model, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
                location=sys.argv[2].split("/")[-1] + ".data")
"""

# ONNX Runtime's data-free HQQ (needs torch): the peer the end-to-end search's time is compared with.
ORT_HQQ_SCRIPT = ORT_SCRIPT.replace(
    "from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer",
    "from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, HQQWeightOnlyQuantConfig").replace(
    "q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True)",
    "q = MatMulNBitsQuantizer(m, algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))")


def _status_bytes(pid: int, field: str) -> int:
    """One memory line of /proc/PID/status in bytes: RssAnon (what the process allocated) or VmHWM (its peak RSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(cmd: list[str]) -> tuple[float, int, int, int]:
    """(seconds, peak RSS bytes, peak anonymous RSS bytes sampled every 50 ms, exit status) of one process.

    Peak RSS counts the file pages a process maps and touches, such as weights ONNX Runtime maps from a data
    file; the anonymous peak is the memory the process allocated. The peak is the child's own high-water mark
    (VmHWM, sampled) where it was read: the kernel's ru_maxrss carries the parent's resident size over fork and
    exec, so a benchmark that holds a model in memory would see it in every child's peak.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon, hwm, status, usage = 0, 0, None, None
    stop = threading.Event()

    def poll() -> None:
        nonlocal anon, hwm
        while not stop.is_set():
            anon = max(anon, _status_bytes(proc.pid, "RssAnon"))
            hwm = max(hwm, _status_bytes(proc.pid, "VmHWM"))
            stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    poller.join()
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"  exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}", flush=True)
    return seconds, hwm or usage.ru_maxrss * 1024, anon, code


def _layers(gb: float) -> int:
    return max(1, round(gb * 1e9 / (4 * layer_params(HIDDEN))))


def stack(folder: Path, gb: float) -> tuple[Path, int]:
    layers = _layers(gb)
    path = folder / f"stack_{layers}x{HIDDEN}.onnx"
    if not path.exists() or not (folder / (path.name + ".data")).exists():
        print(f"making {path} ({layers} layers)", flush=True)
        build(path, layers, HIDDEN)
    return path, 4 * layers * layer_params(HIDDEN)


DECODER_RUNS = {
    "mixq --target-bits 4 (end to end)": ["--target-bits", "4", "--no-verify"],
    "mixq --target-bits 4.5 (end to end)": ["--target-bits", "4.5", "--no-verify"],
    "mixq --bits 4 block32": ["--bits", "4", "--granularity", "block32", "--no-verify"],
}


def decoder(path: Path, repeats: int, write: bool) -> None:
    """The data-free searches on one decoder next to ORT's HQQ (same session, same machine state)."""
    out = path.with_name("out_decoder.onnx")
    jobs = [("ORT MatMulNBits HQQ 4-bit block32", [sys.executable, "-c", ORT_HQQ_SCRIPT, str(path), str(out)])]
    jobs += [(name, [sys.executable, "-m", "mixq_onnx.cli", str(path), "-o", str(out), *extra]) for name, extra in DECODER_RUNS.items()]
    runs = []
    for name, cmd in jobs:
        runs.append({"run": name, "command": cmd[2:] if cmd[1] == "-m" else ["ORT", "MatMulNBitsQuantizer", "HQQ"],
                     "runs": [list(measured(cmd)) for _ in range(repeats)]})
        print(f"{name:45s} " + _cells(runs[-1])[0], flush=True)
        for f in (out, out.with_name(out.name + ".data")):
            f.unlink(missing_ok=True)
    hqq = _cells(runs[0])[1]
    rows = []
    for r in runs:
        cell = _cells(r)[1]
        ratio = f"{cell[0] / hqq[0]:.2f}x" if cell and hqq and r is not runs[0] else ""
        rows.append([r["run"], f"{cell[0]:.1f}" if cell else "failed", ratio, f"{cell[1] / 1e9:.2f}" if cell else "",
                     f"{cell[2] / 1e9:.2f}" if cell else ""])
    table = markdown_table(["run", "seconds", "time vs ORT HQQ", "peak RSS GB", "peak anonymous GB"], rows)
    print(table)
    if not write:
        return
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    size = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size if path.with_name(path.name + ".data").exists() else 0)
    (ROOT / "docs" / "results-decoder.json").write_text(json.dumps({"machine": machine, "model": path.name, "bytes": size,
                                                                    "runs": runs}, indent=1) + "\n")
    command = "python tools/bench_memory.py " + " ".join(sys.argv[1:])
    text = (f"## A 135M-parameter decoder\n\nGenerated by `{command}` ({machine}; medians of {repeats} run(s)). The "
            f"model ({size / 1e6:.0f} MB, inline weights) is built by `python tools/make_decoder.py`: the shapes of the public "
            "135M decoders (30 layers, hidden 576, grouped-query attention, SwiGLU, a tied 49152 x 576 embedding) with "
            "random weights, so only time and memory mean anything here. The searches are data-free (generated token "
            f"ids), as ORT's HQQ is; the goal is at most 3x its time.\n\n{table}\n")
    replace_section(ROOT / "docs" / "RESULTS.md", "decoder", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.7, 2.0, 4.0, 8.0], help="stack sizes in GB")
    ap.add_argument("--repeats", type=int, default=None, help="runs per cell; the median is reported (default: 3 on stacks, 1 on a decoder)")
    ap.add_argument("--dir", type=Path, default=ROOT / ".cache" / "bench" / "stacks")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--render", action="store_true", help="run nothing: rewrite the table from docs/results-memory.json")
    ap.add_argument("--runs", nargs="+", default=None, help="only the runs whose name contains one of these")
    ap.add_argument("--decoder", type=Path, default=None, help="measure this decoder (tools/make_decoder.py) instead of stacks")
    args = ap.parse_args()
    if args.decoder is not None:
        decoder(args.decoder, args.repeats or 1, not args.no_write)
        return
    args.repeats = args.repeats or 3
    args.dir.mkdir(parents=True, exist_ok=True)
    store = ROOT / "docs" / "results-memory.json"
    # Cells are kept per (size, run): rerunning some sizes replaces only their rows.
    kept = json.loads(store.read_text())["runs"] if store.exists() and not args.no_write else []
    if args.render:
        args.sizes = []
    def wanted(name: str) -> bool:
        return args.runs is None or any(w in name for w in args.runs)

    kept = [r for r in kept if not (any(abs(r["gb"] - _size_of(g)) < 0.05 for g in args.sizes) and wanted(r["run"]))]
    raw = []
    for gb in args.sizes:
        path, nbytes = stack(args.dir, gb)
        out = args.dir / "out.onnx"
        jobs = [("ORT MatMulNBits 4-bit block32", [sys.executable, "-c", ORT_SCRIPT, str(path), str(out)]),
                ("ORT MatMulNBits HQQ 4-bit block32", [sys.executable, "-c", ORT_HQQ_SCRIPT, str(path), str(out)])]
        for name, extra in RUNS.items():
            if "end to end" in name and nbytes / 1e9 > E2E_MAX_GB:
                continue
            if "verified" in name and not any(abs(nbytes / 1e9 - v) < 0.5 for v in VERIFY_SIZES):
                continue
            jobs.append((name, [sys.executable, "-m", "mixq_onnx.cli", str(path), "-o", str(out), *extra]))
        for name, cmd in [(n, c) for n, c in jobs if wanted(n)]:
            results = [measured(cmd) for _ in range(args.repeats if nbytes < BIG else 1)]
            raw.append({"gb": nbytes / 1e9, "run": name, "command": cmd[2:] if cmd[1] == "-m" else ["ORT", "MatMulNBitsQuantizer"],
                        "runs": [list(r) for r in results]})
            print(f"{nbytes / 1e9:.2f} GB  {name:45s} " + _cells(raw[-1])[0], flush=True)
        for f in (out, args.dir / "out.onnx.data"):
            f.unlink(missing_ok=True)
    runs = sorted(kept + raw, key=lambda r: (r["gb"], list(RUNS).index(r["run"]) if r["run"] in RUNS else -1))
    rows = []
    for r in runs:
        # Time is compared with ORT's RTN quantizer, and the end-to-end searches with its HQQ one (data-free too).
        peer = "ORT MatMulNBits HQQ" if "end to end" in r["run"] else "ORT MatMulNBits 4-bit"
        ort_run = next((x for x in runs if abs(x["gb"] - r["gb"]) < 1e-6 and x["run"].startswith(peer)), None)
        text, cell = _cells(r)
        ort_cell = _cells(ort_run)[1] if ort_run else None
        ours = not r["run"].startswith("ORT")
        ratio = f"{cell[0] / ort_cell[0]:.2f}x" if cell and ort_cell and ours else ""
        # The memory goal is for the quantization runs; verification only has to fit in memory.
        within = "" if not ours or cell is None or "verified" in r["run"] else ("yes" if cell[1] <= GOAL else "**no**")
        rows.append([f"{r['gb']:.2f}", r["run"], f"{cell[0]:.1f}" if cell else "failed", ratio,
                     f"{cell[1] / 1e9:.2f}" if cell else "", f"{cell[2] / 1e9:.2f}" if cell else "", within])
    table = markdown_table(["model GB", "run", "seconds", "time vs ORT (RTN; HQQ for searches)", "peak RSS GB",
                            "peak anonymous GB",
                            f"RSS <= {GOAL / 1e9:.2f} GB"], rows)
    command = ("python tools/bench_memory.py " + " ".join(a for a in sys.argv[1:] if a != "--render")).strip()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(table)
    if args.no_write:
        return
    store.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1) + "\n")
    text = (f"## Memory and time on models bigger than memory\n\nGenerated by `python tools/bench_memory.py` ({machine}; "
            f"last run: `{command}`; medians of {args.repeats} runs below {BIG / 1e9:g} GB, one run above; goal: peak RSS at most "
            f"1.5 GB + 3 x the largest weight = {GOAL / 1e9:.2f} GB). Peak RSS counts file pages a process maps and "
            "touches (ONNX Runtime maps the weights it runs); *peak anonymous* is what it allocated, sampled every "
            f"50 ms.\n\n{table}\n")
    replace_section(ROOT / "docs" / "RESULTS.md", "memory", text)


def _size_of(gb: float) -> float:
    return 4 * _layers(gb) * layer_params(HIDDEN) / 1e9


def _cells(run: dict) -> tuple[str, tuple[float, int, int] | None]:
    ok = [r for r in run["runs"] if r[-1] == 0]
    if not ok:
        return "failed", None
    cell = (statistics.median(r[0] for r in ok), int(statistics.median(r[1] for r in ok)), int(statistics.median(r[2] for r in ok)))
    return f"{cell[0]:7.1f} s  {cell[1] / 1e9:6.2f} GB RSS  {cell[2] / 1e9:6.2f} GB anon", cell


if __name__ == "__main__":
    main()
