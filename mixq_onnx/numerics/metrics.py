"""How far a quantized model's outputs are from the float model's, measured the way the output's user would.

Each output gets a kind (see :class:`mixq_onnx.kinds.OutputKind`), guessed
from its name, values and shape unless the user names it:

- probabilities, log-probabilities and other scores with a class axis of
  two or more (the last axis of ``[..., C]``, axis 1 of ``[N, C, H, W]``
  maps) are *classes*: top-1 agreement per position, the whole-sequence
  exact-match rate for sequences, and KL for probability-like outputs;
- integer outputs are *labels*: the fraction of equal elements;
- outputs whose name says they are embeddings or hidden states are
  *embeddings*: the mean cosine of their vectors (the last axis);
- everything else is *values*: SQNR.

Every output also gets max/mean absolute difference, the cosine of the
whole output and its SQNR. Samples arrive as one array per run, so a
``[T, N, C]`` sequence output is never merged across runs along its time
axis. Pure numpy.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

from ..kinds import Level, OutputKind, Thresholds

# Output names that say the vector is a representation, not class scores.
_EMBEDDING_NAME = re.compile(r"embed|hidden|feature|pool|encod|represent|vector|latent|last_hidden", re.IGNORECASE)
# Output names that say the values are coordinates or regressions.
_VALUES_NAME = re.compile(r"box|bbox|coord|regress|offset|landmark|depth|flow", re.IGNORECASE)


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the quantized model differs from the float model's, and what that means.

    ``metric`` and ``value`` are what the verdict of this output reads:
    ``top1``, ``top1-foreground`` (off a dominant class), ``decoded``
    (1 - CER of CTC-decoded sequences; these three use the top-1
    thresholds), ``cosine``, ``sqnr``, or ``perplexity`` (next-token logits
    of a language model on real text: the float model's perplexity over the
    quantized model's); ``level`` is that verdict.
    """

    name: str
    kind: str
    class_axis: int | None
    max_abs: float
    mean_abs: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    foreground_agreement: float | None
    decoded_agreement: float | None
    sequence_match: float | None
    mean_cosine: float | None
    kl: float | None
    metric: str
    value: float
    level: str
    # Next-token perplexity of the real text the model read (language-model logits only), float then quantized.
    perplexity_float: float | None = None
    perplexity: float | None = None


def _is_probability(a: np.ndarray, axis: int) -> bool:
    return bool(np.all(a >= 0) and np.all(a <= 1 + 1e-6) and np.allclose(a.sum(axis), 1.0, atol=1e-3))


def _is_log_probability(a: np.ndarray, axis: int) -> bool:
    return bool(np.all(a <= 1e-6) and np.allclose(np.exp(a).sum(axis), 1.0, atol=1e-3))


def class_axis(shape: tuple[int, ...]) -> int | None:
    """The axis holding classes: axis 1 of a rank-4+ map ``[N, C, H, W]``, else the last; None if it has fewer than 2."""
    if len(shape) < 2:
        return None
    axis = 1 if len(shape) >= 4 else len(shape) - 1
    return axis if shape[axis] >= 2 else None


def infer_kind(name: str, refs: list[np.ndarray]) -> tuple[OutputKind, int | None]:
    """The kind of an output and its class axis, from its name, dtype, values and shape."""
    first = refs[0]
    if not np.issubdtype(first.dtype, np.floating):
        return (OutputKind.LABELS, None) if np.issubdtype(first.dtype, np.integer) or first.dtype == np.bool_ \
            else (OutputKind.VALUES, None)
    axis = class_axis(first.shape)
    if axis is not None:
        arrays = [r.astype(np.float64) for r in refs]
        if all(_is_probability(a, axis) or _is_log_probability(a, axis) for a in arrays):
            return OutputKind.CLASSES, axis
    if _EMBEDDING_NAME.search(name) and first.ndim >= 1:
        return OutputKind.EMBEDDING, None
    if _VALUES_NAME.search(name) or axis is None:
        return OutputKind.VALUES, None
    return OutputKind.CLASSES, axis


def batch_axis(shape: tuple[int, ...], samples: int) -> int:
    """Which axis of an output is the batch: 0 for ``[N, T, C]``, 1 for ``[T, N, C]`` (told apart by the run's size)."""
    if len(shape) >= 2 and shape[0] != samples and shape[1] == samples:
        return 1
    return 0


def _kl(p: np.ndarray, q: np.ndarray, axis: int) -> tuple[float, int]:
    """Summed KL(p || q) over positions along ``axis``; works on probabilities or log-probabilities."""
    if _is_log_probability(p, axis) and not _is_probability(p, axis):
        lq = q - np.logaddexp.reduce(q, axis=axis, keepdims=True)
        kl = np.sum(np.exp(p) * (p - lq), axis=axis)
    else:
        qq = np.clip(q, 1e-12, None)
        qq = qq / qq.sum(axis, keepdims=True)
        kl = np.sum(np.where(p > 0, p * (np.log(np.clip(p, 1e-300, None)) - np.log(qq)), 0.0), axis=axis)
    return float(np.sum(np.maximum(kl, 0.0))), int(kl.size)


class _Sums:
    """Running sums over runs, so outputs of any size and any number of runs are compared in one pass."""

    def __init__(self) -> None:
        self.noise = self.signal = self.dot = self.norm_a = 0.0
        self.max_abs = self.sum_abs = 0.0
        self.count = 0
        self.cos_sum, self.cos_n = 0.0, 0
        self.kl_sum, self.kl_n = 0.0, 0
        self.labels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ref argmax, got argmax, tie-aware agree)
        self.seq_match, self.seq_n = 0, 0
        self.sequences: list[tuple[np.ndarray, np.ndarray]] = []  # (ref, got) argmax per sequence: [sequences, steps]

    def add_values(self, r: np.ndarray, a: np.ndarray) -> None:
        d = a - r
        self.noise += float(np.sum(d * d))
        self.signal += float(np.sum(r * r))
        self.dot += float(np.sum(r * a))
        self.norm_a += float(np.sum(a * a))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
            self.sum_abs += float(np.sum(np.abs(d)))
        self.count += d.size


def compare_output(name: str, refs: list[np.ndarray], outs: list[np.ndarray], samples: list[int],
                   thresholds: Thresholds, kind: OutputKind | None = None,
                   tokens: list[np.ndarray] | None = None) -> OutputComparison:
    """Compare one output over several runs (``samples[i]``: the batch size of run ``i``).

    ``tokens``: the token ids each run read, when the model reads text; an output of next-token logits over
    them (``[N, T, V]`` for ids ``[N, T]``) is then judged by the perplexity of the text's next tokens.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        comparison = _compare(name, refs, outs, samples, thresholds, kind)
        if tokens is not None and comparison.kind == OutputKind.CLASSES.value:
            comparison = _with_perplexity(comparison, refs, outs, tokens, thresholds)
        return comparison


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int] | None:
    """Summed negative log-likelihood of each next token (``ids[:, t + 1]`` under ``logits[:, t]``) and the count;
    None unless ``logits`` are ``[N, T, V]`` next-token scores for ``ids`` ``[N, T]`` (every id below V)."""
    if logits.ndim != 3 or ids.ndim != 2 or logits.shape[:2] != ids.shape or ids.shape[1] < 2 \
            or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= logits.shape[2]:
        return None
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, ids[:, 1:, None].astype(np.int64), axis=-1)
    return float(-picked.sum()), int(picked.size)


def _with_perplexity(c: OutputComparison, refs: list[np.ndarray], outs: list[np.ndarray], tokens: list[np.ndarray],
                     thresholds: Thresholds) -> OutputComparison:
    """``c`` judged by next-token perplexity instead of agreement, where the output is next-token logits."""
    f_sum = q_sum = 0.0
    count = 0
    for r, o, ids in zip(refs, outs, tokens):
        f, q = next_token_nll(np.asarray(r), np.asarray(ids)), next_token_nll(np.asarray(o), np.asarray(ids))
        if f is None or q is None:
            return c
        f_sum, q_sum, count = f_sum + f[0], q_sum + q[0], count + f[1]
    if not count:
        return c
    ppl_f, ppl_q = math.exp(f_sum / count), math.exp(q_sum / count)
    ratio = ppl_f / ppl_q if math.isfinite(ppl_q) else 0.0
    level = thresholds.perplexity.level(ratio) if not math.isnan(ratio) else Level.BROKEN
    return dataclasses.replace(c, metric="perplexity", value=ratio, level=level.value, perplexity_float=ppl_f,
                               perplexity=ppl_q)


def _compare(name: str, refs: list[np.ndarray], outs: list[np.ndarray], samples: list[int], thresholds: Thresholds,
             kind: OutputKind | None) -> OutputComparison:
    refs = [np.asarray(r) for r in refs]
    outs = [np.asarray(o) for o in outs]
    guessed, axis = infer_kind(name, refs)
    if kind is None:
        kind = guessed
    elif kind is OutputKind.CLASSES:
        axis = class_axis(refs[0].shape)
        kind = kind if axis is not None else OutputKind.VALUES
    numeric = np.issubdtype(refs[0].dtype, np.number) or refs[0].dtype == np.bool_
    s = _Sums()
    probabilities = kind is OutputKind.CLASSES and axis is not None and all(
        _is_probability(r.astype(np.float64), axis) or _is_log_probability(r.astype(np.float64), axis) for r in refs)
    for r0, a0, n in zip(refs, outs, samples):
        r = r0.astype(np.float64) if numeric else np.zeros(r0.shape)
        a = a0.astype(np.float64) if numeric else np.zeros(a0.shape)
        s.add_values(r, a)
        if kind is OutputKind.CLASSES and axis is not None:
            ra, aa = np.argmax(r, axis=axis), np.argmax(a, axis=axis)
            # Tie-aware: picking another class that the float model scores exactly as high is not a disagreement.
            best = np.take_along_axis(r, np.expand_dims(aa, axis), axis=axis).squeeze(axis) >= np.max(r, axis=axis)
            s.labels.append((ra.ravel(), aa.ravel(), best.ravel()))
            if r.ndim >= 3 and ra.ndim >= 2:
                b = batch_axis(r.shape, n) if axis != 0 else 0
                per = np.moveaxis(best, b, 0).reshape(best.shape[b], -1)
                s.seq_match += int(np.sum(np.all(per, axis=1)))
                s.seq_n += per.shape[0]
                if r.ndim == 3:  # [N, T, C] or [T, N, C]: text and token sequences
                    s.sequences.append((np.moveaxis(ra, b, 0).reshape(ra.shape[b], -1),
                                        np.moveaxis(aa, b, 0).reshape(aa.shape[b], -1)))
            if probabilities:
                kl, k = _kl(r, a, axis)
                s.kl_sum += kl
                s.kl_n += k
        elif kind is OutputKind.LABELS:
            eq = (r0 == a0).ravel()
            s.labels.append((r0.ravel(), a0.ravel(), eq))
        elif kind is OutputKind.EMBEDDING and r.ndim >= 1 and r.shape[-1] > 0:
            nr, na = np.linalg.norm(r, axis=-1), np.linalg.norm(a, axis=-1)
            cos = np.where((nr > 0) & (na > 0), np.sum(r * a, axis=-1) / (nr * na), np.where(nr == na, 1.0, 0.0))
            s.cos_sum += float(np.sum(cos))
            s.cos_n += int(cos.size)
    cosine = s.dot / math.sqrt(s.signal * s.norm_a) if s.signal > 0 and s.norm_a > 0 else 1.0
    sqnr = 10 * math.log10(s.signal / s.noise) if s.noise > 0 and s.signal > 0 else (math.inf if s.noise == 0 else -math.inf)
    top1 = foreground = decoded = None
    trials = {}
    if s.labels:
        ra = np.concatenate([x[0] for x in s.labels])
        aa = np.concatenate([x[1] for x in s.labels])
        agree = np.concatenate([x[2] for x in s.labels])
        top1 = float(np.mean(agree)) if agree.size else 1.0
        trials["top1"] = int(agree.size)
        positions = sum(x[0].size for x in s.labels)
        if positions > sum(samples) and ra.size:
            # One class (CTC blank, background) filling most positions makes plain agreement look better than it is.
            values, counts = np.unique(ra, return_counts=True)
            dominant = values[np.argmax(counts)]
            if counts.max() >= 0.5 * ra.size:
                fg = (ra != dominant) | (aa != dominant)
                foreground = float(np.mean(agree[fg])) if np.any(fg) else 1.0
                trials["top1-foreground"] = int(np.sum(fg))
                if s.sequences:
                    decoded, trials["decoded"] = decoded_agreement(s.sequences, int(dominant))
    mean_cos = s.cos_sum / s.cos_n if s.cos_n else None
    if kind in (OutputKind.CLASSES, OutputKind.LABELS) and top1 is not None:
        # Sequences with a blank class are read after CTC decoding (a flip at a character's edge changes no text);
        # maps with a background class by their agreement off it; anything else by plain agreement.
        if decoded is not None:
            metric, value = "decoded", decoded
        elif foreground is not None and foreground < top1:
            metric, value = "top1-foreground", foreground
        else:
            metric, value = "top1", top1
        bound = thresholds.top1
    elif kind is OutputKind.EMBEDDING and mean_cos is not None:
        metric, value, bound = "cosine", mean_cos, thresholds.cosine
    else:
        kind = OutputKind.VALUES if kind is not OutputKind.LABELS else kind
        metric, value, bound = "sqnr", sqnr, thresholds.sqnr
    level = bound.level(value, trials.get(metric)) if not math.isnan(value) else Level.BROKEN
    return OutputComparison(
        name, kind.value, axis if kind is OutputKind.CLASSES else None,
        s.max_abs, s.sum_abs / s.count if s.count else 0.0, cosine, sqnr,
        top1, foreground, decoded, s.seq_match / s.seq_n if s.seq_n else None, mean_cos,
        s.kl_sum / s.kl_n if s.kl_n else None, metric, value, level.value,
    )


def _collapse(seq: np.ndarray, blank: int) -> list[int]:
    """CTC decoding of one argmax path: repeats merged, then the blank class dropped."""
    if not seq.size:
        return []
    keep = np.concatenate([[True], seq[1:] != seq[:-1]])
    return [int(x) for x in seq[keep] if x != blank]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two label sequences."""
    if not a or not b:
        return len(a) + len(b)
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def decoded_agreement(sequences: list[tuple[np.ndarray, np.ndarray]], blank: int) -> tuple[float, int]:
    """1 - the character error rate of the quantized model's decoded sequences against the float model's.

    Both argmax paths are decoded as CTC does (repeats merged, the blank
    class dropped); the edit distance is summed over sequences and divided by
    the float sequences' total length: what an OCR user measures as CER
    against the float model. Returns it with that length (the trials it rests on).
    """
    errors = length = 0
    for ref, got in sequences:
        for r_row, g_row in zip(ref, got):
            a, b = _collapse(r_row, blank), _collapse(g_row, blank)
            errors += edit_distance(a, b)
            length += len(a)
    if length == 0:
        return (1.0 if errors == 0 else 0.0), max(errors, 1)
    return max(0.0, 1.0 - errors / length), length


def weight_error(w: np.ndarray, approx: np.ndarray) -> tuple[float, float, float]:
    """(mse, nmse, max |d|) of ``approx`` against the float weight ``w``; nmse is mse over the mean square of ``w``."""
    w32 = np.asarray(w, dtype=np.float32)
    flat = (np.asarray(approx, dtype=np.float32) - w32).ravel()
    mean_sq = float(np.dot(w32.ravel(), w32.ravel())) / w32.size if w32.size else 0.0
    mse = float(np.dot(flat, flat)) / max(flat.size, 1)
    return mse, (mse / mean_sq if mean_sq > 0 else 0.0), (max(float(flat.max()), -float(flat.min())) if flat.size else 0.0)


__all__ = ["OutputComparison", "batch_axis", "class_axis", "compare_output", "decoded_agreement", "edit_distance", "infer_kind",
           "weight_error"]
