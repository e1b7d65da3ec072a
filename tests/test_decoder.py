"""Decoder LLM exports: a trained byte-level Llama-style decoder, with a tied embedding, with and without a KV cache.

Quantized with every search mode and judged as a language model is: perplexity on held-out text, in ONNX Runtime,
against the float model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from mixq_onnx.cli import main
from mixq_onnx.runtime.inputs import generate_inputs

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "models" / "tiny_decoder.onnx"
CACHED = ROOT / "models" / "tiny_decoder_kv.onnx"
TEST = np.load(ROOT / "models" / "tiny_decoder_test.npz")["input_ids"][:48]
CALIB = ROOT / "models" / "tiny_decoder_calib.npz"
LAYERS, KV_HEADS, HEAD = 4, 2, 16


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cache_feed(ids: np.ndarray, past: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The cache model's inputs for ``ids`` after ``past`` (default: an empty past, the first step of generation)."""
    n, t = ids.shape
    p = 0 if past is None else past[0].shape[2]
    past = past or [np.zeros((n, KV_HEADS, 0, HEAD), np.float32)] * (2 * LAYERS)
    feed = {"input_ids": ids, "attention_mask": np.ones((n, p + t), np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (n, t)).copy()}
    feed.update({f"past_key_values.{i}.{k}": past[2 * i + j] for i in range(LAYERS) for j, k in enumerate(("key", "value"))})
    return feed


def logits(path: Path, ids: np.ndarray, cached: bool = False) -> np.ndarray:
    """The next-byte logits of ``ids``; ``cached``: the model is the KV-cache form (run with an empty past)."""
    return _session(path).run(["logits"], cache_feed(ids) if cached else {"input_ids": ids})[0]


def perplexity(path: Path, cached: bool = False, ids: np.ndarray = TEST) -> float:
    """exp of the mean negative log-likelihood of each next byte of the held-out windows."""
    z = logits(path, ids, cached)[:, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


def test_the_shipped_decoders_model_held_out_text_and_agree_with_each_other():
    ppl = perplexity(PLAIN)
    assert ppl < 6.0, ppl  # bytes of held-out Python source: 256 values, far better than chance
    assert np.allclose(logits(PLAIN, TEST[:4]), logits(CACHED, TEST[:4], cached=True), atol=1e-4)
    # The cache works as generation uses it: the second half after the first half's present equals the whole run.
    sess = _session(CACHED)
    ids = TEST[:2, :64]
    first = sess.run(None, cache_feed(ids[:, :32]))
    second = sess.run(None, cache_feed(ids[:, 32:], first[1:]))
    assert np.allclose(second[0], logits(PLAIN, ids)[:, 32:], atol=1e-4)


def test_generated_inputs_give_a_cache_model_an_empty_past_and_counted_positions():
    model = onnx.load(str(CACHED))
    gen = generate_inputs(model, {}, {"input_ids": 256}, 2, 0)
    feed = gen.feeds[0]
    assert feed["past_key_values.0.key"].shape == (1, KV_HEADS, 0, HEAD)
    assert feed["attention_mask"].shape == feed["input_ids"].shape and np.all(feed["attention_mask"] == 1)
    assert np.array_equal(feed["position_ids"][0], np.arange(feed["input_ids"].shape[1]))
    assert feed["input_ids"].max() < 256


def _quantize(tmp_path: Path, model: Path, name: str, *args: str) -> tuple[Path, dict]:
    out = tmp_path / f"{name}.onnx"
    res = CliRunner().invoke(main, [str(model), "-o", str(out), "--report", str(out) + ".json", "-q", *args])
    assert res.exit_code == 0, res.output
    return out, json.loads(Path(str(out) + ".json").read_text())


def _cache_calib(tmp_path: Path) -> Path:
    """The calibration windows as the cache model takes them: an empty past, a mask of ones, positions 0..T-1."""
    ids = np.load(CALIB)["input_ids"][:16]
    path = tmp_path / "kv_calib.npz"
    np.savez(path, **cache_feed(ids))
    return path


MODES = {
    "uniform 4-bit block32": ("--bits", "4", "--granularity", "block32"),
    "MixQuant rule": ("--qem", "1"),
    "budget 4.5 bits": ("--target-bits", "4.5"),
    "accuracy target": ("--max-loss", "0.005"),
    "kquant-mixed rule": ("--rule", "kquant-mixed"),
}


def test_a_data_free_search_quantizes_the_cache_model_and_the_tied_table_once(tmp_path):
    """The cache form searched on generated inputs (an empty past); the tied form's table is one tensor with both
    readers, rounded once and stored once."""
    fp32 = perplexity(CACHED, cached=True)
    out, report = _quantize(tmp_path, CACHED, "kv", "--target-bits", "4.5")
    assert perplexity(out, cached=True) < fp32 * 1.10
    assert "generated inputs" in report["end_to_end"]["source"]
    # The logits are compared as next-token distributions (KL of their softmax), the K/V caches as values.
    outputs = report["end_to_end"]["outputs"]
    assert outputs["logits"] == "kl (next-token logits)" and outputs["present.0.key"] == "nmse"
    out, report = _quantize(tmp_path, PLAIN, "tied", "--bits", "4", "--granularity", "block32")
    table = [t for t in report["tensors"] if t["name"] == "embed.weight"]
    assert len(table) == 1 and table[0]["op_types"] == "Gather+MatMul" and table[0]["via"] == ["Transpose"]
    model = onnx.load(str(out))
    # One copy is stored, transposed: the output projection's DequantizeLinear reads it as a [K, N] MatMul weight,
    # the lookup gathers its columns; nothing remakes the whole table under its old name.
    assert not any("embed.weight" in n.output for n in model.graph.node)
    dims = [tuple(t.dims) for t in model.graph.initializer]
    assert dims.count((64, 256)) == 1 and (256, 64) not in dims
    stored = next(t.name for t in model.graph.initializer if tuple(t.dims) == (64, 256))
    assert sorted(n.op_type for n in model.graph.node if stored in n.input) == ["Cast", "DequantizeLinear"]
    assert perplexity(out) < perplexity(PLAIN) * 1.10


@pytest.mark.slow
@pytest.mark.parametrize("model", [PLAIN, CACHED], ids=["tied", "kv-cache"])
def test_every_search_mode_quantizes_a_decoder_and_keeps_its_perplexity(tmp_path, model):
    """Data-free and with calibration: each mode writes a model whose held-out perplexity stays near fp32's."""
    cached = model == CACHED
    fp32 = perplexity(model, cached)
    calib = str(_cache_calib(tmp_path) if cached else CALIB)
    for name, args in MODES.items():
        out, report = _quantize(tmp_path, model, name.replace(" ", "_"), *args, "--calib", calib)
        ppl = perplexity(out, cached)
        # 4 bits on a 64-wide byte model costs a few percent; the searches hold it within 10%.
        assert ppl < fp32 * 1.10, (name, ppl, fp32)
        assert report["totals"]["compression"] > 3.0, name
    out, report = _quantize(tmp_path, model, "data_free", "--target-bits", "4.5")
    assert perplexity(out, cached) < fp32 * 1.10
    assert "generated inputs" in report["end_to_end"]["source"]


def test_the_verdict_on_real_text_reads_perplexity(tmp_path):
    """Held-out --calib windows are real text: the verdict of the logits is their next-byte perplexity, float
    against quantized, the numbers this file computes itself."""
    out, report = _quantize(tmp_path, PLAIN, "rule", "--rule", "kquant-mixed", "--calib", str(CALIB))
    held = np.load(CALIB)["input_ids"][48:]  # the last quarter of 64 windows is held out for verification
    exact = report["verification"]["runs"][0]["outputs"][0]
    assert exact["metric"] == "perplexity" and report["verification"]["verdict"]["reason"].startswith("logits: next-token perplexity")
    assert exact["perplexity_float"] == pytest.approx(perplexity(PLAIN, ids=held), rel=1e-4)
    assert exact["perplexity"] == pytest.approx(perplexity(out, ids=held), rel=1e-2)
    assert exact["value"] == pytest.approx(exact["perplexity_float"] / exact["perplexity"])


def test_precision_groups_tie_each_layers_qkv_and_gate_up_in_the_search(tmp_path):
    """--precision-groups on: each layer's Q/K/V and gate/up get one width and layout, within the budget, and the
    model still models held-out text."""
    out, report = _quantize(tmp_path, PLAIN, "groups", "--target-bits", "4.5", "--precision-groups", "on")
    groups = report["config"]["groups"]
    assert sorted(map(len, groups)) == [2] * 4 + [3] * 4
    chosen = {t["name"]: (t["chosen"]["bits"], t["chosen"]["granularity"]) for t in report["tensors"]}
    assert all(len({chosen[w] for w in g}) == 1 for g in groups)
    assert report["search"]["used_bytes"] <= report["search"]["limit_bytes"]
    assert perplexity(out) < perplexity(PLAIN) * 1.10


def test_logits_references_are_kept_at_every_kth_position_when_they_are_too_big(monkeypatch):
    """A big vocabulary's logits for every position and sample do not fit in memory (Gemma 3: 4.3 GB for 32 windows
    of 128 tokens): the evaluator keeps every k-th position within LOGITS_BYTES, and the KL it measures there stays
    close to the KL over every position."""
    from mixq_onnx import QuantConfig
    from mixq_onnx.graph.find import find_weights
    from mixq_onnx.graph.io import load_model
    from mixq_onnx.numerics.qdq import QTYPES, Grid
    from mixq_onnx.config import Layout
    from mixq_onnx.runtime import sensitivity
    from mixq_onnx.runtime.sensitivity import EndToEnd, OutputKind

    model = load_model(PLAIN).model
    sites = list(find_weights(model, QuantConfig()).weights)
    feeds = [{"input_ids": np.load(CALIB)["input_ids"][i : i + 1, :64]} for i in range(8)]
    site = next(s for s in sites if s.name != "embed.weight")
    grid = Grid(3, False, Layout.parse("channel"), 1, QTYPES["uint4"], np.dtype(np.float32))
    w = grid.fake_quantize(site.array, grid.range_of(site.array))
    full = EndToEnd(model, sites, feeds, "calibration samples")
    assert full.kinds["logits"] is OutputKind.LOGITS and full.references[0][0].shape == (1, 64, 256)
    monkeypatch.setattr(sensitivity, "LOGITS_BYTES", 8 * 16 * 256 * 4)  # room for 16 of the 64 positions
    a = full.distance({site.name: w})
    # One session of the whole model, and the chain of block sessions, which shrinks the logits as they are made.
    for blocks in (0, 4):
        strided = EndToEnd(model, sites, feeds, "calibration samples", blocks=blocks)
        assert (strided.chain is not None) == (blocks > 0) and strided.logits_stride == 4
        assert strided.references[0][0].shape == (1, 16, 256)
        b = strided.distance({site.name: w})
        assert a > 0 and 0.5 < b / a < 2.0
        assert strided.describe()["logits_positions"] == "every 4th"
