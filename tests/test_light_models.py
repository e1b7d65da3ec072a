"""Every real topology in onnx's backend test data quantizes, passes the checker and runs close to float at 8 bits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from mixq_onnx import QuantConfig, Uniform, quantize
from tests.helpers import LEVELS, run, sqnr_db
from tests.light_models import available, build


@pytest.mark.parametrize("name", available())
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
