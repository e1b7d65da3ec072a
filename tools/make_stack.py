"""Generate a decoder-like stack of fp32 MatMul layers with external data, for memory and time benchmarks.

    python tools/make_stack.py OUT.onnx --gb 2            # about 2 GB of weights
    python tools/make_stack.py OUT.onnx --layers 3 --hidden 1024

Each layer is ``x + W_o(q*k + v) + W_down(Relu(W_up n))`` with ``n = LayerNorm(x)`` and ``q, k, v = W_q n, W_k n, W_v n``:
six weight matrices per layer (four hidden x hidden, one hidden x 4 hidden,
one 4 hidden x hidden), the shapes of a transformer decoder without the
attention softmax. Weights are written one tensor at a time straight into the
data file, so a stack bigger than memory can be made. Deterministic: the
same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def layer_params(hidden: int) -> int:
    return 4 * hidden * hidden + 2 * hidden * 4 * hidden


def build(out: Path, layers: int, hidden: int, seed: int = 0) -> Path:
    """Write the model and ``OUT.data``; returns the model path."""
    data_name = out.name + ".data"
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    with open(out.parent / data_name, "wb") as f:
        def weight(name: str, shape: tuple[int, ...], std: float) -> str:
            nonlocal offset
            a = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
            raw = a.tobytes()
            f.write(raw)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
            offset += len(raw)
            inits.append(t)
            return name

        x = "x"
        for i in range(layers):
            p = f"l{i}"
            g, b = f"{p}.ln.weight", f"{p}.ln.bias"
            inits.append(helper.make_tensor(g, TensorProto.FLOAT, [hidden], np.ones(hidden, np.float32)))
            inits.append(helper.make_tensor(b, TensorProto.FLOAT, [hidden], np.zeros(hidden, np.float32)))
            nodes.append(helper.make_node("LayerNormalization", [x, g, b], [f"{p}.n"], axis=-1, name=f"{p}.ln"))
            std = 1.0 / math.sqrt(hidden)
            mix = []
            for w in ("q", "k", "v"):
                nodes.append(helper.make_node("MatMul", [f"{p}.n", weight(f"{p}.{w}.weight", (hidden, hidden), std)],
                                              [f"{p}.{w}"], name=f"{p}.{w}"))
                mix.append(f"{p}.{w}")
            nodes.append(helper.make_node("Mul", [mix[0], mix[1]], [f"{p}.qk"], name=f"{p}.qk"))
            nodes.append(helper.make_node("Add", [f"{p}.qk", mix[2]], [f"{p}.mix"], name=f"{p}.mix"))
            nodes.append(helper.make_node("MatMul", [f"{p}.mix", weight(f"{p}.o.weight", (hidden, hidden), std)],
                                          [f"{p}.o"], name=f"{p}.o"))
            nodes.append(helper.make_node("MatMul", [f"{p}.n", weight(f"{p}.up.weight", (hidden, 4 * hidden), std)],
                                          [f"{p}.up"], name=f"{p}.up"))
            nodes.append(helper.make_node("Relu", [f"{p}.up"], [f"{p}.act"], name=f"{p}.act"))
            nodes.append(helper.make_node("MatMul", [f"{p}.act", weight(f"{p}.down.weight", (4 * hidden, hidden), std / 2)],
                                          [f"{p}.down"], name=f"{p}.down"))
            nodes.append(helper.make_node("Sum", [x, f"{p}.o", f"{p}.down"], [f"{p}.out"], name=f"{p}.res"))
            x = f"{p}.out"
        nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mixq-onnx tools/make_stack.py")
    out.write_bytes(model.SerializeToString())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--gb", type=float, default=None, help="approximate size of the weights in GB (1e9 bytes)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    layers = args.layers if args.gb is None else max(1, round(args.gb * 1e9 / (4 * layer_params(args.hidden))))
    build(args.out, layers, args.hidden, args.seed)
    print(f"{args.out}: {layers} layers, hidden {args.hidden}, {4 * layers * layer_params(args.hidden) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
