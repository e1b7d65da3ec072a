"""The block-wise evaluator: cuts, block distances, per-weight gains, the proxy against the whole model, spilling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from mixq_onnx import QuantConfig
from mixq_onnx.cli import main
from mixq_onnx.graph.find import find_weights
from mixq_onnx.graph.io import load_model
from mixq_onnx.runtime.blockwise import BlockProxy, spearman
from mixq_onnx.runtime.sensitivity import EndToEnd

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
TINY = MODELS / "tiny_transformer.onnx"
LINES = MODELS / "digit_lines_crnn.onnx"


def _evaluator(model_path: Path, calib: Path, samples: int = 16) -> tuple[EndToEnd, list]:
    model = load_model(model_path).model
    sites = list(find_weights(model, QuantConfig()).weights)
    data = np.load(calib)
    feeds = [{k: data[k][i : i + 1] for k in data.files} for i in range(samples)]
    return EndToEnd(model, sites, feeds, "calibration samples"), sites


def _rtn(w: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric round-to-nearest per output row, as a stand-in for any rounding the search measures."""
    axes = tuple(range(1, w.ndim))
    lo = np.minimum(w.min(axis=axes, keepdims=True), 0)
    hi = np.maximum(w.max(axis=axes, keepdims=True), 0)
    step = np.where(hi > lo, (hi - lo) / (2**bits - 1), 1.0)
    return (np.round((w - lo) / step) * step + lo).astype(w.dtype)


@pytest.mark.parametrize("path,calib,cut", [(TINY, MODELS / "tiny_transformer_calib.npz", 4),
                                            (LINES, MODELS / "digit_lines_calib.npz", 1)])
def test_proxy_ranks_options_as_the_whole_model_does(path, calib, cut):
    """On real models, gain x block distance orders every (weight, width) pair as whole-model runs do."""
    ev, sites = _evaluator(path, calib)
    proxy = BlockProxy(ev, sites, cut)
    try:
        assert proxy.usable and len(proxy.partition.blocks) > 1
        owned = [s for s in sites if proxy.owns(s.name)]
        assert len(owned) >= 3
        raw, truth = {}, {}
        for s in owned:
            w = s.array
            # The float weight reproduces the block's float outputs: the reference is the same session's.
            assert proxy.raw(s.name, w) == 0.0
            raw[s.name] = {(b, "channel"): proxy.raw(s.name, _rtn(w, b), "screen") for b in (3, 4, 6)}
            assert raw[s.name][(3, "channel")] > raw[s.name][(4, "channel")] > raw[s.name][(6, "channel")] > 0
            truth.update({(s.name, k): ev.distance({s.name: _rtn(w, k[0])}) for k in raw[s.name]})
        by_name = {s.name: s for s in owned}
        summary = proxy.fit(raw, lambda todo: [ev.distance({n: _rtn(by_name[n].array, k[0])}, proxy.screen) for n, k in todo],
                            lambda n, k: str(k))
        assert summary.weights == len(proxy.owner) and summary.rank_correlation is not None
        pairs = sorted(truth)
        # The proxy on every sample, as the refinement measures it, against whole-model runs on every sample.
        predicted = [proxy.predict(n, proxy.raw(n, _rtn(by_name[n].array, k[0]))) for n, k in pairs]
        # Within one width (the comparisons a budget search makes across weights), where there are enough weights to
        # rank (the recognizer has three), and over all widths.
        for width in (3, 6) if len(owned) >= 5 else ():
            sel = [i for i, (_, k) in enumerate(pairs) if k[0] == width]
            assert spearman([predicted[i] for i in sel], [truth[pairs[i]] for i in sel]) >= 0.85
        assert spearman(predicted, [truth[p] for p in pairs]) >= 0.9
    finally:
        proxy.close()


def test_a_gain_per_block_would_misrank_the_weights_of_one_block():
    """Why gains are per weight: in one attention block, block distance alone misorders the end-to-end effect."""
    ev, sites = _evaluator(TINY, MODELS / "tiny_transformer_calib.npz")
    proxy = BlockProxy(ev, sites, 4)
    try:
        block = max(proxy.partition.blocks, key=lambda b: len(b.weights))
        by_name = {s.name: s for s in sites}
        ratios = [ev.distance({w: _rtn(by_name[w].array, 4)}) / proxy.raw(w, _rtn(by_name[w].array, 4)) for w in block.weights]
        assert max(ratios) > 5 * min(ratios)
    finally:
        proxy.close()


def test_spilled_boundary_activations_give_the_same_distances(tmp_path):
    ev, sites = _evaluator(TINY, MODELS / "tiny_transformer_calib.npz", samples=8)
    held, spilled = BlockProxy(ev, sites, 4), BlockProxy(ev, sites, 4, store_bytes=0, scratch=tmp_path)
    try:
        for s in (s for s in sites if held.owns(s.name)):
            q = _rtn(s.array, 4)
            assert spilled.raw(s.name, q, "screen") == held.raw(s.name, q, "screen")
        assert held.spilled == 0 and spilled.spilled > 0 and held._dir is None  # nothing made where nothing spilled
        folder = spilled._dir
        assert folder.parent == tmp_path and folder.name.startswith(".mixq-") and any(folder.rglob("*.npy"))
    finally:
        held.close()
        spilled.close()
    assert not folder.exists()


def test_the_refinement_view_takes_fewer_samples_rather_than_pass_its_memory_budget():
    ev, sites = _evaluator(TINY, MODELS / "tiny_transformer_calib.npz", samples=16)
    roomy = BlockProxy(ev, sites, 4)
    probe = BlockProxy(ev, sites, 4)
    s = next(s for s in sites if roomy.owns(s.name))
    try:
        roomy.raw(s.name, s.array)
        assert roomy.samples["all"] == tuple(range(16)) and roomy.spilled == 0
        probe.raw(s.name, s.array, "screen")
        per_sample = probe.stores["screen"].in_memory / len(probe.screen)
        tight = BlockProxy(ev, sites, 4, store_bytes=int(per_sample * 6))
        try:
            assert tight.raw(s.name, _rtn(s.array, 4)) > 0
            assert len(tight.screen) <= len(tight.samples["all"]) <= 6 < 16
            assert tight.stores["all"].in_memory <= tight.store_bytes and tight.spilled == 0
        finally:
            tight.close()
    finally:
        roomy.close()
        probe.close()


def test_spearman_handles_ties_and_constants():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 2, 3], [5, 5, 5]) is None


def _run(tmp_path: Path, evaluation: str, budget: str) -> dict:
    out = tmp_path / f"{evaluation}_{budget}.onnx"
    res = CliRunner().invoke(main, [str(TINY), "-o", str(out), "--target-bits", budget, "--evaluation", evaluation,
                                    "--calib", str(MODELS / "tiny_transformer_calib.npz"), "--inputs",
                                    str(MODELS / "tiny_transformer_test.npz"), "--report", str(out) + ".json"])
    assert res.exit_code == 0, res.output
    return json.loads(Path(str(out) + ".json").read_text())


def test_cli_block_evaluation_is_the_default_and_costs_fewer_whole_model_runs(tmp_path):
    """Both evaluators on the tiny transformer: the block-wise one runs the whole model far less, and its plan holds up."""
    model, blocks = _run(tmp_path, "model", "4.5"), _run(tmp_path, "blocks", "4.5")
    proxy = blocks["end_to_end"]["block_proxy"]
    assert blocks["config"]["evaluation"] == "blocks" and "block_proxy" not in model["end_to_end"]
    assert proxy["blocks"] > 1 and proxy["weights"] == blocks["end_to_end"]["weights_measured"]
    assert proxy["checked"] >= 8 and proxy["rank_correlation"] >= 0.8
    assert blocks["end_to_end"]["evaluations"] * 2 < model["end_to_end"]["evaluations"]
    # Whole plans are still measured end to end: the returned plan is no worse than the uniform ones that fit,
    # and within a small factor of what the whole-model search returns at the same budget.
    s = blocks["search"]
    rivals = [m["distance"] for m in s["measured"] if m["plan"].startswith("uniform") and m["bytes"] <= s["limit_bytes"]]
    assert s["distance"] <= min(rivals)
    assert s["distance"] <= 1.5 * model["search"]["distance"]
    assert blocks["verification"]["verdict"]["level"] == "good"


def test_default_evaluation_is_blocks_and_a_bad_block_size_is_refused():
    from mixq_onnx.errors import ConfigError
    from mixq_onnx.kinds import Evaluation

    assert QuantConfig().evaluation is Evaluation.BLOCKS
    with pytest.raises(ConfigError, match="--eval-block-weights"):
        QuantConfig(eval_block_weights=0)


def test_cache_like_outputs_do_not_stop_the_cuts(tmp_path):
    """A decoder exported with a KV cache returns each layer's keys and values: those graph outputs stay cuttable."""
    import onnx
    from onnx import helper

    from mixq_onnx.graph.blocks import partition

    model = onnx.load(TINY)
    # The key and value projections of both layers, as a cache export returns them (present.*).
    present = ["val_17", "val_25", "val_64", "val_72"]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in present)
    path = tmp_path / "tiny_present.onnx"
    onnx.save(model, path)
    ev, sites = _evaluator(path, MODELS / "tiny_transformer_calib.npz", samples=8)
    names = [s.name for s in sites if s.name in ev.swappable]
    plain = partition(ev.model, names, 4)
    cut = partition(ev.model, names, 4, outputs_cut=True)
    assert len(plain.blocks) < len(cut.blocks) == len(partition(load_model(TINY).model, names, 4).blocks)
    made = {o for b in cut.blocks for o in b.outputs}
    assert set(present) <= made  # each is an output of the block that makes it
    proxy = BlockProxy(ev, sites, 4)
    try:
        assert proxy.usable
        s = next(s for s in sites if proxy.owns(s.name) and s.name not in ("tok.weight", "pos.weight"))
        assert proxy.raw(s.name, s.array) == 0.0 and proxy.raw(s.name, _rtn(s.array, 4)) > 0
    finally:
        proxy.close()


@pytest.mark.parametrize("stage", ["float pass", "options"])
def test_a_block_onnx_runtime_refuses_falls_back_to_the_whole_model(tmp_path, monkeypatch, stage):
    """Block sessions that fail (an operator ORT cannot run alone, say) cost time, never the run."""
    import mixq_onnx.runtime.blockwise as blockwise
    import mixq_onnx.runtime.chain as chain

    real = chain.session

    def refuse(model, *args, **kwargs):
        if isinstance(model, onnx.ModelProto) and model.graph.name.startswith("block"):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : a block ORT refuses")
        return real(model, *args, **kwargs)

    if stage == "float pass":
        monkeypatch.setattr(chain, "session", refuse)
    else:  # the float pass works; every block task reports ORT's refusal
        monkeypatch.setattr(blockwise, "run_block", lambda job: "[ONNXRuntimeError] : 1 : FAIL : a block ORT refuses")
    report = _run(tmp_path, "blocks", "4.5")
    e2e = report["end_to_end"]
    assert "a block ORT refuses" in e2e["block_proxy"]["failed"]
    assert e2e["evaluations"] > 50  # every option ran the whole model
    s = report["search"]
    assert s["distance"] <= min(m["distance"] for m in s["measured"] if m["plan"].startswith("uniform"))


def test_large_batched_feeds_are_split_per_row(monkeypatch):
    """Eight page-sized images in one feed would hold gigabytes of activations per run: the evaluator splits them."""
    from mixq_onnx.runtime import sensitivity

    monkeypatch.setattr(sensitivity, "BATCH_BYTES", 16 * 1536)  # 16 text lines of 1 x 8 x 48 floats stand for 8 MB
    BATCH_BYTES = sensitivity.BATCH_BYTES
    model = load_model(LINES).model
    sites = list(find_weights(model, QuantConfig()).weights)
    data = np.load(MODELS / "digit_lines_calib.npz")["image"]
    rows = int(BATCH_BYTES // data[0].nbytes) + 4
    big = np.concatenate([data] * (rows // len(data) + 1))[:rows]
    small = data[:4]
    ev = EndToEnd(model, sites, [{"image": big}, {"image": small}], "test")
    assert len(ev.feeds) == rows + 1 and all(len(f["image"]) == 1 for f in ev.feeds[:rows])
    assert ev.feeds[-1]["image"].shape[0] == 4
    assert all(sum(ev.feeds[i]["image"].nbytes for i in g) <= BATCH_BYTES for g in ev.run_groups(range(len(ev.feeds))))
