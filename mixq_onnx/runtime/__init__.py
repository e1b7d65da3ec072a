"""Everything that runs a model in ONNX Runtime (or PyTorch): generated inputs, calibration, end-to-end
sensitivity and plan measurements, SmoothQuant, block reconstruction, fusion analysis and verification."""
