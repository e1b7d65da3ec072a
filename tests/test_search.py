"""The search: MixQuant rule, exact budget knapsack, storage awareness and overrides."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mixq_onnx import Budget, BudgetError, ForceBits, Layout, MixQuantRule, QuantConfig, Uniform, quantize
from mixq_onnx.config import PER_CHANNEL, Sensitivity
from mixq_onnx.numerics.qdq import QTYPES, GroupRange, fake_quantize, quantize_weight
from mixq_onnx.planning.search import _lagrangian, solve_mckp
from onnx import helper
from tests.helpers import init, make_model, quantize_and_compare, rng, vi


def two_layer_model(seed: int = 0, n_gauss: int = 3):
    """Gaussian layers and one outlier-heavy layer of the same shape, in a chain."""
    r = rng(seed)
    inits, nodes, prev = [], [], "x"
    for k in range(n_gauss):
        inits.append(init(f"gauss{k}", r.normal(0, 0.06, (256, 256)).astype(np.float32)))
        nodes += [helper.make_node("MatMul", [prev, f"gauss{k}"], [f"h{k}"], name=f"mm_gauss{k}"),
                  helper.make_node("Relu", [f"h{k}"], [f"r{k}"])]
        prev = f"r{k}"
    heavy = r.normal(0, 0.05, (256, 256)).astype(np.float32)
    # One large outlier per output channel stretches its min-max range.
    idx = r.integers(0, 256, 256)
    heavy[idx, np.arange(256)] = r.choice([-1, 1], 256) * r.uniform(0.8, 1.2, 256)
    inits.append(init("heavy", heavy))
    nodes.append(helper.make_node("MatMul", [prev, "heavy"], ["y"], name="mm_heavy"))
    m = make_model(nodes, [vi("x", [8, 256])], [vi("y", [8, 256])], inits)
    return m, {"x": r.normal(size=(8, 256)).astype(np.float32)}


# The weight-error rule as the paper states it: per-channel scales, the weight's own roundoff error.
WEIGHT_RULE = dict(sensitivity=Sensitivity.WEIGHT, layouts=(PER_CHANNEL,), min_elements=0)


def _bits(result):
    return {t.name: t.chosen.bits for t in result.report.tensors}


def test_mixquant_gives_the_sensitive_layer_more_bits():
    m, feeds = two_layer_model()
    result, s = quantize_and_compare(m, feeds, QuantConfig(search=MixQuantRule(qem=2.0), **WEIGHT_RULE))
    bits = _bits(result)
    assert bits == {"gauss0": 4, "gauss1": 4, "gauss2": 4, "heavy": 8}
    # The heavy layer's normalised error at 4 bits is far above the Gaussian one's.
    errs = {t.name: {(e.bits, e.granularity): e.nmse for e in t.errors} for t in result.report.tensors}
    assert errs["heavy"][(4, "channel")] > 5 * errs["gauss0"][(4, "channel")]
    # And it pays off: better than uniform 4 bits at the model output.
    _, s4 = quantize_and_compare(m, feeds, QuantConfig(search=Uniform(4), min_elements=0))
    assert s > s4 + 3


def test_mixquant_literal_bits_picks_the_lowest_width_within_threshold():
    m, feeds = two_layer_model()
    result = quantize(m, QuantConfig(search=MixQuantRule(qem=1.0), storage_aware=False, **WEIGHT_RULE))
    t = {x.name: x for x in result.report.tensors}
    thr = result.report.search["threshold"]
    for name, rep in t.items():
        chosen = rep.chosen.bits
        lower = [e for e in rep.errors if e.bits < chosen]
        assert all(e.nmse > thr for e in lower)
        assert rep.chosen.nmse <= thr or chosen == 8


def test_storage_aware_never_picks_a_lossier_width_for_the_same_bytes():
    m, feeds = two_layer_model()
    for qem in (0.3, 1.0, 3.0, 30.0):
        result = quantize(m, QuantConfig(search=MixQuantRule(qem=qem), **WEIGHT_RULE))
        assert set(_bits(result).values()) <= {4, 8}


def test_per_tensor_reference_trap_is_avoided():
    """With a per-tensor 8-bit reference every layer would get the same bits; ours differ."""
    m, _ = two_layer_model()
    result = quantize(m, QuantConfig(search=MixQuantRule(qem=1.5), storage_aware=False, **WEIGHT_RULE))
    assert len(set(_bits(result).values())) == 2


def _uniform_bytes(m, bits: int, int2: bool = False) -> int:
    return quantize(m, QuantConfig(search=Uniform(bits), allow_int2=int2, min_elements=0)).report.totals.quantized_bytes


@pytest.mark.parametrize("target, int2", [(2.0, True), (3.0, True), (4.0, False), (4.5, False), (5.0, False),
                                          (6.0, False), (7.0, False), (8.0, False)])
def test_target_bits_interpolates_between_the_container_widths(target, int2):
    """--target-bits B: the uniform per-channel plans at 2 (with --int2), 4 and 8 bits, interpolated between them."""
    m, feeds = two_layer_model()
    anchors = [2, 4, 8] if int2 else [4, 8]
    lo, hi = max(a for a in anchors if a <= target), min(a for a in anchors if a >= target)
    u_lo, u_hi = _uniform_bytes(m, lo, int2), _uniform_bytes(m, hi, int2)
    limit = u_lo if lo == hi else int(np.floor(u_lo + (target - lo) / (hi - lo) * (u_hi - u_lo)))
    result = quantize(m, QuantConfig(search=Budget(target_bits=target), allow_int2=int2, min_elements=0))
    assert result.report.search["limit_bytes"] == limit
    assert result.report.totals.quantized_bytes <= limit
    # Every plan the search measured is listed; what it returns is the best of those that fit.
    measured = result.report.search["measured"]
    returned = [x for x in measured if x["plan"] == result.report.search["returned"]][0]
    assert all(returned["distance"] <= x["distance"] + 1e-15 for x in measured if x["bytes"] <= limit)
    assert any(x["plan"].startswith("uniform") for x in measured)


def test_budgets_between_containers_are_distinct_and_mix_widths():
    """5, 6 and 7 bits are not the 8-bit plan: each is a different size, and 5 bits mixes 4- and 8-bit tensors."""
    m, _ = two_layer_model()
    plans = {b: quantize(m, QuantConfig(search=Budget(target_bits=b), layouts=(PER_CHANNEL,), min_elements=0))
             for b in (4.0, 4.5, 5.0, 6.0, 7.0, 8.0)}
    limits = [plans[b].report.search["limit_bytes"] for b in sorted(plans)]
    assert limits == sorted(set(limits)), limits
    assert plans[8.0].report.totals.quantized_bytes > plans[7.0].report.totals.quantized_bytes
    assert sorted({t.chosen.bits for t in plans[6.0].report.tensors}) == [4, 8]


def test_budget_max_size_is_the_whole_file_and_unreachable_budget():
    m, feeds = two_layer_model()
    file4 = quantize(m, QuantConfig(search=Uniform(4), min_elements=0)).model.ByteSize()
    ok = quantize(m, QuantConfig(search=Budget(max_bytes=file4), min_elements=0))
    assert ok.model.ByteSize() <= file4
    assert ok.report.search["file_bytes"] == ok.model.ByteSize()
    # Per-channel only: uniform INT4 is then the smallest plan there is, and its file does not fit one byte less.
    with pytest.raises(BudgetError, match=r"the smallest file that can be written takes about \d+ bytes") as exc:
        quantize(m, QuantConfig(search=Budget(max_bytes=file4 - 1), layouts=(PER_CHANNEL,), min_elements=0))
    assert exc.value.smallest_reachable >= file4 - 1


def test_budget_with_int2_and_granularity_choices_mixes_at_the_int4_size():
    m, feeds = two_layer_model()
    file4 = quantize(m, QuantConfig(search=Uniform(4), min_elements=0)).model.ByteSize()
    cfg = QuantConfig(search=Budget(max_bytes=file4), allow_int2=True,
                      layouts=(Layout.parse("channel"), Layout.parse("block32"), Layout.parse("block128")), min_elements=0)
    result, s = quantize_and_compare(m, feeds, cfg)
    chosen = {(t.chosen.bits, t.chosen.granularity) for t in result.report.tensors}
    assert result.model.ByteSize() <= file4
    assert result.model.opset_import[0].version == 25 or all(b != 2 for b, _ in chosen)
    _, s4 = quantize_and_compare(m, feeds, QuantConfig(search=Uniform(4), min_elements=0))
    assert s >= s4 - 0.5  # never materially worse than uniform INT4 at the same bytes


def _random_knapsacks(seed: int, count: int = 30):
    """Small random multiple-choice knapsacks with their brute-force optimum."""
    r = np.random.default_rng(seed)
    for _ in range(count):
        costs = [np.sort(r.integers(1, 20, r.integers(1, 4))) for _ in range(r.integers(2, 6))]
        errs = [np.sort(r.uniform(0, 1, len(c)))[::-1].copy() for c in costs]
        budget = int(sum(c.min() for c in costs) + r.integers(0, 30))
        opt = min(
            sum(e[j] for e, j in zip(errs, js))
            for js in itertools.product(*[range(len(c)) for c in costs])
            if sum(c[j] for c, j in zip(costs, js)) <= budget
        )
        yield costs, errs, budget, opt


def test_dp_is_exact_against_brute_force():
    for costs, errs, budget, opt in _random_knapsacks(0):
        choice, lower, exact = solve_mckp(costs, errs, budget)
        assert exact
        assert sum(c[j] for c, j in zip(costs, choice)) <= budget
        assert sum(e[j] for e, j in zip(errs, choice)) == pytest.approx(opt)


def test_lagrangian_is_feasible_and_its_bound_brackets_the_optimum():
    for costs, errs, budget, opt in _random_knapsacks(1):
        choice, lower, exact = _lagrangian(costs, errs, budget)
        value = sum(e[j] for e, j in zip(errs, choice))
        assert sum(c[j] for c, j in zip(costs, choice)) <= budget
        assert lower <= opt + 1e-12 <= value + 1e-12


def test_force_bits_and_keep_float_patterns():
    m, feeds = two_layer_model()
    cfg = QuantConfig(search=Uniform(4), force_bits=(ForceBits.parse("mm_heavy=8"),), keep_float=("gau*",), min_elements=0)
    result = quantize(m, cfg)
    assert _bits(result) == {"heavy": 8}
    assert any(s.name == "gauss0" and "--keep-float" in s.reason for s in result.report.skipped)


def test_fake_quantize_matches_stored_integers_bit_for_bit():
    r = np.random.default_rng(3)
    for dtype in (np.float32, np.float16):
        w = (r.standard_t(3, (70, 96)) * 0.05).astype(dtype)
        for lay, axis in ((Layout.parse("tensor"), 0), (Layout.parse("channel"), 1), (Layout.parse("block32"), 0)):
            for bits, sym in itertools.product(range(2, 9), (False, True)):
                qt = QTYPES[("int" if sym else "uint") + ("4" if bits <= 4 else "8")]
                gr = GroupRange.of(w, lay, axis)
                a = quantize_weight(w, bits, sym, lay, axis, qt, np.dtype(dtype), gr).dequantize().astype(np.float32)
                b, _ = fake_quantize(w, bits, sym, lay, axis, qt, np.dtype(dtype), gr)
                assert a.tobytes() == b.tobytes()


def test_max_size_bounds_the_written_file_and_5_bits_lands_between_4_and_8(tmp_path):
    """On the digits CNN with its calibration data: the file written for --max-size fits it, and --target-bits 5
    is a real mix whose held-out accuracy lies between the uniform 4- and 8-bit plans'."""
    from pathlib import Path

    from mixq_onnx import CalibrationOptions, VerifyOptions, quantize_file
    from mixq_onnx.graph.io import load_model

    models = Path(__file__).resolve().parents[1] / "models"
    digits, calib = models / "digits_cnn.onnx", CalibrationOptions(models / "digits_calib.npz")
    verify = VerifyOptions(inputs=models / "digits_test.npz")
    for size in (26_000, 30_000, 40_000):
        out = tmp_path / f"m{size}.onnx"
        quantize_file(digits, out, QuantConfig(search=Budget(max_bytes=size)), verify, calibration=calib)
        assert out.stat().st_size <= size and not (tmp_path / f"m{size}.onnx.data").exists()
    sqnr = {}
    for name, search in (("4", Uniform(4)), ("5", Budget(target_bits=5)), ("8", Uniform(8))):
        r = quantize_file(digits, tmp_path / f"b{name}.onnx", QuantConfig(search=search), verify, calibration=calib)
        sqnr[name] = r.report.verification.runs[0].outputs[0].sqnr_db
        if name == "5":
            assert {t.chosen.bits for t in r.report.tensors} == {4, 8}
    assert sqnr["4"] < sqnr["5"] < sqnr["8"], sqnr
    assert load_model(tmp_path / "b5.onnx").model.graph.node


def _shared_input_model():
    """Three projections of one input (a layer's Q, K, V), one of them outlier-heavy, and a fourth weight after them."""
    r = rng(3)
    inits, nodes = [], []
    for name in ("q", "k", "v"):
        w = r.normal(0, 0.06, (128, 128)).astype(np.float32)
        if name == "v":
            w[r.integers(0, 128, 128), np.arange(128)] = r.choice([-1, 1], 128)
        inits.append(init(name, w))
        nodes.append(helper.make_node("MatMul", ["x", name], [f"{name}_out"], name=f"mm_{name}"))
    inits.append(init("o", r.normal(0, 0.06, (128, 128)).astype(np.float32)))
    nodes += [helper.make_node("Sum", ["q_out", "k_out", "v_out"], ["s"]), helper.make_node("MatMul", ["s", "o"], ["y"], name="mm_o")]
    return make_model(nodes, [vi("x", [8, 128])], [vi("y", [8, 128])], inits)


def test_precision_groups_give_weights_that_read_one_input_one_width_and_layout():
    from mixq_onnx.kinds import PrecisionGroups, Target

    m = _shared_input_model()
    base = dict(sensitivity=Sensitivity.WEIGHT, min_elements=0, search=Budget(target_bits=5.0))
    alone = quantize(m, QuantConfig(precision_groups=PrecisionGroups.OFF, **base)).report
    tied = quantize(m, QuantConfig(precision_groups=PrecisionGroups.ON, **base)).report
    pick = {r: {t.name: (t.chosen.bits, t.chosen.granularity) for t in rep.tensors} for r, rep in (("alone", alone), ("tied", tied))}
    # Alone, the outlier-heavy V takes more bits than Q and K; tied, the three share one choice (the group is one item).
    assert pick["alone"]["v"] != pick["alone"]["q"]
    assert pick["tied"]["q"] == pick["tied"]["k"] == pick["tied"]["v"]
    assert tied.config["groups"] == [["q", "k", "v"]] and alone.config["groups"] == []
    for rep in (alone, tied):
        assert rep.search["used_bytes"] <= rep.search["limit_bytes"]
    # One constraint more can only cost the knapsack's objective, never lower it.
    assert tied.search["objective"] >= alone.search["objective"] - 1e-12 and tied.search["precision_groups"] == 1
    # auto: on where the target combines such layers (TensorRT), off on ONNX Runtime's CPU.
    assert QuantConfig(target=Target.TENSORRT).groups_on and not QuantConfig(target=Target.ORT_CPU).groups_on
