"""Rounding recipes that evaluation tasks carry: the weights they make are the weights that are written."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mixq_onnx import QuantConfig
from mixq_onnx.config import Method
from mixq_onnx.graph.find import find_weights
from mixq_onnx.graph.io import load_model
from mixq_onnx.kinds import Layout
from mixq_onnx.numerics.qdq import Grid, container_for
from mixq_onnx.numerics.rounding import round_weight
from mixq_onnx.runtime.plans import RoundSpec

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_a_round_to_nearest_recipe_makes_the_dequantized_weight_bit_for_bit(symmetric, scale_dtype):
    """A recipe skips the integer container (2-3x faster); its floats equal DequantizeLinear of the written integers."""
    model = load_model(MODELS / "tiny_transformer.onnx").model
    sites = [s for s in find_weights(model, QuantConfig()).weights if len(s.shape) == 2]
    assert sites
    for site in sites[:4]:
        for bits in (2, 3, 4, 6, 8):
            for layout in (Layout.parse("channel"), Layout.parse("block32"), Layout.parse("tensor")):
                if layout.block_size and site.shape[0] < layout.block_size:
                    continue
                grid = Grid(bits, symmetric, layout, 0 if layout.block_size else 1,
                            container_for(bits, symmetric, True), np.dtype(scale_dtype))
                want = round_weight(site.array, grid, Method.RTN).tensor.dequantize().astype(site.np_dtype)
                got = RoundSpec((site, grid, Method.RTN, None)).array()
                assert got.dtype == want.dtype and np.array_equal(got, want), (site.name, bits, layout.name)
