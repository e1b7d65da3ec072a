"""Train a small CNN on scikit-learn's bundled digits dataset (pure numpy) and export it to ONNX.

Regenerates models/digits_cnn.onnx, models/digits_test.npz and models/digits_calib.npz:

    python tools/train_digits_cnn.py

Deterministic: fixed seed, fixed split (scikit-learn's train_test_split with
random_state=0, 20% test). Architecture: Conv(1->16, 3x3) ReLU, Conv(16->32, 3x3)
ReLU, MaxPool 2x2, Flatten, MatMul(512->64) + Add, ReLU, Gemm(64->10).
The model is written at opset 13 so quantizing it exercises the opset upgrade.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]


def im2col(x: np.ndarray) -> np.ndarray:
    """[N,C,H,W] -> [N*H*W, C*9] patches of a 3x3, stride 1, pad 1 convolution."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)


def col2im(cols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, c, h, w = shape
    cols = cols.reshape(n, h, w, c, 3, 3)
    xp = np.zeros((n, c, h + 2, w + 2), cols.dtype)
    for i in range(3):
        for j in range(3):
            xp[:, :, i : i + h, j : j + w] += cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return xp[:, :, 1:-1, 1:-1]


def init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1.weight": he((16, 1, 3, 3), 9), "conv1.bias": np.zeros(16, np.float32),
        "conv2.weight": he((32, 16, 3, 3), 144), "conv2.bias": np.zeros(32, np.float32),
        "fc1.weight": he((512, 64), 512), "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": he((64, 10), 64), "fc2.bias": np.zeros(10, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray, cache: dict | None = None) -> np.ndarray:
    n = x.shape[0]
    c1 = im2col(x)
    a1 = np.maximum(c1 @ p["conv1.weight"].reshape(16, -1).T + p["conv1.bias"], 0)  # N*64,16
    h1 = a1.reshape(n, 8, 8, 16).transpose(0, 3, 1, 2)
    c2 = im2col(h1)
    a2 = np.maximum(c2 @ p["conv2.weight"].reshape(32, -1).T + p["conv2.bias"], 0)
    h2 = a2.reshape(n, 8, 8, 32).transpose(0, 3, 1, 2)
    win = h2.reshape(n, 32, 4, 2, 4, 2)
    pooled = win.max(axis=(3, 5))
    flat = pooled.reshape(n, 512)
    z3 = flat @ p["fc1.weight"] + p["fc1.bias"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ p["fc2.weight"] + p["fc2.bias"]
    if cache is not None:
        cache.update(locals())
    return logits


def backward(p: dict[str, np.ndarray], cache: dict, dlogits: np.ndarray) -> dict[str, np.ndarray]:
    g: dict[str, np.ndarray] = {}
    n = cache["n"]
    g["fc2.weight"] = cache["a3"].T @ dlogits
    g["fc2.bias"] = dlogits.sum(0)
    dz3 = (dlogits @ p["fc2.weight"].T) * (cache["z3"] > 0)
    g["fc1.weight"] = cache["flat"].T @ dz3
    g["fc1.bias"] = dz3.sum(0)
    dpooled = (dz3 @ p["fc1.weight"].T).reshape(n, 32, 4, 1, 4, 1)
    win = cache["win"]
    mask = win == cache["pooled"].reshape(n, 32, 4, 1, 4, 1)
    dh2 = (mask * dpooled).reshape(n, 32, 8, 8)
    da2 = dh2.transpose(0, 2, 3, 1).reshape(-1, 32) * (cache["a2"] > 0)
    g["conv2.weight"] = (da2.T @ cache["c2"]).reshape(32, 16, 3, 3)
    g["conv2.bias"] = da2.sum(0)
    dh1 = col2im(da2 @ p["conv2.weight"].reshape(32, -1), (n, 16, 8, 8))
    da1 = dh1.transpose(0, 2, 3, 1).reshape(-1, 16) * (cache["a1"] > 0)
    g["conv1.weight"] = (da1.T @ cache["c1"]).reshape(16, 1, 3, 3)
    g["conv1.bias"] = da1.sum(0)
    return g


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = init(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(w) for k, w in p.items()}
    t, lr, b1, b2 = 0, 2e-3, 0.9, 0.999
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), 64):
            idx = order[s : s + 64]
            cache: dict = {}
            logits = forward(p, x[idx], cache)
            e = np.exp(logits - logits.max(1, keepdims=True))
            prob = e / e.sum(1, keepdims=True)
            prob[np.arange(len(idx)), y[idx]] -= 1
            grads = backward(p, cache, prob / len(idx))
            t += 1
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * grads[k]
                v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
                p[k] -= (lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + 1e-8)).astype(np.float32)
    return p


def export(p: dict[str, np.ndarray], path: Path) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["conv1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "conv2.weight", "conv2.bias"], ["conv2"], name="conv2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc1.weight"], ["fc1_mm"], name="fc1"),
        helper.make_node("Add", ["fc1_mm", "fc1.bias"], ["fc1_out"], name="fc1_bias"),
        helper.make_node("Relu", ["fc1_out"], ["relu3"], name="relu3"),
        helper.make_node("Gemm", ["relu3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in p.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="mixq-onnx/tools/train_digits_cnn.py")
    model.ir_version = 7
    model.doc_string = "Small CNN trained on scikit-learn's digits dataset (8x8 images scaled to [0,1])."
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return model


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    xtr, xte, ytr, yte = load_split()
    p = train(xtr, ytr, args.epochs, args.seed)
    acc = float(np.mean(np.argmax(forward(p, xte), 1) == yte))
    args.out.mkdir(parents=True, exist_ok=True)
    export(p, args.out / "digits_cnn.onnx")
    np.savez_compressed(args.out / "digits_test.npz", image=xte, label=yte.astype(np.int64))
    # Calibration samples for data-aware methods: the first 256 training images, never the test split.
    np.savez_compressed(args.out / "digits_calib.npz", image=xtr[:256])
    print(f"test accuracy {acc:.4f} on {len(yte)} held-out images; wrote {args.out / 'digits_cnn.onnx'}")


if __name__ == "__main__":
    main()
