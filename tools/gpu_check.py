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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def prepare(out: Path) -> None:
    """Copy the deployment benchmark's models with their eval inputs and fp32 CPU outputs."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import outputs
    from bench_cases import CASES
    from bench_deploy import variants

    cache = ROOT / ".cache" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name in ("digits", "efficientnet", "minilm"):
        case = CASES[name](cache)
        feeds = case.eval_feeds[:4] if name == "minilm" else case.eval_feeds[:1]
        ref = outputs(case.model, feeds)
        np.savez(out / f"{name}_io.npz", **{f"in{i}:{k}": v for i, f in enumerate(feeds) for k, v in f.items()},
                 **{f"ref{i}": r for i, r in enumerate(ref)})
        files = [(label, cache / "runs" / f"{name}_deploy_{k + 1}.onnx") for k, (label, _) in enumerate(variants(name))]
        if name == "minilm":
            # 91 MB is too much to carry: the GPU side rebuilds an fp32 model of the same graph from the int8 file.
            manifest.append({"case": name, "model": "fp32 (int8 weights dequantized: same graph, for latency)",
                             "file": f"{name}_fp32.onnx", "derive": f"{name}_{len(manifest) + 1}.onnx"})
        else:
            files.insert(0, ("fp32", case.model))
        for label, src in files:
            if "tensorrt" in label or "uint8), ort-cpu, gptq" in label:
                continue  # one full-QDQ variant per target is enough here
            dst = out / f"{name}_{len(manifest)}.onnx"
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


def _agreement(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
    r = np.concatenate([x.reshape(len(x), -1) for x in ref]).astype(np.float64)
    o = np.concatenate([x.reshape(len(x), -1) for x in out]).astype(np.float64)
    cos = np.sum(r * o, 1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1) + 1e-12)
    res = {"cosine vs fp32 CPU": float(cos.mean())}
    if ref[0].ndim == 2:
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


def run(folder: Path, out: Path) -> None:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    manifest = json.loads((folder / "manifest.json").read_text())
    results = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(), "rows": []}
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
                so.profile_file_prefix = str(out.parent / "profile")
                sess = ort.InferenceSession(str(folder / entry["file"]), so, providers=[provider, "CPUExecutionProvider"])
                row["session_providers"] = sess.get_providers()
                outs = [sess.run(None, f)[0] for f in feeds]
                row.update(_agreement(refs, outs))
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
                for e in json.loads(Path(sess.end_profiling()).read_text()):
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                        share[e["args"].get("provider", "?")] += e["dur"]
                total = sum(share.values()) or 1
                row["kernel_time_share"] = {k: round(v / total, 4) for k, v in share.items()}
            except Exception as exc:  # a provider that cannot load or run the model is a result, not a crash
                row["error"] = str(exc).splitlines()[0][:300]
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    out.write_text(json.dumps(results, indent=1))


def publish(result: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from _table import markdown_table, replace_section

    data = json.loads(result.read_text())
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["case"], r["model"], r["provider"], "did not run", "", "", r["error"][:120]])
            continue
        acc = "; ".join(f"{k} {v:.4f}" for k, v in r.items() if k.endswith("vs fp32 CPU"))
        share = ", ".join(f"{k.replace('ExecutionProvider', '')} {v:.0%}" for k, v in r["kernel_time_share"].items())
        rows.append([r["case"], r["model"], r["provider"], ", ".join(p.replace("ExecutionProvider", "") for p in r["session_providers"]),
                     f"{r['latency_ms']:.3f}", acc, share])
    section = (
        "## GPU: the quantized models on ONNX Runtime's CUDA and TensorRT providers\n\n"
        f"Measured on the lent GPU machine with onnxruntime-gpu {data['onnxruntime']} (providers available: "
        f"{', '.join(data['available'])}) by `python tools/gpu_check.py run` on the models that `tools/bench_deploy.py` "
        "wrote (`python tools/gpu_check.py prepare DIR` picks them). Latency: median of 50 single-sample runs, inputs "
        "and outputs on the CPU. *kernel time*: share of kernel time per provider from ORT's profiler (a CPU share "
        "means nodes fell back to the CPU). Accuracy is against the fp32 model's outputs on the CPU.\n\n"
        + markdown_table(["case", "model", "asked for", "session got", "latency ms", "accuracy", "kernel time"], rows) + "\n"
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
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.dir)
    elif args.cmd == "run":
        run(args.dir, args.out)
    else:
        publish(args.result)


if __name__ == "__main__":
    main()
