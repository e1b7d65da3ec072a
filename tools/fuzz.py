"""Seeded hostile cases against the ``mixq-onnx`` command: every run must fail cleanly or succeed completely.

    python tools/fuzz.py                  # 588 cases, 2 workers (about 10 minutes on 2 cores)
    python tools/fuzz.py --cases 60       # a quick sample of every class
    python tools/fuzz.py --seed 7 -v      # another corpus, printing each case

Each case builds its files in a fresh folder, runs the CLI in a subprocess
with a time limit, and judges the result. A **defect** is any of:

- a Python traceback on stderr, or exit 70 (internal error);
- a hang (the time limit, 120 s);
- exit 0 with an output that onnx.checker or ONNX Runtime rejects;
- a non-zero exit that leaves an output (or report) behind, or a temporary
  ``.mixq-*`` file after a run that was not killed with SIGKILL (a run
  signalled after its model was moved into place may leave it, but it must
  then be whole and valid);
- any input file (model, its data, calibration, inputs) changed;
- a special file (FIFO) at the output replaced.

Classes: damaged files and paths, hostile external data (over-long
locations too), hostile tensors, random graph mutations of real models,
malformed QDQ for ``check``, bad options and bad sample files, signals
during the run (SIGTERM, SIGINT, SIGKILL mid-write; the next run must
remove what a killed one left), concurrent writers to one output, sparse
initializers and wrong declared output shapes, block reconstruction's
calibration inputs, and ``--require`` verdicts that must write nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST_SET = ROOT / "models" / "digits_test.npz"
TIMEOUT = 120


@dataclass
class Case:
    """One hostile run: the command (paths relative to its folder), the files it must not change, and what may exist after."""

    cls: str
    name: str
    args: list[str]
    out: str | None = "out.onnx"
    report: str | None = None
    protect: list[str] = field(default_factory=list)  # files whose bytes must not change
    special_out: bool = False  # OUT is a FIFO that must survive
    signal_after: float | None = None
    signal_kind: int = signal.SIGTERM
    concurrent: int = 1
    command: str = "quantize"


# --- model builders ----------------------------------------------------------------------------------------

def mm_model(w: np.ndarray | None = None, opset: int = 13, dtype=np.float32) -> onnx.ModelProto:
    """x[2,64] @ W[64,48]: the smallest model with a quantizable weight."""
    w = np.random.default_rng(0).normal(0, 0.1, (64, 48)).astype(dtype) if w is None else w
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", elem, [2, 64])],
                          [helper.make_tensor_value_info("y", elem, [2, w.shape[-1] if w.ndim else 1])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def save(model: onnx.ModelProto, path: Path) -> None:
    path.write_bytes(model.SerializeToString())


def with_external(model: onnx.ModelProto, folder: Path, name: str = "m.onnx", location: str = "m.onnx.data") -> Path:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return folder / name


# --- case generators (each returns a Case after preparing its folder) ---------------------------------------

Gen = Callable[[Path, np.random.Generator], Case]


def files_and_paths(d: Path, r: np.random.Generator) -> Case:
    kind = r.integers(0, 12)
    raw = DIGITS.read_bytes()
    if kind == 0:
        return Case("paths", "missing model", ["nope.onnx", "-o", "out.onnx"])
    if kind == 1:
        (d / "dir.onnx").mkdir()
        return Case("paths", "model is a folder", ["dir.onnx", "-o", "out.onnx"])
    if kind == 2:
        cut = int(r.integers(0, len(raw)))
        (d / "m.onnx").write_bytes(raw[:cut])
        return Case("paths", f"truncated at {cut}", ["m.onnx", "-o", "out.onnx"], protect=["m.onnx"])
    if kind == 3:
        (d / "m.onnx").write_bytes(r.bytes(int(r.integers(0, 4096))))
        return Case("paths", "random bytes", ["m.onnx", "-o", "out.onnx"], protect=["m.onnx"])
    if kind == 4:
        os.mkfifo(d / "m.onnx")
        return Case("paths", "model is a FIFO", ["m.onnx", "-o", "out.onnx"])
    if kind == 5:
        os.symlink("b.onnx", d / "a.onnx")
        os.symlink("a.onnx", d / "b.onnx")
        return Case("paths", "symlink loop", ["a.onnx", "-o", "out.onnx"])
    shutil.copy(DIGITS, d / "m.onnx")
    if kind == 6:
        name = "x" * int(r.integers(250, 300)) + ".onnx"
        return Case("paths", "file name too long", ["m.onnx", "-o", name], out=name, protect=["m.onnx"])
    if kind == 7:
        return Case("paths", "output folder missing", ["m.onnx", "-o", "no/such/out.onnx"], out="no/such/out.onnx", protect=["m.onnx"])
    if kind == 8:
        return Case("paths", "output is the input", ["m.onnx", "-o", "m.onnx"], out=None, protect=["m.onnx"])
    if kind == 9:
        try:  # a character device (like /dev/null) where root may make one, else a FIFO
            os.mknod(d / "out.onnx", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            what = "a device node"
        except (PermissionError, AttributeError, OSError):
            os.mkfifo(d / "out.onnx")
            what = "a FIFO"
        return Case("paths", f"output is {what}", ["m.onnx", "-o", "out.onnx"], special_out=True, protect=["m.onnx"])
    if kind == 10:
        return Case("paths", "report is the output", ["m.onnx", "-o", "out.onnx", "--report", "out.onnx"],
                    report="out.onnx", protect=["m.onnx"])
    os.mkfifo(d / "r.json")
    return Case("paths", "report is a FIFO", ["m.onnx", "-o", "out.onnx", "--report", "r.json"], protect=["m.onnx"])


def external_data(d: Path, r: np.random.Generator) -> Case:
    kind = r.integers(0, 9)
    base = onnx.load(str(DIGITS))
    if kind == 0:
        p = with_external(base, d)
        return Case("external", "-o names the input's data file", [p.name, "-o", "m.onnx.data"], out=None,
                    protect=["m.onnx", "m.onnx.data"])
    if kind == 1:
        p = with_external(base, d, location="out.onnx.data")
        return Case("external", "input data file is OUT.data", [p.name, "-o", "out.onnx"], protect=["m.onnx", "out.onnx.data"])
    if kind == 2:
        p = with_external(base, d)
        return Case("external", "--report names the input's data", [p.name, "-o", "out.onnx", "--report", "m.onnx.data"],
                    protect=["m.onnx", "m.onnx.data"])
    p = with_external(base, d)
    m = onnx.load(str(p), load_external_data=False)
    t = m.graph.initializer[int(r.integers(0, len(m.graph.initializer)))]
    info = {e.key: e for e in t.external_data}
    if kind == 3:
        info["location"].value = "/etc/passwd"
    elif kind == 4:
        info["location"].value = "../" + info["location"].value
    elif kind == 5:
        (d / "m.onnx.data").write_bytes((d / "m.onnx.data").read_bytes()[: int(r.integers(0, 1000))])
    elif kind == 8:
        info["location"].value = ("d" * int(r.integers(256, 6000))) + ".data"  # longer than any file name may be
    elif kind == 6:
        bad = [("offset", "abc"), ("length", "-4"), ("checksum", "00"), ("offset", str(10**12))][int(r.integers(0, 4))]
        if bad[0] in info:
            info[bad[0]].value = bad[1]
        else:
            t.external_data.add(key=bad[0], value=bad[1])
    else:
        if "length" in info:
            info["length"].value = str(int(info["length"].value) + int(r.integers(1, 64)))
        else:
            t.external_data.add(key="length", value="3")
    save(m, p)
    return Case("external", f"hostile external data {kind}", [p.name, "-o", "out.onnx"], protect=["m.onnx", "m.onnx.data"])


def hostile_tensors(d: Path, r: np.random.Generator) -> Case:
    kind = int(r.integers(0, 13))
    rng = np.random.default_rng(int(r.integers(0, 2**31)))
    w = rng.normal(0, 0.1, (64, 48)).astype(np.float32)
    extra: list[str] = ["--min-elements", "0"]
    if kind == 0:
        w[int(rng.integers(0, 64)), int(rng.integers(0, 48))] = np.nan
        m = mm_model(w)
    elif kind == 1:
        w[int(rng.integers(0, 64)), int(rng.integers(0, 48))] = np.inf
        m = mm_model(w)
    elif kind == 2:
        w16 = w.astype(np.float16)
        w16[0, :] = 65504
        w16[1, :] = -65504
        m = mm_model(w16, opset=19)
        extra += ["--bits", str(int(rng.choice([2, 4, 8])))]
    elif kind == 3:
        m = mm_model(np.zeros((64, 0), np.float32))
    elif kind == 4:
        m = mm_model(np.float32(0.5) * np.ones((), np.float32))
    elif kind in (5, 6, 7):
        m = mm_model(w)
        t = m.graph.initializer[0]
        if kind == 5:
            t.raw_data = t.raw_data[: int(rng.integers(0, len(t.raw_data)))]
        elif kind == 6:
            data = numpy_helper.to_array(t).ravel()[: int(rng.integers(0, 3000))]
            t.ClearField("raw_data")
            t.float_data.extend(data.tolist())
        else:
            del t.dims[:]
            t.dims.extend([10**6, 10**6])
    elif kind == 8:
        m = mm_model(w)
        m.graph.initializer[0].data_type = int(rng.choice([0, 999]))
    elif kind == 9:
        m = mm_model(w)
        m.graph.initializer[0].segment.begin = 0
        m.graph.initializer[0].segment.end = 10
    elif kind == 10:
        m = mm_model(w)
        t = m.graph.initializer.pop()
        idx = np.array([[0, 0], [1, 1]], np.int64)
        sp = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w"),
                                       numpy_helper.from_array(idx, "w_idx"), list(t.dims))
        m.graph.sparse_initializer.append(sp)
    elif kind == 11:
        m = mm_model(w)
        g = m.graph
        g.node.append(helper.make_node("Gather", ["emb", "ids"], ["e"], name="gather"))
        g.initializer.append(numpy_helper.from_array(np.float32(3.0) * np.ones((), np.float32), "emb"))
        g.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2]))
        g.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    else:
        m = mm_model(w)
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 20000
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 20000 * 64
    save(m, d / "m.onnx")
    return Case("tensors", f"hostile tensor {kind}", ["m.onnx", "-o", "out.onnx", *extra], protect=["m.onnx"])


MUTATIONS = ("drop-node", "swap-inputs", "unknown-op", "duplicate-name", "opset-30", "unknown-domain", "no-outputs",
             "rename-input", "bad-attribute", "input-dims", "double-opset", "drop-initializer", "cycle")


def graph_mutation(d: Path, r: np.random.Generator) -> Case:
    m = onnx.load(str(DIGITS))
    g = m.graph
    kinds = [MUTATIONS[int(k)] for k in r.integers(0, len(MUTATIONS), int(r.integers(1, 3)))]
    for kind in kinds:
        nodes = list(g.node)
        i = int(r.integers(0, len(nodes)))
        if kind == "drop-node" and len(nodes) > 1:
            del g.node[i]
        elif kind == "swap-inputs" and len(g.node[i].input) > 1:
            a = list(g.node[i].input)
            a[0], a[1] = a[1], a[0]
            del g.node[i].input[:]
            g.node[i].input.extend(a)
        elif kind == "unknown-op":
            g.node[i].op_type = "NoSuchOp"
        elif kind == "duplicate-name":
            g.node[i].name = g.node[(i + 1) % len(nodes)].name or "dup"
            g.node[(i + 1) % len(nodes)].name = g.node[i].name
        elif kind == "opset-30":
            m.opset_import[0].version = 30
        elif kind == "unknown-domain":
            g.node[i].domain = "com.example.nothing"
            m.opset_import.append(helper.make_opsetid("com.example.nothing", 1))
        elif kind == "no-outputs":
            del g.output[:]
        elif kind == "rename-input":
            g.input[0].name = "renamed"
        elif kind == "bad-attribute" and g.node[i].attribute:
            a = g.node[i].attribute[0]
            if a.type == onnx.AttributeProto.INTS:
                del a.ints[:]
                a.ints.extend([int(v) for v in r.integers(-3, 9, int(r.integers(0, 5)))])
            elif a.type == onnx.AttributeProto.INT:
                a.i = int(r.integers(-5, 100))
        elif kind == "input-dims":
            dims = g.input[0].type.tensor_type.shape.dim
            if len(dims):
                dims[int(r.integers(0, len(dims)))].dim_param = "dyn"
        elif kind == "double-opset":
            m.opset_import.append(helper.make_opsetid("", m.opset_import[0].version))
        elif kind == "drop-initializer" and len(g.initializer):
            del g.initializer[int(r.integers(0, len(g.initializer)))]
        elif kind == "cycle" and len(nodes) > 2:
            g.node[0].input[0] = g.node[-1].output[0]
    save(m, d / "m.onnx")
    extra = [["--bits", "4"], ["--target-bits", "4"], [], ["--qem", "1"]][int(r.integers(0, 4))]
    return Case("mutation", "+".join(kinds), ["m.onnx", "-o", "out.onnx", *extra], protect=["m.onnx"])


def malformed_qdq(d: Path, r: np.random.Generator) -> Case:
    kind = int(r.integers(0, 6))
    q = numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(3, 4), "q")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    ins = {0: ["q"], 1: ["q", ""], 2: ["q", "s", "zz"], 3: ["", "s"], 4: ["q", "s"], 5: ["q", "s"]}[kind]
    node = helper.make_node("DequantizeLinear", ins, ["w"] if kind != 5 else [""], name="dq")
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    inits = [q, s] if kind != 4 else [q, numpy_helper.from_array(np.array([-1.0, 0.0, np.inf], np.float32), "s")]
    g = helper.make_graph([node, mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    save(m, d / "q.onnx")
    target = ["generic", "ort-cpu", "ort-cuda", "tensorrt"][int(r.integers(0, 4))]
    return Case("check", f"malformed DQ {kind} for {target}", ["q.onnx", "--target", target], out=None, protect=["q.onnx"],
                command="check")


BAD_OPTIONS = (
    ["--seed", "-1"], ["--bits", "9"], ["--bits", "1"], ["--target-bits", "0.5"], ["--target-bits", "nan"],
    ["--max-size", "-5"], ["--max-size", "12XB"], ["--max-loss", "-1"], ["--max-loss", "inf"], ["--qem", "0"],
    ["--input-shape", "image"], ["--input-shape", "nope:1x1x8x8"], ["--input-shape", "image:0x1x8x8"],
    ["--verify-samples", "0"], ["--e2e-samples", "0"], ["--calib-samples", "0"], ["--granularity", "block7"],
    ["--candidate-bits", "a,b"], ["--force-bits", "x"], ["--min-elements", "-1"], ["--scheme", "odd"],
    ["--target", "tensorrt", "--int2"], ["--method", "gptq"], ["--activations", "uint8"],
    ["--input-shape", "image:1x1x100000x100000"],
)


def bad_options(d: Path, r: np.random.Generator) -> Case:
    shutil.copy(DIGITS, d / "m.onnx")
    kind = int(r.integers(0, len(BAD_OPTIONS) + 9))
    if kind < len(BAD_OPTIONS):
        return Case("options", " ".join(BAD_OPTIONS[kind]), ["m.onnx", "-o", "out.onnx", *BAD_OPTIONS[kind]], protect=["m.onnx"])
    kind -= len(BAD_OPTIONS)
    x = np.load(TEST_SET)["image"][:4]
    if kind == 0:
        np.savez(d / "i.npz", other=x)
    elif kind == 1:
        np.savez(d / "i.npz", image=x[:, :, :5])
    elif kind == 2:
        np.savez(d / "i.npz", image=x.astype(np.int32))
    elif kind == 3:
        np.savez(d / "i.npz")
    elif kind == 4:
        (d / "i.npz").write_text("not an npz")
    elif kind == 5:
        np.savez(d / "i.npz", image=x[:0])
    elif kind == 6:
        os.mkfifo(d / "i.npz")
    elif kind == 7:
        os.mkfifo(d / "c.npz")
        return Case("options", "--calib FIFO", ["m.onnx", "-o", "out.onnx", "--calib", "c.npz", "--bits", "4", "--method", "gptq"],
                    protect=["m.onnx"])
    else:
        (d / "cal").mkdir()
        return Case("options", "--calib empty folder", ["m.onnx", "-o", "out.onnx", "--calib", "cal", "--method", "gptq"],
                    protect=["m.onnx"])
    protect = ["m.onnx"] + (["i.npz"] if (d / "i.npz").is_file() else [])
    return Case("options", f"bad --inputs {kind}", ["m.onnx", "-o", "out.onnx", "--inputs", "i.npz"], protect=protect)


def sparse_and_shapes(d: Path, r: np.random.Generator) -> Case:
    """Models ONNX Runtime runs but whose rewrite the full checker could refuse: sparse initializers read by
    ordinary ops, and declared output shapes that contradict what the graph computes."""
    kind = int(r.integers(0, 3))
    m = mm_model(np.random.default_rng(int(r.integers(0, 2**31))).normal(size=(64, 64)).astype(np.float32))
    g = m.graph
    if kind in (0, 1):
        nnz = int(r.integers(1, 20))
        vals = numpy_helper.from_array(np.random.default_rng(kind).normal(size=nnz).astype(np.float32), "sp")
        idx = numpy_helper.from_array(np.sort(np.random.default_rng(kind).choice(128, nnz, replace=False)).astype(np.int64), "sp_i")
        g.sparse_initializer.append(helper.make_sparse_tensor(vals, idx, [2, 64]))
        op = ["Add", "Mul"][kind]
        out = g.output[0].name
        g.node.append(helper.make_node(op, [out, "sp"], ["z"], name="sparse_reader"))
        g.output[0].name = "z"
    else:
        # The output declares a rank the graph does not compute (ORT warns and runs it).
        dims = g.output[0].type.tensor_type.shape
        dims.ClearField("dim")
        dims.dim.add().dim_value = 1
        dims.dim.add().dim_param = "seq"
        dims.dim.add().dim_value = 5
    save(m, d / "m.onnx")
    bits = ["--bits", "4"] if r.integers(0, 2) else ["--target-bits", "4"]
    return Case("repair", f"{['sparse Add', 'sparse Mul', 'wrong output rank'][kind]} {' '.join(bits)}",
                ["m.onnx", "-o", "out.onnx", *bits], protect=["m.onnx"])


def brecq_inputs(d: Path, r: np.random.Generator) -> Case:
    """Block reconstruction's inputs: single-sample folders, batch-1 models, odd calibration shapes."""
    kind = int(r.integers(0, 4))
    shutil.copy(DIGITS, d / "m.onnx")
    x = np.load(TEST_SET)["image"]
    if kind == 0:
        (d / "cal").mkdir()
        np.save(d / "cal" / "image.npy", x[:1])
        calib = "cal"
    elif kind == 1:
        m = onnx.load(str(DIGITS))
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch fixed at 1: one sample per run
        save(m, d / "m.onnx")
        np.savez(d / "c.npz", image=x[: int(r.integers(1, 12))])
        calib = "c.npz"
    elif kind == 2:
        np.savez(d / "c.npz", image=x[:5, :, :, :4])  # wrong spatial size
        calib = "c.npz"
    else:
        (d / "cal").mkdir()
        for i in range(int(r.integers(1, 4))):
            np.savez(d / "cal" / f"{i}.npz", image=x[i * 3:(i + 1) * 3 + i])  # parts of different sizes
        calib = "cal"
    return Case("brecq", f"brecq calibration {kind}", ["m.onnx", "-o", "out.onnx", "--bits", "4", "--method", "brecq",
                                                       "--calib", calib, "--brecq-iters", "3"], protect=["m.onnx"])


def verdicts(d: Path, r: np.random.Generator) -> Case:
    """--require below the verdict must fail cleanly: exit 6, nothing written, no report."""
    shutil.copy(DIGITS, d / "m.onnx")
    shutil.copy(TEST_SET, d / "t.npz")
    args = ["m.onnx", "-o", "out.onnx", "--report", "r.json", "--require", str(r.choice(["good", "degraded"]))]
    if r.integers(0, 2):
        args += ["--bits", "2", "--int2", "--min-elements", "0", "--inputs", "t.npz"]  # broken on real data
    return Case("verdict", " ".join(args[5:]), args, report="r.json", protect=["m.onnx", "t.npz"])


def signals(d: Path, r: np.random.Generator) -> Case:
    shutil.copy(DIGITS, d / "m.onnx")
    sig = [signal.SIGTERM, signal.SIGINT, signal.SIGKILL][int(r.integers(0, 3))]
    after = float(r.uniform(0.1, 1.5))
    args = ["m.onnx", "-o", "out.onnx", *(["--target-bits", "4"] if r.integers(0, 2) else ["--bits", "4"])]
    return Case("signals", f"{signal.Signals(sig).name} after {after:.2f} s", args, protect=["m.onnx"], signal_after=after, signal_kind=sig)


def concurrent_writers(d: Path, r: np.random.Generator) -> Case:
    shutil.copy(DIGITS, d / "m.onnx")
    bits = str(int(r.choice([4, 8])))
    return Case("concurrent", f"3 writers, --bits {bits}", ["m.onnx", "-o", "out.onnx", "--bits", bits], protect=["m.onnx"], concurrent=3)


# Class, generator, share of the cases.
CLASSES: tuple[tuple[str, Gen, int], ...] = (
    ("paths", files_and_paths, 60), ("external", external_data, 40), ("tensors", hostile_tensors, 70),
    ("mutation", graph_mutation, 240), ("check", malformed_qdq, 30), ("options", bad_options, 70),
    ("signals", signals, 20), ("concurrent", concurrent_writers, 10), ("repair", sparse_and_shapes, 20),
    ("brecq", brecq_inputs, 16), ("verdict", verdicts, 12),
)


# --- running and judging -----------------------------------------------------------------------------------

def _exists(p: Path) -> bool:
    try:
        return p.exists() or p.is_symlink()
    except OSError:  # a name too long to exist
        return False


def _digest(p: Path) -> str | None:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    except OSError:
        return None


def _cmd(case: Case) -> list[str]:
    return [sys.executable, "-m", "mixq_onnx.cli", case.command, *case.args]


def _finite_run(path: Path) -> bool | None:
    """Whether the model's float outputs are finite on a seeded input (None if it cannot be fed simply)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        if i.type != "tensor(float)" or not all(isinstance(d, int) and 0 < d <= 4096 for d in i.shape):
            return None
        feed[i.name] = np.random.default_rng(0).normal(size=i.shape).astype(np.float32)
    outs = sess.run(None, feed)
    return all(np.all(np.isfinite(o)) for o in outs if np.issubdtype(np.asarray(o).dtype, np.floating))


def _valid(path: Path, source: Path | None) -> str:
    """'' if onnx.checker and ONNX Runtime accept the model at ``path`` and its outputs are finite where the
    source model's are, else why not."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        finite = _finite_run(path)
        if finite is False and source is not None and _finite_run(source):
            return "silent damage: the quantized model gives NaN or Inf where the float model does not"
    except Exception as exc:
        return f"invalid output: {str(exc).splitlines()[0][:160]}"
    return ""


def run_case(case: Case, d: Path) -> dict:
    before = {p: _digest(d / p) for p in case.protect}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    problems: list[str] = []
    killed = False
    procs = [subprocess.Popen(_cmd(case), cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(case.concurrent)]
    if case.signal_after is not None:
        try:
            procs[0].wait(case.signal_after)
        except subprocess.TimeoutExpired:
            procs[0].send_signal(case.signal_kind)
            killed = case.signal_kind == signal.SIGKILL
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            problems.append("hang")
        results.append((p.returncode, out, err))
    seconds = time.time() - t0
    codes = [c for c, _, _ in results]
    for code, _, err in results:
        if "Traceback (most recent call last)" in err:
            problems.append("traceback: " + err.strip().splitlines()[-1][:160])
        if code == 70:
            problems.append("internal error: " + err.strip().splitlines()[-1][:160])
    out_path = d / case.out if case.out else None
    signalled = case.signal_after is not None and codes[0] not in (0,)
    if out_path is not None and not case.special_out:
        if any(c == 0 for c in codes) and case.command == "quantize":
            if not _exists(out_path):
                problems.append("exit 0 without an output")
            elif why := _valid(out_path, d / case.args[0] if (d / case.args[0]).is_file() else None):
                problems.append(why)
        elif all(c != 0 for c in codes) and _exists(out_path):
            if signalled:
                # A signal after the model was moved into place leaves it there: it must then be whole and valid.
                if why := _valid(out_path, d / case.args[0]):
                    problems.append(f"signalled run left a broken output: {why}")
            else:
                problems.append(f"output left after exit {codes}")
    if case.special_out and out_path is not None and not (_exists(out_path) and (out_path.is_fifo() or out_path.is_char_device())):
        problems.append("the special file at the output was replaced")
    if case.report and all(c != 0 for c in codes) and case.report != case.out and (d / case.report).is_file():
        problems.append("report left after a failure")
    if case.command == "check" and any(c not in (0, 1, 3) for c in codes):
        problems.append(f"check exited {codes}")
    for p, h in before.items():
        if _digest(d / p) != h:
            problems.append(f"input {p} modified")
    leftovers = [x.name for x in Path(d).rglob(".mixq-*")]
    if leftovers and not killed:
        problems.append(f"temporary files left: {leftovers[:3]}")
    if killed and leftovers:
        # A SIGKILLed run cannot clean up; the next run into the same folder must.
        shutil.copy(DIGITS, d / "m2.onnx")
        subprocess.run([sys.executable, "-m", "mixq_onnx.cli", "m2.onnx", "-o", "o2.onnx", "-q", "--no-verify"],
                       cwd=d, env=env, capture_output=True, timeout=TIMEOUT)
        if list(Path(d).rglob(".mixq-*")):
            problems.append("a later successful run left a killed run's temporary files")
    return {"class": case.cls, "name": case.name, "exit": codes, "seconds": round(seconds, 2), "defects": problems,
            "stderr": results[0][2].strip().splitlines()[-1][:200] if results[0][2].strip() else ""}


def corpus(n: int, seed: int) -> list[tuple[str, Gen, int]]:
    """``n`` (class, generator, case seed) triples in the classes' proportions, deterministically."""
    total = sum(w for _, _, w in CLASSES)
    out = []
    for cls, gen, weight in CLASSES:
        k = max(1, round(n * weight / total))
        out += [(cls, gen, seed * 1_000_003 + zlib.crc32(cls.encode()) % 10_007 * 1_000 + i) for i in range(k)]
    return out


def _one(item: tuple[str, Gen, int], verbose: bool) -> dict:
    cls, gen, case_seed = item
    with tempfile.TemporaryDirectory(prefix="mixq-fuzz-") as tmp:
        d = Path(tmp)
        case = gen(d, np.random.default_rng(case_seed & 0xFFFFFFFF))
        result = run_case(case, d)
    if verbose or result["defects"]:
        mark = "DEFECT " + "; ".join(result["defects"]) if result["defects"] else "ok"
        print(f"[{cls}] {case.name}: exit {result['exit']} {result['seconds']} s: {mark} | {result['stderr'][:120]}", flush=True)
    return result


def run(n: int, seed: int, workers: int, verbose: bool = False) -> list[dict]:
    items = corpus(n, seed)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda it: _one(it, verbose), items))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=588)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write every case's result here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    results = run(args.cases, args.seed, args.workers, args.verbose)
    minutes = (time.time() - t0) / 60
    by_class = Counter(r["class"] for r in results)
    bad = Counter(r["class"] for r in results if r["defects"])
    print(f"\n{'class':<12} {'cases':>6} {'defects':>8}")
    for cls, _, _ in CLASSES:
        print(f"{cls:<12} {by_class[cls]:>6} {bad[cls]:>8}")
    print(f"{'total':<12} {len(results):>6} {sum(bad.values()):>8}   ({minutes:.1f} minutes, seed {args.seed})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
