"""--sensitivity-cache: reruns and budget sweeps reuse measurements, the output does not change, stale files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import numpy_helper

from mixq_onnx.cli import main
from mixq_onnx.planning.cache import SensitivityCache, feeds_digest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny_transformer.onnx"
CALIB = ROOT / "models" / "tiny_transformer_calib.npz"


def _run(tmp_path: Path, name: str, *args: str, model: Path = TINY) -> tuple[dict, bytes]:
    out = tmp_path / f"{name}.onnx"
    res = CliRunner().invoke(main, [str(model), "-o", str(out), "--no-verify", "--report", str(out) + ".json",
                                    "--e2e-samples", "8", *args])
    assert res.exit_code == 0, res.output
    return json.loads(Path(str(out) + ".json").read_text()), out.read_bytes()


def test_a_budget_sweep_reuses_the_measurements_and_writes_the_same_bytes(tmp_path):
    cache = tmp_path / "sens.json"
    common = ("--calib", str(CALIB), "--sensitivity-cache", str(cache))
    cold, _ = _run(tmp_path, "cold", "--target-bits", "4.5", *common)
    info = cold["end_to_end"]["sensitivity_cache"]
    # Within one run a plan is measured once: the curve's measurement asks again for the plans the run checked (the
    # plan at 4.5 bits and its uniform rivals) and finds them.
    assert info["hits"] <= len(cold["search"]["measured"]) and info["misses"] == info["stored"] > 50
    assert info["error_tables_reused"] == 0 and info["error_table_entries"] > 0
    assert cache.exists()
    # With a cache file every plan of the curve is measured, so the curve is measured throughout.
    assert all(p["measured"] is not None for p in cold["curve"])
    for budget in ("4", "5"):
        warm, written = _run(tmp_path, f"warm{budget}", "--target-bits", budget, *common)
        w = warm["end_to_end"]["sensitivity_cache"]
        # The cold run refined what every budget of the curve picks and measured its plans and the uniform rivals
        # that fit the curve: a run at another budget measures nothing.
        assert w["hits"] > 50 and w["misses"] == 0, w
        assert w["error_tables_reused"] == len(warm["tensors"])  # the weights' own errors come from the file too
        assert warm["end_to_end"]["evaluations"] == 0 < cold["end_to_end"]["evaluations"]
        _, plain = _run(tmp_path, f"plain{budget}", "--target-bits", budget, "--calib", str(CALIB))
        assert written == plain  # the cache changes the cost, never the result
    again, written = _run(tmp_path, "again", "--target-bits", "4.5", *common)
    assert again["end_to_end"]["sensitivity_cache"]["misses"] == 0
    # Nothing to measure: the model never ran, not even for its reference outputs, and the report still describes them.
    assert again["end_to_end"]["reference_pass"].startswith("not needed") and again["end_to_end"]["evaluations"] == 0
    assert again["end_to_end"]["outputs"] == cold["end_to_end"]["outputs"] and cold["end_to_end"]["reference_pass"] == "ran"
    assert written == _run(tmp_path, "plain45", "--target-bits", "4.5", "--calib", str(CALIB))[1]


def test_a_cache_made_for_another_model_data_or_rounding_is_not_used(tmp_path):
    cache = tmp_path / "sens.json"
    _run(tmp_path, "first", "--target-bits", "4.5", "--calib", str(CALIB), "--sensitivity-cache", str(cache))
    # The same graph with one weight nudged: the model digest changes.
    model = onnx.load(TINY)
    t = next(t for t in model.graph.initializer if t.name == "val_42")
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.001), t.name))
    nudged = tmp_path / "nudged.onnx"
    onnx.save(model, nudged)
    cases = [(("--calib", str(CALIB)), "model", nudged),
             (("--calib", str(tmp_path / "reversed.npz")), "samples", TINY),
             (("--calib", str(CALIB), "--scheme", "symmetric"), "settings", TINY)]
    data = np.load(CALIB)
    # Other samples: the search measures on the first ones, and these are the last ones first.
    np.savez(tmp_path / "reversed.npz", **{k: data[k][::-1] for k in data.files})
    for args, what, path in cases:
        _run(tmp_path, "base", "--target-bits", "4.5", "--calib", str(CALIB), "--sensitivity-cache", str(cache))
        report, _ = _run(tmp_path, "other", "--target-bits", "4.5", *args, "--sensitivity-cache", str(cache), model=path)
        info = report["end_to_end"]["sensitivity_cache"]
        # Nothing from the file: the only hits are the plans this run checked, asked for again by the curve.
        assert info["hits"] <= len(report["search"]["measured"]) < info["misses"], info
        assert "stale" in info["note"] and what in info["note"], info
        assert any("stale sensitivity cache" in n for n in report["notes"])


def test_an_unreadable_cache_is_replaced_with_a_note(tmp_path):
    cache = tmp_path / "sens.json"
    cache.write_text("{not json")
    report, _ = _run(tmp_path, "x", "--target-bits", "4.5", "--calib", str(CALIB), "--sensitivity-cache", str(cache))
    assert "not a usable sensitivity cache" in report["end_to_end"]["sensitivity_cache"]["note"]
    assert json.loads(cache.read_text())["values"]


def test_the_cache_may_not_overwrite_the_model_or_the_output(tmp_path):
    out = tmp_path / "q.onnx"
    for target in (TINY, out):
        res = CliRunner().invoke(main, [str(TINY), "-o", str(out), "--target-bits", "4.5", "--sensitivity-cache", str(target)])
        assert res.exit_code != 0 and "sensitivity cache" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_values_round_trip_exactly_and_the_file_is_deterministic(tmp_path):
    path = tmp_path / "c.json"
    cache = SensitivityCache(path, {"model": "m"})
    values = {("e2e", "w", 4, "channel", "rtn", "all"): 0.1 + 0.2, ("plan", "rtn", "x"): float("inf"), ("b",): 1e-300}
    for k, v in values.items():
        assert cache.measured(k, lambda v=v: v) == v
    path.write_text(cache.text())
    again = SensitivityCache(path, {"model": "m"})
    assert not again.discarded and again.text() == cache.text()
    for k, v in values.items():
        assert again.measured(k, lambda: -1.0) == v
    assert again.hits == 3 and again.misses == 0


def test_feeds_digest_sees_values_shapes_and_names():
    a = [{"x": np.zeros((2, 3), np.float32)}]
    assert feeds_digest(a) == feeds_digest([{"x": np.zeros((2, 3), np.float32)}])
    assert feeds_digest(a) != feeds_digest([{"x": np.zeros((3, 2), np.float32)}])
    assert feeds_digest(a) != feeds_digest([{"y": np.zeros((2, 3), np.float32)}])
    assert feeds_digest(a) != feeds_digest([{"x": np.ones((2, 3), np.float32)}])


def test_the_model_digest_reads_external_weights_and_ignores_where_they_are(tmp_path):
    """A weight changed in the data file changes the digest; the same model saved in another folder does not."""
    from mixq_onnx.graph.io import load_model, model_digest

    model = onnx.load(TINY)
    digests = []
    for folder, scale in (("a", 1.0), ("b", 1.0), ("c", 1.001)):
        (tmp_path / folder).mkdir()
        m = onnx.ModelProto()
        m.CopyFrom(model)
        t = next(t for t in m.graph.initializer if t.name == "val_42")
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(scale), t.name))
        path = tmp_path / folder / "m.onnx"
        onnx.save(m, path, save_as_external_data=True, location="m.data", size_threshold=1024)
        digests.append(model_digest(load_model(path).model))
    assert digests[0] == digests[1] != digests[2]
    assert model_digest(load_model(TINY).model) == model_digest(load_model(TINY).model)


def test_measured_many_measures_only_what_is_missing_in_one_batch():
    """Stored values are answered; the rest go to one call; with nothing missing nothing is set up to measure."""
    cache = SensitivityCache(None, {})
    calls: list[list[int]] = []

    def compute(idx: list[int]) -> list[float]:
        calls.append(idx)
        return [float(10 + i) for i in idx]

    parts = [("block", "w", 4, "channel"), ("block", "w", 5, "channel"), ("block", "w", 4, "channel")]
    assert cache.measured_many(parts, compute) == [10.0, 11.0, 10.0]
    assert calls == [[0, 1]] and (cache.hits, cache.misses) == (1, 2)  # the repeat is one measurement
    assert cache.measured_many(parts[:2] + [("e2e", "w", 3, "tensor")], compute) == [10.0, 11.0, 12.0]
    assert calls[-1] == [2]
    cache.forget(("e2e", "w", 3, "tensor"))
    assert cache.peek(("e2e", "w", 3, "tensor")) is None
    assert cache.measured_many(parts, compute) == [10.0, 11.0, 10.0] and len(calls) == 2
