"""Train a tiny transformer encoder on a counting task (PyTorch) and export it to ONNX.

Regenerates models/tiny_transformer.onnx, models/tiny_transformer_test.npz and
models/tiny_transformer_calib.npz:

    pip install '.[bench]'     # torch, onnxscript
    python tools/train_tiny_transformer.py

The task: a sequence of 32 token ids from a 512-word vocabulary holds 8 to 23 of
eight marker tokens (ids 1-8); the class is the marker that occurs most often.
Architecture: token + position embeddings, LayerNorm, two post-norm encoder
layers (4-head self-attention with separate Q/K/V projections, GELU FFN
64->256->64), mean pooling, a linear classifier. Exported by torch.onnx's
dynamo exporter (opset 18) with dynamic batch and sequence axes, so the graph
has what transformer exports have: Gather embeddings, LayerNormalization,
MatMul + Add projections, Q.K^T and attention.V MatMuls, Softmax, Erf GELU.
Deterministic: fixed seeds, single-threaded training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, DIM, HEADS, FFN, LAYERS, CLASSES = 512, 32, 64, 4, 256, 2, 8


def make_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n, SEQ] and the index of the most frequent marker token (ties broken by a re-draw)."""
    ids = rng.integers(CLASSES + 1, VOCAB, (n, SEQ))
    labels = np.empty(n, np.int64)
    for i in range(n):
        while True:
            counts = rng.multinomial(rng.integers(8, 24), [1 / CLASSES] * CLASSES)
            if np.sum(counts == counts.max()) == 1:
                break
        pos = rng.choice(SEQ, counts.sum(), replace=False)
        ids[i, pos] = np.repeat(np.arange(1, CLASSES + 1), counts)
        labels[i] = int(np.argmax(counts))
    return ids.astype(np.int64), labels


def build():
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.ff1, self.ff2 = nn.Linear(DIM, FFN), nn.Linear(FFN, DIM)

        def forward(self, x):
            b, s, _ = x.shape
            split = lambda t: t.reshape(b, s, HEADS, DIM // HEADS).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, s, DIM)
            x = self.ln1(x + self.o(y))
            return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ * 4, DIM)
            self.ln = nn.LayerNorm(DIM)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.cls = nn.Linear(DIM, CLASSES)

        def forward(self, input_ids):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.ln(self.tok(input_ids) + self.pos(positions))
            for layer in self.layers:
                x = layer(x)
            return self.cls(x.mean(1))

    return Encoder()


def main() -> None:
    import onnx
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x_train, y_train = make_data(20000, rng)
    x_test, y_test = make_data(1000, rng)
    x_calib, _ = make_data(256, rng)
    net = build()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    for step in range(args.steps):
        idx = rng.integers(0, len(x_train), 64)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x_train[idx])), torch.from_numpy(y_train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        acc = (net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"held-out accuracy {acc:.4f}")
    out = ROOT / "models" / "tiny_transformer.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=SEQ * 4)
    prog = torch.onnx.export(net, (torch.from_numpy(x_test[:2]),), dynamo=True, input_names=["input_ids"], output_names=["logits"],
                             dynamic_shapes={"input_ids": {0: batch, 1: seq}}, opset_version=18)
    prog.optimize()
    model = prog.model_proto
    model.producer_name, model.doc_string = "tools/train_tiny_transformer.py", f"held-out accuracy {acc:.4f}"
    onnx.save(model, str(out))
    np.savez(ROOT / "models" / "tiny_transformer_test.npz", input_ids=x_test, label=y_test)
    np.savez(ROOT / "models" / "tiny_transformer_calib.npz", input_ids=x_calib)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
