"""Real network topologies from onnx's own backend test data, with seeded weights.

The ``light_*.onnx`` models in ``onnx/backend/test/data/light`` keep the real
architectures (ResNet-50, VGG-19, Inception v1/v2, DenseNet-121, ShuffleNet,
SqueezeNet, ZFNet, AlexNet) but replace every weight with a ConstantOfShape.
This turns each ConstantOfShape into an initializer of seeded random values
scaled like a trained network's (He-initialised weights, sane BatchNorm
statistics) so activations stay finite through the whole network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = ["resnet50", "vgg19", "inception_v1", "inception_v2", "densenet121", "shufflenet", "squeezenet", "zfnet512", "bvlc_alexnet"]


def _value(rng: np.random.Generator, shape: tuple[int, ...], op: str, index: int) -> np.ndarray:
    if op == "BatchNormalization":
        if index == 1:
            return rng.normal(1.0, 0.1, shape)
        if index == 4:
            return rng.uniform(0.5, 1.5, shape)
        return rng.normal(0.0, 0.1, shape)
    if op in ("Conv", "Gemm", "ConvTranspose") and index == 1:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if op == "Mul":
        return rng.normal(1.0, 0.05, shape)
    return rng.normal(0.0, 0.02, shape)


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model ``name`` with ConstantOfShape weights replaced by seeded initializers."""
    model = onnx.load(str(LIGHT_DIR / f"light_{name}.onnx"))
    g = model.graph
    rng = np.random.default_rng(seed)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    uses: dict[str, tuple[str, int]] = {}
    for n in g.node:
        for j, i in enumerate(n.input):
            uses.setdefault(i, (n.op_type, j))
    new_inits, keep_nodes, shape_names = [], [], set()
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in consts:
            shape = tuple(int(d) for d in consts[n.input[0]])
            op, idx = uses.get(n.output[0], ("", 0))
            new_inits.append(numpy_helper.from_array(_value(rng, shape, op, idx).astype(np.float32), n.output[0]))
            shape_names.add(n.input[0])
        else:
            keep_nodes.append(n)
    inits = [t for t in g.initializer if t.name not in shape_names] + new_inits
    init_names = {t.name for t in inits}
    inputs = [i for i in g.input if i.name not in init_names and i.name not in shape_names]
    del g.node[:]
    g.node.extend(keep_nodes)
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.input[:]
    g.input.extend(inputs)
    # Compare logits, not a saturated softmax: drop a trailing Softmax.
    last = g.node[-1]
    if last.op_type == "Softmax" and last.output[0] == g.output[0].name:
        g.output[0].name = last.input[0]
        g.node.pop()
    # IR 3 demanded that initializers also be graph inputs; from IR 4 they need not be.
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def available() -> list[str]:
    return [n for n in NAMES if (LIGHT_DIR / f"light_{n}.onnx").is_file()] if os.path.isdir(LIGHT_DIR) else []
