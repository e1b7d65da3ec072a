"""Pure numpy numerics: QuantizeLinear/DequantizeLinear (qdq), rounding methods, layer input statistics and
activation ranges. No onnx, no onnxruntime: each function can be tested alone against onnx's reference."""
