"""Decoder LLM quantization, judged as a language model: held-out perplexity, KL and next-byte agreement against bytes.

    pip install '.[bench]'
    python tools/bench_llm.py              # -> docs/RESULTS.md "llm" section, docs/results-llm.json

The model is the repo's trained decoder (models/tiny_decoder.onnx, tools/train_tiny_decoder.py: byte-level, 4
Llama-style layers, a tied embedding), evaluated on its 192 held-out windows of 128 bytes (models/tiny_decoder_test.npz)
and calibrated, where a method takes data, on the 64 training windows of models/tiny_decoder_calib.npz.

Methods: ONNX Runtime's MatMulNBits quantizer (round-to-nearest and HQQ, 4 bits, blocks of 32 and 128; it leaves the
tied table in float), its dynamic INT8 quantizer; our uniform 4-bit plans (also on ORT HQQ's tensors only, with
round-to-nearest and ``--method hqq``); the k-quant rule every peer ships
(``--rule kquant-mixed``, round-to-nearest and GPTQ); and our searches at the rule's bytes (``--max-size`` of the
rule's file), data-free and with calibration. Each quantization runs in a fresh process: seconds and peak RSS are
that process's. Metrics per held-out position: perplexity of the next byte, KL(fp32 || quantized) of the next-byte
distribution, and whether the most likely next byte is the same.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _table import markdown_table, replace_section  # noqa: E402
from bench_memory import measured  # noqa: E402

MODEL = ROOT / "models" / "tiny_decoder.onnx"
TEST = ROOT / "models" / "tiny_decoder_test.npz"
CALIB = ROOT / "models" / "tiny_decoder_calib.npz"

ORT_NBITS = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, HQQWeightOnlyQuantConfig
m = onnx.load(sys.argv[1])
block = int(sys.argv[4])
if sys.argv[3] == "hqq":
    q = MatMulNBitsQuantizer(m, algo_config=HQQWeightOnlyQuantConfig(block_size=block, bits=4))
else:
    q = MatMulNBitsQuantizer(m, bits=4, block_size=block, is_symmetric=True)
q.process()
onnx.save_model(q.model.model, sys.argv[2])
"""

ORT_DYNAMIC = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
"""


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"input_ids": ids[i: i + 32]})[0] for i in range(0, len(ids), 32)])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def scores(ref: np.ndarray, out: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """Perplexity of the next byte, mean KL(fp32 || quantized) and top-1 agreement, over every held-out position."""
    lp, lq = log_softmax(ref[:, :-1]), log_softmax(out[:, :-1])
    nll = -np.take_along_axis(lq, ids[:, 1:, None], axis=-1)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return {"perplexity": float(np.exp(nll.mean())), "kl": float(kl.mean()),
            "agreement": float(np.mean(lp.argmax(-1) == lq.argmax(-1)))}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    ids = np.load(TEST)["input_ids"]
    ref = logits(MODEL, ids)
    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    mixq = [sys.executable, "-m", "mixq_onnx.cli", str(MODEL)]
    data = ["--calib", str(CALIB)]
    rows: list[dict] = []

    def run(name: str, cmd: list[str], out: Path) -> None:
        seconds, rss, _, code = measured(cmd)
        if code != 0:
            print(f"{name}: failed", flush=True)
            return
        row = {"method": name, "bytes": out.stat().st_size, "seconds": seconds, "rss_mb": rss / 2**20,
               **scores(ref, logits(out, ids), ids)}
        rows.append(row)
        print(f"{name:55s} {row['bytes']:>8d} B  ppl {row['perplexity']:.4f}  KL {row['kl']:.5f}  "
              f"agree {row['agreement']:.4f}  {seconds:.1f} s", flush=True)

    fp32 = {"method": "fp32", "bytes": MODEL.stat().st_size, "seconds": 0.0, "rss_mb": 0.0, **scores(ref, ref, ids)}
    rows.append(fp32)
    for algo in ("rtn", "hqq"):
        for block in (32, 128):
            out = work / f"ort_{algo}_{block}.onnx"
            run(f"ORT MatMulNBits {algo.upper()} 4-bit block{block}",
                [sys.executable, "-c", ORT_NBITS, str(MODEL), str(out), algo, str(block)], out)
    out = work / "ort_dynamic.onnx"
    run("ORT quantize_dynamic INT8", [sys.executable, "-c", ORT_DYNAMIC, str(MODEL), str(out)], out)
    for block in ("block32", "block128"):
        out = work / f"uniform_{block}.onnx"
        run(f"mixq --bits 4 --granularity {block}", [*mixq, "-o", str(out), "--no-verify", "--bits", "4",
                                                     "--granularity", block], out)
    # ORT HQQ's tensors and layout (MatMul weights only, the tied table kept float), rounded both ways.
    for method in ("rtn", "hqq"):
        out = work / f"matmuls_{method}.onnx"
        run(f"mixq --bits 4 --granularity block32 --method {method} --keep-float embed.weight",
            [*mixq, "-o", str(out), "--no-verify", "--bits", "4", "--granularity", "block32", "--method", method,
             "--keep-float", "embed.weight"], out)
    out = work / "uniform_hqq.onnx"
    run("mixq --bits 4 --granularity block32 --method hqq", [*mixq, "-o", str(out), "--no-verify", "--bits", "4",
                                                             "--granularity", "block32", "--method", "hqq"], out)
    rule = work / "kquant.onnx"
    run("mixq --rule kquant-mixed (rtn)", [*mixq, "-o", str(rule), "--no-verify", "--rule", "kquant-mixed"], rule)
    out = work / "kquant_gptq.onnx"
    run("mixq --rule kquant-mixed --method gptq --calib", [*mixq, "-o", str(out), "--no-verify", "--rule", "kquant-mixed",
                                                           "--method", "gptq", *data], out)
    size = str(rule.stat().st_size)
    for name, extra in (("data-free", []), ("data-free --method hqq", ["--method", "hqq"]), ("--calib", data),
                        ("--calib --method gptq", [*data, "--method", "gptq"])):
        out = work / f"search_{name.replace(' ', '_').replace('-', '')}.onnx"
        run(f"mixq --max-size (the rule's bytes) {name}", [*mixq, "-o", str(out), "--no-verify", "--max-size", size, *extra],
            out)
    head = ["method", "file bytes", "perplexity", "vs fp32", "mean KL", "top-1 agreement", "seconds", "peak RSS MB"]
    table = markdown_table(head, [[r["method"], str(r["bytes"]), f"{r['perplexity']:.4f}",
                                   f"{r['perplexity'] / fp32['perplexity'] - 1:+.2%}", f"{r['kl']:.5f}",
                                   f"{r['agreement']:.4f}", *((f"{r['seconds']:.1f}", f"{r['rss_mb']:.0f}") if r is not fp32
                                                              else ("-", "-"))] for r in rows])
    print(table)
    if args.no_write:
        return
    import onnxruntime

    machine = f"{platform.machine()}, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    (ROOT / "docs" / "results-llm.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    text = (f"## A trained decoder: the k-quant rule against the search at its bytes\n\nGenerated by `python "
            f"tools/bench_llm.py` ({machine}; 2 cores). The model is models/tiny_decoder.onnx (4 Llama-style layers, "
            "hidden 64, byte vocabulary, tied embedding; trained on Python source by tools/train_tiny_decoder.py); "
            f"scores on its {ids.shape[0]} held-out windows of {ids.shape[1]} bytes from files the training never "
            "saw: perplexity of the next byte, mean KL of the next-byte distribution against fp32, and top-1 "
            "next-byte agreement. Data-aware methods calibrate on the 64 training windows of "
            "models/tiny_decoder_calib.npz. The searches' `--max-size` is the rule's file size. ORT's MatMulNBits "
            "files leave the tied table in float.\n\n" + table + "\n")
    replace_section(ROOT / "docs" / "RESULTS.md", "llm", text)
    print("updated docs/RESULTS.md")


if __name__ == "__main__":
    main()
