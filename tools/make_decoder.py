"""A 135M-parameter Llama-style decoder with random weights, exported to ONNX: a stand-in for timing the search.

    python tools/make_decoder.py --out .cache/bench/decoder_135m.onnx

The shapes are those of the public 135M-parameter decoders (hidden 576,
30 layers, 9 query and 3 key/value heads, SwiGLU 1536, vocabulary 49152,
tied input and output embeddings, RMSNorm, rotary positions), built with
``transformers``' Llama classes from a fixed seed and exported by
``torch.onnx.export``: ``input_ids [batch, sequence]`` to ``logits``. The
weights are random, so the file says nothing about accuracy; it has the
tensor count, sizes and graph of a real one, which is what time and memory
depend on. Needs torch and transformers (the ``[brecq]`` and ``[bench]``
extras).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=True)


def build(out: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Export the decoder to ``out`` (written to a temporary name, then renamed) and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**SHAPE, **({"num_hidden_layers": layers} if layers else {})})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    with torch.no_grad():
        torch.onnx.export(Logits(), (ids,), str(tmp), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", min=2, max=2048)}},
                          opset_version=18, dynamo=True, external_data=False)
    tmp.replace(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".cache/bench/decoder_135m.onnx"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick look")
    args = ap.parse_args()
    path = build(args.out, args.seed, args.layers)
    print(f"{path}: {path.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
