"""Build OCR-class models with large inputs, for the calibration-cost benchmark (their weights are random).

    pip install torch && python tools/make_ocr_models.py OUT_DIR

Writes, in OUT_DIR:

- ``crnn_rec.onnx``: a CRNN text-line recognizer as OCR pipelines ship them,
  input ``[N, 3, 48, 320]``: a VGG-style backbone (3x3 convolutions 64-512,
  batch norm folded, pools that keep the width), a height-collapsing 3x1
  convolution, two bidirectional LSTMs (256 per direction) over the 80 time
  steps, and a 97-class projection, log-softmax, output ``[N, 80, 97]``.
  8.7M parameters.
- ``db_det.onnx``: a DBNet-style page detector, input ``[N, 3, 640, 640]``: a
  MobileNetV3-style backbone of inverted residual blocks (1x1 expand,
  depthwise 3x3/5x5, 1x1 project; strides to 1/32), a 4-level FPN to 96
  channels, and the probability head (conv, two transposed convolutions,
  sigmoid) at full resolution, output ``[N, 1, 640, 640]``.
- ``crnn_rec_calib/`` and ``db_det_calib/``: 32 calibration samples each,
  one ``.npz`` per sample: smooth random images (text-like stripes for the
  recognizer, blocks of stripes for the detector) in [0, 1].

The weights are random (seed 0, Kaiming-style scales): these models measure
how long quantization takes on the shapes OCR models have, not accuracy.
Exported by torch.onnx's TorchScript exporter at opset 17 with a dynamic
batch. Deterministic: the same command gives the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = 97
SAMPLES = 32


def recognizer():
    import torch
    from torch import nn

    def conv(i: int, o: int) -> list:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(
                *conv(3, 64), nn.MaxPool2d(2),                              # 24 x 160
                *conv(64, 128), nn.MaxPool2d(2),                            # 12 x 80
                *conv(128, 256), *conv(256, 256), nn.MaxPool2d((2, 1)),     # 6 x 80
                *conv(256, 512), *conv(512, 512), nn.MaxPool2d((2, 1)),     # 3 x 80
                nn.Conv2d(512, 512, (3, 1)), nn.BatchNorm2d(512), nn.ReLU(),  # 1 x 80
            )
            self.rnn = nn.LSTM(512, 256, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(512, CLASSES)

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            f = self.backbone(x).squeeze(2).permute(0, 2, 1)  # [N, T, C]
            y, _ = self.rnn(f)
            return torch.log_softmax(self.head(y), -1)

    return CRNN(), (1, 3, 48, 320), "image", "log_probs"


def detector():
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Block(nn.Module):
        """MobileNetV3's inverted residual: 1x1 expand, depthwise k x k, 1x1 project (residual when shapes match)."""

        def __init__(self, i: int, e: int, o: int, k: int, s: int) -> None:
            super().__init__()
            self.res = s == 1 and i == o
            self.body = nn.Sequential(
                nn.Conv2d(i, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish(),
                nn.Conv2d(e, e, k, s, k // 2, groups=e, bias=False), nn.BatchNorm2d(e), nn.Hardswish(),
                nn.Conv2d(e, o, 1, bias=False), nn.BatchNorm2d(o))

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            y = self.body(x)
            return x + y if self.res else y

    # (in, expand, out, kernel, stride) per block; stages end at strides 4, 8, 16, 32.
    cfg = [[(16, 16, 16, 3, 1), (16, 64, 24, 3, 2), (24, 72, 24, 3, 1)],
           [(24, 72, 40, 5, 2), (40, 120, 40, 5, 1), (40, 120, 40, 5, 1)],
           [(40, 240, 80, 3, 2), (80, 200, 80, 3, 1), (80, 184, 80, 3, 1), (80, 480, 112, 3, 1), (112, 672, 112, 3, 1)],
           [(112, 672, 160, 5, 2), (160, 960, 160, 5, 1), (160, 960, 160, 5, 1)]]

    class DB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
            self.stages = nn.ModuleList(nn.Sequential(*(Block(*b) for b in stage)) for stage in cfg)
            widths = [stage[-1][2] for stage in cfg]
            self.lateral = nn.ModuleList(nn.Conv2d(w, 96, 1, bias=False) for w in widths)
            self.smooth = nn.ModuleList(nn.Conv2d(96, 24, 3, padding=1, bias=False) for _ in widths)
            self.head = nn.Sequential(
                nn.Conv2d(96, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                nn.ConvTranspose2d(24, 24, 2, 2), nn.BatchNorm2d(24), nn.ReLU(),
                nn.ConvTranspose2d(24, 1, 2, 2), nn.Sigmoid())

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            x = self.stem(x)
            feats = []
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            lat = [l(f) for l, f in zip(self.lateral, feats)]
            for i in range(len(lat) - 2, -1, -1):
                lat[i] = lat[i] + F.interpolate(lat[i + 1], scale_factor=2.0, mode="nearest")
            size = lat[0].shape[-2:]
            fused = torch.cat([F.interpolate(s(l), size=size, mode="nearest") if k else s(l)
                               for k, (s, l) in enumerate(zip(self.smooth, lat))], 1)
            return self.head(fused)

    return DB(), (1, 3, 640, 640), "image", "probability"


def _init(net) -> None:
    """Kaiming-style random weights and non-trivial batch-norm statistics (folded into the convolutions at export)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        elif isinstance(m, nn.LSTM):
            for p in m.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def samples(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Smooth random images in [0, 1]: dark strokes on a light ground, as text lines and pages look."""
    _, c, h, w = shape
    ground = 0.8 + 0.2 * rng.random((1, c, 1, 1))
    img = np.broadcast_to(ground, (1, c, h, w)).copy()
    rows = [(0, h)] if kind == "line" else [(int(y), int(y) + int(rng.integers(12, 30))) for y in rng.integers(0, h - 30, 12)]
    for y0, y1 in rows:
        x = 0
        x_end = w if kind == "line" else int(rng.integers(w // 3, w))
        x = int(rng.integers(0, max(1, w - x_end) + 1)) if kind != "line" else 0
        while x < x_end:
            stroke = int(rng.integers(1, 4))
            img[0, :, y0 + (y1 - y0) // 5: y1 - (y1 - y0) // 5, x:x + stroke] *= 0.2
            x += stroke + int(rng.integers(1, 6))
    return np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1).astype(np.float32)


def build(out: Path) -> list[Path]:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make, kind in (("crnn_rec", recognizer, "line"), ("db_det", detector, "page")):
        net, shape, inp, outp = make()
        _init(net)
        net.eval()
        path = out / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(net, (torch.zeros(shape),), str(path), input_names=[inp], output_names=[outp],
                              opset_version=17, dynamo=False, dynamic_axes={inp: {0: "N"}, outp: {0: "N"}})
        folder = out / f"{name}_calib"
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(SAMPLES):
            np.savez(folder / f"{i:03d}.npz", **{inp: samples(shape, kind, rng)})
        written.append(path)
        print(f"wrote {path} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters) and {folder}")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    build(ap.parse_args().out)


if __name__ == "__main__":
    main()
