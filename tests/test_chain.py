"""The chain of block sessions: the same outputs and distances as one session of the whole model, one block at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mixq_onnx import QuantConfig
from mixq_onnx.graph.find import find_weights
from mixq_onnx.graph.io import load_model
from mixq_onnx.runtime.chain import BlockChain, ChainRun
from mixq_onnx.runtime.sensitivity import EndToEnd

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CASES = [(MODELS / "tiny_transformer.onnx", MODELS / "tiny_transformer_calib.npz"),
         (MODELS / "digit_lines_crnn.onnx", MODELS / "digit_lines_calib.npz"),
         (MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz")]


def _setup(path: Path, calib: Path, samples: int = 8, blocks: int = 0) -> tuple[EndToEnd, list]:
    model = load_model(path).model
    sites = list(find_weights(model, QuantConfig()).weights)
    data = np.load(calib)
    feeds = [{k: data[k][i : i + 1] for k in data.files} for i in range(samples)]
    return EndToEnd(model, sites, feeds, "calibration samples", blocks=blocks), sites


def _rtn(w: np.ndarray, bits: int) -> np.ndarray:
    axes = tuple(range(1, w.ndim))
    lo, hi = np.minimum(w.min(axis=axes, keepdims=True), 0), np.maximum(w.max(axis=axes, keepdims=True), 0)
    step = np.where(hi > lo, (hi - lo) / (2**bits - 1), 1.0)
    return (np.round((w - lo) / step) * step + lo).astype(w.dtype)


@pytest.mark.parametrize("path,calib", CASES)
def test_chain_gives_the_whole_models_outputs_and_distances(path, calib):
    """Reference outputs, single-weight distances and a whole plan's distance agree with one session of the model."""
    whole, sites = _setup(path, calib)
    chained, _ = _setup(path, calib, blocks=1)
    try:
        assert chained.chain is not None and len(chained.chain.partition.blocks) > 1
        assert whole.chain is None and chained._session_obj is None  # no session ever holds every weight
        for a, b in zip(whole.references, chained.references):
            for x, y in zip(a, b):
                np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * float(np.abs(x).max()))
        assert chained.batched == whole.batched
        named = [s for s in sites if s.name in chained.swappable]
        pairs = [(s.name, _rtn(s.array, bits)) for s in named for bits in (3, 5)]
        from mixq_onnx.executor import inline
        w = list(whole.distances(pairs, None, inline()))
        c = list(chained.distances(pairs, None, inline()))
        assert all(v > 0 for v in c)
        np.testing.assert_allclose(c, w, rtol=2e-3)
        # Every weight quantized at once: a plan as the chain measures it (from block 0, each block's weights swapped).
        plan = {s.name: _rtn(s.array, 4) for s in named}
        assert list(chained.plan_distances([plan], inline()))[0] == pytest.approx(whole.distance(plan), rel=2e-3)
    finally:
        chained.close()


def test_a_run_from_its_own_block_equals_a_run_from_the_start():
    """A weight changes nothing before its first reader: starting there (float inputs from the store) is exact."""
    ev, sites = _setup(MODELS / "tiny_transformer.onnx", MODELS / "tiny_transformer_calib.npz", blocks=2)
    chain = ev.chain
    try:
        feeds = [ev.stacked(g) for g in ev.run_groups(range(len(ev.feeds)))]
        late = [s for s in sites if s.name in chain.readers and chain.readers[s.name][0] > 0]
        assert late
        runs = [ChainRun({s.name: _rtn(s.array, 3)}, start) for s in late[-3:]
                for start in (0, chain.start_of({s.name: 0}))]
        outs = list(chain.run(runs, feeds, "all"))
        for a, b in zip(outs[::2], outs[1::2]):
            for fa, fb in zip(a, b):
                for x, y in zip(fa, fb):
                    assert np.array_equal(x, y)
    finally:
        ev.close()


def test_sweeps_bounded_by_live_bytes_give_the_same_values(tmp_path):
    """Runs that do not fit one sweep go through in several, with the same values; spilled boundaries read back."""
    ev, sites = _setup(MODELS / "digit_lines_crnn.onnx", MODELS / "digit_lines_calib.npz")
    model = load_model(MODELS / "digit_lines_crnn.onnx").model
    weights = {s.name: (1, s.shape) for s in sites if s.name in ev.swappable}
    roomy = BlockChain(model, weights, 1)
    tight = BlockChain(model, weights, 1, store_bytes=0, live_bytes=1, scratch=tmp_path)
    feeds = [f for f in ev.feeds]
    runs = [ChainRun({s.name: _rtn(s.array, 2)}, roomy.start_of({s.name: 0})) for s in sites if s.name in weights]
    try:
        a = list(roomy.run(runs, feeds, "k"))
        b = list(tight.run(runs, feeds, "k"))
        assert tight.boundaries(feeds, "k").spilled > 0 and list(tmp_path.iterdir())
        for x, y in zip(a, b):
            for fx, fy in zip(x, y):
                for u, v in zip(fx, fy):
                    assert np.array_equal(u, v)
    finally:
        tight.close()
        roomy.close()
    assert not list(tmp_path.iterdir())


def test_float_runner_and_generated_inputs_fall_back_to_the_whole_model():
    """The float chain gives the session's outputs; a chain that fails does not make generated inputs fail."""
    from mixq_onnx.runtime.chain import float_runner
    from mixq_onnx.runtime.inputs import generate_inputs, session

    model = load_model(MODELS / "tiny_transformer.onnx").model
    from mixq_onnx.graph.find import gather_index_bounds

    run = float_runner(model, block_weights=2, large_bytes=4096)  # a tiny model: its "large" tensors are small
    assert run is not None
    bounds = gather_index_bounds(model)
    gen = generate_inputs(model, {}, bounds, 2, 0, run)
    want = session(model).run(None, gen.feeds[0])
    for a, b in zip(run(gen.feeds[0]), want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))

    def refuses(feed):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : a block ORT refuses")

    again = generate_inputs(model, {}, bounds, 2, 0, refuses)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(gen.feeds, again.feeds) for k in x)


def test_free_dims_name_each_inputs_dimensions_apart():
    """ONNX Runtime takes a dimension name for one size across the graph: a block whose inputs differ in one axis
    (Gemma's one key/value head beside four query heads) failed to run when every input's axes were d0, d1, ...;
    shapes of rank 0 and 1 keep their sizes."""
    from mixq_onnx.runtime.chain import free_dims

    infos = {"k": (1, (4, 1, 16, 128)), "q": (1, (4, 4, 16, 128)), "sizes": (7, (3,))}
    free = free_dims(infos)
    names = [d for name in ("k", "q") for d in free[name][1]]
    assert len(names) == len(set(names)) == 8 and all(isinstance(d, str) for d in names)
    assert free["sizes"] == (7, (3,)) and free["k"][0] == 1
