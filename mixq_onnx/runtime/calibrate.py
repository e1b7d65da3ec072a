"""Calibration data: load and validate it, then stream it through the float model to collect
the moments H = E[x x^T] and E[x] of each weight's input, for output-aware
sensitivity, GPTQ, AdaRound and bias correction.

The float model runs in ONNX Runtime with the needed activations exposed as
extra outputs, one batch at a time; only the K x K statistics are kept, so
memory is bounded by the statistics and one batch of activations, not by the
number of samples.

Covered: MatMul and Gemm with a constant weight on the right (B), Conv
(every group, with strides, dilations and padding), and the input weights W
of LSTM/GRU/RNN (every time step is a row; padded steps beyond
``sequence_lens`` are included). Weights of other consumers (ConvTranspose,
Gather, recurrent weights R, a constant left MatMul input, weights reached
through Transpose/Reshape/Cast, weights inside subgraphs) have no H: they
keep the weight-error measure and round with ``mse`` at most; the report
says which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..errors import ConfigError
from ..graph.find import WeightSite, gather_index_bounds
from ..graph.scopes import MAIN, node_label
from ..numerics.ranges import RangeHistogram
from ..config import CalibMethod
from ..numerics.statistics import InputStats
from ..numerics.qdq import QType
from .inputs import ORT_TYPES, InputInfo, check_index_values, feed_samples, input_infos, is_script, script_feeds, session

log = logging.getLogger(__name__)

RECURRENT = ("LSTM", "GRU", "RNN")

Feed = dict[str, np.ndarray]


def _parts_from(path: Path) -> list[tuple[Path, dict[str, np.ndarray]]]:
    """Arrays keyed by input name: one part per .npz file, one part for all .npy files (named by their stem).

    Parts whose arrays agree in every axis but the first are concatenated;
    otherwise (sequences of different lengths, say) each part stays its own
    set of batches, so nothing needs padding.
    """
    if is_script(path):
        feeds = script_feeds(path, "--calib")
        parts = [(Path(f"{path}[{i}]"), f) for i, f in enumerate(feeds)]
        return _merged(path, parts)
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"{path}: no .npz or .npy files in the --calib folder")
    for f in files:
        # A FIFO or device would block or never end; only regular files are read.
        if not f.is_file():
            raise ConfigError(f"{f}: not a regular file; give .npz or .npy files for --calib")
    parts: list[tuple[Path, dict[str, np.ndarray]]] = []
    npy: dict[str, np.ndarray] = {}
    for f in files:
        try:
            if f.suffix == ".npy":
                npy[f.stem] = np.load(f, allow_pickle=False)
            else:
                with np.load(f, allow_pickle=False) as data:
                    parts.append((f, {k: data[k] for k in data.files}))
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(f"{f}: cannot read calibration data ({exc}); give .npz or .npy files of arrays") from exc
    if npy:
        parts.append((path, npy))
    return _merged(path, parts)


def _merged(path: Path, parts: list[tuple[Path, dict[str, np.ndarray]]]) -> list[tuple[Path, dict[str, np.ndarray]]]:
    """Parts that agree in every axis but the first, as one; otherwise as they are."""
    if len(parts) > 1 and all(
        p.keys() == parts[0][1].keys() and all(p[k].shape[1:] == parts[0][1][k].shape[1:] for k in p) for _, p in parts
    ):
        return [(path, {k: np.concatenate([p[k] for _, p in parts]) for k in parts[0][1]})]
    return parts


def _validate(where: Path, arrays: dict[str, np.ndarray], inputs: list, bounds: dict[str, int]) -> int:
    """Check one part's names, dtypes, shapes and values against the model inputs; return its sample count."""
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise ConfigError(f"{where}: calibration data lacks model input(s) {missing}; it has {sorted(arrays)}")
    count = None
    for i in inputs:
        a = arrays[i.name]
        want = ORT_TYPES.get(i.type)
        if want is None or a.dtype != np.dtype(want):
            raise ConfigError(f"{where}: input '{i.name}' is {a.dtype}, the model expects {i.type}; convert the array")
        dims = list(i.shape)
        if a.ndim != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims[1:], a.shape[1:])):
            raise ConfigError(f"{where}: input '{i.name}' has shape {list(a.shape)}, the model expects {dims} (first axis = samples)")
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise ConfigError(f"{where}: input '{i.name}' contains NaN or infinite values; clean the calibration data")
        if count is not None and a.shape[0] != count:
            raise ConfigError(f"{where}: inputs have different sample counts ({count} and {a.shape[0]} for '{i.name}')")
        count = a.shape[0]
    check_index_values(where, arrays, bounds)
    return count or 0


def _graph_of(model: bytes | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph (its external weights not read), whatever form it came in."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model), load_external_data=False)


def load_calibration(path: str | Path, model: bytes | Path | onnx.ModelProto, samples: int | None, batch: int = 8,
                     inputs: Sequence[InputInfo] | None = None) -> list[Feed]:
    """Validated calibration batches: names, shapes and dtypes checked against the model, no NaNs.

    The first axis of every array is the sample axis. ``samples`` keeps the
    first N (files of a folder in name order). ``inputs``: the model's
    inputs as an ONNX Runtime session describes them, where the caller has
    one (else a session is made here, which costs a model load).
    """
    p = Path(path)
    if not p.exists() and not is_script(p):
        raise ConfigError(f"{p}: calibration data not found; pass an .npz file or a folder of .npz/.npy files")
    if samples is not None and samples < 1:
        raise ConfigError(f"--calib-samples must be at least 1, got {samples}")
    parts = _parts_from(p)
    bounds = gather_index_bounds(_graph_of(model))
    if inputs is None:
        inputs = input_infos(session(model, config={"session.disable_prepacking": "1"}))
    # A fixed batch dimension of 1 in the model forces one sample per run.
    fixed = [i.shape[0] for i in inputs if isinstance(i.shape[0], int) and i.shape[0] > 0]
    step = 1 if fixed and fixed[0] == 1 else batch
    feeds: list[Feed] = []
    left = samples if samples is not None else None
    for where, arrays in parts:
        count = _validate(where, arrays, inputs, bounds)
        if left is not None:
            count = min(count, left)
            left -= count
        feeds.extend({i.name: arrays[i.name][s : min(s + step, count)] for i in inputs} for s in range(0, count, step))
        if left == 0:
            break
    if not feeds:
        raise ConfigError(f"{p}: calibration data has no samples")
    return feeds


@dataclass(frozen=True)
class _Probe:
    site: WeightSite
    activation: str
    op: str
    attrs: dict


def _probes(model: onnx.ModelProto, sites: tuple[WeightSite, ...]) -> tuple[list[_Probe], dict[str, str]]:
    """Which activation feeds each weight, for the weights whose H we can compute; reasons for the others."""
    nodes = {node_label(n, i): n for i, n in enumerate(model.graph.node)}
    probes, skipped = [], {}
    for s in sites:
        if s.graph != MAIN or s.via and set(s.via) - {"Identity"}:
            skipped[s.name] = "inside a subgraph or behind a Transpose/Reshape/Cast"
            continue
        acts = []
        for u in s.uses:
            n = nodes.get(u.node)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute} if n is not None else {}
            if n is not None and u.op_type in ("MatMul", "Gemm") and u.input_index == 1 and len(s.shape) == 2:
                acts.append((n.input[0], u.op_type, attrs))
            elif n is not None and u.op_type == "Conv" and u.input_index == 1:
                acts.append((n.input[0], "Conv", attrs))
            elif n is not None and u.op_type in RECURRENT and u.input_index == 1 and len(s.shape) == 3:
                acts.append((n.input[0], "Recurrent", attrs))
            else:
                acts = []
                break
        if not acts or len({a[0] for a in acts}) != 1:
            skipped[s.name] = "no input statistics for this consumer (only MatMul/Gemm weights on the right, Conv, and LSTM/GRU/RNN input weights W)"
            continue
        probes.append(_Probe(s, acts[0][0], acts[0][1], acts[0][2]))
    return probes, skipped


def _rows(x: np.ndarray, probe: _Probe, wshape: tuple[int, ...]) -> np.ndarray:
    """The weight's input as [groups, rows, K], in the same K order as the weight's reduction."""
    if probe.op == "MatMul":
        return x.reshape(1, -1, x.shape[-1])
    if probe.op == "Gemm":
        a = x.T if probe.attrs.get("transA", 0) else x
        return a.reshape(1, -1, a.shape[-1])
    if probe.op == "Recurrent":
        # X is [seq, batch, in] (or [batch, seq, in]); every direction sees the same rows.
        rows = x.reshape(1, -1, x.shape[-1])
        return np.broadcast_to(rows, (wshape[0],) + rows.shape[1:])
    return _im2col(x, probe.attrs, wshape)


def _im2col(x: np.ndarray, attrs: dict, wshape: tuple[int, ...]) -> np.ndarray:
    """Conv input patches [groups, N*out positions, C/g * prod(kernel)], matching W[o, c, k...] order."""
    group = int(attrs.get("group", 1))
    kernel = tuple(wshape[2:])
    nd = len(kernel)
    strides = tuple(attrs.get("strides", [1] * nd))
    dil = tuple(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * 2 * nd))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * nd
        for d in range(nd):
            size = x.shape[2 + d]
            out = -(-size // strides[d])
            total = max(0, (out - 1) * strides[d] + (kernel[d] - 1) * dil[d] + 1 - size)
            small, big = total // 2, total - total // 2
            pads[d], pads[d + nd] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * 2 * nd
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[d], pads[d + nd]) for d in range(nd)])
    span = tuple((k - 1) * dl + 1 for k, dl in zip(kernel, dil))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    # Keep every dilation-th tap and every stride-th position.
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, dl) for dl in dil)]
    n, c = x.shape[:2]
    outs = win.shape[2 : 2 + nd]
    # [N, C, out..., k...] -> [N, out..., C, k...] -> [groups, rows, C/g * k]
    perm = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    cols = win.transpose(perm).reshape(n * int(np.prod(outs)), group, c // group * int(np.prod(kernel)))
    return cols.transpose(1, 0, 2)


def stream_tensors(model: onnx.ModelProto, wanted: list[str], feeds: list[Feed]) -> Iterator[dict[str, np.ndarray]]:
    """Run the float model batch by batch and yield the ``wanted`` tensors of each batch (graph inputs included).

    Only one batch of activations is alive at a time: memory does not grow
    with the number of batches.
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    inputs = {i.name for i in model.graph.input}
    have = {o.name for o in exposed.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in have and name not in inputs:
            exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    # Between runs the caller does numpy (BLAS) work on the activations; ORT's threads must not spin meanwhile,
    # or they and the BLAS threads fight over the cores (measured: 40x slower x^T x products).
    sess = session(exposed, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, {"session.intra_op.allow_spinning": "0"})
    names = [o.name for o in sess.get_outputs()]
    for feed in feeds:
        values = dict(zip(names, sess.run(None, feed)))
        values.update({k: v for k, v in feed.items() if k in inputs})
        yield {k: values[k] for k in wanted}


def collect_input_stats(
    model: onnx.ModelProto, sites: tuple[WeightSite, ...], feeds: list[Feed],
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, InputStats], dict[str, str]]:
    """Stream ``feeds`` through the float model and accumulate H per weight (keyed by tensor name)."""
    probes, skipped = _probes(model, sites)
    if not probes:
        return {}, skipped
    stats: dict[str, InputStats] = {}
    for batch, values in enumerate(stream_tensors(model, [p.activation for p in probes], feeds)):
        if progress is not None:
            progress(batch + 1, len(feeds), "calibration statistics")
        for p in probes:
            start = time.perf_counter()
            # float32 throughout: the activations are float32, and im2col in float64 cost 2x the memory and time.
            x = np.asarray(values[p.activation], dtype=np.float32)
            rows = _rows(x, p, p.site.shape)
            st = stats.get(p.site.name)
            if st is None:
                st = stats[p.site.name] = InputStats(
                    np.zeros((rows.shape[0], rows.shape[2], rows.shape[2])), p.op, bool(p.attrs.get("transB", 0))
                )
            st.add(rows)
            st.seconds += time.perf_counter() - start
    log.info("collected input statistics for %d weights from %d batches", len(stats), len(feeds))
    return stats, skipped


def collect_activation_ranges(
    model: onnx.ModelProto, names: list[str], feeds: list[Feed], method: CalibMethod, qtype: QType, symmetric: bool
) -> dict[str, tuple[float, float]]:
    """The calibrated range of each activation tensor: one streaming pass for min/max, a second for histograms."""
    hists = {n: RangeHistogram() for n in names}
    passes = (1,) if method is CalibMethod.MINMAX else (1, 2)
    for p in passes:
        for values in stream_tensors(model, names, feeds):
            for n in names:
                x = np.asarray(values[n], dtype=np.float32)
                if p == 1:
                    hists[n].observe(x)
                else:
                    hists[n].accumulate(x)
    return {n: h.choose(method, qtype, symmetric) for n, h in hists.items()}


# Verification holds out this share of --calib, but never fewer samples than HOLDOUT_MIN nor more than half.
HOLDOUT_FRACTION = 0.25
HOLDOUT_MIN = 8


def hold_out(feeds: list[Feed], fraction: float = HOLDOUT_FRACTION) -> tuple[list[Feed], list[Feed]]:
    """Split calibration feeds into (kept, held out): the last ``fraction`` of the samples, at least HOLDOUT_MIN.

    Nothing is held out (``held`` is empty) when ``fraction`` is 0 or the
    data has fewer than 2 x HOLDOUT_MIN samples: calibration would be left
    with too little. The split is by sample, from the end, so it is the
    same on every run.
    """
    total = sum(feed_samples(f) for f in feeds)
    if fraction <= 0 or total < 2 * HOLDOUT_MIN:
        return feeds, []
    want = min(max(int(round(total * fraction)), HOLDOUT_MIN), total // 2)
    kept: list[Feed] = []
    held: list[Feed] = []
    left = total - want  # samples that stay for calibration
    for f in feeds:
        n = feed_samples(f)
        if left >= n:
            kept.append(f)
        elif left <= 0:
            held.append(f)
        else:
            kept.append({k: np.asarray(v)[:left] for k, v in f.items()})
            held.append({k: np.asarray(v)[left:] for k, v in f.items()})
        left -= n
    return kept, held
