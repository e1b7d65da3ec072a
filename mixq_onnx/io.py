"""Load and save ONNX models safely: external data checks, atomic and deterministic writes."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import ModelError, OutputError

log = logging.getLogger(__name__)

TWO_GB = 2**31 - 1
# Leave headroom under protobuf's 2 GB hard limit for the graph itself.
EXTERNAL_THRESHOLD = 2**31 - 2**26


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path | None
    had_external_data: bool


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(external_data_helper._get_all_tensors(model))


def _check_external_location(path: Path, tensor: onnx.TensorProto) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    loc = info.get("location", "")
    base = path.parent.resolve()
    where = f"{path}: tensor '{tensor.name}' stores its data in '{loc}'"
    if not loc or os.path.isabs(loc) or Path(loc).drive:
        raise ModelError(f"{where}, an absolute or empty path; external data must sit beside the model")
    if ".." in Path(loc).parts:
        raise ModelError(f"{where}, outside the model's folder; move the data file next to the model")
    target = path.parent / loc
    if target.is_symlink() or not str(target.resolve()).startswith(str(base) + os.sep):
        raise ModelError(f"{where}, a symbolic link or a path outside the model's folder; copy the data beside the model")
    if not target.is_file():
        raise ModelError(f"{where}, which does not exist; copy the data file next to the model")


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read a model and its external data, refusing data locations outside its folder."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file; check the path")
    if not p.is_file():
        raise ModelError(f"{p}: not a file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelError(f"{p}: not a readable ONNX model ({type(exc).__name__}); is it truncated or not an .onnx file?") from exc
    if not model.HasField("graph") or model.ir_version <= 0 or not model.graph.node:
        raise ModelError(f"{p}: not an ONNX model (no graph or IR version); is it truncated or not an .onnx file?")
    external = [t for t in _all_tensors(model) if external_data_helper.uses_external_data(t)]
    for t in external:
        _check_external_location(p, t)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:  # truncated data files surface as assorted errors
            raise ModelError(f"{p}: could not read external data ({exc}); is the .data file complete?") from exc
    log.info("loaded %s (%d nodes, external data: %s)", p, len(model.graph.node), bool(external))
    return LoadedModel(model, p, bool(external))


def check_output_path(output: str | os.PathLike[str], input_path: str | os.PathLike[str] | None) -> Path:
    """Refuse writing over the input or into a folder that is missing or read-only."""
    out = Path(output)
    if input_path is not None and out.resolve() == Path(input_path).resolve():
        raise OutputError(f"{out}: the output path is the input model; choose another -o path (the input is never modified)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: folder '{parent}' is not writable; choose another -o path")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as {out / 'model_q.onnx'}")
    return out


def save_model(model: onnx.ModelProto, output: str | os.PathLike[str], external: bool) -> list[Path]:
    """Check the model, then write it (and its .data file) atomically.

    Everything is first written to a temporary folder next to the output,
    checked with ``onnx.checker`` (full check), and only then moved into
    place, so a failure never leaves a half-written file behind.
    """
    out = Path(output)
    external = external or model.ByteSize() > EXTERNAL_THRESHOLD
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".mixq-", dir=out.parent if str(out.parent) else "."))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in folder '{out.parent}' ({exc.strerror or exc}); choose another -o path") from exc
    try:
        tmp_model = tmpdir / out.name
        written = [out]
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model = copy
            data_name = out.name + ".data"
            external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
            )
            external_data_helper.write_external_data_tensors(model, str(tmpdir))
            tmp_model.write_bytes(model.SerializeToString(deterministic=True))
            written.insert(0, out.parent / data_name)
        else:
            tmp_model.write_bytes(model.SerializeToString(deterministic=True))
        if external:
            # In-memory models were checked by the pipeline; large ones can only be checked on disk.
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except Exception as exc:
                raise OutputError(f"{out}: refusing to write a model that fails onnx.checker ({exc}); please report this") from exc
        for final in written:
            os.replace(tmpdir / final.name, final)
    except OSError as exc:
        raise OutputError(f"{out}: could not write ({exc.strerror or exc}); check the path and free space") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("wrote %s", ", ".join(map(str, written)))
    return written


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file (the JSON report) through a temporary file and a rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".mixq-", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{p}: could not write the report ({exc.strerror or exc}); check the path") from exc
