"""Train a tiny Llama-style decoder on Python source text (PyTorch) and export it to ONNX, with and without a KV cache.

Regenerates models/tiny_decoder.onnx, models/tiny_decoder_kv.onnx, models/tiny_decoder_test.npz and
models/tiny_decoder_calib.npz:

    pip install '.[bench]'     # torch, onnxscript
    python tools/train_tiny_decoder.py

The text: the Python standard library's own source files (this interpreter's), read as bytes, so the
vocabulary is the 256 byte values and no tokenizer is needed. Files are split by a hash of their name:
one in ten is held out, and the test windows come only from those. The windows are shipped in the npz
files, so the evaluation does not depend on the Python version that reads them.

Architecture, as in the Llama family: token embedding tied to the output projection, RMSNorm before
attention and before the MLP, rotary positions, grouped-query attention (4 query heads sharing 2
key/value heads), a SwiGLU MLP, a final RMSNorm; no biases. Exports:

- ``tiny_decoder.onnx``: ``input_ids [batch, sequence]`` to ``logits [batch, sequence, 256]``
  (torch.onnx's dynamo exporter, opset 18), the tied table read by a Gather and, transposed, by the
  output MatMul.
- ``tiny_decoder_kv.onnx``: the optimum-style cache form, ``input_ids``, ``attention_mask [batch,
  past + sequence]``, ``position_ids [batch, sequence]`` and ``past_key_values.N.key/value [batch, 2,
  past, 16]`` to ``logits`` and ``present.N.key/value [batch, 2, past + sequence, 16]`` (TorchScript
  exporter, opset 17, so that a past of length 0 runs: the first step of generation).

Deterministic: fixed seeds, single-threaded training.
"""

from __future__ import annotations

import argparse
import hashlib
import sysconfig
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN, SEQ = 256, 64, 4, 4, 2, 176, 128
HEAD = DIM // HEADS
CORPUS_BYTES = 6 * 2**20
TEST_WINDOWS, CALIB_WINDOWS = 192, 64


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out bytes from the standard library's source (test suites left out)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.relative_to(stdlib).parts[0] and "site-packages" not in p.parts)
    train, held, size = [], [], 0
    for p in files:
        data = p.read_bytes()
        (held if hashlib.sha256(p.name.encode()).digest()[0] % 10 == 0 else train).append(data)
        size += len(data)
        if size > CORPUS_BYTES:
            break
    return (np.frombuffer(b"\n".join(train), np.uint8).astype(np.int64),
            np.frombuffer(b"\n".join(held), np.uint8).astype(np.int64))


def build_model():
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(DIM))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + turned * sin

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_norm, self.mlp_norm = RMSNorm(), RMSNorm()
            self.q_proj = nn.Linear(DIM, HEADS * HEAD, bias=False)
            self.k_proj = nn.Linear(DIM, KV_HEADS * HEAD, bias=False)
            self.v_proj = nn.Linear(DIM, KV_HEADS * HEAD, bias=False)
            self.o_proj = nn.Linear(HEADS * HEAD, DIM, bias=False)
            self.gate_proj = nn.Linear(DIM, FFN, bias=False)
            self.up_proj = nn.Linear(DIM, FFN, bias=False)
            self.down_proj = nn.Linear(FFN, DIM, bias=False)

        def forward(self, x, cos, sin, bias, past_k, past_v):
            b, t, _ = x.shape
            h = self.attn_norm(x)
            q = self.q_proj(h).view(b, t, HEADS, HEAD).transpose(1, 2)
            k = self.k_proj(h).view(b, t, KV_HEADS, HEAD).transpose(1, 2)
            v = self.v_proj(h).view(b, t, KV_HEADS, HEAD).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            kk = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
            vv = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
            scores = q @ kk.transpose(-1, -2) / HEAD ** 0.5 + bias
            a = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(b, t, DIM)
            x = x + self.o_proj(a)
            h = self.mlp_norm(x)
            return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h)), k, v

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            nn.init.normal_(self.embed.weight, std=0.02)  # as Llama's: N(0, 1) rows would make the tied logits huge
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.norm = RMSNorm()
            inv = 1.0 / (10000 ** (torch.arange(0, HEAD, 2).float() / HEAD))
            self.register_buffer("inv_freq", inv, persistent=False)

        def run(self, ids, positions, bias, past):
            angles = positions[:, None, :, None].float() * self.inv_freq
            cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
            sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
            x = self.embed(ids)
            present = []
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, cos, sin, bias, *(past[2 * i: 2 * i + 2] if past else (None, None)))
                present += [k, v]
            # Tied: the output projection is the embedding table, transposed.
            return self.norm(x) @ self.embed.weight.t(), present

        def forward(self, ids):
            t = ids.shape[1]
            positions = torch.arange(t, device=ids.device)[None].expand(ids.shape[0], t)
            causal = torch.full((t, t), float("-inf")).triu(1)
            return self.run(ids, positions, causal, None)[0]

    class WithCache(nn.Module):
        """The cache form: masks and positions from the caller, the past in and the present out."""

        def __init__(self, core: Decoder) -> None:
            super().__init__()
            self.core = core

        def forward(self, input_ids, attention_mask, position_ids, *past):
            t = input_ids.shape[1]
            total = attention_mask.shape[1]
            # Query i sits at key position total - t + i: it sees keys up to there, and only those the mask keeps.
            rows = torch.arange(t)[:, None] + (total - t)
            cols = torch.arange(total)[None, :]
            allowed = (cols <= rows)[None, None] & (attention_mask[:, None, None, :] > 0)
            bias = torch.where(allowed, torch.tensor(0.0), torch.tensor(float("-inf")))
            logits, present = self.core.run(input_ids, position_ids, bias, list(past))
            return (logits, *present)

    return Decoder, WithCache


def windows(data: np.ndarray, count: int, rng: np.random.Generator, length: int = SEQ) -> np.ndarray:
    starts = rng.integers(0, len(data) - length - 1, count)
    return np.stack([data[s: s + length] for s in starts])


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train, held = corpus()
    Decoder, WithCache = build_model()
    model = Decoder()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    for step in range(args.steps):
        batch = torch.from_numpy(windows(train, 32, rng, SEQ + 1))
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    test = windows(held, TEST_WINDOWS, np.random.default_rng(1))
    calib = windows(train, CALIB_WINDOWS, np.random.default_rng(2))
    with torch.no_grad():
        logits = model(torch.from_numpy(test))
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.from_numpy(test[:, 1:]).reshape(-1))
    print(f"held-out perplexity (bytes): {float(torch.exp(nll)):.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "tiny_decoder_test.npz", input_ids=test)
    np.savez_compressed(args.out / "tiny_decoder_calib.npz", input_ids=calib)
    ids = torch.from_numpy(test[:2, :16])
    with torch.no_grad():
        torch.onnx.export(model, (ids,), str(args.out / "tiny_decoder.onnx"), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes={"ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", min=2, max=1024)}},
                          opset_version=18, dynamo=True, external_data=False)
        cached = WithCache(model).eval()
        past = [torch.zeros(2, KV_HEADS, 3, HEAD) for _ in range(2 * LAYERS)]
        names = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
        present = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
        mask, positions = torch.ones(2, 3 + 16, dtype=torch.int64), torch.arange(3, 3 + 16)[None].expand(2, 16)
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                "position_ids": {0: "batch_size", 1: "sequence_length"},
                "logits": {0: "batch_size", 1: "sequence_length"},
                **{n: {0: "batch_size", 2: "past_sequence_length"} for n in names},
                **{n: {0: "batch_size", 2: "total_sequence_length"} for n in present}}
        torch.onnx.export(cached, (ids, mask, positions, *past), str(args.out / "tiny_decoder_kv.onnx"),
                          input_names=["input_ids", "attention_mask", "position_ids", *names],
                          output_names=["logits", *present], dynamic_axes=axes, opset_version=17, dynamo=False)
    print("wrote", *(args.out / n for n in ("tiny_decoder.onnx", "tiny_decoder_kv.onnx")))


if __name__ == "__main__":
    main()
