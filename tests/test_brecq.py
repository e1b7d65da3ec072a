"""Block reconstruction (--method brecq): cuts, conversion checked against ONNX Runtime, accuracy, fallback, extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from mixq_onnx import QuantConfig, Uniform, quantize
from mixq_onnx.graph.blocks import block_model, partition
from mixq_onnx.runtime.calibrate import load_calibration
from mixq_onnx.runtime.store import ActivationStore
from mixq_onnx.config import Method, Reconstruction
from mixq_onnx.errors import ConfigError
from mixq_onnx.graph.find import find_weights

from .helpers import init, make_model, rng, run, vi

torch = pytest.importorskip("torch")  # the [brecq] extra; '.[test]' installs it
from mixq_onnx.runtime.torch_convert import to_torch  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
TINY = MODELS / "tiny_transformer.onnx"


def _tiny_feeds(samples: int):
    return load_calibration(MODELS / "tiny_transformer_calib.npz", TINY, samples)


def _brecq(**kw) -> QuantConfig:
    return QuantConfig(search=Uniform(kw.pop("bits", 3)), method=Method.BRECQ, reconstruction=Reconstruction(**kw))


def test_cuts_fall_between_layers_and_leave_side_tensors_out():
    model = onnx.load(TINY)
    names = [s.name for s in find_weights(model, QuantConfig()).weights]
    part = partition(model, names, 1)
    # Embeddings, then each encoder layer's attention and feed-forward halves: at most one quantized tensor crosses a cut.
    assert len(part.blocks) >= 5
    assert all(len(b.affected_inputs) <= 1 for b in part.blocks)
    assert sorted(w for b in part.blocks for w in b.weights) == sorted(names)
    # Merging up to 8 weights keeps whole segments: two blocks (embeddings + layer 1, layer 2 + classifier).
    merged = partition(model, names, 8)
    assert [len(b.weights) for b in merged.blocks] == [8, 6]


def _conv_zoo() -> onnx.ModelProto:
    """Ops onnx2torch does not handle on its own: Conv with auto_pad SAME_UPPER and a weight input, ConvTranspose with
    asymmetric pads, Reshape allowzero=1, ReduceMean with axes as an input (opset 18), GreaterOrEqual."""
    r = rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], auto_pad="SAME_UPPER", strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "w2", "b2"], ["t1"], strides=[2, 2], pads=[0, 1, 1, 0], kernel_shape=[3, 3]),
        helper.make_node("ReduceMean", ["t1", "axes"], ["m"], keepdims=1),
        helper.make_node("GreaterOrEqual", ["t1", "m"], ["ge"]),
        helper.make_node("Cast", ["ge"], ["gef"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["t1", "gef"], ["y0"]),
        helper.make_node("Reshape", ["y0", "shape"], ["y"], allowzero=1),
    ]
    inits = [init("w1", r.standard_normal((8, 3, 3, 3)).astype(np.float32)),
             init("w2", r.standard_normal((8, 4, 3, 3)).astype(np.float32)),
             init("b2", r.standard_normal(4).astype(np.float32)),
             init("axes", np.array([2, 3], np.int64)),
             init("shape", np.array([2, 4, -1], np.int64))]
    return make_model(nodes, [vi("x", [2, 3, 9, 9])], [vi("y", ["a", "b", "c"])], inits, opset=18)


def _recurrent_zoo() -> onnx.ModelProto:
    """A bidirectional LSTM (all three outputs used) into a GRU with linear_before_reset, then Gelu (opset 20)."""
    r = rng(4)
    h = 6
    nodes = [
        helper.make_node("LSTM", ["x", "lw", "lr", "lb"], ["y", "y_h", "y_c"], hidden_size=h, direction="bidirectional"),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "shape"], ["y2"]),
        helper.make_node("GRU", ["y2", "gw", "gr", "gb"], ["g", "g_h"], hidden_size=h, linear_before_reset=1),
        helper.make_node("Gelu", ["g"], ["out"], approximate="tanh"),
        helper.make_node("Add", ["y_c", "g_h"], ["state"]),
    ]
    inits = [init("lw", (r.standard_normal((2, 4 * h, 8)) / 3).astype(np.float32)),
             init("lr", (r.standard_normal((2, 4 * h, h)) / 3).astype(np.float32)),
             init("lb", (r.standard_normal((2, 8 * h)) / 3).astype(np.float32)),
             init("shape", np.array([0, 0, 2 * h], np.int64)),
             init("gw", (r.standard_normal((1, 3 * h, 2 * h)) / 3).astype(np.float32)),
             init("gr", (r.standard_normal((1, 3 * h, h)) / 3).astype(np.float32)),
             init("gb", (r.standard_normal((1, 6 * h)) / 3).astype(np.float32))]
    return make_model(nodes, [vi("x", [5, 2, 8])], [vi("out", [5, 1, 2, h]), vi("state", [2, 2, h])], inits, opset=20)


@pytest.mark.parametrize("name", ["zoo", "recurrent", "tiny_transformer", "digits_cnn"])
def test_converted_blocks_match_onnx_runtime(name):
    """Every block of these models, converted with its weights as inputs, computes what ONNX Runtime computes."""
    model = {"zoo": _conv_zoo, "recurrent": _recurrent_zoo}.get(name, lambda: onnx.load(MODELS / f"{name}.onnx"))()
    weights = {s.name: s.array for s in find_weights(model, QuantConfig(min_elements=0)).weights}
    if name == "zoo":
        feeds = {"x": rng(2).standard_normal((2, 3, 9, 9)).astype(np.float32)}
    elif name == "recurrent":
        feeds = {"x": rng(2).standard_normal((5, 2, 8)).astype(np.float32)}
    elif name == "digits_cnn":
        feeds = {"image": np.load(MODELS / "digits_test.npz")["image"][:4]}
    else:
        feeds = {"input_ids": np.load(MODELS / "tiny_transformer_test.npz")["input_ids"][:4]}
    part = partition(model, sorted(weights), 1)
    # Every block's inputs, computed by the whole model in ONNX Runtime.
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    wanted = [t for b in part.blocks for t in b.inputs + b.outputs if t not in feeds]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(wanted))
    values = dict(zip([o.name for o in exposed.graph.output], run(exposed, feeds)))
    values.update(feeds)
    checked = 0
    for b in part.blocks:
        infos = {t: (helper.np_dtype_to_tensor_dtype(values[t].dtype), values[t].shape) for t in b.inputs}
        infos.update({w: (onnx.TensorProto.FLOAT, weights[w].shape) for w in b.weights})
        bm = block_model(model, b, infos, b.weights)
        args = [values[t] for t in b.inputs] + [weights[w] for w in b.weights]
        ref = run(bm, dict(zip([t for t in b.inputs] + list(b.weights), args)))
        module = to_torch(bm)
        with torch.no_grad():
            got = module(*[torch.from_numpy(np.array(a)) for a in args])
        got = list(got) if isinstance(got, (list, tuple)) else [got]
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            g = g.numpy()
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(r)))))
            checked += 1
    assert checked >= len(part.blocks)


def _held_out_error(q: onnx.ModelProto, x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((run(q, {"input_ids": x})[0] - ref) ** 2))


@pytest.mark.slow  # 12-20 s on 2 cores: the fast suite must stay under 2 minutes; CI runs it with the slow tests
def test_brecq_beats_adaround_at_3_bits_on_held_out_inputs():
    """A two-layer transformer at 3 bits: block reconstruction lands closer to the float model than AdaRound, on
    sequences it never saw, in ONNX Runtime."""
    feeds = _tiny_feeds(128)
    x = np.load(MODELS / "tiny_transformer_test.npz")["input_ids"][:300]
    model = onnx.load(TINY)
    ref = run(model, {"input_ids": x})[0]
    ada = quantize(model, QuantConfig(search=Uniform(3), method=Method.ADAROUND), calibration=feeds)
    brecq = quantize(model, _brecq(samples=128), calibration=feeds)
    blocks = brecq.report.reconstruction["blocks"]
    assert [b["status"] for b in blocks] == ["reconstructed", "reconstructed"]
    assert all(b["loss_after"] < b["loss_before"] for b in blocks)
    e_ada, e_brecq = _held_out_error(ada.model, x, ref), _held_out_error(brecq.model, x, ref)
    assert e_brecq < 0.8 * e_ada, (e_brecq, e_ada)
    methods = {t["rounding"]["method"] for t in brecq.report.to_dict()["tensors"]}
    assert methods == {"brecq"}
    # Only the integers changed: the same graph as the layer-wise rounding's.
    assert [n.op_type for n in brecq.model.graph.node] == [n.op_type for n in ada.model.graph.node]


def test_brecq_is_deterministic_and_spilling_changes_nothing():
    feeds = _tiny_feeds(32)
    model = onnx.load(TINY)
    a = quantize(model, _brecq(samples=32, iters=30), calibration=feeds)
    b = quantize(model, _brecq(samples=32, iters=30), calibration=feeds)
    spilled = quantize(model, _brecq(samples=32, iters=30, memory_mb=0), calibration=feeds)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert spilled.report.reconstruction["spilled_bytes"] > 0 and a.report.reconstruction["spilled_bytes"] == 0
    assert spilled.model.SerializeToString() == a.model.SerializeToString()


def _cnn_with(op: str) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Three convolutions; ``op`` (one onnx2torch cannot convert) sits between the second and the third."""
    r = rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node(op, ["c2"], ["s2"], name="odd"),
        helper.make_node("Conv", ["s2", "w3"], ["y"], pads=[1, 1, 1, 1], name="conv3"),
    ]
    inits = [init(f"w{k}", (r.standard_normal((16, 3 if k == 1 else 16, 3, 3)) / 6).astype(np.float32)) for k in (1, 2, 3)]
    model = make_model(nodes, [vi("x", ["n", 3, 8, 8])], [vi("y", ["n", 16, 8, 8])], inits, opset=13)
    feeds = [{"x": r.standard_normal((8, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    return model, feeds


def test_a_block_that_cannot_be_converted_keeps_the_layer_wise_rounding():
    model, feeds = _cnn_with("Shrink")
    result = quantize(model, _brecq(bits=4, block_weights=1, iters=40), calibration=feeds)
    blocks = result.report.reconstruction["blocks"]
    fell = [b for b in blocks if b["status"] == "fallback"]
    assert len(fell) == 1 and "onnx2torch" in fell[0]["reason"] and "Shrink" in fell[0]["reason"]
    assert any(b["status"] == "reconstructed" for b in blocks)
    rounding = {t["name"]: t["rounding"] for t in result.report.to_dict()["tensors"]}
    kept = [n for n, r in rounding.items() if r["method"] == "gptq"]
    assert kept == fell[0]["weights"] and "kept gptq" in rounding[kept[0]]["note"]
    # The written model still runs and stays close to the float one.
    x = feeds[0]["x"]
    ref, out = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.mean((out - ref) ** 2) < 0.05 * np.mean(ref**2)


def test_missing_extra_is_a_one_line_error(tmp_path):
    """Without PyTorch, --method brecq fails before any work with how to install the extra."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mixq_onnx.cli import main\n"
        "sys.argv = ['mixq-onnx', sys.argv[1], '-o', sys.argv[2], '--method', 'brecq', '--bits', '4', '--calib', sys.argv[3]]\n"
        "main()\n"
    )
    out = tmp_path / "q.onnx"
    proc = subprocess.run([sys.executable, "-c", code, str(MODELS / "digits_cnn.onnx"), str(out), str(MODELS / "digits_calib.npz")],
                          capture_output=True, text=True)
    assert proc.returncode == ConfigError.exit_code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'mixq-onnx[brecq]'" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_runs_brecq_and_reports_the_blocks(tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    proc = subprocess.run([sys.executable, "-m", "mixq_onnx.cli", str(TINY), "-o", str(out), "--bits", "4", "--method", "brecq",
                           "--calib", str(MODELS / "tiny_transformer_calib.npz"), "--calib-samples", "32", "--brecq-iters", "20",
                           "--brecq-batch", "8", "--brecq-block-weights", "4", "--brecq-fallback", "mse", "--brecq-learn-scales",
                           "--report", str(report)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "block reconstruction:" in proc.stdout
    data = json.loads(report.read_text())
    assert data["config"]["reconstruction"]["iters"] == 20 and data["config"]["reconstruction"]["fallback"] == "mse"
    # A quarter of the 32 samples (8) is held out for verification: 24 calibrate.
    assert len(data["reconstruction"]["blocks"]) >= 3 and data["reconstruction"]["samples"] == 24
    assert data["verification"]["source"] == "held-out calibration"
    bad = subprocess.run([sys.executable, "-m", "mixq_onnx.cli", str(TINY), "-o", str(out), "--brecq-iters", "5"],
                         capture_output=True, text=True)
    assert bad.returncode == ConfigError.exit_code and "--method brecq" in bad.stderr


@pytest.mark.parametrize("kw", [{"iters": 0}, {"batch": -1}, {"lr": 0.0}, {"fallback": Method.RTN}, {"fallback": Method.BRECQ}])
def test_reconstruction_options_are_validated(kw):
    with pytest.raises(ConfigError):
        Reconstruction(**kw)


def _two_layer_classifier():
    r = rng(5)
    w1 = r.standard_normal((12, 16)).astype(np.float32) / 3
    w2 = r.standard_normal((16, 5)).astype(np.float32) / 3
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["logits"])]
    model = make_model(nodes, [vi("x", ["n", 12])], [vi("logits", ["n", 5])], [init("w1", w1), init("w2", w2)])
    return model, w1, w2


def test_fisher_weights_are_the_squared_loss_gradients_at_each_block_output(tmp_path):
    """The Fisher weights of both blocks equal (d CE / d output)^2 with the float top-1 class as label, worked out by hand."""
    from mixq_onnx.runtime import brecq

    model, w1, w2 = _two_layer_classifier()
    x = rng(6).standard_normal((6, 12)).astype(np.float32)
    samples = [{"x": x[i : i + 1]} for i in range(6)]
    part = partition(model, ["w1", "w2"], 1)
    # The weightless Relu joins the first block.
    assert [b.outputs for b in part.blocks] == [("a",), ("logits",)]
    infos = {w: (onnx.TensorProto.FLOAT, a.shape) for w, a in (("w1", w1), ("w2", w2))}
    store, note = brecq._fisher(model, part, samples, {"w1": w1, "w2": w2}, infos, ActivationStore(2**20, tmp_path / "g"),
                                ActivationStore(0, tmp_path / "a"))  # the float outputs all go to disk
    assert note == ""
    h = x.astype(np.float64) @ w1
    z = np.maximum(h, 0) @ w2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g_z = p - (np.arange(5) == z.argmax(1)[:, None])
    g_a = g_z @ w2.T
    np.testing.assert_allclose(np.concatenate(store.values["logits"]), g_z**2, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(store.values["a"]), g_a**2, rtol=1e-4, atol=1e-7)


def test_fisher_runs_end_to_end_and_says_when_no_output_admits_a_loss():
    model, _, _ = _two_layer_classifier()
    feeds = [{"x": rng(7).standard_normal((32, 12)).astype(np.float32)}]
    result = quantize(model, QuantConfig(search=Uniform(3), method=Method.BRECQ, min_elements=0,
                                  reconstruction=Reconstruction(fisher=True, iters=30)), calibration=feeds)
    rec = result.report.reconstruction
    assert rec["fisher_note"] == "" and all(b["fisher"] for b in rec["blocks"] if b["status"] == "reconstructed")
    tiny = quantize(onnx.load(TINY), _brecq(samples=16, iters=10, fisher=True), calibration=_tiny_feeds(16))
    assert tiny.report.reconstruction["fisher_note"] == ""  # logits [batch, 8]
    # A model whose only output is 3-D (token states) admits no classification loss.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    states = make_model(nodes, [vi("x", ["n", 4, 12])], [vi("y", ["n", 4, 16])],
                        [init("w", rng(8).standard_normal((12, 16)).astype(np.float32))])
    res = quantize(states, QuantConfig(search=Uniform(3), method=Method.BRECQ, min_elements=0,
                                       reconstruction=Reconstruction(fisher=True, iters=10)),
                   calibration=[{"x": rng(9).standard_normal((8, 4, 12)).astype(np.float32)}])
    assert "no output admits a loss" in res.report.reconstruction["fisher_note"]
    assert not any(b["fisher"] for b in res.report.reconstruction["blocks"])


def test_a_broken_torchvision_does_not_stop_conversion(tmp_path):
    """A torchvision built for another PyTorch raises at import; onnx2torch only needs it for NMS and RoiAlign."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    code = (
        "import onnx\n"
        "from mixq_onnx.runtime.torch_convert import to_torch\n"
        "import torchvision\n"
        "assert not hasattr(torchvision, '__file__')  # the stand-in\n"
        f"to_torch(onnx.load({str(MODELS / 'digits_cnn.onnx')!r}))\n"
        "print('converted')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "converted" in proc.stdout, proc.stderr[-800:]


def _scalar_side_input_cnn() -> onnx.ModelProto:
    """A CNN whose second block reads a 0-d tensor computed from the graph input (a normalising scalar), as real
    exports do (EfficientNet-Lite0's): the block's side input has no sample axis."""
    r = rng(3)
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["sc"], keepdims=0),  # 0-d, unaffected by quantization
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Div", ["r2", "sc"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["p"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["p", "w3"], ["y"]),
    ]
    inits = [init("w1", r.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32)),
             init("w2", r.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32)),
             init("w3", r.normal(0, 0.3, (16, 10)).astype(np.float32))]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 10])], inits, opset=13)


@pytest.mark.parametrize("samples", [1, 9])
def test_brecq_runs_blocks_with_a_scalar_side_input_and_batch_one(samples):
    """Regression: a 0-d block input (and a model fixed at batch 1, so one sample per run) crashed np.concatenate."""
    m = _scalar_side_input_cnn()
    r = rng(4)
    feeds = [{"x": np.abs(r.normal(size=(1, 3, 8, 8))).astype(np.float32) + 0.1} for _ in range(samples)]
    cfg = _brecq(bits=4, iters=4, batch=4, block_weights=1)
    result = quantize(m, QuantConfig(search=cfg.search, method=cfg.method, reconstruction=cfg.reconstruction, min_elements=0),
                      calibration=feeds)
    blocks = result.report.reconstruction["blocks"]
    assert len(blocks) == 3 and all(b["status"] != "fallback" for b in blocks), blocks
    out = run(result.model, feeds[0])[0]
    ref = run(m, feeds[0])[0]
    assert np.dot(out.ravel(), ref.ravel()) / (np.linalg.norm(out) * np.linalg.norm(ref)) > 0.95
