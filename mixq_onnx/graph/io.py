"""Load and save ONNX models safely: external data checks, atomic and deterministic writes."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, Message
import numpy as np
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from ..errors import ModelError, OutputError
from .scopes import MAIN, iter_scopes

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
    where = f"{path}: tensor '{tensor.name}' stores its data in '{loc if len(loc) <= 80 else loc[:60] + '...'}'"
    if not loc or os.path.isabs(loc) or Path(loc).drive:
        raise ModelError(f"{where}, an absolute or empty path; external data must sit beside the model")
    if ".." in Path(loc).parts:
        raise ModelError(f"{where}, outside the model's folder; move the data file next to the model")
    if any(len(part.encode()) > 255 for part in Path(loc).parts) or len(loc.encode()) > 4000:
        raise ModelError(f"{path}: tensor '{tensor.name}' stores its data under a path of {len(loc.encode())} bytes, longer "
                         "than file systems allow; re-save the model with a short external-data location")
    target = path.parent / loc
    try:
        outside = target.is_symlink() or not str(target.resolve()).startswith(str(base) + os.sep)
        missing = not target.is_file()
    except OSError as exc:
        raise ModelError(f"{where}, which cannot be opened ({exc.strerror or exc}); re-save the model with its data beside it") from exc
    if outside:
        raise ModelError(f"{where}, a symbolic link or a path outside the model's folder; copy the data beside the model")
    if missing:
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
    """Read a model's graph, leaving its external data on disk.

    Data locations outside the model's folder are refused. External tensors
    keep pointing at their file, with the location made absolute so that
    they stay readable wherever the model goes: :func:`read_tensor` reads
    one at a time, :func:`stage_model` copies them into the output, and
    :func:`ort_model` lets ONNX Runtime map them. Memory stays at the size
    of the graph, not of the weights.
    """
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
    sizes: dict[Path, int] = {}
    for t in external:
        info = _external_info(t)
        target = (p.parent / info["location"]).resolve()
        size = sizes.setdefault(target, target.stat().st_size)
        for key in ("offset", "length"):
            if key in info and not info[key].isdigit():
                raise ModelError(f"{p}: tensor '{t.name}' has external data {key} {info[key]!r}, not a byte count; "
                                 "the model is damaged or was edited by hand")
        offset, length = int(info.get("offset", 0)), _declared_length(t, info)
        if length is not None and offset + length > size:
            raise ModelError(f"{p}: could not read external data for tensor '{t.name}' ({target.name} holds {size} bytes, "
                             f"the tensor needs bytes {offset} to {offset + length}); is the .data file complete?")
        _set_location(t, str(target), offset, length)  # absolute: in memory only
        if length is not None and length < _EXTERNAL_MIN_BYTES:
            # Small tensors (shapes, axes) are read now: ONNX Runtime's shape inference needs them inline.
            raw = _read_bytes(t)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw
    log.info("loaded %s (%d nodes, external data: %s)", p, len(model.graph.node), bool(external))
    return LoadedModel(model, p, bool(external))


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _declared_length(t: onnx.TensorProto, info: dict[str, str]) -> int | None:
    if "length" in info and info["length"].isdigit():
        return int(info["length"])
    count = int(np.prod([int(d) for d in t.dims], dtype=object)) if t.dims else 1
    return _expected_bytes(t, count)


def is_external(t: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(t)


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of the tensor's data, wherever it lives."""
    if is_external(t):
        return _declared_length(t, _external_info(t)) or 0
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return t.ByteSize()


def _read_bytes(t: onnx.TensorProto) -> bytes:
    info = _external_info(t)
    length = _declared_length(t, info)
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        raw = f.read() if length is None else f.read(length)
    if length is not None and len(raw) != length:
        raise ModelError(f"tensor '{t.name}': its data file {info['location']} ends early; is the .data file complete?")
    return raw


def read_tensor(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's values as a fresh numpy array, read from its data file if it has one.

    Plain numeric types are read straight into the array (one copy);
    others go through onnx's decoder.
    """
    if not is_external(t):
        return numpy_helper.to_array(t)
    info = _external_info(t)
    shape = tuple(int(d) for d in t.dims)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, ValueError, TypeError):
        dtype = None
    plain = dtype is not None and _expected_bytes(t, count) == count * dtype.itemsize and t.data_type != TensorProto.STRING
    if plain and sys.byteorder == "little":
        a = np.fromfile(info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        if a.size != count:
            raise ModelError(f"tensor '{t.name}': its data file {info['location']} ends early; is the .data file complete?")
        return a.reshape(shape)
    inline = onnx.TensorProto()
    inline.CopyFrom(t)
    inline.ClearField("external_data")
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = _read_bytes(t)
    return numpy_helper.to_array(inline)


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The model file and the external data files it references (those that exist), without reading any data."""
    p = Path(path)
    if not p.is_file():  # a FIFO would block; load_model refuses anything but a regular file
        return [p]
    try:
        st = p.stat()
    except OSError:
        return [p]
    # A run asks several times (output checks, sizes); the answer holds while the file is unchanged.
    locs = _data_locations(str(p), st.st_ino, st.st_size, st.st_mtime_ns)
    return [p, *(p.parent / loc for loc in locs if _is_file(p.parent / loc))]


@functools.lru_cache(maxsize=16)
def _data_locations(path: str, inode: int, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The data file names the model file references, sorted (the file's identity is the cache key)."""
    p = Path(path)
    if not _contains(p, b"location"):  # no tensor names a data file: no need to parse (a big inline model's seconds)
        return ()
    try:
        m = onnx.load(path, load_external_data=False)
    except Exception:  # an unreadable model has no data files we could damage
        return ()
    return tuple(sorted({e.value for t in _all_tensors(m) for e in t.external_data if e.key == "location"}))


def _contains(path: Path, needle: bytes, chunk: int = 16 * 2**20) -> bool:
    """Whether the file's bytes contain ``needle``, read a chunk at a time (unreadable: True, so callers look closer)."""
    try:
        with open(path, "rb") as f:
            tail = b""
            while block := f.read(chunk):
                if needle in tail + block[: len(needle)] or needle in block:
                    return True
                tail = block[-len(needle) + 1:]
    except OSError:
        return True
    return False


def _is_file(p: Path) -> bool:
    """``p.is_file()``, False for a name the file system cannot even look up (too long, say)."""
    try:
        return p.is_file()
    except OSError:
        return False


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
                      reads: tuple[Path, ...] = (), what: str = "output path", writes: tuple[Path, ...] = ()) -> Path:
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
        for w in writes:
            if _resolved(target) == _resolved(w):
                raise OutputError(f"{out}: the {what} is '{w}', where this run writes the quantized model; choose another path")
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
    """A new temporary folder in ``parent``, after removing those of runs that died there (kill -9 leaves them)."""
    remove_stale(parent)
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent))


def scratch_dir(folder: Path | None = None) -> Path:
    """A new ``.mixq-PID-*`` folder in ``folder`` (default: the system's temporary folder), for a stage's scratch
    files; a later run removes it if this one is killed, like the other temporaries."""
    return _temp_dir(folder if folder is not None else Path(tempfile.gettempdir()))


def remove_stale(folder: Path) -> list[Path]:
    """Remove the ``.mixq-PID-*`` leftovers of dead processes in ``folder``; returns what was removed."""
    gone = []
    for stale in stale_temp_dirs(folder):
        try:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        except OSError:  # another run may be removing it too, or it is not ours to remove
            continue
        log.info("removed %s, left by a run that was killed", stale)
        gone.append(stale)
    return gone


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


# Tensors of at least this many bytes go to the data file (onnx's default), and big ones start on a page boundary
# so that ONNX Runtime can map them.
_EXTERNAL_MIN_BYTES = 1024
_ALIGN_FROM = 65536
_COPY_CHUNK = 64 * 2**20


def _raw_bytes(t: onnx.TensorProto) -> bytes:
    """An inline tensor's data as raw_data would hold it (typed fields converted)."""
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _copy_range(src: Path, offset: int, length: int, dst: "os.PathLike[str] | object") -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise OutputError(f"{src}: ends early while copying tensor data; is the input's .data file complete?")
            dst.write(chunk)  # type: ignore[attr-defined]
            left -= len(chunk)


class _Tally:
    """A stand-in for the data file that only counts what would be written (see :func:`output_bytes`)."""

    def __init__(self) -> None:
        self.pos = 0

    def write(self, b: bytes) -> None:
        self.pos += len(b)

    def tell(self) -> int:
        return self.pos

    def __enter__(self) -> "_Tally":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def output_bytes(model: onnx.ModelProto, data_name: str, external: bool = False) -> int:
    """The bytes :func:`stage_model` would write for ``model`` (model file plus data file), without writing them.

    The same layout as the real write (tensors in order, big ones on page
    boundaries), counted instead of copied: ``--max-size`` covers the whole output.
    """
    if not (external or has_external_data(model) or model.ByteSize() > EXTERNAL_THRESHOLD):
        return model.ByteSize()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    tally = _Tally()
    write_tensor_data(copy, Path("."), data_name, sink=tally)
    return copy.ByteSize() + tally.pos


def write_tensor_data(model: onnx.ModelProto, folder: Path, data_name: str, link: bool = False,
                      sink: _Tally | None = None) -> None:
    """Move every tensor's data of ``model`` (a copy, edited in place) into files in ``folder``.

    Inline tensors of 1 KiB or more and external tensors are written one at
    a time, in the model's order, into ``data_name``; with ``link``, an
    external tensor's whole file is hard-linked into ``folder`` instead
    (for ONNX Runtime sessions: no copy). Memory stays at one chunk. With
    ``sink`` nothing is written: the layout is only counted there.
    """
    linked: dict[str, str] = {}
    with (sink if sink is not None else open(folder / data_name, "wb")) as out:
        for t in _all_tensors(model):
            if is_external(t):
                info = _external_info(t)
                src = Path(info["location"])
                if link:
                    name = linked.get(str(src))
                    if name is None:
                        name = linked[str(src)] = _link_or_copy(src, folder, f"linked{len(linked)}.data")
                    _set_location(t, name, int(info.get("offset", 0)), _declared_length(t, info))
                    continue
                offset, length = int(info.get("offset", 0)), _declared_length(t, info)
                if length is None:
                    length = src.stat().st_size - offset
                start = _pad_to(out, length)
                if sink is not None:
                    sink.pos += length
                else:
                    _copy_range(src, offset, length, out)
                _set_location(t, data_name, start, length)
            elif t.data_type != TensorProto.STRING and t.ByteSize() >= _EXTERNAL_MIN_BYTES:
                raw = _raw_bytes(t)
                start = _pad_to(out, len(raw))
                out.write(raw)
                for f in ("raw_data", *_TYPED_FIELDS):
                    t.ClearField(f)
                _set_location(t, data_name, start, len(raw))


def _pad_to(f: "object", length: int) -> int:
    """Pad the file to the next boundary for a big tensor; returns where it starts."""
    pos = f.tell()  # type: ignore[attr-defined]
    if length >= _ALIGN_FROM and pos % _ALIGN_FROM:
        f.write(b"\0" * (_ALIGN_FROM - pos % _ALIGN_FROM))  # type: ignore[attr-defined]
        pos = f.tell()  # type: ignore[attr-defined]
    return pos


def _set_location(t: onnx.TensorProto, location: str, offset: int, length: int | None) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="offset", value=str(offset))
    if length is not None:
        t.external_data.add(key="length", value=str(length))


def _link_folder(model: onnx.ModelProto) -> Path | None:
    """Where hard links to the model's data files can be made: the system's temporary folder if it shares their
    file system, else their own folder if writable, else None (the system's, with copies)."""
    sources = {Path(_external_info(t)["location"]) for t in _all_tensors(model) if is_external(t)}
    if not sources:
        return None
    system = Path(tempfile.gettempdir())
    try:
        devices = {s.stat().st_dev for s in sources}
        if devices == {system.stat().st_dev}:
            return None
    except OSError:
        return None
    folder = sorted(sources)[0].parent
    if len(devices) == 1 and os.access(folder, os.W_OK):
        return folder
    log.warning("the model's data files are on another file system than %s and their folder is read-only: ONNX Runtime "
                "gets copies of them (slow for big models; set TMPDIR to a folder on the same file system)", system)
    return None


def _link_or_copy(src: Path, folder: Path, name: str) -> str:
    try:
        os.link(src, folder / name)
    except OSError:  # another file system, or links not allowed: a copy costs time, not memory
        log.info("cannot hard-link %s into %s; copying it", src, folder)
        shutil.copyfile(src, folder / name)
    return name


class Spill:
    """A scratch data file that takes big new tensors out of memory while a model is being built.

    :meth:`take` appends a tensor's bytes to the file and leaves the tensor
    pointing there (an absolute location, like those of :func:`load_model`),
    so a rewrite holds one quantized tensor at a time. The folder lives
    beside the output (``.mixq-PID-*``, removed by :meth:`close`, at exit,
    or by a later run if this one is killed).
    """

    def __init__(self, folder: Path | None = None) -> None:
        parent = folder if folder is not None else Path(tempfile.gettempdir())
        self.dir = _temp_dir(parent)
        self.path = self.dir / "spilled.data"
        self._file = open(self.path, "wb")  # noqa: SIM115 - kept open for appends, closed by close()
        self._finalizer = weakref.finalize(self, _remove_spill, self._file, self.dir)
        self.bytes = 0

    def take(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """``t`` with its data moved to the scratch file if it is at least 64 KiB (small tensors come back as they are).

        The result is a new message: clearing the data of ``t`` itself would
        not free it (protobuf keeps a message's bytes in its arena until the
        message goes), so the caller drops ``t`` and keeps the light copy.
        """
        if is_external(t) or t.data_type == TensorProto.STRING or t.ByteSize() < _ALIGN_FROM:
            return t
        raw = _raw_bytes(t)
        start = _pad_to(self._file, len(raw))
        self._file.write(raw)
        self._file.flush()
        # Every field but the data, as it was: inline_copy() gives the tensor back exactly.
        light = onnx.TensorProto()
        _copy_fields(t, light, skip=_DATA_FIELDS)
        _set_location(light, str(self.path), start, len(raw))
        self.bytes += len(raw)
        return light

    def close(self) -> None:
        self._finalizer()


def spill_initializers(model: onnx.ModelProto, spill: Spill) -> onnx.ModelProto:
    """A copy of an inline model whose main-graph initializers of 64 KiB or more keep their data in ``spill``'s file.

    The rest of the run then treats the model as one with external data:
    weights read one at a time, ONNX Runtime mapping them, block sessions
    made from the graph alone. :func:`inline_copy` gives the inline form
    back, byte for byte. The caller drops ``model`` to free its memory.
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    # Only tensors that inline_copy() restores exactly: data in raw_data, no data_location of their own.
    light.graph.initializer.extend(spill.take(t) if t.HasField("raw_data") and not t.HasField("data_location") else t
                                   for t in model.graph.initializer)
    return light


def inline_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with the data of every external tensor read back into it (the whole model in memory)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)  # external tensors hold no data: this copies the graph
    for t in _all_tensors(out):
        if is_external(t):
            raw = _read_bytes(t)
            del t.external_data[:]
            t.ClearField("data_location")
            t.raw_data = raw
    return out


def inline_bytes(model: onnx.ModelProto) -> int:
    """The size of the model with every tensor inline (all of it serialized, so it costs the model's memory)."""
    return inline_copy(model).ByteSize() if has_external_data(model) else model.ByteSize()


def _remove_spill(f: "object", folder: Path) -> None:
    f.close()  # type: ignore[attr-defined]
    shutil.rmtree(folder, ignore_errors=True)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in _all_tensors(model))


_LIGHT_BYTES = 4096


def light_copy(model: onnx.ModelProto, keep_bytes: int = _LIGHT_BYTES, placeholder: bytes = b"") -> onnx.ModelProto:
    """A copy in which every initializer holding more than ``keep_bytes`` of data keeps only its name, type and shape.

    For the passes that read the graph and never the weights (shape
    inference, the version converter). The main graph's heavy tensors are
    never copied, so the copy costs the graph, not the weights; those of
    subgraphs (small, in practice) are copied, then emptied. ``placeholder``
    becomes the emptied tensors' raw data, a marker a pass carries through.
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    light.graph.initializer.extend(_emptied(t, placeholder) if _heavy(t, keep_bytes) else t for t in model.graph.initializer)
    for scope in iter_scopes(light.graph):
        if scope.path == MAIN:
            continue
        for t in scope.graph.initializer:
            if _heavy(t, keep_bytes):
                t.CopyFrom(_emptied(t, placeholder))
    return light


_DATA_FIELDS = ("raw_data", *_TYPED_FIELDS)


def _copy_fields(src: Message, dst: Message, skip: tuple[str, ...]) -> None:
    """Copy every set field of ``src`` into ``dst`` but those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED  # protobuf < 5
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _heavy(t: onnx.TensorProto, keep_bytes: int) -> bool:
    """Whether the tensor's message takes more than ``keep_bytes`` (ByteSize encodes the message, so a tensor whose
    shape says its data alone is larger is judged without it)."""
    count = int(np.prod([int(d) for d in t.dims], dtype=object)) if t.dims else 1
    size = _expected_bytes(t, count)
    if size is not None and size > keep_bytes and not is_external(t):
        return True
    return t.ByteSize() > keep_bytes


def _emptied(t: onnx.TensorProto, placeholder: bytes) -> onnx.TensorProto:
    return onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=placeholder)


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's size with all its tensor data, including what stays on disk."""
    return model.ByteSize() + sum(tensor_nbytes(t) for t in _all_tensors(model) if is_external(t))


@contextmanager
def ort_model(model: onnx.ModelProto) -> Iterator[bytes | Path]:
    """What ONNX Runtime should load for an in-memory model: its bytes, or a file beside its linked data.

    Models whose weights stay on disk (see :func:`load_model`), or that are
    too big to serialize, are written to a temporary folder with their data
    files hard-linked, so ONNX Runtime maps the weights instead of receiving
    a copy. The folder is removed on exit; a session made inside keeps working.
    Hard links need one file system: when the temporary folder is on another
    (a tmpfs /tmp, say) the folder is made beside the data files instead, and
    only when that folder is read-only are the files copied.
    """
    if not has_external_data(model):
        # Serializing is what measuring the size costs (ByteSize encodes the message): do it once, and only a
        # model past protobuf's limit goes the file way.
        data = model.SerializeToString()
        if len(data) <= EXTERNAL_THRESHOLD:
            yield data
            return
        del data
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-ort-", dir=_link_folder(model)))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        write_tensor_data(copy, tmp, "inline.data", link=True)
        path = tmp / "model.onnx"
        path.write_bytes(copy.SerializeToString())
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stage_model(model: onnx.ModelProto, output: str | os.PathLike[str], external: bool) -> StagedModel:
    """Check the model and write it (and its .data file) into a temporary folder next to the output.

    Tensor data is streamed into the data file one tensor at a time, so a
    model whose weights stay on disk is written without loading them.
    Nothing reaches ``output`` until :meth:`StagedModel.commit`; on any
    failure here the temporary folder is removed.
    """
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    external = external or has_external_data(model) or model.ByteSize() > EXTERNAL_THRESHOLD
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
            data_name = out.name + ".data"
            write_tensor_data(copy, tmpdir, data_name)
            tmp_model.write_bytes(copy.SerializeToString(deterministic=True))
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


def model_digest(model: onnx.ModelProto) -> str:
    """A digest of the model: its graph as serialized (deterministic), then the data of every large tensor.

    Large inline tensors are hashed from their data, not re-encoded with the
    graph; external files are read in chunks (seconds for gigabytes), never
    held whole. A model with the same graph and the same weights gives the
    same digest wherever it was loaded from.
    """
    h = hashlib.sha256()  # SHA extensions make it about twice blake2b's speed here
    light = light_copy(model)
    files: dict[str, None] = {}
    for t in _all_tensors(light):
        if is_external(t):
            info = _external_info(t)
            files[info["location"]] = None
            # The location is absolute in memory (see load_model): keep only its name, the bytes are hashed below.
            _set_location(t, Path(info["location"]).name, int(info.get("offset", 0)), _declared_length(t, info))
    h.update(light.SerializeToString(deterministic=True))
    # The emptied tensors in the copy's order: each one's shape and type are in the graph hashed above, which
    # fixes how many bytes it holds.
    for scope in iter_scopes(model.graph):
        for t in scope.graph.initializer:
            if _heavy(t, _LIGHT_BYTES):  # never an external tensor (its message is small)
                h.update(t.raw_data if t.HasField("raw_data") else t.SerializeToString(deterministic=True))
    for location in sorted(files):
        with open(location, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:32]


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str = "the report") -> None:
    """Write a text file (the JSON report, the sensitivity cache) through a temporary file and a rename."""
    p = Path(path)
    remove_stale(p.parent if str(p.parent) else Path("."))
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{p}: could not write {what} ({exc.strerror or exc}); check the path") from exc
