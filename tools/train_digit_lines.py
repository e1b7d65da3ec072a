"""Train a small CTC text-line recognizer on lines of scikit-learn's bundled digits and export it as older exporters do.

Regenerates models/digit_lines_crnn.onnx, models/digit_lines_test.npz and models/digit_lines_calib.npz:

    pip install '.[tools]' torch && python tools/train_digit_lines.py

A text line is 4 to 6 digit images (8x8, from scikit-learn's digits) side by
side with random 0-3 pixel gaps, padded to 1 x 8 x 48; its label is the digit
string. The model is a CRNN as OCR recognizers are: Conv(1->16) ReLU,
Conv(16->32) ReLU, mean over the height, a bidirectional LSTM (32 per
direction) over the width, and a MatMul to 11 classes (blank + 10 digits),
log-softmax, output ``[T, N, C]`` (time first, as recurrent recognizers
write it). Trained with CTC loss (seed 0, Adam); exported by torch.onnx's
TorchScript exporter at opset 12, like the OCR exports people have, and with
the output declared ``[N, T]``, rank 2, as a buggy exporter we met declared
it (ONNX Runtime ignores it; the new opset's checker does not).

Test lines are built from the digits test split (scikit-learn's
``train_test_split``, random_state 0, 20%), calibration lines from the
training split only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
WIDTH, BLANK = 48, 0


def make_lines(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
    """``count`` lines [count, 1, 8, WIDTH] in [0, 1] and their digit strings."""
    x = np.zeros((count, 1, 8, WIDTH), np.float32)
    texts = []
    for i in range(count):
        n = int(rng.integers(4, 7))
        picks = rng.integers(0, len(images), n)
        col, text = int(rng.integers(0, 3)), []
        for p in picks:
            if col + 8 > WIDTH:
                break
            x[i, 0, :, col:col + 8] = images[p]
            text.append(int(labels[p]) + 1)  # class 0 is the blank
            col += 8 + int(rng.integers(0, 4))
        texts.append(text)
    return x, texts


def greedy_decode(log_probs: np.ndarray) -> list[list[int]]:
    """[T, N, C] -> the CTC best paths, repeats merged and blanks dropped (digits as 1..10)."""
    best = log_probs.argmax(-1).T
    out = []
    for path in best:
        keep = np.concatenate([[True], path[1:] != path[:-1]])
        out.append([int(c) for c in path[keep] if c != BLANK])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(images, d.target, test_size=0.2, random_state=0, stratify=d.target)

    class CRNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
            self.rnn = torch.nn.LSTM(32, 32, bidirectional=True)
            self.out = torch.nn.Linear(64, 11)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            f = torch.relu(self.c2(torch.relu(self.c1(image))))  # [N, 32, 8, W]
            seq = f.mean(2).permute(2, 0, 1)  # [W, N, 32]
            h, _ = self.rnn(seq)  # [W, N, 64]
            return torch.log_softmax(self.out(h), -1)  # [W, N, 11]

    net = CRNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ctc = torch.nn.CTCLoss(blank=BLANK, zero_infinity=True)
    for step in range(args.steps):
        xb, tb = make_lines(x_train, y_train, 64, rng)
        lp = net(torch.from_numpy(xb))
        targets = torch.tensor([c for t in tb for c in t])
        loss = ctc(lp, targets, torch.full((64,), WIDTH, dtype=torch.long), torch.tensor([len(t) for t in tb]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"step {step}: CTC loss {loss.item():.3f}")
    net.eval()
    x_eval, t_eval = make_lines(x_test, y_test, 300, np.random.default_rng(1))
    x_calib, _ = make_lines(x_train, y_train, 128, np.random.default_rng(2))
    with torch.no_grad():
        decoded = greedy_decode(net(torch.from_numpy(x_eval)).numpy())
    exact = np.mean([a == b for a, b in zip(decoded, t_eval)])
    print(f"float model: {exact:.3f} of the {len(t_eval)} test lines read exactly")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "digit_lines_crnn.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, WIDTH),), str(path), input_names=["image"], output_names=["log_probs"],
                      opset_version=12, dynamo=False, dynamic_axes={"image": {0: "N"}, "log_probs": {1: "N"}})
    m = onnx.load(str(path))
    dims = m.graph.output[0].type.tensor_type.shape
    dims.ClearField("dim")
    dims.dim.add().dim_param = "N"
    dims.dim.add().dim_param = "seqlen"  # the wrong declaration: rank 2 for a [T, N, C] output
    onnx.save(m, str(path))
    labels = np.full((len(t_eval), 6), -1, np.int64)
    for i, t in enumerate(t_eval):
        labels[i, :len(t)] = np.array(t) - 1  # digits 0-9, -1 pads
    np.savez(args.out / "digit_lines_test.npz", image=x_eval, label=labels)
    np.savez(args.out / "digit_lines_calib.npz", image=x_calib)
    print(f"wrote {path}, {args.out / 'digit_lines_test.npz'}, {args.out / 'digit_lines_calib.npz'}")


if __name__ == "__main__":
    main()
