"""Load and save ONNX models safely: external data checks, atomic and deterministic writes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
import numpy as np
from onnx import TensorProto, external_data_helper, helper

from .errors import ModelError, OutputError

log = logging.getLogger(__name__)

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


def _expected_bytes(tensor: onnx.TensorProto, count: int) -> int | None:
    """Bytes ``count`` elements of the tensor's dtype take in raw_data (sub-byte types packed), or None if unknown."""
    try:
        np_dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4}.get(tensor.data_type)
    bits = bits or {getattr(TensorProto, n): 2 for n in ("INT2", "UINT2") if hasattr(TensorProto, n)}.get(tensor.data_type)
    if bits:
        return (count * bits + 7) // 8
    if tensor.data_type == TensorProto.STRING:
        return None
    return count * np.dtype(np_dtype).itemsize


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def check_tensor(tensor: onnx.TensorProto, where: str) -> None:
    """Refuse a tensor whose dtype is unknown, that is segmented, or whose data does not match its dims."""
    if tensor.data_type == TensorProto.UNDEFINED or tensor.data_type not in helper.get_all_tensor_dtypes():
        raise ModelError(f"{where}: tensor '{tensor.name}' has unknown data type {tensor.data_type}; re-export the model")
    if tensor.HasField("segment"):
        raise ModelError(f"{where}: tensor '{tensor.name}' is segmented (TensorProto.segment), which is not supported; "
                         "re-save the model with onnx.save")
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{where}: tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
    count = int(np.prod([int(d) for d in tensor.dims], dtype=object)) if tensor.dims else 1
    expected = _expected_bytes(tensor, count)
    if external_data_helper.uses_external_data(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        length = info.get("length")
        if expected is not None and length is not None and length.isdigit() and int(length) != expected:
            raise ModelError(f"{where}: tensor '{tensor.name}' declares {length} bytes of external data but its dims "
                             f"{list(tensor.dims)} need {expected}; the model or its .data file is damaged")
        return
    if tensor.HasField("raw_data"):
        got = len(tensor.raw_data)
        if expected is not None and got != expected:
            raise ModelError(f"{where}: tensor '{tensor.name}' holds {got} bytes but its dims {list(tensor.dims)} need "
                             f"{expected}; the model is damaged or was edited by hand")
        return
    stored = [f for f in _TYPED_FIELDS if len(getattr(tensor, f))]
    if stored:
        got = len(getattr(tensor, stored[0]))
        # complex types store two values per element; fp16/bf16/int8/int4 pack into int32_data one (or two) per element
        per = 2 if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        want = {TensorProto.INT4, TensorProto.UINT4}
        need = (count + 1) // 2 if tensor.data_type in want else count * per
        if got != need:
            raise ModelError(f"{where}: tensor '{tensor.name}' holds {got} values but its dims {list(tensor.dims)} need "
                             f"{need}; the model is damaged or was edited by hand")
    elif count and tensor.data_type != TensorProto.STRING:
        raise ModelError(f"{where}: tensor '{tensor.name}' has dims {list(tensor.dims)} but no data; the model is damaged")


def _dedupe_opsets(model: onnx.ModelProto, path: Path) -> None:
    """Drop repeated opset imports of one domain at one version (runtimes accept them; the converter does not)."""
    seen: dict[str, int] = {}
    keep = []
    for op in model.opset_import:
        if op.domain in seen:
            if seen[op.domain] != op.version:
                raise ModelError(f"{path}: imports opset domain '{op.domain or 'ai.onnx'}' twice, at versions "
                                 f"{seen[op.domain]} and {op.version}; keep one import per domain")
            continue
        seen[op.domain] = op.version
        keep.append(op)
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)


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
    _dedupe_opsets(model, p)
    tensors = _all_tensors(model)
    for t in tensors:
        check_tensor(t, str(p))
    external = [t for t in tensors if external_data_helper.uses_external_data(t)]
    for t in external:
        _check_external_location(p, t)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:  # truncated data files surface as assorted errors
            raise ModelError(f"{p}: could not read external data ({exc}); is the .data file complete?") from exc
    log.info("loaded %s (%d nodes, external data: %s)", p, len(model.graph.node), bool(external))
    return LoadedModel(model, p, bool(external))


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The model file and the external data files it references (those that exist), without reading any data."""
    p = Path(path)
    files = [p]
    if not p.is_file():  # a FIFO would block; load_model refuses anything but a regular file
        return files
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception:  # an unreadable model has no data files we could damage
        return files
    locs = {e.value for t in _all_tensors(m) for e in t.external_data if e.key == "location"}
    files += [p.parent / loc for loc in sorted(locs) if (p.parent / loc).is_file()]
    return files


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop or a name too long
        return p.absolute()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):
        return False


def check_output_path(output: str | os.PathLike[str], input_path: str | os.PathLike[str] | None,
                      reads: tuple[Path, ...] = (), what: str = "output path") -> Path:
    """Refuse writing over anything the run reads, over a special file, or into a missing or read-only folder.

    ``reads``: every file the run reads besides the model (its external
    data, calibration and verification samples). The model's own data file
    name (``OUT.data``) is checked too, since a model output may write one.
    """
    out = Path(output)
    if len(out.name.encode()) > 200:
        raise OutputError(f"{out.name[:40]}...: the file name is too long ({len(out.name.encode())} bytes); choose a shorter name")
    read = [*(model_files(input_path) if input_path is not None else []), *reads]
    for target in (out, out.parent / (out.name + ".data")):
        for r in read:
            if _resolved(target) == _resolved(r) or _same_file(target, r):
                role = "the input model" if r == Path(input_path or "") else f"'{r}', which this run reads"
                raise OutputError(f"{out}: the {what} would overwrite {role}; choose another path (inputs are never modified)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: folder '{parent}' is not writable; choose another path")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as {out / 'model_q.onnx'}")
    if out.exists() or out.is_symlink():
        try:
            mode = out.stat().st_mode
        except OSError as exc:
            raise OutputError(f"{out}: cannot inspect the existing {what} ({exc.strerror or exc}); choose another path") from exc
        if not stat.S_ISREG(mode):
            raise OutputError(f"{out}: exists and is not a regular file (a FIFO, device or socket); choose another path")
    return out


# Temporary folders are named after the process that made them, so a later run can tell a dead one's leftovers.
TEMP_PREFIX = ".mixq-"


def _temp_dir(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent))


def stale_temp_dirs(folder: Path) -> list[Path]:
    """``.mixq-PID-*`` folders and files in ``folder`` whose process is gone (left by a killed run)."""
    out = []
    for d in sorted(folder.glob(f"{TEMP_PREFIX}*")):
        pid = d.name[len(TEMP_PREFIX):].split("-")[0]
        if not d.is_symlink() and (d.is_dir() or d.is_file()) and pid.isdigit() and not _alive(int(pid)):
            out.append(d)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StagedModel:
    """A model written in full to a temporary folder beside its destination, not yet in place.

    ``path`` can be loaded and verified as it is; :meth:`commit` moves it
    (and its data file) into place, :meth:`discard` removes everything.
    """

    out: Path
    tmpdir: Path
    names: list[str]

    @property
    def path(self) -> Path:
        return self.tmpdir / self.out.name

    def commit(self) -> list[Path]:
        written = []
        # The data file and the model move together: signals wait until both are in place.
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for name in self.names:
                os.replace(self.tmpdir / name, self.out.parent / name)
                written.append(self.out.parent / name)
        except OSError as exc:
            raise OutputError(f"{self.out}: could not move the model into place ({exc.strerror or exc}); check the folder") from exc
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            self.discard()
        log.info("wrote %s", ", ".join(map(str, written)))
        return written

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def stage_model(model: onnx.ModelProto, output: str | os.PathLike[str], external: bool) -> StagedModel:
    """Check the model and write it (and its .data file) into a temporary folder next to the output.

    Nothing reaches ``output`` until :meth:`StagedModel.commit`; on any
    failure here the temporary folder is removed.
    """
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    external = external or model.ByteSize() > EXTERNAL_THRESHOLD
    try:
        tmpdir = _temp_dir(parent)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in folder '{parent}' ({exc.strerror or exc}); choose another -o path") from exc
    staged = StagedModel(out, tmpdir, [out.name])
    try:
        tmp_model = tmpdir / out.name
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
            staged.names.insert(0, data_name)
            # In-memory models were checked by the pipeline; large ones can only be checked on disk.
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except Exception as exc:
                raise OutputError(f"{out}: refusing to write a model that fails onnx.checker ({exc}); please report this") from exc
        else:
            tmp_model.write_bytes(model.SerializeToString(deterministic=True))
    except OSError as exc:
        staged.discard()
        raise OutputError(f"{out}: could not write ({exc.strerror or exc}); check the path and free space") from exc
    except BaseException:
        staged.discard()
        raise
    return staged


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file (the JSON report) through a temporary file and a rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{p}: could not write the report ({exc.strerror or exc}); check the path") from exc
