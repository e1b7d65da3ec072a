"""Every real topology in onnx's backend test data quantizes, passes the checker and runs close to float at 8 bits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from mixq_onnx import Budget, QuantConfig, Uniform, quantize
from mixq_onnx.config import Sensitivity
from tests.helpers import LEVELS, run, sqnr_db
from tests.light_models import available, build


# The three largest topologies (0.2-0.5 GB of weights) take most of the suite's time: they run with the slow set.
HEAVY = ("vgg19", "zfnet512", "bvlc_alexnet")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in available()])
def test_light_model_8bit(name):
    model = build(name)
    result = quantize(model, QuantConfig(search=Uniform(8)))
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.totals.tensors > 0
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    ref = run(model, feeds)[0]
    assert np.all(np.isfinite(ref))
    for level in LEVELS:
        got = run(result.model, feeds, level)[0]
        assert sqnr_db(ref, got) > 25, f"{name}: SQNR {sqnr_db(ref, got):.1f} dB at {level}"
        ref2, got2 = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
        assert np.array_equal(ref2.argmax(1), got2.argmax(1))
    assert result.report.totals.compression > 3.5


def test_all_light_models_present():
    assert len(available()) >= 8


def _check_budget_run(name: str, sensitivity: Sensitivity) -> None:
    model = build(name)
    q4 = quantize(model, QuantConfig(search=Uniform(4))).report.totals.quantized_bytes
    result = quantize(model, QuantConfig(search=Budget(target_bits=4), sensitivity=sensitivity, e2e_samples=2))
    onnx.checker.check_model(result.model, full_check=True)
    s = result.report.search
    assert s["limit_bytes"] == q4 and result.report.totals.quantized_bytes <= q4
    assert s["distance"] <= min(m["distance"] for m in s["measured"] if m["bytes"] <= q4)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = {model.graph.input[0].name: np.random.default_rng(1).normal(size=shape).astype(np.float32)}
    got = run(result.model, feeds)[0]
    assert np.all(np.isfinite(got)) and got.shape == run(model, feeds)[0].shape


@pytest.mark.parametrize("name", [n for n in ("squeezenet", "shufflenet") if n in available()])
def test_light_model_target_bits_4(name):
    """--target-bits 4 is reachable; the plan check runs end to end (weight-error search: fast)."""
    _check_budget_run(name, Sensitivity.WEIGHT)


@pytest.mark.slow
@pytest.mark.parametrize("name", available())
def test_light_model_target_bits_4_weight_error(name):
    """--target-bits 4 on every topology with the weight-error search and the end-to-end plan check."""
    _check_budget_run(name, Sensitivity.WEIGHT)


@pytest.mark.slow
@pytest.mark.parametrize("name", available())
def test_light_model_target_bits_4_end_to_end(name):
    """The default end-to-end search on every topology (minutes: marked slow)."""
    _check_budget_run(name, Sensitivity.E2E)


def test_tensorrt_w8a8_on_a_weight_read_through_a_reshape_follows_the_rules():
    """inception_v1's classifier weight reaches its Gemm through a Reshape: per-channel would sit on the wrong axis."""
    from mixq_onnx.graph.check import check_model
    from mixq_onnx.config import Activations, Target

    m = build("inception_v1")
    inp = m.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    calib = [{inp.name: np.random.default_rng(k).normal(size=shape).astype(np.float32)} for k in range(2)]
    config = QuantConfig(search=Uniform(8), target=Target.TENSORRT, activations=Activations.AUTO)
    assert check_model(quantize(m, config, calibration=calib).model, Target.TENSORRT) == []
