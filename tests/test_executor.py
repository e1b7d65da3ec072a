"""Executors: the per-weight work gives the same bytes in this process, in worker processes and on Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from mixq_onnx import QuantConfig
from mixq_onnx.config import Budget, Evaluation, MaxLoss, Method, Uniform
from mixq_onnx.executor import ExecutionOptions, ExecutorKind, inline, processes, threads
from mixq_onnx.graph.find import find_weights
from mixq_onnx.graph.io import load_model
from mixq_onnx.runtime.blockwise import BlockProxy
from mixq_onnx.runtime.sensitivity import EndToEnd
from mixq_onnx.errors import ConfigError
from mixq_onnx.pipeline import CalibrationOptions, VerifyOptions, quantize_file

from .helpers import run

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny_transformer.onnx"
CALIB = ROOT / "models" / "tiny_transformer_calib.npz"
TEST = ROOT / "models" / "tiny_transformer_test.npz"


def _files(out: Path) -> bytes:
    return out.read_bytes() + (out.with_name(out.name + ".data").read_bytes() if out.with_name(out.name + ".data").exists() else b"")


def _quantize(out: Path, executor, config: QuantConfig) -> bytes:
    quantize_file(MODEL, out, config, VerifyOptions(enabled=False), calibration=CalibrationOptions(CALIB, 64), executor=executor)
    return _files(out)


def test_worker_processes_give_the_same_bytes_as_threads(tmp_path):
    """gptq rounding and a 3-bit search's error tables run in two spawned processes: same file, and it runs."""
    config = QuantConfig(search=Uniform(3), method=Method.GPTQ)
    with threads() as local:
        a = _quantize(tmp_path / "a.onnx", local, config)
    with processes(2) as pool:
        b = _quantize(tmp_path / "b.onnx", pool, config)
    assert a == b
    feeds = {"input_ids": np.load(TEST)["input_ids"][:16]}
    got = run(onnx.load(str(tmp_path / "b.onnx")), feeds)[0]
    ref = run(onnx.load(str(MODEL)), feeds)[0]
    cos = float(np.dot(got.ravel(), ref.ravel()) / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.9


def _rounded(w: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest per output row: a perturbation of the kind the search measures."""
    axes = tuple(range(1, w.ndim))
    lo, hi = np.minimum(w.min(axis=axes, keepdims=True), 0), np.maximum(w.max(axis=axes, keepdims=True), 0)
    step = np.where(hi > lo, (hi - lo) / (2**bits - 1), 1.0)
    return (np.round((w - lo) / step) * step + lo).astype(w.dtype)


def test_evaluations_on_worker_processes_give_the_same_values():
    """Block runs and whole-model runs as tasks in two spawned processes: the same floats, in the same order."""
    model = load_model(MODEL).model
    sites = list(find_weights(model, QuantConfig()).weights)
    data = np.load(CALIB)
    ev = EndToEnd(model, sites, [{k: data[k][i : i + 1] for k in data.files} for i in range(16)], "calibration samples")
    proxy = BlockProxy(ev, sites, 4)
    try:
        owned = [s for s in sites if proxy.owns(s.name)]
        swaps = [(s.name, _rounded(s.array, b)) for s in owned for b in (3, 5)]
        assert len({proxy.owner[s.name] for s in owned}) > 1  # several blocks, so several tasks
        here_blocks = proxy.measure(swaps, "screen", inline())
        here_whole = list(ev.distances(swaps[:6], proxy.screen, inline()))
        here_models = list(ev.model_distances([model, ev.model], inline()))
        runs_before = ev.evaluations
        with processes(2) as pool:
            there_blocks = proxy.measure(swaps, "screen", pool)
            there_whole = list(ev.distances(swaps[:6], proxy.screen, pool))
            there_models = list(ev.model_distances([model, ev.model], pool))
        assert ev.evaluations == runs_before + 6 + 2  # counted here, though measured there
        assert there_blocks == here_blocks and all(isinstance(v, float) and v > 0 for v in there_blocks)
        assert there_whole == here_whole and all(v > 0 for v in there_whole)
        # The float model itself, in a worker that never saw it loaded (unoptimised: float noise only).
        assert there_models == here_models and max(there_models) < 1e-10
    finally:
        proxy.close()


@pytest.mark.parametrize("search,evaluation", [
    (Budget(target_bits=4.5), Evaluation.BLOCKS),
    pytest.param(Budget(target_bits=4.5), Evaluation.MODEL, marks=pytest.mark.slow),
    pytest.param(MaxLoss(0.05), Evaluation.BLOCKS, marks=pytest.mark.slow)])
def test_searches_with_evaluations_on_worker_processes_write_the_same_bytes(tmp_path, search, evaluation):
    """The whole search (block tasks, whole-model chunks, plan checks) on two processes: same file, same report."""
    config = QuantConfig(search=search, evaluation=evaluation)
    results = []
    for name, executor in (("here", threads()), ("there", processes(2))):
        with executor:
            out = tmp_path / f"{name}.onnx"
            r = quantize_file(MODEL, out, config, VerifyOptions(enabled=False), calibration=CalibrationOptions(CALIB, 64),
                              executor=executor)
            results.append((_files(out), r.report.search, r.report.end_to_end))
    (a, search_a, e2e_a), (b, search_b, e2e_b) = results
    assert a == b
    assert search_a == search_b and search_a["measured"]
    assert e2e_a == e2e_b and e2e_a["evaluations"] > 0


@pytest.mark.slow
def test_evaluations_on_worker_processes_read_external_data_by_reference(tmp_path):
    """Weights in a data file travel as references: workers map the same file, and the bytes are the same."""
    model = onnx.load(str(MODEL))
    src = tmp_path / "ext.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
                    size_threshold=0)
    config = QuantConfig(search=Budget(target_bits=4.5))
    outs = []
    for name, executor in (("here", threads()), ("there", processes(2))):
        with executor:
            out = tmp_path / name / "q.onnx"  # one name: the model names its data file
            out.parent.mkdir()
            quantize_file(src, out, config, VerifyOptions(enabled=False), calibration=CalibrationOptions(CALIB, 64),
                          executor=executor)
            outs.append(_files(out))
    assert outs[0] == outs[1]


def test_map_keeps_a_bounded_window_of_tasks_in_flight():
    """A generator of large tasks (plan models) is drawn a few items ahead of the results, never all at once."""
    drawn = []

    def items():
        for i in range(50):
            drawn.append(i)
            yield i

    for executor in (threads(2), inline()):
        drawn.clear()
        with executor:
            results = executor.map(lambda x: x * x, items())
            assert next(results) == 0
            assert len(drawn) <= executor.window + 1
            assert list(results) == [i * i for i in range(1, 50)]


def test_execution_options_are_checked():
    with pytest.raises(ConfigError):
        ExecutionOptions(jobs=0)
    with pytest.raises(ConfigError):
        ExecutionOptions(ExecutorKind.LOCAL, ray_address="ray://head:10001")


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixq_onnx.cli", str(MODEL), "--no-verify", "-q", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})})


def test_cli_refuses_contradictory_executor_flags(tmp_path):
    for args, words in ((("--jobs", "0"), "--jobs"), (("--ray-address", "auto"), "--executor ray"),
                        (("--executor", "ray", "--jobs", "2"), "--jobs")):
        proc = _cli(tmp_path, "-o", "q.onnx", *args)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "q.onnx").exists()


def test_cli_without_ray_names_the_extra(tmp_path):
    """With Ray missing, --executor ray fails at once with the pip command, writing nothing."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "ray.py").write_text("raise ImportError('no ray here')\n")
    proc = _cli(tmp_path, "-o", "q.onnx", "--executor", "ray", env={"PYTHONPATH": str(hide)})
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'mixq-onnx[ray]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--bits", "4", "--method", "gptq", "--calib", str(CALIB), "--calib-samples", "64"),
                                  # a search: block tasks, whole-model chunks and plan checks on Ray
                                  ("--target-bits", "4.5", "--calib", str(CALIB), "--calib-samples", "64")])
def test_ray_executor_on_a_local_instance_gives_the_same_bytes(tmp_path, args):
    """`--executor ray` on a local Ray instance (started by the run) writes the same file as the local executor."""
    pytest.importorskip("ray")
    local = _cli(tmp_path, "-o", "local.onnx", *args)
    assert local.returncode == 0, local.stderr
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    remote = _cli(tmp_path, "-o", "ray.onnx", *args, "--executor", "ray", env=env)
    assert remote.returncode == 0, remote.stderr
    assert _files(tmp_path / "local.onnx") == _files(tmp_path / "ray.onnx")
