"""Generated model inputs for verification and data-free end-to-end sensitivity.

Shapes come from the model; ``--input-shape`` fixes dynamic dimensions. A
dynamic dimension that is not given is probed: the batch axis is 1, and the
others take increasing sizes (spatial ones from 32 to 640, sequence ones 16
then 128) until the float model runs and gives finite outputs. The sizes
chosen are returned so the caller can say what it used.

A decoder's key/value cache inputs (``past_key_values.N.key``...) get an
empty past, the first step of generation, where the attention mask covers
the new tokens only; position inputs count 0, 1, 2... along the sequence,
token ids stay inside their embedding table and masks are ones.
"""

from __future__ import annotations

import logging
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError
from ..graph.io import ort_model

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

# Sizes tried for dynamic dimensions, smallest first: image sides, then sequence lengths.
SPATIAL_SIZES = (32, 64, 128, 224, 320, 640)
SEQUENCE_SIZES = (16, 128)
# One generated sample may not exceed this (all inputs together); --input-shape gives smaller shapes.
MAX_SAMPLE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class GeneratedInputs:
    """Seeded feeds and the shape each input got (``probed`` lists the inputs whose dynamic sizes were chosen here)."""

    feeds: list[Feed]
    shapes: dict[str, tuple[int, ...]]
    probed: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(f"{n}:{'x'.join(map(str, s))}" for n, s in self.shapes.items())


def session(model: bytes | Path | onnx.ModelProto,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            config: dict[str, str] | None = None, provider: str = "CPUExecutionProvider",
            arena: bool = True, threads: int = 0) -> ort.InferenceSession:
    """A quiet ONNX Runtime session from a path, serialized bytes or a model in memory.

    A model whose weights stay on disk is handed over as a file beside its
    linked data (see :func:`mixq_onnx.graph.io.ort_model`): never serialized whole.
    ``arena=False`` gives memory back after each run instead of keeping a
    pool sized for the largest run (for the many short-lived block sessions).
    ``threads``: ONNX Runtime's intra-op threads (0: one per core), for
    worker processes that share the cores.
    """
    if isinstance(model, onnx.ModelProto):
        with ort_model(model) as src:
            return session(src, level, config, provider, arena, threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = level
    # ORT's default order runs every node without node inputs first, so an unfused model dequantizes all its weights
    # before the first layer (1.4 GB for a 2 GB stack stored int8); priority order keeps the graph's order, where
    # each DequantizeLinear sits just before its reader (measured: 0.18 GB).
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.log_severity_level = 3
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, so, providers=providers)


@dataclass(frozen=True)
class InputInfo:
    """A model input as ONNX Runtime describes it (name, shape with dimension names, type), as plain data: a
    session's own NodeArg keeps the session, and its weights, alive."""

    name: str
    shape: tuple[int | str | None, ...]
    type: str


def input_infos(sess: ort.InferenceSession) -> list[InputInfo]:
    return [InputInfo(i.name, tuple(i.shape), i.type) for i in sess.get_inputs()]


def is_cache_input(name: str, type_: str) -> bool:
    """A decoder's key/value cache input (``past_key_values.0.key``, ``past.3.value``, ``past_key_2``...): float, named
    for the past, as optimum, ONNX Runtime GenAI and torch's exporters call them."""
    dtype = ORT_TYPES.get(type_)
    return dtype is not None and np.issubdtype(dtype, np.floating) and "past" in name.lower()


def _is_positions(name: str, type_: str) -> bool:
    dtype = ORT_TYPES.get(type_)
    return dtype is not None and np.issubdtype(dtype, np.integer) and "position" in name.lower()


def _role(inp: ort.NodeArg | InputInfo, axis: int) -> str:
    """'batch', 'past', 'spatial' or 'sequence' for a dynamic dimension: images are float inputs of rank 4 or more;
    a cache input's other dynamic dimensions are the length of the past."""
    if axis == 0:
        return "batch"
    if is_cache_input(inp.name, inp.type):
        return "past"
    dtype = ORT_TYPES.get(inp.type)
    return "spatial" if dtype is not None and np.issubdtype(dtype, np.floating) and len(inp.shape) >= 4 else "sequence"


def _shapes_at(inputs: list[ort.NodeArg], given: dict[str, tuple[int, ...]], step: int) -> dict[str, tuple[int, ...]]:
    # An empty past is the first step of generation: the attention mask then spans the new tokens only, so its
    # length (total = past + new) needs no relation between differently named dimensions to hold.
    sizes = {"batch": 1, "past": 0, "spatial": SPATIAL_SIZES[min(step, len(SPATIAL_SIZES) - 1)],
             "sequence": SEQUENCE_SIZES[min(step, len(SEQUENCE_SIZES) - 1)]}
    named: dict[str, int] = {}  # a named dimension shared by several inputs gets one size
    out = {}
    for inp in inputs:
        if inp.name in given:
            out[inp.name] = given[inp.name]
            continue
        dims = []
        for axis, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
                continue
            size = sizes[_role(inp, axis)]
            if isinstance(d, str) and d:
                size = named.setdefault(d, size)
            dims.append(size)
        out[inp.name] = tuple(dims)
    return out


def _fill(inputs: list[ort.NodeArg], shapes: dict[str, tuple[int, ...]], bounds: dict[str, int],
          rng: np.random.Generator) -> Feed:
    feed = {}
    for inp in inputs:
        dtype = ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ConfigError(f"input '{inp.name}' has type {inp.type}, which generated inputs cannot fill; pass --inputs FILE.npz")
        shape = shapes[inp.name]
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif inp.name in bounds:  # token ids: inside the embedding table
            feed[inp.name] = rng.integers(0, max(bounds[inp.name], 1), shape).astype(dtype)
        elif _is_positions(inp.name, inp.type) and shape:  # 0, 1, 2... along the sequence (after an empty past)
            feed[inp.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:  # masks, flags and counts: ones are the valid common case
            feed[inp.name] = np.ones(shape, dtype=dtype)
    return feed


Run = Callable[[Feed], list[np.ndarray]]


def _runs(run: Run, names: list[str], feed: Feed) -> str:
    """'' if the model runs on ``feed`` with finite float outputs, else why not."""
    try:
        outs = run(feed)
    except Exception as exc:  # ORT raises several unrelated types for shape problems
        return str(exc).splitlines()[0][:200]
    for o, name in zip(outs, names):
        a = np.asarray(o)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            return f"output '{name}' is not finite"
    return ""


def generate_inputs(
    model: bytes | Path | onnx.ModelProto, given: dict[str, tuple[int, ...]], bounds: dict[str, int], samples: int, seed: int,
    run: Run | None = None,
) -> GeneratedInputs:
    """``samples`` seeded feeds of one sample each that the float model runs on.

    ``run`` runs the float model on a feed (default: this session's run; a
    chain of block sessions keeps a big model's weights out of memory: a
    session that only lists the inputs does not read them).
    Raises ConfigError, naming what to pass, when no probed size works or a
    sample would be too large.
    """
    sess = session(model, config={"session.disable_prepacking": "1"})  # maps the weights instead of copying them
    names = [o.name for o in sess.get_outputs()]

    def whole(feed: Feed) -> list[np.ndarray]:
        return sess.run(None, feed)

    inputs = sess.get_inputs()
    unknown = set(given) - {i.name for i in inputs}
    if unknown:
        raise ConfigError(f"--input-shape names {sorted(unknown)}, which are not model inputs; inputs are {[i.name for i in inputs]}")
    dynamic = [i.name for i in inputs if i.name not in given and any(not (isinstance(d, int) and d > 0) for d in i.shape[1:])]
    steps = range(len(SPATIAL_SIZES)) if dynamic else range(1)
    failure = ""
    for step in steps:
        shapes = _shapes_at(inputs, given, step)
        nbytes = sum(int(np.prod(s)) * np.dtype(ORT_TYPES.get(i.type, np.float32)).itemsize for i, s in zip(inputs, shapes.values()))
        if nbytes > MAX_SAMPLE_BYTES:
            big = ", ".join(f"{n}:{'x'.join(map(str, s))}" for n, s in shapes.items())
            raise ConfigError(f"generated inputs of {big} would take {nbytes / 2**20:.0f} MiB per sample (limit "
                              f"{MAX_SAMPLE_BYTES // 2**20} MiB); pass a smaller --input-shape or real samples with --inputs")
        rng = np.random.default_rng(seed)
        first = _fill(inputs, shapes, bounds, rng)
        failure = _runs(run or whole, names, first)
        if failure and run is not None:  # a block ORT cannot run alone is no reason to give up: the whole model decides
            failure = _runs(whole, names, first)
        if not failure:
            feeds = [first] + [_fill(inputs, shapes, bounds, rng) for _ in range(samples - 1)]
            if dynamic:
                log.info("generated inputs: dynamic sizes chosen by probing: %s", shapes)
            return GeneratedInputs(feeds, shapes, tuple(dynamic))
        if not dynamic:
            break
    tried = "the model's own shapes" if not dynamic else f"sizes {SPATIAL_SIZES} (spatial) and {SEQUENCE_SIZES} (sequence)"
    raise ConfigError(f"the float model does not run on generated inputs with {tried} ({failure}); "
                      f"pass --input-shape NAME:DxD.. for {', '.join(dynamic) or 'its inputs'}, or real samples with --inputs/--calib")


# A data loader that never stops is cut here (with a warning): calibration and verification need a bounded set.
MAX_SCRIPT_FEEDS = 4096


def is_script(path: str | Path) -> bool:
    """Whether a data path names a Python data-loader script (``loader.py`` or ``loader.py:function``)."""
    text = str(path)
    return text.endswith(".py") or ".py:" in text


def script_feeds(spec: str | Path, what: str) -> list[Feed]:
    """The feeds a data-loader script yields, as Polygraphy's ``--data-loader-script`` reads them.

    ``spec`` is ``FILE.py`` or ``FILE.py:FUNCTION`` (default ``load_data``);
    the function takes no argument and returns or yields dicts of arrays
    keyed by input name, each a batch along the first axis. ``what`` names
    the option in messages.
    """
    text = str(spec)
    file, _, func = text.rpartition(":") if ".py:" in text else (text, "", "")
    func = func or "load_data"
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{path}: data-loader script not found; give FILE.py or FILE.py:FUNCTION for {what}")
    try:
        namespace = runpy.run_path(str(path), run_name="mixq_data_loader")
    except Exception as exc:  # the user's code may raise anything
        raise ConfigError(f"{path}: the data-loader script failed while loading ({type(exc).__name__}: {exc})") from exc
    fn = namespace.get(func)
    if not callable(fn):
        raise ConfigError(f"{path}: defines no function '{func}'; name it with {what} {path}:FUNCTION")
    feeds: list[Feed] = []
    try:
        for i, item in enumerate(fn()):
            if i >= MAX_SCRIPT_FEEDS:
                log.warning("%s: %s() yielded more than %d feeds; the rest are not used", path, func, MAX_SCRIPT_FEEDS)
                break
            if not isinstance(item, dict) or not item:
                raise ConfigError(f"{path}: {func}() yielded a {type(item).__name__} as feed {i}; yield dicts of arrays keyed by input name")
            feeds.append({str(k): np.asarray(v) for k, v in item.items()})
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: {func}() failed ({type(exc).__name__}: {exc})") from exc
    if not feeds:
        raise ConfigError(f"{path}: {func}() yielded no feeds; it must yield at least one dict of arrays")
    return feeds


def feed_samples(feed: Feed) -> int:
    """Samples in one feed: the first axis of its first array that has one (1 for scalars only)."""
    for v in feed.values():
        if np.asarray(v).ndim:
            return int(np.asarray(v).shape[0])
    return 1


def check_index_values(where: str | Path, arrays: Feed, bounds: dict[str, int]) -> None:
    """Refuse token ids outside the embedding table they index (ONNX Runtime would fail, or read garbage, on them)."""
    for name, rows in bounds.items():
        a = arrays.get(name)
        if a is None or not np.issubdtype(np.asarray(a).dtype, np.integer) or not np.asarray(a).size:
            continue
        lo, hi = int(np.min(a)), int(np.max(a))
        if lo < -rows or hi >= rows:
            bad = hi if hi >= rows else lo
            raise ConfigError(f"{where}: input '{name}' holds index {bad}, outside the {rows}-row table it looks up "
                              f"(valid: 0 to {rows - 1}); fix the token ids")


__all__ = ["GeneratedInputs", "check_index_values", "feed_samples", "generate_inputs", "is_script", "script_feeds", "session", "ORT_TYPES"]
