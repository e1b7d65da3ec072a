"""Models with external data are quantized without loading their weights: lazy reads, spilled outputs, streamed writes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mixq_onnx import QuantConfig
from mixq_onnx.config import Granularity, Layout, Uniform
from mixq_onnx.graph.io import is_external, load_model, ort_model, read_tensor
from mixq_onnx.pipeline import VerifyOptions, quantize, quantize_file

from .helpers import run

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny_transformer.onnx"
IDS = {"input_ids": np.load(ROOT / "models" / "tiny_transformer_test.npz")["input_ids"][:8]}
CONFIG = QuantConfig(search=Uniform(4), layouts=(Layout(Granularity.BLOCK, 32),))


def _external_copy(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(onnx.load(str(MODEL)), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _values(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_load_model_leaves_weights_on_disk(tmp_path):
    path = _external_copy(tmp_path / "in")
    loaded = load_model(path)
    full = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(MODEL)).graph.initializer}
    assert loaded.had_external_data
    for t in loaded.model.graph.initializer:
        # Tensors under 1 KiB (norm weights, shapes) are read inline at once: ORT's shape inference needs them.
        assert is_external(t) != (len(t.raw_data) > 0)
        assert is_external(t) == (full[t.name].nbytes >= 1024), t.name
        assert np.array_equal(read_tensor(t), full[t.name])
    # ONNX Runtime gets the file with its data linked, and computes what the original computes.
    assert np.allclose(run(loaded.model, IDS)[0], run(onnx.load(str(MODEL)), IDS)[0])


def test_streamed_output_equals_the_in_memory_one(tmp_path):
    """Quantizing from external data (rounded one weight at a time, spilled, streamed) writes the same weights and
    graph as quantizing the model in memory, and two runs write the same bytes."""
    path = _external_copy(tmp_path / "in")
    out1, out2, mem = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "mem.onnx"
    quantize_file(path, out1, CONFIG, VerifyOptions(enabled=False))
    quantize_file(path, out2, CONFIG, VerifyOptions(enabled=False))
    assert out1.read_bytes().replace(b"a.onnx", b"b.onnx") == out2.read_bytes()
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    quantize_file(MODEL, mem, CONFIG, VerifyOptions(enabled=False))
    streamed, in_memory = _values(out1), _values(mem)
    assert streamed.keys() == in_memory.keys()
    for name, v in in_memory.items():
        assert np.array_equal(streamed[name], v), name
    assert [n.op_type for n in onnx.load(str(out1)).graph.node] == [n.op_type for n in onnx.load(str(mem)).graph.node]
    # Big tensors start on 64 KiB boundaries so ONNX Runtime can map them.
    for t in onnx.load(str(out1), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if int(info.get("length", 0)) >= 65536:
            assert int(info["offset"]) % 65536 == 0
    q = run(onnx.load(str(out1)), IDS)[0]
    f = run(onnx.load(str(MODEL)), IDS)[0]
    assert float(np.dot(q.ravel(), f.ravel()) / np.linalg.norm(q) / np.linalg.norm(f)) > 0.95


def test_the_scratch_file_holds_new_weights_until_closed(tmp_path):
    """New weights of 64 KiB or more go to the scratch file as they are made; closing the result removes it."""
    sys.path.insert(0, str(ROOT / "tools"))
    from make_stack import build

    path = build(tmp_path / "stack.onnx", layers=1, hidden=256)
    ids = {"x": np.random.default_rng(0).standard_normal((2, 4, 256)).astype(np.float32)}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = quantize(path, CONFIG, scratch=scratch)
    assert result.spill is not None and result.spill.bytes > 0
    spilled = [t for t in result.model.graph.initializer if is_external(t) and str(scratch) in t.external_data[0].value]
    assert spilled and all(not t.raw_data for t in spilled)
    with ort_model(result.model) as src:
        assert isinstance(src, Path)
    q, f = run(result.model, ids)[0], run(onnx.load(str(path)), ids)[0]
    assert float(np.dot(q.ravel(), f.ravel()) / np.linalg.norm(q) / np.linalg.norm(f)) > 0.95
    result.close()
    assert os.listdir(scratch) == []


def test_onnx_runtime_gets_links_even_when_the_temporary_folder_is_elsewhere(tmp_path, monkeypatch):
    """A temporary folder on another file system (a tmpfs) cannot hold hard links: the links go beside the data."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system at /dev/shm")
    path = _external_copy(tmp_path / "in")
    monkeypatch.setattr("tempfile.tempdir", str(shm))
    loaded = load_model(path)
    with ort_model(loaded.model) as src:
        assert isinstance(src, Path) and src.parent.parent == path.parent
        data = [p for p in src.parent.iterdir() if p.name.startswith("linked")]
        assert data and all(os.stat(p).st_ino == os.stat(path.parent / "model.onnx.data").st_ino for p in data)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".mixq-")]
    assert np.allclose(run(loaded.model, IDS)[0], run(onnx.load(str(MODEL)), IDS)[0])


def test_a_non_numeric_external_offset_is_a_model_error(tmp_path):
    """Found by tools/fuzz.py: the lazy loader parses offsets itself, so a damaged one must be refused, not crash."""
    from mixq_onnx.errors import ModelError

    path = _external_copy(tmp_path / "in")
    m = onnx.load(str(path), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.external_data)
    next(e for e in t.external_data if e.key == "offset").value = "abc"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="not a byte count"):
        load_model(path)


@pytest.mark.parametrize("extra", [[], ["max-size"]])
def test_a_big_inline_input_runs_spilled_and_is_written_inline_byte_for_byte(tmp_path, monkeypatch, extra):
    """Past SPILL_BYTES an inline model's weights go to a scratch file for the run (as external data would); the
    output is the same inline file, byte for byte, as without the spill, with a verdict from ONNX Runtime, and the
    scratch file is gone after the run. ``--max-size`` counts the inline form."""
    import mixq_onnx.pipeline as pipeline
    from mixq_onnx.config import Budget

    config = CONFIG
    if extra:
        size = MODEL.stat().st_size // 5
        config = QuantConfig(search=Budget(max_bytes=size), layouts=(Layout(Granularity.BLOCK, 32), Layout(Granularity.CHANNEL)))
    plain, spilled = tmp_path / "plain.onnx", tmp_path / "spilled" / "spilled.onnx"
    spilled.parent.mkdir()
    first = quantize_file(MODEL, plain, config, VerifyOptions())
    seen: list[int] = []
    real = pipeline.spill_initializers

    def spy(model, spill):
        out = real(model, spill)
        seen.append(sum(is_external(t) for t in out.graph.initializer))
        return out

    monkeypatch.setattr(pipeline, "SPILL_BYTES", 0)
    monkeypatch.setattr(pipeline, "spill_initializers", spy)
    second = quantize_file(MODEL, spilled, config, VerifyOptions())
    assert seen and seen[0] > 0  # the run really went the spilled way
    assert spilled.read_bytes() == plain.read_bytes()
    # Inline: no data file. The scratch files stay with the result (its model reads them) until it is closed.
    assert sorted(p.name for p in spilled.parent.iterdir() if not p.name.startswith(".mixq")) == ["spilled.onnx"]
    assert second.report.verification.verdict.level == first.report.verification.verdict.level
    if extra:
        assert spilled.stat().st_size <= config.search.max_bytes
    second.close()
    assert sorted(p.name for p in spilled.parent.iterdir()) == ["spilled.onnx"]
