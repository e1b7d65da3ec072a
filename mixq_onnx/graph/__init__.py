"""The graph layer: reading, inspecting and rewriting ONNX graphs (onnx, never onnxruntime).

io (load lazily, stream the output) -> find (the weights) -> rewrite (DequantizeLinear, Q/DQ pairs);
placement (where activation Q/DQ pairs go), check (a finished model against a target's rules),
blocks (cuts for block reconstruction), scopes (graphs, subgraphs and names).
"""
