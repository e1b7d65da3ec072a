"""The whole-model search: end-to-end sensitivity, budgets in uniform bytes, never worse than uniform, --max-loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from mixq_onnx import Budget, BudgetError, ForceBits, QuantConfig, Uniform, quantize
from mixq_onnx.cli import main
from mixq_onnx.config import PER_CHANNEL, MaxLoss, Method, MixQuantRule, Sensitivity
from mixq_onnx.errors import ConfigError
from mixq_onnx.runtime.inputs import generate_inputs
from mixq_onnx.runtime.sensitivity import OutputKind, output_kind
from tests.helpers import init, make_model, rng, run, vi

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"


def _nmse(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    """Normalised output MSE of ``quantized`` against ``model`` in ONNX Runtime, over all feeds."""
    noise = signal = 0.0
    for f in feeds:
        ref, out = run(model, f)[0].astype(np.float64), run(quantized, f)[0].astype(np.float64)
        noise += float(np.sum((out - ref) ** 2))
        signal += float(np.sum(ref**2))
    return noise / signal


def misranked_model(seed: int = 0):
    """Two same-shaped layers whose weight errors rank them the wrong way round.

    ``loud`` is Gaussian (small relative roundoff) and drives the output;
    ``quiet`` has an outlier per channel (large relative roundoff) but its
    output is scaled by 0.01 before it is added, so it hardly matters.
    """
    r = rng(seed)
    loud = r.normal(0, 0.05, (128, 128)).astype(np.float32)
    quiet = r.normal(0, 0.05, (128, 128)).astype(np.float32)
    quiet[r.integers(0, 128, 128), np.arange(128)] = r.choice([-1, 1], 128) * 2.0
    nodes = [
        helper.make_node("MatMul", ["x", "loud"], ["a"], name="mm_loud"),
        helper.make_node("MatMul", ["x", "quiet"], ["b"], name="mm_quiet"),
        helper.make_node("Mul", ["b", "damp"], ["bd"], name="damp_mul"),
        helper.make_node("Add", ["a", "bd"], ["y"], name="add"),
    ]
    inits = [init("loud", loud), init("quiet", quiet), init("damp", np.array(0.01, np.float32))]
    return make_model(nodes, [vi("x", [4, 128])], [vi("y", [4, 128])], inits)


def _feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    r = rng(seed)
    return [{"x": r.normal(size=(4, 128)).astype(np.float32)} for _ in range(n)]


def test_e2e_protects_the_layer_that_weight_error_ranks_wrongly():
    m = misranked_model()
    feeds = _feeds(8)
    # --max-size is the whole file: room for exactly one layer at 8 bits (the file of such a plan).
    one_at_8 = quantize(m, QuantConfig(search=Uniform(4), force_bits=(ForceBits("loud", 8),), min_elements=0)).model.ByteSize()
    base = dict(search=Budget(max_bytes=one_at_8), layouts=(PER_CHANNEL,), min_elements=0)
    by_weight = quantize(m, QuantConfig(sensitivity=Sensitivity.WEIGHT, **base), evaluation=feeds)
    by_e2e = quantize(m, QuantConfig(sensitivity=Sensitivity.E2E, **base), evaluation=feeds)
    bits = {r: {t.name: t.chosen.bits for t in x.report.tensors} for r, x in (("weight", by_weight), ("e2e", by_e2e))}
    # Weight error spends the 8 bits on the outlier layer; the end-to-end measurement on the one that matters.
    w_err = {t.name: t.errors[0].nmse for t in by_weight.report.tensors}
    assert w_err["quiet"] > 3 * w_err["loud"]
    assert bits["e2e"] == {"loud": 8, "quiet": 4}
    e2e = {t.name: {e.bits: e.e2e for e in t.errors} for t in by_e2e.report.tensors}
    assert e2e["loud"][4] > 10 * e2e["quiet"][4]
    # In ONNX Runtime, on held-out inputs, the end-to-end plan is far more accurate.
    held_out = _feeds(8, seed=7)
    assert _nmse(m, by_e2e.model, held_out) < 0.5 * _nmse(m, by_weight.model, held_out)


def test_returned_plan_is_never_worse_than_uniform_at_its_bytes():
    m = misranked_model(3)
    feeds = _feeds(8)
    for target in (4.0, 4.5, 6.0):
        result = quantize(m, QuantConfig(search=Budget(target_bits=target), min_elements=0), evaluation=feeds)
        s = result.report.search
        assert result.report.totals.quantized_bytes <= s["limit_bytes"]
        fitting = [x for x in s["measured"] if x["bytes"] <= s["limit_bytes"] and x["plan"].startswith("uniform")]
        assert fitting, "every budget here fits at least uniform 4-bit per channel"
        # Measured in ONNX Runtime on the same samples: no uniform plan that fits does better.
        ours = _nmse(m, result.model, feeds)
        assert ours == pytest.approx(s["distance"], rel=1e-3)
        for rival in fitting:
            bits, layout = rival["plan"].split()[1], rival["plan"].split()[3]
            from mixq_onnx.config import Layout

            uni = quantize(m, QuantConfig(search=Uniform(int(bits)), layouts=(Layout.parse(layout),), min_elements=0))
            assert ours <= _nmse(m, uni.model, feeds) * (1 + 1e-6)


def test_target_bits_4_is_always_reachable_and_error_names_the_smallest_size():
    m = misranked_model()
    result = quantize(m, QuantConfig(search=Budget(target_bits=4), min_elements=0))
    q4 = quantize(m, QuantConfig(search=Uniform(4), min_elements=0)).report.totals.quantized_bytes
    assert result.report.search["limit_bytes"] == q4
    with pytest.raises(BudgetError, match=r"smallest file that can be written takes about \d+ bytes"):
        quantize(m, QuantConfig(search=Budget(max_bytes=100), min_elements=0))


def test_budget_is_checked_before_calibration(monkeypatch):
    import mixq_onnx.pipeline as pipeline

    def boom(*args, **kwargs):
        raise AssertionError("statistics were collected for a budget that cannot be met")

    monkeypatch.setattr(pipeline, "collect_input_stats", boom)
    m = misranked_model()
    with pytest.raises(BudgetError):
        quantize(m, QuantConfig(search=Budget(max_bytes=100), min_elements=0, method=Method.GPTQ), calibration=_feeds(4))


def test_max_loss_returns_the_smallest_plan_within_the_loss():
    m = misranked_model()
    feeds = _feeds(8)
    d4 = _nmse(m, quantize(m, QuantConfig(search=Uniform(4), min_elements=0)).model, feeds)
    d8 = _nmse(m, quantize(m, QuantConfig(search=Uniform(8), min_elements=0)).model, feeds)
    target = (d4 * d8) ** 0.5  # between the two uniform plans
    result = quantize(m, QuantConfig(search=MaxLoss(target), min_elements=0), evaluation=feeds)
    measured = _nmse(m, result.model, feeds)
    assert measured <= target
    assert result.report.search["distance"] == pytest.approx(measured, rel=1e-3)
    q8 = quantize(m, QuantConfig(search=Uniform(8), min_elements=0)).report.totals.quantized_bytes
    assert result.report.totals.quantized_bytes < q8
    # It keeps the loud layer wide and squeezes the quiet one.
    bits = {t.name: t.chosen.bits for t in result.report.tensors}
    assert bits["quiet"] == 4 and bits["loud"] == 8
    with pytest.raises(BudgetError, match="cannot be met: even the most accurate plan"):
        quantize(m, QuantConfig(search=MaxLoss(1e-12), min_elements=0), evaluation=feeds)


def test_mixquant_rule_uses_end_to_end_distance():
    m = misranked_model()
    result = quantize(m, QuantConfig(search=MixQuantRule(qem=1.0), layouts=(PER_CHANNEL,), min_elements=0), evaluation=_feeds(8))
    bits = {t.name: t.chosen.bits for t in result.report.tensors}
    assert bits == {"loud": 8, "quiet": 4}
    assert all("end-to-end distance" in t.reason for t in result.report.tensors)


def test_output_kinds():
    p = np.full((2, 5), 0.2)
    assert output_kind([p]) is OutputKind.PROBABILITIES
    assert output_kind([np.log(p)]) is OutputKind.LOG_PROBABILITIES
    assert output_kind([np.array([[3.0, -1.0]])]) is OutputKind.VALUES
    assert output_kind([np.array([1, 2], np.int64)]) is None


def test_kl_is_used_for_softmax_outputs():
    m = misranked_model()
    g = m.graph
    g.node.append(helper.make_node("Softmax", ["y"], ["p"], axis=-1))
    del g.output[:]
    g.output.append(vi("p", [4, 128]))
    result = quantize(m, QuantConfig(search=Budget(target_bits=5), min_elements=0), evaluation=_feeds(4))
    assert result.report.end_to_end["outputs"] == {"p": "kl"}


def dynamic_conv_model():
    """A Conv whose 33x33 kernel needs images of at least 33 pixels: the float model fails at 32."""
    w = rng(5).normal(0, 0.05, (8, 3, 33, 33)).astype(np.float32)
    conv = helper.make_node("Conv", ["image", "w"], ["y"], name="conv")
    return make_model([conv], [vi("image", [1, 3, "H", "W"])], [vi("y", [1, 8, "h", "w"])], [init("w", w)])


def test_dynamic_spatial_sizes_are_probed(tmp_path):
    m = dynamic_conv_model()
    gen = generate_inputs(m.SerializeToString(), {}, {}, 2, 0)
    assert gen.shapes == {"image": (1, 3, 64, 64)} and len(gen.feeds) == 2
    path, out = tmp_path / "dyn.onnx", tmp_path / "q.onnx"
    onnx.save(m, path)
    r = CliRunner().invoke(main, [str(path), "-o", str(out), "--target-bits", "4"])
    assert r.exit_code == 0, r.output
    assert "image:1x3x64x64" in r.output and out.exists()
    with pytest.raises(ConfigError, match="--input-shape"):
        generate_inputs(m.SerializeToString(), {"image": (1, 3, 16, 16)}, {}, 1, 0)


def test_stale_value_info_does_not_block_the_opset_upgrade():
    """value_info from the exporter that the new opset infers differently is inferred afresh, not restored."""
    w = rng(2).normal(0, 0.1, (64, 48)).astype(np.float32)
    shape = np.array([2, 2, 64], np.int64)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x3"], name="reshape"),
             helper.make_node("MatMul", ["x3", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [vi("x", [4, 64])], [vi("y", [2, 2, 48])], [init("w", w), init("shape", shape)],
                          value_info=[vi("x3", [4, 64])])  # stale: rank 2 where Reshape gives rank 3
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 7
    onnx.checker.check_model(m)  # the plain checker accepts it, as runtimes do
    result = quantize(m, QuantConfig(search=Budget(target_bits=4), min_elements=0))
    assert result.model.opset_import[0].version == 21
    onnx.checker.check_model(result.model, full_check=True)
    assert not any("fell back" in n for n in result.report.notes)
    x = rng(3).normal(size=(4, 64)).astype(np.float32)
    ref, out = run(m, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.99


def test_searches_refuse_an_int8_fallback(monkeypatch):
    import mixq_onnx.graph.rewrite as rw

    def broken(model, target):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(rw.version_converter, "convert_version", broken)
    from mixq_onnx.errors import ModelError

    with pytest.raises(ModelError, match="the search's widths and layouts need opset 21"):
        quantize(misranked_model(), QuantConfig(search=Budget(target_bits=4), min_elements=0))


def test_cli_digits_target_bits_4_with_gptq_and_report(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, [str(DIGITS), "-o", str(out), "--target-bits", "4", "--calib", str(CALIB), "--calib-samples", "32",
                                  "--method", "gptq", "--report", str(rep), "--inputs", str(ROOT / "models" / "digits_test.npz")])
    assert r.exit_code == 0, r.output
    assert "budget: --target-bits 4 = " in r.output and "measured end to end" in r.output
    data = json.loads(rep.read_text())
    assert data["end_to_end"]["source"] == "calibration samples" and data["end_to_end"]["samples"] == 32
    assert all(t["rounding"]["method"] in ("gptq", "mse") for t in data["tensors"])
    top1 = data["verification"]["runs"][0]["outputs"][0]["top1_agreement"]
    assert top1 >= 0.97


def test_cli_max_loss_and_sensitivity_options():
    r = CliRunner().invoke(main, ["--help"])
    r = CliRunner().invoke(main, ["quantize", "--help"])
    assert "--max-loss" in r.output and "--e2e-samples" in r.output and "e2e" in r.output
    r = CliRunner().invoke(main, [str(DIGITS), "--plan", "--max-loss", "0.01", "--sensitivity", "weight"])
    assert r.exit_code == 2 and "--max-loss measures the model end to end" in r.output
    r = CliRunner().invoke(main, [str(DIGITS), "--plan", "--max-loss", "0.001"])
    assert r.exit_code == 0, r.output
    assert "accuracy target: --max-loss 0.001" in r.output


def test_bf16_weights_fall_back_with_a_note():
    import ml_dtypes

    w = rng(4).normal(0, 0.1, (64, 64)).astype(ml_dtypes.bfloat16)
    t = onnx.numpy_helper.from_array(w.view(np.uint16), "w")
    t.data_type = TensorProto.BFLOAT16
    nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w32"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])], [t], opset=13)
    result = quantize(m, QuantConfig(search=Budget(target_bits=4), min_elements=0))
    assert any("end-to-end measurements are not possible" in n for n in result.report.notes)


def test_subgraph_weights_are_measured_end_to_end():
    """Weights inside If branches (Constant nodes) and outer-scope initializers are fed as main-graph inputs."""
    from tests.test_graphs import _if_model

    m = _if_model()
    x = rng(9).normal(size=(4, 64)).astype(np.float32)
    feeds = [{"cond": np.array(c), "x": x} for c in (True, False)]
    result = quantize(m, QuantConfig(search=Budget(target_bits=6), min_elements=0), evaluation=feeds)
    e = result.report.end_to_end
    assert e["weights_measured"] == 2 and e["not_measured"] == {}
    graphs = {t.name: t.graph for t in result.report.tensors}
    assert graphs == {"tw": "main/branch:then_branch", "outer_w": "main"}
    assert all(err.e2e is not None and err.e2e > 0 for t in result.report.tensors for err in t.errors)
    for f in feeds:
        ref, out = run(m, f)[0], run(result.model, f)[0]
        assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.99


def test_end_to_end_search_is_deterministic():
    m = misranked_model()
    a = quantize(m, QuantConfig(search=Budget(target_bits=5), min_elements=0)).model.SerializeToString()
    b = quantize(m, QuantConfig(search=Budget(target_bits=5), min_elements=0)).model.SerializeToString()
    assert a == b


def test_an_infinite_mask_is_no_change_and_carries_no_signal():
    """A -inf attention mask crossing a block boundary never changes: it adds nothing to a distance, where inf - inf
    used to make every distance of its block NaN (and its signal inf, every distance 0)."""
    from mixq_onnx.runtime.sensitivity import energy, squared_change

    f = np.array([[0.0, -np.inf], [2.0, -np.inf]], np.float32)
    q = np.array([[0.5, -np.inf], [2.0, -np.inf]], np.float32)
    assert squared_change(q, f) == pytest.approx(0.25)
    assert squared_change(f, f.copy()) == 0.0
    assert energy(f) == pytest.approx(4.0)
    broken = np.array([[0.5, 3.0], [2.0, -np.inf]], np.float32)  # a masked entry that became finite
    assert squared_change(broken, f) == np.inf
    assert squared_change(np.full_like(f, np.nan), f) == np.inf


def test_next_token_logits_are_compared_as_distributions():
    """Logits [N, T, V] over the vocabulary of the model's token input: KL of their softmax, which a shift of every
    score leaves at 0 and which counts one term per position."""
    from mixq_onnx.runtime.sensitivity import _kl_sum

    r = rng(1)
    logits = r.standard_normal((2, 5, 7)).astype(np.float32)
    assert output_kind([logits], vocabulary=7) is OutputKind.LOGITS
    assert output_kind([logits]) is OutputKind.VALUES and output_kind([logits], vocabulary=8) is OutputKind.VALUES
    assert output_kind([logits[0]], vocabulary=7) is OutputKind.VALUES  # [T, V] without a batch: not a sequence of them
    total, count = _kl_sum(logits, logits + np.float32(3.0), True, True)
    assert total == pytest.approx(0.0, abs=1e-9) and count == 10
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    q_logits = logits + r.standard_normal(logits.shape).astype(np.float32)
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    expected = float(np.sum(p * (np.log(p) - np.log(q))))
    assert _kl_sum(logits, q_logits, True, True)[0] == pytest.approx(expected, rel=1e-5)
