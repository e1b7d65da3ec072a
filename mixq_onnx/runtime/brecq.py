"""Block reconstruction (BRECQ, Li et al. 2021): learn each block's rounding against its float output.

The bit-widths and grids are already chosen (by any search); this step only
changes which integers are stored, and optionally the scales, never the
graph. The model's main graph is cut into blocks (:mod:`mixq_onnx.graph.blocks`).
Block by block, in order:

1. the float block output is computed in ONNX Runtime from the float
   model's activations, and the block input from the already-quantized
   preceding blocks (so each block corrects what came before it);
2. the block is converted to PyTorch by onnx2torch (:mod:`mixq_onnx.runtime.torch_convert`)
   with every quantized weight as an input, and checked against ONNX Runtime
   on calibration samples;
3. each weight it owns gets AdaRound's rounding variables (rectified
   sigmoid, annealed regulariser) on the layer-wise method's grid, and
   optionally a learned scale per group (LSQ-style), optimised with Adam
   to minimise the block-output error, optionally weighted by the squared
   gradient of the model's loss at the block output (``fisher``);
4. the hard-rounded result is kept only if its block-output error on the
   calibration samples is below the layer-wise method's, and the quantized
   block output for the next block is computed in ONNX Runtime.

A block that cannot be converted, or whose conversion disagrees with ONNX
Runtime, keeps the layer-wise rounding; the outcome says why. Activations
live in memory up to ``memory_mb`` and spill to memory-mapped files beyond.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..graph.blocks import Block, Partition, Shape, block_model, partition
from ..config import Reconstruction
from ..errors import ConfigError
from .inputs import session
from ..numerics.qdq import QuantizedTensor, broadcast, logical_range
from .sensitivity import OutputKind, output_kind
from .store import ActivationStore, tensor_info
from ..numerics.rounding import ADAROUND_BETA, ADAROUND_WARMUP, GAMMA, ZETA

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Progress = Callable[[int, int, str], None]
# A converted block must agree with ONNX Runtime to this relative error (float32 kernels differ in summation order).
CONVERSION_TOLERANCE = 1e-3
CHECK_SAMPLES = 4
# AdaRound's regulariser weight, relative to the block loss normalised to 1 at round-to-nearest. Higher than the
# layer-wise method's: with a few hundred steps instead of AdaRound's 10-20 thousand, a weak regulariser leaves
# many variables undecided, and rounding them hard at the end undoes the optimisation (measured on EfficientNet-Lite0's
# head block: 0.107 block error at 3.0, 0.029 at 20, against the layer-wise gptq's 0.196).
BRECQ_LAMBDA = 20.0
# The learned log-scales' step size relative to --brecq-lr.
SCALE_LR_RATIO = 0.01
# Where the rounding variables start between the layer-wise integer (0) and its neighbour (1).
WARM_START = 0.1
INSTALL_HINT = "pip install 'mixq-onnx[brecq]' (PyTorch and onnx2torch)"


def require_torch() -> None:
    """Raise a one-line ConfigError when the ``[brecq]`` extra is missing."""
    try:
        import torch  # noqa: F401

        from . import torch_convert  # noqa: F401  (imports onnx2torch, whatever state torchvision is in)
    except ImportError as exc:
        raise ConfigError(f"block reconstruction needs PyTorch and onnx2torch ({exc.name} is not installed): "
                          f"{INSTALL_HINT}") from None


@dataclass(frozen=True)
class BlockOutcome:
    """What happened to one block."""

    index: int
    nodes: int
    weights: tuple[str, ...]
    status: str  # "reconstructed", "kept layer-wise" (not better), "fallback" (could not run), "no weights"
    reason: str = ""
    loss_before: float | None = None  # block-output MSE with the layer-wise integers, all samples
    loss_after: float | None = None
    seconds: float = 0.0
    fisher: bool = False  # whether the block error was Fisher-weighted


@dataclass(frozen=True)
class ReconstructionResult:
    tensors: dict[str, QuantizedTensor]  # reconstructed weights by name (the others keep the layer-wise result)
    blocks: tuple[BlockOutcome, ...]
    samples: int
    spilled_bytes: int
    fisher_note: str = ""  # why Fisher weighting was not possible, or where its gradients stopped

    def describe(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "spilled_bytes": self.spilled_bytes,
            "fisher_note": self.fisher_note,
            "blocks": [{"index": b.index, "nodes": b.nodes, "weights": list(b.weights), "status": b.status,
                        "reason": b.reason, "loss_before": b.loss_before, "loss_after": b.loss_after, "fisher": b.fisher,
                        "seconds": round(b.seconds, 2)} for b in self.blocks],
        }


def split_samples(feeds: Sequence[Feed], limit: int) -> list[Feed]:
    """One feed per sample (the first axis is the sample axis, as for --calib), at most ``limit``."""
    out: list[Feed] = []
    for f in feeds:
        rows = len(next(iter(f.values())))
        for j in range(rows):
            if len(out) == limit:
                return out
            out.append({k: np.ascontiguousarray(v[j : j + 1]) for k, v in f.items()})
    return out


def reconstruct(
    model: onnx.ModelProto,
    start: dict[str, QuantizedTensor],
    floats: dict[str, np.ndarray],
    feeds: Sequence[Feed],
    options: Reconstruction,
    progress: Progress | None = None,
) -> ReconstructionResult:
    """Block-reconstruct the main-graph weights in ``start`` (their layer-wise rounding) on ``feeds``.

    ``floats`` holds each weight's float value. Returns the weights whose
    block error went down, and one outcome per block.
    """
    require_torch()
    samples = split_samples(feeds, options.samples)
    part = partition(model, sorted(start), options.block_weights)
    weight_infos = {w: (helper.np_dtype_to_tensor_dtype(floats[w].dtype), floats[w].shape) for w in start}
    graph_outputs = {o.name for o in model.graph.output}
    later_reads: dict[str, int] = {}
    for b in part.blocks:
        for name in b.inputs:
            later_reads[name] = b.index
    with tempfile.TemporaryDirectory(prefix="mixq-brecq-") as tmp:
        budget = options.memory_mb * 2**20
        env_f, env_q = ActivationStore(budget // 2, Path(tmp) / "float"), ActivationStore(budget // 2, Path(tmp) / "quantized")
        for i in model.graph.input:
            if all(i.name in s for s in samples):
                env_f.put(i.name, [s[i.name] for s in samples])
                env_q.share(i.name, env_f)
        fisher, fisher_note, fisher_scratch = None, "", 0
        if options.fisher:
            # The float outputs of every block (only while the gradients are computed) and the squared gradients each
            # take up to half the budget; both spill beyond it.
            scratch = ActivationStore(budget // 2, Path(tmp) / "all")
            fisher, fisher_note = _fisher(model, part, samples, floats, weight_infos,
                                          ActivationStore(budget // 2, Path(tmp) / "fisher"), scratch)
            fisher_scratch = scratch.spilled
            if fisher_note:
                log.warning("Fisher weighting: %s", fisher_note)
        tensors: dict[str, QuantizedTensor] = {}
        outcomes = []
        for block in part.blocks:
            t0 = time.perf_counter()
            outcome = _run_block(model, block, part, start, floats, tensors, weight_infos, samples, env_f, env_q, fisher,
                                 options, progress, len(part.blocks))
            outcomes.append(replace(outcome, seconds=time.perf_counter() - t0))
            log.info("block %d/%d: %s %s", block.index + 1, len(part.blocks), outcome.status, outcome.reason)
            for name in block.outputs if fisher is not None else ():
                fisher.drop(name)
            for name in list(env_f.values):
                if later_reads.get(name, -1) <= block.index and name not in graph_outputs:
                    env_f.drop(name)
                    env_q.drop(name)
        spilled = env_f.spilled + env_q.spilled + (fisher.spilled if fisher is not None else 0) + fisher_scratch
    return ReconstructionResult(tensors, tuple(outcomes), len(samples), spilled, fisher_note)


def _run_block(model: onnx.ModelProto, block: Block, part: Partition, start: dict[str, QuantizedTensor],
               floats: dict[str, np.ndarray], tensors: dict[str, QuantizedTensor], weight_infos: dict[str, tuple[int, Shape]],
               samples: list[Feed], env_f: ActivationStore, env_q: ActivationStore, fisher: ActivationStore | None, options: Reconstruction,
               progress: Progress | None, total: int) -> BlockOutcome:
    """Float targets, the optimisation where possible, then the quantized outputs for the next block."""
    infos = {**weight_infos, **{i: tensor_info(env_f.values[i]) for i in block.inputs}}
    bm = _with_single_outputs(block_model(model, block, infos, block.weights))
    sess = session(bm, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    names = [o.name for o in sess.get_outputs()]
    n = len(samples)
    float_w = {w: floats[w] for w in block.weights}
    targets = [sess.run(None, {**{i: env_f.values[i][s] for i in block.inputs}, **float_w}) for s in range(n)]
    owned = [w for w in block.weights if w not in part.shared]
    outcome = BlockOutcome(block.index, len(block.nodes), tuple(owned), "no weights")
    if owned:
        try:
            weights = _fisher_for(block, targets, fisher)
            found, outcome = _optimise(bm, block, owned, start, floats, targets, weights, samples, env_q, options, progress,
                                       total)
            outcome = replace(outcome, fisher=weights is not None)
            tensors.update(found)
        except _Unconvertible as exc:
            outcome = BlockOutcome(block.index, len(block.nodes), tuple(owned), "fallback", str(exc))
    quant_w = {w: (tensors.get(w) or start[w]).dequantize().astype(floats[w].dtype) for w in block.weights}
    quants = [sess.run(None, {**{i: env_q.values[i][s] for i in block.inputs}, **quant_w}) for s in range(n)]
    for k, name in enumerate(names):
        original = block.outputs[k]
        env_f.put(original, [t[k] for t in targets])
        if all(np.array_equal(t[k], q[k]) for t, q in zip(targets, quants)):
            env_q.share(original, env_f)  # a side tensor: quantization does not reach it
        else:
            env_q.put(original, [q[k] for q in quants])
    return outcome


def _fisher_for(block: Block, targets: list[list[np.ndarray]], fisher: ActivationStore | None) -> list[list[np.ndarray]] | None:
    """The block's Fisher weights per output and sample (zeros where no gradient reached), or None."""
    if fisher is None or not any(name in fisher.values for name in block.outputs):
        return None
    return [fisher.values[name] if name in fisher.values else [np.zeros_like(t[k]) for t in targets]
            for k, name in enumerate(block.outputs)]


def _loss_gradient(values: list[np.ndarray]) -> list[np.ndarray] | None:
    """d loss / d output per sample for a classifier output, with the float model's top-1 class as the label.

    Logits ([N, classes], 2-D): cross-entropy, ``softmax - onehot``;
    probabilities: ``-onehot / p``; log-probabilities: ``-onehot``. Other
    outputs (embeddings, boxes) admit no such loss: None.
    """
    kind = output_kind(values)
    if kind is None or any(v.shape[-1] < 2 for v in values):
        return None
    if kind is OutputKind.VALUES and any(v.ndim != 2 for v in values):
        return None
    out = []
    for v in values:
        a = v.astype(np.float64)
        onehot = (np.arange(a.shape[-1]) == a.argmax(-1)[..., None]).astype(np.float64)
        if kind is OutputKind.PROBABILITIES:
            g = -onehot / np.maximum(a, 1e-12)
        elif kind is OutputKind.LOG_PROBABILITIES:
            g = -onehot
        else:
            e = np.exp(a - a.max(-1, keepdims=True))
            g = e / e.sum(-1, keepdims=True) - onehot
        out.append(g.astype(np.float32))
    return out


def _fisher(model: onnx.ModelProto, part: Partition, samples: list[Feed], floats: dict[str, np.ndarray],
            weight_infos: dict[str, tuple[int, Shape]], store: ActivationStore, scratch: ActivationStore) -> tuple[ActivationStore | None, str]:
    """Squared gradients of the pseudo-label loss at every block output, per sample, or (None, why not).

    The float model runs block by block in ONNX Runtime, keeping every block
    output; the loss gradient at the classifier outputs is then carried
    backwards one converted block at a time (vector-Jacobian products), so no
    whole-model conversion is needed. If a block cannot be converted, blocks
    before it get no weights (plain MSE) and the note says so.
    """
    import torch

    n = len(samples)
    acts = scratch.values  # every block output of the float model, spilling to disk beyond the scratch budget
    for i in model.graph.input:
        if all(i.name in s for s in samples):
            scratch.put(i.name, [s[i.name] for s in samples])
    models = []
    for block in part.blocks:
        infos = {**weight_infos, **{i: tensor_info(acts[i]) for i in block.inputs}}
        bm = _with_single_outputs(block_model(model, block, infos, block.weights))
        sess = session(bm, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        outs = [sess.run(None, {**{i: acts[i][s] for i in block.inputs}, **{w: floats[w] for w in block.weights}})
                for s in range(n)]
        for k, name in enumerate(block.outputs):
            scratch.put(name, [o[k] for o in outs])
        models.append(bm)
    grads: dict[str, list[np.ndarray | None]] = {}
    for o in model.graph.output:
        g = _loss_gradient(acts[o.name]) if o.name in acts else None
        if g is not None:
            grads[o.name] = list(g)
    if not grads:
        return None, ("no output admits a loss (Fisher weighting needs a classifier output: N x classes logits, "
                      "probabilities or log-probabilities); used the plain block-output error")
    env = lambda i, s: acts[i][s]  # noqa: E731
    note = ""
    for block in reversed(part.blocks):
        if not any(name in grads for name in block.outputs):
            continue
        for name in block.outputs:
            if name in grads:
                store.put(name, [np.square(g) for g in grads[name]])
        try:
            tb = _TorchBlock(models[block.index], block, floats, env, n)
        except _Unconvertible as exc:
            note = f"gradients stop at block {block.index + 1} ({exc}); the blocks before it use the plain error"
            break
        weights = {w: _tensor(floats[w]) for w in block.weights}
        for b0 in range(0, n, 16):
            for ys, members, args in tb.run(range(b0, min(b0 + 16, n)), weights, env, grad_inputs=True):
                pairs = [(y, _tensor(_join([grads[name][s] for s in members])))
                         for y, name in zip(ys, block.outputs) if name in grads and y.requires_grad]
                if not pairs:
                    continue
                torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs])
                for name, a in zip(tb.inputs, args):
                    if a.grad is None:
                        continue
                    parts = np.split(a.grad.numpy(), len(members)) if len(members) > 1 else [a.grad.numpy()]
                    have = grads.setdefault(name, [None] * n)
                    for s, g in zip(members, parts):
                        have[s] = g if have[s] is None else have[s] + g
        for name in block.inputs:
            if name in grads and any(g is None for g in grads[name]):
                grads[name] = [g if g is not None else np.zeros_like(acts[name][s]) for s, g in enumerate(grads[name])]
        for name in block.outputs:
            grads.pop(name, None)
    for name in list(acts):
        scratch.drop(name)
    return store, note


class _Unconvertible(Exception):
    """The block cannot be trusted in PyTorch; the message says why."""


def _with_single_outputs(bm: onnx.ModelProto) -> onnx.ModelProto:
    """Each output through its own Identity: onnx2torch returns whole nodes, which breaks multi-output nodes."""
    outs = [o.name for o in bm.graph.output]
    del bm.graph.output[:]
    for k, name in enumerate(outs):
        alias = f"{name}__mixq_block_out{k}"
        bm.graph.node.append(helper.make_node("Identity", [name], [alias], name=f"mixq_block_out{k}"))
        bm.graph.output.append(helper.make_empty_tensor_value_info(alias))
    return bm


def _optimise(bm: onnx.ModelProto, block: Block, owned: list[str], start: dict[str, QuantizedTensor],
              floats: dict[str, np.ndarray], targets: list[list[np.ndarray]], fisher: list[list[np.ndarray]] | None,
              samples: list[Feed], env_q: ActivationStore, options: Reconstruction, progress: Progress | None, total: int
              ) -> tuple[dict[str, QuantizedTensor], BlockOutcome]:
    """Learn the rounding of the weights ``owned`` by this block against its float outputs ``targets``.

    ``fisher`` (per output, per sample) weighs each output element by the
    squared gradient of the model's loss there, or None for plain MSE.
    """
    import torch

    for w in block.weights:
        if floats[w].dtype != np.float32:
            raise _Unconvertible(f"weight {w} is {floats[w].dtype}; reconstruction runs float32 blocks")
    n = len(samples)
    quant_env = lambda i, s: env_q.values[i][s]  # noqa: E731
    tb = _TorchBlock(bm, block, floats, quant_env, n)
    tens = _tensor
    fixed = {w: tens(start[w].dequantize().astype(np.float32)) for w in block.weights if w not in owned}
    params = {w: _SoftWeight(start[w], floats[w], options.learn_scales) for w in owned}

    def error_sum(idx: Sequence[int], weights: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", float]:
        """Summed squared block-output error over the samples ``idx`` (Fisher-weighted where given), and its weight."""
        total_err, count = torch.zeros((), dtype=torch.float64), 0.0
        for ys, members in tb.run(idx, weights, quant_env):
            for k, y in enumerate(ys):
                if not torch.is_floating_point(y):
                    continue
                t = tens(_join([targets[s][k] for s in members]))
                sq = (y - t) ** 2
                if fisher is not None:
                    f = tens(_join([fisher[k][s] for s in members]))
                    total_err = total_err + (sq * f).sum().double()
                    count += float(f.sum())
                else:
                    total_err = total_err + sq.sum().double()
                    count += t.numel()
        return total_err, count

    def error(idx: Sequence[int], weights: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Mean squared block-output error over the samples ``idx``."""
        total_err, count = error_sum(idx, weights)
        return total_err / max(count, 1e-30)

    def evaluate(weights: dict[str, "torch.Tensor"]) -> float:
        """``error`` over every sample, a batch at a time (a whole-set batch would hold every activation at once)."""
        total_err, count = 0.0, 0.0
        with torch.no_grad():
            for b0 in range(0, n, options.batch):
                e, c = error_sum(range(b0, min(b0 + options.batch, n)), weights)
                total_err, count = total_err + float(e), count + c
        return total_err / max(count, 1e-30)

    start_w = {**fixed, **{w: tens(start[w].dequantize().astype(np.float32)) for w in owned}}
    before = evaluate(start_w)
    nearest = evaluate({**fixed, **{w: p.nearest for w, p in params.items()}})
    # The loss is relative to round-to-nearest's error on this grid, so one step size and regulariser fit every block.
    den = nearest if nearest > 0 else (before if before > 0 else 1.0)
    rng = np.random.default_rng(options.seed + block.index)
    groups = [{"params": [p.v for p in params.values()], "lr": options.lr}]
    if options.learn_scales:
        # Scales move the whole group's grid: a much smaller step than the rounding variables'.
        groups.append({"params": [p.log_scale for p in params.values()], "lr": options.lr * SCALE_LR_RATIO})
    opt = torch.optim.Adam(groups)
    elements = sum(p.size for p in params.values())
    warm = int(options.iters * ADAROUND_WARMUP)
    label = f"reconstructing block {block.index + 1}/{total}"
    for it in range(options.iters):
        idx = rng.choice(n, size=min(options.batch, n), replace=False)
        weights = {**fixed, **{w: p.soft() for w, p in params.items()}}
        loss = error(sorted(idx.tolist()), weights) / den
        if it >= warm:
            frac = (it - warm) / max(options.iters - warm - 1, 1)
            beta = ADAROUND_BETA[0] + (ADAROUND_BETA[1] - ADAROUND_BETA[0]) * frac
            reg = sum(p.regulariser(beta) for p in params.values())
            loss = loss + BRECQ_LAMBDA * reg / elements
        opt.zero_grad()
        if it % 50 == 0 or it == options.iters - 1:
            hs = torch.cat([p._h().flatten() for p in params.values()])
            log.debug("block %d iter %d loss %.4g undecided %.3f", block.index, it, loss.item(), ((hs > 0.01) & (hs < 0.99)).float().mean().item())
        loss.backward()
        opt.step()
        if progress is not None and ((it + 1) % 10 == 0 or it + 1 == options.iters):
            progress(it + 1, options.iters, label)
    hard = {w: p.hard() for w, p in params.items()}
    after = evaluate({**fixed, **hard})
    outcome = BlockOutcome(block.index, len(block.nodes), tuple(owned), "reconstructed", "", before, after)
    if not after < before:
        return {}, replace(outcome, status="kept layer-wise",
                           reason=f"block error {after:.3g} was not below the layer-wise method's {before:.3g}")
    return {w: p.result() for w, p in params.items()}, outcome


def _tensor(a: np.ndarray):
    """A torch tensor holding a copy (stored arrays may be read-only memory maps)."""
    import torch

    return torch.from_numpy(np.array(a))


class _TorchBlock:
    """A block converted to PyTorch, checked against ONNX Runtime on a few samples, run over groups of samples."""

    def __init__(self, bm: onnx.ModelProto, block: Block, floats: dict[str, np.ndarray],
                 env: Callable[[str, int], np.ndarray], n: int) -> None:
        from .torch_convert import to_torch

        try:
            self.module = to_torch(bm)
        except Exception as exc:  # onnx2torch raises NotImplementedError, KeyError... for ops it cannot convert
            raise _Unconvertible(f"onnx2torch cannot convert it ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:160]})") from None
        self.module.train(False)
        self.block, self.inputs = block, list(block.inputs)
        # Samples concatenate on the first axis only where every input has it (shape vectors do not).
        self.stackable = all(env(i, s).ndim and env(i, s).shape[0] == 1 for i in self.inputs for s in range(n))
        check = list(range(min(CHECK_SAMPLES, n)))
        ort_sess = session(bm, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        floats_t = {w: _tensor(floats[w]) for w in block.weights}
        try:
            self._check(check, floats_t, env, ort_sess, floats)
        except _Unconvertible:
            if not self.stackable or len(check) < 2:
                raise
            # Some graphs bake the batch size into a Reshape; run such blocks one sample at a time.
            self.stackable = False
            self._check(check, floats_t, env, ort_sess, floats)

    def run(self, idx: Sequence[int], weights: dict, env: Callable[[str, int], np.ndarray], grad_inputs: bool = False
            ) -> Iterator[tuple[list, list[int]]]:
        """Outputs for the samples ``idx``, in groups of equal input shapes; with ``grad_inputs`` also the inputs."""
        groups: dict[tuple, list[int]] = {}
        for s in idx:
            key = tuple(env(i, s).shape for i in self.inputs) if self.stackable else (s,)
            groups.setdefault(key, []).append(s)
        for members in groups.values():
            args = [_tensor(_join([env(i, s) for s in members])) for i in self.inputs]
            if grad_inputs:
                for a in args:
                    if a.is_floating_point():
                        a.requires_grad_(True)
            y = self.module(*args, *[weights[w] for w in self.block.weights])
            ys = list(y) if isinstance(y, (tuple, list)) else [y]
            yield (ys, members, args) if grad_inputs else (ys, members)

    def _check(self, check: list[int], floats_t: dict, env, ort_sess: ort.InferenceSession, floats: dict[str, np.ndarray]
               ) -> None:
        import torch

        with torch.no_grad():
            try:
                got = list(self.run(check, floats_t, env))
            except Exception as exc:  # a converted module can still fail at run time (shapes, dtypes)
                raise _Unconvertible(f"the converted block fails in PyTorch ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:160]})") from None
            for ys, members in got:
                ref = [ort_sess.run(None, {**{i: env(i, s) for i in self.inputs},
                                           **{w: floats[w] for w in self.block.weights}}) for s in members]
                for k, y in enumerate(ys):
                    r = _join([np.asarray(o[k]) for o in ref])
                    yv = y.detach().numpy()
                    if yv.shape != r.shape:
                        raise _Unconvertible(f"the converted block's output {k} has shape {yv.shape}, ONNX Runtime's {r.shape}")
                    if np.issubdtype(r.dtype, np.floating) and r.size:
                        rel = float(np.max(np.abs(yv - r))) / max(float(np.max(np.abs(r))), 1e-12)
                        if not rel <= CONVERSION_TOLERANCE:
                            raise _Unconvertible(f"the converted block differs from ONNX Runtime by {rel:.2g} (relative)")


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    """Samples joined on the first axis; a lone sample as it is (a 0-d side input, such as a scalar computed
    from the graph input, has no axis to join on and only ever runs one sample at a time)."""
    if len(arrays) == 1 or np.ndim(arrays[0]) == 0:
        return np.asarray(arrays[0])
    return np.concatenate(arrays)


class _SoftWeight:
    """One weight's rounding variables (and optional log-scale offsets) on a fixed grid."""

    def __init__(self, qt: QuantizedTensor, w: np.ndarray, learn_scales: bool) -> None:
        import torch

        self.qt = qt
        self.size = w.size
        shape, axis, block = w.shape, qt.axis, qt.block_size
        self.lo, self.hi = logical_range(qt.bits, qt.zero_point is None)
        scale = np.broadcast_to(broadcast(qt.scale.astype(np.float32), shape, axis, block), shape)
        zp = qt.zero_point.astype(np.float32) if qt.zero_point is not None else np.zeros((), np.float32)
        zero = np.broadcast_to(broadcast(zp, shape, axis, block), shape)
        # Warm start from the layer-wise integers q0: each weight may stay at q0 or move one step towards its float
        # value; the soft value starts WARM_START of a step from q0 on that side, where the gradients are still alive.
        ratio = w.astype(np.float64) / scale + zero
        q0 = qt.values.astype(np.float64)
        floor = np.where(ratio >= q0, q0, q0 - 1) - zero
        p = np.where(ratio >= q0, WARM_START, 1 - WARM_START)
        p = np.clip((p - GAMMA) / (ZETA - GAMMA), 1e-3, 1 - 1e-3)
        self.floor = torch.from_numpy(floor.astype(np.float32))
        # Round-to-nearest on this grid: the scale of the loss.
        self.nearest = torch.from_numpy(((np.clip(np.rint(ratio), self.lo, self.hi) - zero) * scale).astype(np.float32))
        self.zero = torch.from_numpy(np.ascontiguousarray(zero))
        self.scale0 = torch.from_numpy(np.ascontiguousarray(scale))
        self.v = torch.nn.Parameter(torch.from_numpy(np.log(p / (1 - p)).astype(np.float32)))
        # Which scale each element uses, so a learned per-group offset broadcasts exactly like DequantizeLinear's scale.
        self.group = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(
            broadcast(np.arange(qt.scale.size).reshape(qt.scale.shape), shape, axis, block), shape)).astype(np.int64))
        self.log_scale = torch.nn.Parameter(torch.zeros(qt.scale.size)) if learn_scales else None

    def _scale(self):
        import torch

        if self.log_scale is None:
            return self.scale0
        return self.scale0 * torch.exp(self.log_scale)[self.group]

    def _h(self):
        import torch

        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft(self):
        import torch

        q = torch.clamp(self.floor + self._h() + self.zero, self.lo, self.hi)
        return (q - self.zero) * self._scale()

    def _integers(self):
        import torch

        return torch.clamp(self.floor + (self.v >= 0).float() + self.zero, self.lo, self.hi)

    def hard(self):
        import torch

        with torch.no_grad():
            return ((self._integers() - self.zero) * self._scale()).detach()

    def regulariser(self, beta: float):
        import torch

        return (1 - torch.abs(2 * self._h() - 1) ** beta).sum()

    def result(self) -> QuantizedTensor:
        """The hard-rounded integers in the original container, with the (learned) scales."""
        import torch

        with torch.no_grad():
            values = self._integers().numpy().astype(self.qt.qtype.dtype)
            scale = self.qt.scale
            if self.log_scale is not None:
                scale = (self.qt.scale.astype(np.float32) * np.exp(self.log_scale.numpy()).reshape(self.qt.scale.shape)
                         ).astype(self.qt.scale.dtype)
        return replace(self.qt, values=values, scale=scale)


__all__ = ["BlockOutcome", "ReconstructionResult", "reconstruct", "require_torch", "split_samples"]
