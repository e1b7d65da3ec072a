"""Run quantized models on ONNX Runtime's GPU providers and compare them with fp32 (the GPU check of the targets work).

Two steps, because the GPU machine has no network and no project install:

    python tools/gpu_check.py prepare DIR      # here: pick the models, CPU reference outputs and inputs into DIR
    python tools/gpu_check.py run DIR OUT.json # there: with onnxruntime-gpu importable; writes the measurements
    python tools/gpu_check.py publish OUT.json # here: the GPU section of docs/RESULTS.md

`run` needs only numpy and onnxruntime(-gpu). For each model and each of the
CUDA and TensorRT providers it records which providers the session really
got, the share of kernel time each provider ran (ORT's profiler; a CPU share
means nodes fell back), the median single-sample latency, and agreement with
the fp32 model's CPU outputs.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


# The files the GPU check runs, by bench_deploy label: one per target where the target changes the file.
GPU_MODELS = {
    "efficientnet": ("weight-only int8 (default)", "W8A8 ort-cpu preset (--activations auto = uint8), gptq, percentile",
                     "W8A8 tensorrt (int8), gptq, percentile"),
    "minilm": ("weight-only int8 (default)", "weight-only INT4 block32, ort-cuda, gptq", "W8A8 ort-cpu preset + --smooth"),
}


def prepare(out: Path) -> None:
    """Copy the deployment benchmark's files for each target, with eval inputs and fp32 CPU outputs, into ``out``.

    The fp32 models are not copied (the machine is reached through a small
    transfer): the GPU side rebuilds each from the int8 weight-only file by
    folding its DequantizeLinear nodes, which gives the same graph for latency.
    """
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import outputs
    from bench_cases import CASES
    from bench_deploy import variants

    cache = ROOT / ".cache" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, wanted in GPU_MODELS.items():
        case = CASES[name](cache)
        feeds = case.eval_feeds[:4] if name == "minilm" else case.eval_feeds[:16]
        ref = outputs(case.model, feeds)
        np.savez(out / f"{name}_io.npz", **{f"in{i}:{k}": v for i, f in enumerate(feeds) for k, v in f.items()},
                 **{f"ref{i}": r for i, r in enumerate(ref)})
        labels = [label for label, _ in variants(name)]
        first = None
        for label in wanted:
            src = cache / "runs" / f"{name}_deploy_{labels.index(label) + 1}.onnx"
            dst = out / f"{name}_{len(manifest) + 1}.onnx"
            if first is None:
                first = dst.name
                manifest.append({"case": name, "model": "fp32 (weight-only int8 file with its DequantizeLinear folded)",
                                 "file": f"{name}_fp32.onnx", "derive": first})
                dst = out / first
            shutil.copy(src, dst)
            manifest.append({"case": name, "model": label, "file": dst.name})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _feeds(io: dict[str, np.ndarray]) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    feeds: dict[int, dict[str, np.ndarray]] = {}
    refs = {}
    for k, v in io.items():
        if k.startswith("ref"):
            refs[int(k[3:])] = v
        else:
            i, name = k.split(":", 1)
            feeds.setdefault(int(i[2:]), {})[name] = v
    return [feeds[i] for i in sorted(feeds)], [refs[i] for i in sorted(refs)]


def _agreement(ref: list[np.ndarray], out: list[np.ndarray], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean cosine per sample (padding positions zeroed where the feed has an attention mask) and, for [N, classes]
    outputs, top-1 agreement."""
    cos = []
    for r, o, f in zip(ref, out, feeds):
        if "attention_mask" in f and r.ndim == 3:
            r, o = r * f["attention_mask"][..., None], o * f["attention_mask"][..., None]
        r2, o2 = r.reshape(len(r), -1).astype(np.float64), o.reshape(len(o), -1).astype(np.float64)
        cos.extend(np.sum(r2 * o2, 1) / (np.linalg.norm(r2, axis=1) * np.linalg.norm(o2, axis=1) + 1e-12))
    res = {"cosine vs fp32 CPU": float(np.mean(cos))}
    if ref[0].ndim == 2:
        r, o = np.concatenate(ref), np.concatenate(out)
        res["top-1 agreement vs fp32 CPU"] = float(np.mean(r.argmax(1) == o.argmax(1)))
    return res


def _fold_weights(src: Path, dst: Path) -> None:
    """The same model with every constant DequantizeLinear replaced by its float result."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input if i):
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            z = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) if len(n.input) > 2 and n.input[2] else 0.0
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if s.size > 1:
                shape[axis] = s.size
            w = (q - np.reshape(z, shape)) * np.reshape(s, shape) if s.size > 1 else (q - z) * s
            m.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in m.graph.output}
    live = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(live)
    onnx.save(m, str(dst))


def _device_name() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or "no GPU found"
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


def run(folder: Path, out: Path) -> None:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    manifest = json.loads((folder / "manifest.json").read_text())
    results = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(), "device": _device_name(), "rows": []}
    for entry in manifest:
        if "derive" in entry and not (folder / entry["file"]).exists():
            _fold_weights(folder / entry["derive"], folder / entry["file"])
        feeds, refs = _feeds(dict(np.load(folder / f"{entry['case']}_io.npz")))
        for provider in PROVIDERS:
            row = {**entry, "provider": provider}
            if provider not in results["available"]:
                row["error"] = "not available in this onnxruntime build"
                results["rows"].append(row)
                continue
            try:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="mixq-gpu-")) / "profile")
                sess = ort.InferenceSession(str(folder / entry["file"]), so, providers=[provider, "CPUExecutionProvider"])
                row["session_providers"] = sess.get_providers()
                outs = [sess.run(None, f)[0] for f in feeds]
                row.update(_agreement(refs, outs, feeds))
                one = {k: v[:1] for k, v in feeds[0].items()}
                for _ in range(5):
                    sess.run(None, one)
                times = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    sess.run(None, one)
                    times.append(time.perf_counter() - t0)
                row["latency_ms"] = 1000 * statistics.median(times)
                share: dict[str, float] = collections.Counter()
                ops: dict[str, set[str]] = collections.defaultdict(set)
                for e in json.loads(Path(sess.end_profiling()).read_text()):
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                        provider = e["args"].get("provider", "?")
                        share[provider] += e["dur"]
                        ops[provider].add(e["args"].get("op_name", "?"))
                total = sum(share.values()) or 1
                row["kernel_time_share"] = {k: round(v / total, 4) for k, v in share.items()}
                row["ops_per_provider"] = {k: sorted(v) for k, v in ops.items()}
            except Exception as exc:  # a provider that cannot load or run the model is a result, not a crash
                row["error"] = str(exc).splitlines()[0][:300]
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    out.write_text(json.dumps(results, indent=1))


def publish(result: Path, note: str = "") -> None:
    """The GPU section of docs/RESULTS.md from ``run``'s JSON; ``note`` adds what the run's log said (e.g. a provider's load error)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from _table import markdown_table, replace_section

    data = json.loads(result.read_text())
    rows = []
    fp32 = {(r["case"], r["provider"]): r.get("latency_ms") for r in data["rows"] if r["model"].startswith("fp32")}
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["case"], r["model"], r["provider"], "did not run", "", "", r["error"][:160], ""])
            continue
        acc = "; ".join(f"{k.replace(' vs fp32 CPU', '')} {v:.4f}" for k, v in r.items() if k.endswith("vs fp32 CPU"))
        share = ", ".join(f"{k.replace('ExecutionProvider', '')} {v:.0%}" for k, v in r["kernel_time_share"].items())
        got = ", ".join(p.replace("ExecutionProvider", "") for p in r["session_providers"])
        if r["provider"] not in r["session_providers"]:
            got += " (the provider did not load; ORT fell back)"
        base = fp32.get((r["case"], r["provider"]))
        latency = f"{r['latency_ms']:.2f}" + (f" ({base / r['latency_ms']:.2f}x)" if base else "")
        cpu_ops = ", ".join(r.get("ops_per_provider", {}).get("CPUExecutionProvider", [])) or "none"
        rows.append([r["case"], r["model"], r["provider"].replace("ExecutionProvider", ""), got, latency, acc, share,
                     cpu_ops if r["provider"] in r["session_providers"] else "(all)"])
    section = (
        "## GPU: the outputs of each target on ONNX Runtime's CUDA and TensorRT providers\n\n"
        f"Measured on the lent GPU machine ({data.get('device', 'GPU')}) with onnxruntime-gpu {data['onnxruntime']} "
        f"(providers compiled in: {', '.join(data['available'])}) by `python tools/gpu_check.py run` on the files that "
        "`tools/bench_deploy.py` wrote (`python tools/gpu_check.py prepare DIR` picks one per target). The fp32 rows are the "
        "weight-only int8 file with its DequantizeLinear nodes folded back to float (the same graph; the machine is reached "
        "through a small transfer). Latency: median of 50 batch-1 runs, inputs and outputs on the host, with the speed-up "
        "against the fp32 row on the same provider. *accuracy*: cosine (padding masked) and top-1 agreement against the "
        "original fp32 model's CPU outputs. *kernel time*: share per provider from ORT's profiler; *ops that ran on the "
        "CPU*: the op types the CUDA session left to the CPU provider.\n\n"
        + (note + "\n\n" if note else "")
        + markdown_table(["case", "model", "asked for", "session got", "latency ms (vs fp32)", "accuracy vs fp32", "kernel time",
                          "ops that ran on the CPU"], rows) + "\n"
    )
    replace_section(ROOT / "docs" / "RESULTS.md", "gpu", section)
    print(section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("out", type=Path)
    q = sub.add_parser("publish")
    q.add_argument("result", type=Path)
    q.add_argument("--note", default="", help="what the run's log said, e.g. why a provider did not load")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.dir)
    elif args.cmd == "run":
        run(args.dir, args.out)
    else:
        publish(args.result, args.note)


if __name__ == "__main__":
    main()
