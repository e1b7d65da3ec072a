"""numerics/metrics.py: output kinds, the metric each kind is judged by, and the verdict thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixq_onnx.errors import ConfigError
from mixq_onnx.kinds import Level, OutputKind, Threshold, Thresholds, wilson_upper
from mixq_onnx.numerics.metrics import batch_axis, class_axis, compare_output, infer_kind, weight_error

T = Thresholds()


def _cmp(name, refs, outs, samples=None, kind=None):
    return compare_output(name, refs, outs, samples or [r.shape[0] for r in refs], T, kind)


def test_class_scores_are_judged_by_top1_agreement_along_the_class_axis():
    r = np.random.default_rng(0)
    ref = r.normal(size=(1000, 10)).astype(np.float32)
    got = ref.copy()
    flip = np.arange(120)  # 12% of the rows get another top-1 class
    got[flip, (ref[flip].argmax(1) + 1) % 10] += 10
    c = _cmp("logits", [ref], [got])
    assert c.kind == "classes" and c.class_axis == 1 and c.metric == "top1"
    assert c.top1_agreement == pytest.approx(0.88) and c.level == "broken"
    assert _cmp("logits", [ref], [ref + 1e-4]).level == "good"
    # The same rate on 16 samples is no proof: 2 flips in 16 are degraded, not broken.
    few = _cmp("logits", [ref[:16]], [np.concatenate([got[:2], ref[2:16]])])
    assert few.top1_agreement == pytest.approx(0.875) and few.level == "degraded"


def test_maps_use_axis_1_and_ties_are_not_disagreements():
    assert class_axis((2, 5, 4, 4)) == 1 and class_axis((2, 7)) == 1 and class_axis((3, 1)) is None
    ref = np.zeros((1, 3, 2, 2), np.float32)  # every class tied: any pick matches the float model's best score
    got = ref.copy()
    got[0, 2] = 1e-6
    c = _cmp("seg", [ref], [got])
    assert c.class_axis == 1 and c.top1_agreement == 1.0


def test_sequences_get_per_position_agreement_and_whole_sequence_matches_in_either_layout():
    r = np.random.default_rng(1)
    ntc = r.normal(size=(4, 6, 5)).astype(np.float32)
    got = ntc.copy()
    got[0, 0, (ntc[0, 0].argmax() + 1) % 5] += 10  # one position of the first sequence differs
    c = _cmp("scores", [ntc], [got])
    assert c.top1_agreement == pytest.approx(23 / 24) and c.sequence_match == pytest.approx(3 / 4)
    # [T, N, C]: the same data with time first; the batch axis is found from the run's size.
    assert batch_axis((6, 4, 5), 4) == 1 and batch_axis((4, 6, 5), 4) == 0
    c2 = _cmp("scores", [ntc.transpose(1, 0, 2)], [got.transpose(1, 0, 2)], samples=[4])
    assert c2.sequence_match == pytest.approx(3 / 4)


def _ctc(paths: list[list[int]], classes: int = 5) -> np.ndarray:
    """Scores [N, T, C] whose argmax along C is each path (class 0 is the blank)."""
    out = np.zeros((len(paths), len(paths[0]), classes), np.float32)
    for n, path in enumerate(paths):
        for t, c in enumerate(path):
            out[n, t, c] = 5.0
    return out


def test_ctc_sequences_are_judged_after_decoding_like_an_ocr_user_would():
    """Mostly blank outputs: a flip at a character's edge changes no text; a changed character does."""
    f = [[0, 1, 1, 0, 0, 2, 0, 0, 3, 0, 0, 0]] * 4  # decodes to 1 2 3
    edge = [[0, 1, 0, 0, 0, 2, 2, 0, 3, 0, 0, 0]] * 4  # the same text, other positions
    c = _cmp("ctc", [_ctc(f)], [_ctc(edge)])
    assert c.top1_agreement < 0.9 and c.decoded_agreement == 1.0 and c.metric == "decoded" and c.level == "good"
    wrong = [[0, 1, 1, 0, 0, 4, 0, 0, 3, 0, 0, 0]] * 3 + [[0, 1, 1, 0, 0, 2, 0, 0, 3, 0, 0, 0]]  # 3 of 12 characters
    c = _cmp("ctc", [_ctc(f)], [_ctc(wrong)])
    assert c.top1_agreement == pytest.approx(45 / 48) and c.decoded_agreement == pytest.approx(0.75)
    assert c.level == "broken"
    # [T, N, C] (a recurrent recognizer's layout) gives the same.
    c2 = _cmp("ctc", [_ctc(f).transpose(1, 0, 2)], [_ctc(wrong).transpose(1, 0, 2)], samples=[4])
    assert c2.decoded_agreement == pytest.approx(0.75)


def test_a_dominant_background_in_maps_does_not_hide_disagreement_elsewhere():
    """Segmentation-style [N, C, H, W]: mostly background; agreement off the background class decides."""
    ref = np.zeros((1, 3, 10, 10), np.float32)
    ref[0, 0] = 5  # background everywhere...
    ref[0, 0, :1], ref[0, 1, :1] = 0, 5  # ...but one row of class 1
    got = ref.copy()
    got[0, 2, 0, :5] = 9  # half of it changes
    c = _cmp("seg", [ref], [got])
    assert c.top1_agreement == pytest.approx(0.95) and c.foreground_agreement == pytest.approx(0.5)
    assert c.metric == "top1-foreground" and c.value == pytest.approx(0.5) and c.level == "broken"


def test_probabilities_get_kl_and_embeddings_mean_cosine_and_integers_exact_agreement():
    r = np.random.default_rng(2)
    logits = r.normal(size=(8, 6))
    p = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    c = _cmp("output", [p], [p])
    assert c.kind == "classes" and c.kl == pytest.approx(0.0, abs=1e-7)
    emb = r.normal(size=(8, 32)).astype(np.float32)
    e = _cmp("sentence_embedding", [emb], [emb + 0.01 * r.normal(size=emb.shape).astype(np.float32)])
    assert e.kind == "embedding" and e.metric == "cosine" and 0.99 < e.mean_cosine < 1.0
    labels = np.tile(np.array([1, 2, 3, 4], np.int64), 10)
    lab = _cmp("label", [labels], [np.where(labels == 4, 0, labels)])
    assert lab.kind == "labels" and lab.top1_agreement == 0.75 and lab.level == "broken"
    boxes = r.normal(size=(1, 20, 4)).astype(np.float32)
    assert infer_kind("boxes", [boxes])[0] is OutputKind.VALUES
    assert _cmp("boxes", [boxes], [boxes]).metric == "sqnr"
    # The user's word wins over the guess.
    assert _cmp("output", [emb], [emb], kind=OutputKind.EMBEDDING).metric == "cosine"


def test_results_over_several_runs_equal_one_run_over_all_samples():
    r = np.random.default_rng(3)
    ref = r.normal(size=(10, 7)).astype(np.float32)
    got = ref + 0.3 * r.normal(size=ref.shape).astype(np.float32)
    whole = _cmp("y", [ref], [got])
    split = _cmp("y", [ref[:4], ref[4:]], [got[:4], got[4:]])
    assert whole.top1_agreement == split.top1_agreement
    assert whole.sqnr_db == pytest.approx(split.sqnr_db) and whole.cosine == pytest.approx(split.cosine)


def test_thresholds_levels_and_parsing():
    t = Threshold(0.99, 0.9)
    assert (t.level(0.995), t.level(0.95), t.level(0.85)) == (Level.GOOD, Level.DEGRADED, Level.BROKEN)
    parsed = Thresholds.parse(("top1=0.95:0.8", "sqnr=20:5"))
    assert parsed.top1 == Threshold(0.95, 0.8) and parsed.sqnr == Threshold(20, 5) and parsed.cosine == T.cosine
    for bad in ("top1=0.8", "kl=1:0", "top1=0.8:0.9", "top1=a:b"):
        with pytest.raises(ConfigError):
            Thresholds.parse((bad,))
    assert Level.UNVERIFIED.rank < Level.BROKEN.rank < Level.DEGRADED.rank < Level.GOOD.rank
    # Rates: broken only when the upper end of the one-sided 95% interval is below the bound.
    assert t.level(0.85, 20) is Level.DEGRADED and t.level(0.85, 2000) is Level.BROKEN
    assert wilson_upper(0.5, 100) == pytest.approx(0.5809, abs=1e-3)


def test_weight_error_is_mse_nmse_and_max_abs():
    w = np.array([1.0, -2.0, 3.0, 0.0], np.float32)
    mse, nmse, mx = weight_error(w, w + np.array([0.5, 0, -1.0, 0], np.float32))
    assert mse == pytest.approx(0.3125) and nmse == pytest.approx(0.3125 / 3.5) and mx == pytest.approx(1.0)


def test_next_token_logits_on_real_text_are_judged_by_perplexity():
    """Logits [N, T, V] over the token ids [N, T] the model read: the verdict is the float model's next-token
    perplexity over the quantized one's, where agreement would count flips on uncertain positions."""
    from mixq_onnx.numerics.metrics import next_token_nll

    r = np.random.default_rng(0)
    ids = r.integers(0, 16, (4, 12))
    ref = r.standard_normal((4, 12, 16)).astype(np.float32)
    ref[np.arange(4)[:, None], np.arange(11)[None], ids[:, 1:]] += 3.0  # the float model predicts the text well
    near = ref + np.float32(0.05) * r.standard_normal(ref.shape).astype(np.float32)
    far = ref + np.float32(1.5) * r.standard_normal(ref.shape).astype(np.float32)
    nll, n = next_token_nll(ref, ids)
    assert n == 4 * 11 and nll > 0
    good = compare_output("logits", [ref], [near], [4], T, tokens=[ids])
    assert good.metric == "perplexity" and good.level == "good"
    assert good.value == pytest.approx(good.perplexity_float / good.perplexity)
    assert math.exp(nll / n) == pytest.approx(good.perplexity_float)
    bad = compare_output("logits", [ref], [far], [4], T, tokens=[ids])
    assert bad.metric == "perplexity" and bad.level == "broken" and bad.perplexity > bad.perplexity_float * 1.25
    # Without the text, or with ids that do not index these logits, the same output is judged by agreement.
    assert compare_output("logits", [ref], [near], [4], T).metric == "top1"
    assert compare_output("logits", [ref], [near], [4], T, tokens=[ids[:, :5]]).metric == "top1"
